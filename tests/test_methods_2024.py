"""DGAD and ABSLD (nbs/16_methods_2024): one training step, and ABSLD's class temperatures over short epochs, against
references written out here from the official files each test names; bad options; training through `train`."""
import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adaad.checkpoint import read_checkpoint
from adaad.data import CifarSplit
from adaad.methods import get_method, training_loss
from adaad.methods_2024 import ABSLD, absld_update, swap_true_top
from adaad.models import create_model
from adaad.train import TrainConfig, resolve, train

from test_field_methods import grads, rel, tiny  # noqa: E402  (the same toy network and checks)

pytestmark = pytest.mark.usefixtures('one_thread')


def params(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


@pytest.fixture
def batch():
    "Float64 student, teacher and batch; half the labels are the teacher's clean prediction, half another class."
    torch.manual_seed(0)
    S, T = tiny(seed=0).double(), tiny(seed=1).double().eval()
    x = torch.rand(20, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad(): top = T(x).argmax(1)
    y = torch.where(torch.arange(20) % 2 == 0, top, (top + 1) % 10)
    return S, T, x, y


# ---- DGAD ----------------------------------------------------------------------------------------------------------
def official_adaad_inner(model, teacher, x_natural, step_size=2 / 255, steps=10, epsilon=8 / 255):
    """kunsaram01/DGAD AT_helper.py adaad_inner_loss (lines 8-48): eval-mode student and teacher, start x + 0.001 N
    (drawn here in the batch's dtype, on the CPU), sign steps on sum KL(T || S), projection and clipping each step."""
    model.eval(); teacher.eval()
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape, dtype=x_natural.dtype)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = nn.KLDivLoss(reduction='none')(F.log_softmax(model(x_adv), dim=1),
                                                     F.softmax(teacher(x_adv), dim=1))
            loss_kl = torch.sum(loss_kl)
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon), 0.0, 1.0)
    model.train()
    return torch.clamp(x_adv, 0.0, 1.0).detach()


def official_dgad_step(net, teacher_net, inputs, targets, alp_beta=1., epsilon=8 / 255, step_size=2 / 255):
    """kunsaram01/DGAD main.py, method 'DGAD' (lines 390-447) with --alp on, a student other than mobilenetV2 and a full
    batch (--bs = the batch's size). Returns the loss and the two swap masks (on x: the teacher wrong; on x~)."""
    bs = len(inputs)
    adv_inputs = official_adaad_inner(net, teacher_net, inputs, step_size=step_size, epsilon=epsilon)
    net.train()
    ori_outputs = net(inputs)
    adv_outputs = net(adv_inputs)
    KL_loss = nn.KLDivLoss(reduction='none')
    with torch.no_grad():
        teacher_net.eval()
        t_ori_outputs = teacher_net(inputs)
        t_adv_outputs = teacher_net(adv_inputs)
    Lambda = torch.zeros(inputs.size(0))
    t_misclassified_group = torch.argmax(t_ori_outputs, dim=1) != targets
    Lambda[t_misclassified_group] = 1.0
    num_lambda = Lambda.sum().item()
    ori_true_probs = torch.gather(t_ori_outputs, 1, targets.unsqueeze(1)).squeeze()
    ori_max_probs, ori_max_indices = torch.max(t_ori_outputs, dim=1)
    g = t_misclassified_group
    t_ori_outputs[g, targets[g]] = ori_max_probs[g]
    t_ori_outputs[g, ori_max_indices[g]] = ori_true_probs[g]
    correct_probs = torch.gather(t_adv_outputs, 1, targets.unsqueeze(1)).squeeze()
    max_probs, max_indices = torch.max((t_adv_outputs.scatter(1, targets.unsqueeze(1), -float('inf'))), dim=1)
    mask = correct_probs - max_probs < 0
    t_adv_outputs[mask, targets[mask]] = max_probs[mask]
    t_adv_outputs[mask, max_indices[mask]] = correct_probs[mask]
    loss_clean = (1 / (num_lambda + 1e-10)) * torch.sum(
        Lambda * KL_loss(F.log_softmax(ori_outputs, dim=1), F.softmax(t_ori_outputs.detach(), dim=1)).sum(dim=1))
    loss_adv = (1 / (len(adv_inputs) - num_lambda)) * torch.sum(
        (1 - Lambda) * KL_loss(F.log_softmax(adv_outputs, dim=1), F.softmax(t_adv_outputs.detach(), dim=1)).sum(dim=1))
    loss_alp = nn.MSELoss()(F.softmax(adv_outputs, dim=1), F.softmax(ori_outputs, dim=1))
    loss = (num_lambda / bs) * loss_clean + ((bs - num_lambda) / bs) * loss_adv + alp_beta * loss_alp
    return loss, g, mask


def test_swap_true_top_is_the_scripts_two_swaps():
    "main.py swaps on x where argmax T(x) != y (lines 416-419), on x~ where the true logit is below another (422-427)."
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(50, 10, generator=g, dtype=torch.float64), torch.randint(0, 10, (50,), generator=g)
    z[0, 3] = z[0, y[0]] = z[0].max() + 1                                  # a tie at the top: nothing to swap
    want = z.clone()
    true = want.gather(1, y[:, None]).squeeze(1)
    top, at = want.scatter(1, y[:, None], -float('inf')).max(1)
    m = true < top
    want[m, y[m]], want[m, at[m]] = top[m], true[m]
    got = swap_true_top(z, y)
    assert torch.equal(got, want) and m.sum() > 20 and (got.argmax(1) == y)[1:].all()
    assert torch.equal(got.sort(1).values, z.sort(1).values)               # a permutation of each row's logits


@pytest.mark.parametrize('kw', [{}, dict(consistency_weight=0.),
                                dict(consistency_weight=3., eps=64 / 255, step_size=16 / 255)])
def test_dgad_one_step_matches_main_py(batch, kw):
    "Inner point, loss, student gradient and BatchNorm statistics equal to main.py's DGAD step at the same start."
    S, T, x, y = batch
    s1, s2 = copy.deepcopy(S), copy.deepcopy(S)
    torch.manual_seed(7); ours, _ = training_loss(get_method('dgad', **kw), s1, T, x, y, num_classes=10)
    torch.manual_seed(7)
    theirs, clean_wrong, adv_wrong = official_dgad_step(s2, T, x, y, kw.get('consistency_weight', 1.),
                                                        kw.get('eps', 8 / 255), kw.get('step_size', 2 / 255))
    ours.backward(); theirs.backward()
    assert rel(ours, theirs) < 1e-10 and rel(grads(s1), grads(s2)) < 1e-9, (ours.item(), theirs.item())
    assert torch.allclose(s1[1].running_mean, s2[1].running_mean, atol=1e-12)   # S(x), then S(x~), as the script
    assert 0 < clean_wrong.sum() < len(y) and all(p.grad is None for p in T.parameters())
    if 'eps' in kw: assert (adv_wrong & ~clean_wrong).any()              # an example swapped on x~ only


def test_dgad_partitions_and_swaps():
    "An example the teacher misclassifies on x is taught on x only; the target ranks the true class first."
    from adaad.methods_2024 import dgad_loss
    g = torch.Generator().manual_seed(1)
    sa, sn = (torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    t = torch.randn(4, 5, generator=g, dtype=torch.float64)
    y = t.argmax(1); y[0] = (y[0] + 1) % 5                                   # the teacher is wrong on example 0 only
    dgad_loss(sa, sn, t, t, y, consistency_weight=0.).backward()
    assert sn.grad[0].abs().sum() > 0 and sn.grad[1:].abs().sum() == 0      # example 0: clean only
    assert sa.grad[0].abs().sum() == 0 and sa.grad[1:].abs().sum() > 0      # the others: adversarial only
    assert (swap_true_top(t, y).argmax(1) == y).all()


# ---- ABSLD ---------------------------------------------------------------------------------------------------------
def official_absld_inner_loss(model, teacher_logits, x_natural, y, optimizer, step_size=2 / 255, epsilon=8 / 255,
                              perturb_steps=10):
    """zhaoshiji123/ABSLD absld_loss.py absld_inner_loss (lines 26-59): eval-mode student, start x + 0.001 N (drawn in
    the batch's dtype, on the CPU), sign steps on sum KL(softmax(target) || S); returns S(x~) in train mode."""
    criterion_kl = nn.KLDivLoss(reduction='none')
    model.eval()
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape, dtype=x_natural.dtype)
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = torch.sum(criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(teacher_logits, dim=1)))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon), 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    optimizer.zero_grad()
    return model(x_adv)


def official_absld_epoch(student, teacher, data, optimizer, temp_adv, temp_nat, rate, seeds, shared=True):
    """zhaoshiji123/ABSLD resnet18_absld_cifar10.py, one epoch: the batch loop (lines 85-127) and the temperature update
    (lines 177-189). `shared=False` is the other reading: the two targets as separate tensors (the script's
    `.detach()` makes them views of one tensor, so both are divided by both temperatures)."""
    kl_loss = lambda a, b: -a * b + torch.log(b + 1e-5) * b                  # line 58
    ce_loss = nn.CrossEntropyLoss(reduction='none')
    total_adv, total_nat = torch.zeros(10), torch.zeros(10)
    losses = []
    for (x, y), seed in zip(data, seeds):
        student.train()
        optimizer.zero_grad()
        with torch.no_grad():
            teacher_logits = teacher(x).detach()
            new_adv = teacher_logits.detach() if shared else teacher_logits.clone()
            new_nat = teacher_logits.detach() if shared else teacher_logits.clone()
            for i in range(y.shape[0]):
                new_adv[i] = new_adv[i] / temp_adv[y[i]]
                new_nat[i] = new_nat[i] / temp_nat[y[i]]
        torch.manual_seed(seed)
        adv_logits = official_absld_inner_loss(student, new_adv, x, y, optimizer)
        student.train()
        nat_logits = student(x)
        with torch.no_grad():
            rec_adv, rec_nat = ce_loss(adv_logits.detach(), y), ce_loss(nat_logits.detach(), y)
            for i in range(y.shape[0]):
                total_adv[y[i]] = total_adv[y[i]] + rec_adv[i]
                total_nat[y[i]] = total_nat[y[i]] + rec_nat[i]
        kl1 = torch.mean(kl_loss(torch.log(F.softmax(adv_logits, dim=1)), F.softmax(new_adv.detach(), dim=1)))
        kl2 = torch.mean(kl_loss(torch.log(F.softmax(nat_logits, dim=1)), F.softmax(new_nat.detach(), dim=1)))
        loss = 5.0 / 6.0 * kl1 + 1.0 / 6.0 * kl2
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    gap = total_adv - torch.mean(total_adv)
    temp_adv = torch.clamp(temp_adv - rate * gap / torch.max(torch.abs(gap)), 0.5, 5)
    gap = total_nat - torch.mean(total_nat)
    temp_nat = torch.clamp(temp_nat - rate * gap / torch.max(torch.abs(gap)), 0.5, 5)
    return losses, total_adv, total_nat, temp_adv, temp_nat


def our_absld_epoch(m, student, teacher, data, optimizer, state, epoch, seeds):
    "The same epoch through `training_loss` with the method's state, then `end_epoch`."
    losses = []
    for (x, y), seed in zip(data, seeds):
        optimizer.zero_grad()
        torch.manual_seed(seed)
        loss, _ = training_loss(m, student, teacher, x, y, epoch=epoch, num_classes=10, state=state)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    sums = state['loss_adv'].clone(), state['loss_nat'].clone()
    m.end_epoch(state, epoch)
    return losses, sums


def _batches(n=3, b=20):
    g = torch.Generator().manual_seed(2)
    return [(torch.rand(b, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (b,), generator=g))
            for _ in range(n)]


@pytest.mark.parametrize('temperatures', ['product', 'separate'])
def test_absld_two_epochs_match_the_script(temperatures):
    """Two epochs of three SGD steps: each step's loss, the class-wise loss sums, the temperatures after each epoch and
    the final weights equal the script's; the second epoch trains with the temperatures the first one learnt (both sides
    with ours: the float32 sums, added in another order, give temperatures one float32 rounding apart)."""
    T = tiny(seed=1).double().eval()
    s1, s2 = tiny(seed=0).double(), tiny(seed=0).double()
    o1, o2 = (torch.optim.SGD(s.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4) for s in (s1, s2))
    m = get_method('absld', temperatures=temperatures)
    st = m.new_state(10)
    ta, tn = torch.ones(10), torch.ones(10)
    for epoch, seeds in ((0, (11, 12, 13)), (1, (14, 15, 16))):
        data = _batches()
        ours, (sum_adv, sum_nat) = our_absld_epoch(m, s1, T, data, o1, st, epoch, seeds)
        theirs, tot_adv, tot_nat, ta, tn = official_absld_epoch(s2, T, data, o2, ta, tn, 0.1, seeds,
                                                                shared=temperatures == 'product')
        assert all(rel(a, b) < 1e-9 for a, b in zip(ours, theirs)), (epoch, ours, theirs)
        assert torch.allclose(sum_adv, tot_adv, rtol=1e-6) and torch.allclose(sum_nat, tot_nat, rtol=1e-6)
        assert torch.allclose(st['temp_adv'], ta, atol=1e-6) and torch.allclose(st['temp_nat'], tn, atol=1e-6)
        ta, tn = st['temp_adv'].clone(), st['temp_nat'].clone()   # the float32 class sums round apart by ~1 ulp
        assert st['loss_adv'].sum() == 0 and st['loss_nat'].sum() == 0
    assert rel(params(s1), params(s2)) < 1e-9 and torch.allclose(s1[1].running_mean, s2[1].running_mean, atol=1e-12)
    assert (st['temp_adv'] - 1).abs().max() > 0.05 and st['temp_adv'].unique().numel() > 2


def test_absld_readings_differ_once_temperatures_do():
    "With learnt temperatures, the script's shared target and the separate reading give different losses."
    S, T = tiny(seed=0).double(), tiny(seed=1).double().eval()
    x, y = _batches(1)[0]
    st = ABSLD().new_state(10)
    st['temp_adv'].copy_(torch.linspace(0.6, 2., 10)); st['temp_nat'].copy_(torch.linspace(1.5, 0.8, 10))
    loss = {}
    for t in ('product', 'separate'):
        torch.manual_seed(3)
        m = get_method('absld', temperatures=t)
        loss[t] = training_loss(m, copy.deepcopy(S), T, x, y, state=copy.deepcopy(st))[0]
    torch.manual_seed(3); plain = training_loss('rslad', copy.deepcopy(S), T, x, y)[0]
    assert rel(loss['product'], loss['separate']) > 1e-3 and rel(loss['separate'], plain) > 1e-3


def test_absld_step_follows_the_learning_rate():
    "resnet18_absld_cifar10.py lines 173-176: the step is x0.1 with the LR, before the update of epochs 215, 260, 285."
    m = ABSLD()
    steps = [m.step_at(e) for e in (0, 213, 214, 258, 259, 284, 299)]
    assert steps == pytest.approx([.1, .1, .01, .01, 1e-3, 1e-4, 1e-4])
    assert [ABSLD(step_milestones=[2]).step_at(e) for e in (0, 1, 2)] == pytest.approx([.1, .01, .01])
    t = absld_update(torch.ones(3), torch.tensor([4., 1., 1.]), 0.1)
    assert torch.allclose(t, torch.tensor([0.9, 1.05, 1.05]))
    assert torch.equal(absld_update(torch.full((3,), 2.), torch.full((3,), 7.), 0.1), torch.full((3,), 2.))   # no gap
    assert torch.equal(absld_update(torch.tensor([0.55, 4.98]), torch.tensor([9., 0.]), 0.1), torch.tensor([0.5, 5.]))


# ---- bad options ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name, kw, msg', [
    ('dgad', dict(consistency_weight=-1.), r"dgad: consistency_weight must be >= 0 \(beta"),
    ('dgad', dict(consistency_weight='on'), 'dgad: consistency_weight must be'),
    ('dgad', dict(tau=30.), 'dgad takes no tau; accepted: consistency_weight'),
    ('absld', dict(temperatures='mean'), r"temperatures must be one of .*'product'.*'separate'"),
    ('absld', dict(min_temperature=0.), 'absld: min_temperature must be > 0'),
    ('absld', dict(min_temperature=6.), 'absld: min_temperature must be <= max_temperature'),
    ('absld', dict(temperature_step=-0.1), r'absld: temperature_step must be >= 0 \(eta'),
    ('absld', dict(step_milestones=[-1]), 'absld: step_milestones must be a sequence of epochs'),
    ('absld', dict(step_milestones='215'), 'absld: step_milestones must be a sequence of epochs')])
def test_bad_options_are_refused_by_name(name, kw, msg):
    with pytest.raises(ValueError, match=msg): get_method(name, **kw)
    with pytest.raises(ValueError, match=list(kw)[0]): resolve(TrainConfig(method=name, method_kwargs=kw))


def test_registered_with_the_registry_and_recorded():
    "A fresh interpreter that imports only adaad.methods knows both names (the trainer's and the CLI's registry)."
    code = "from adaad.methods import known_methods; assert {'dgad', 'absld'} <= set(known_methods())"
    subprocess.run([sys.executable, '-c', code], check=True)
    cfg = resolve(TrainConfig(method='absld', epochs=20, method_kwargs=dict(step_milestones=[15])))
    assert (cfg.epochs, cfg.milestones, cfg.weight_decay) == (20, (215, 260, 285), 2e-4)
    recorded = json.loads(json.dumps(cfg.method_kwargs))                   # as config.json holds it
    assert get_method('absld', **recorded) == get_method('absld', step_milestones=(15,))
    a = get_method('absld')
    assert (a.temperatures, a.temperature_step, a.min_temperature, a.max_temperature, a.step_milestones) == ('product', .1, .5, 5., None)
    assert (a.epochs, a.milestones, a.weight_decay, a.budget.eps, a.budget.step_size, a.budget.init) == (
        300, (215, 260, 285), 2e-4, 8 / 255, 2 / 255, 'gaussian')
    d = resolve(TrainConfig(method='dgad'))
    assert (d.epochs, d.milestones, d.weight_decay, d.batch_size) == (200, (100, 150), 5e-4, 128)
    assert d.method_kwargs == dict(consistency_weight=1., init='gaussian', attack_bn='eval')


# ---- through train -------------------------------------------------------------------------------------------------
def _data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (48, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(48) % 10
    return CifarSplit(x[:32], y[:32], 10, split='train'), CifarSplit(x[32:], y[32:], 10, split='test')


def _cfg(name):
    return TrainConfig(method=name, student='wrn-10-1', epochs=2, batch_size=16, steps=2, val_n=8, val_steps=1,
                       milestones=(1,), method_kwargs=dict(step_milestones=(1,)) if name == 'absld' else {})


@pytest.mark.parametrize('name', ['dgad', 'absld'])
def test_trains_through_train(tmp_path, name):
    torch.manual_seed(5); teacher = create_model('wrn-10-1').eval()
    out = train(_cfg(name), teacher=teacher, out_dir=tmp_path, device='cpu', progress=False, data=_data())
    assert out['status'] == 'done'
    log = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in log] == [0, 1] and all(r['loss'] > 0 for r in log)
    st = read_checkpoint(tmp_path / 'last.pt').get('method_state')
    if name == 'dgad': assert st is None
    else:   # the temperatures after the last epoch, the sums reset
        assert st['loss_adv'].sum() == 0 and st['temp_adv'].unique().numel() > 1
        assert ((st['temp_adv'] >= 0.5) & (st['temp_adv'] <= 5) & (st['temp_nat'] >= 0.5) & (st['temp_nat'] <= 5)).all()


def test_absld_resumes_exactly(tmp_path):
    "Pausing after every step and resuming gives bit-identical weights and temperatures: the state is checkpointed."
    torch.manual_seed(5); teacher = create_model('wrn-10-1').eval()
    a = train(_cfg('absld'), teacher=teacher, out_dir=tmp_path / 'a', device='cpu', progress=False, data=_data())
    while True:
        b = train(_cfg('absld'), teacher=teacher, out_dir=tmp_path / 'b', device='cpu', progress=False, data=_data(),
                  time_limit=1e-9)
        if b['status'] == 'done': break
    sa, sb = a['model'].state_dict(), b['model'].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ca, cb = (read_checkpoint(tmp_path / d / 'last.pt')['method_state'] for d in 'ab')
    assert all(torch.equal(ca[k], cb[k]) for k in ca) and ca['temp_nat'].unique().numel() > 1


@pytest.mark.parametrize('method,field', [('absld', 'step_milestones'), ('mtard', 'share_rate_milestones')])
def test_step_milestones_that_do_not_fit_the_run_warn(method, field):
    """ABSLD's temperature step and MTARD's share step drop at their scripts' epochs (215, 260, 285 of 300) unless told:
    a run of another length is warned once (also under Fair-ARD), milestones past its end are named, fitting ones are
    silent."""
    import warnings
    with pytest.warns(UserWarning, match=rf"{method}: .* drops at its script's epochs \(215, 260, 285\) of 300, but "
                                         rf"this run has 8 epochs: pass {field}="):
        resolve(TrainConfig(method=method, epochs=8))
    with pytest.warns(UserWarning, match=rf"{field} \[9\] lie past the run's 8 epochs"):
        resolve(TrainConfig(method=method, epochs=8, method_kwargs={field: (6, 9)}))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        resolve(TrainConfig(method=method, epochs=8, method_kwargs={field: (6,)}))
        resolve(TrainConfig(method=method))                                   # the script's 300 epochs
    if method == 'mtard':
        with pytest.warns(UserWarning, match=f'pass {field}='):
            resolve(TrainConfig(method='fair-ard', epochs=8, method_kwargs=dict(base='mtard')))
