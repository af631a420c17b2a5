"""Adversarial weight perturbation (AWP, notebook 12) and the methods trades-awp and pgd-at-awp (notebook 16): one
float64 training step against a step written from the official files of csdongxian/AWP (trades_AWP/utils_awp.py,
trades_AWP/train_trades_cifar.py, AT_AWP/utils_awp.py, AT_AWP/train_cifar10.py; lines cited below), on the perturbed,
the updated and the restored weights, BatchNorm buffers and x~; the perturbation's size; the warm-up; the trainer with
a pause and resume; the refusal of bad values."""
import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import adaad.methods as M
import adaad.train
from adaad.checkpoint import read_checkpoint
from adaad.data import CifarSplit
from adaad.train import (TrainConfig, add_into_weights, awp_facts, awp_loss, awp_weights, check_identity, resolve,
                         resolve_run, run_identity, train)
from test_field_methods import tiny

pytestmark = pytest.mark.usefixtures('one_thread')
RTOL, ATOL = 1e-10, 1e-13
# ---- the official step, from the files ----------------------------------------------------------------------------
def diff_in_weights(model, proxy, eps=1e-20):
    "utils_awp.py:8-18: over the state dicts, each 'weight' of more than one axis: ||w|| / (||d|| + EPS) * d."
    out = {}
    for (k, w), (_, w2) in zip(model.state_dict().items(), proxy.state_dict().items()):
        if w.dim() > 1 and 'weight' in k: out[k] = w.norm() / ((w2 - w).norm() + eps) * (w2 - w)
    return out


def add_weights(model, diff, coeff):
    "utils_awp.py:21-26."
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k in diff: p.add_(coeff * diff[k])


def calc_awp(model, proxy, lr, proxy_loss):
    "utils_awp.py:37-53 (TradesAWP) and AT_AWP/utils_awp.py:37-47: the proxy reloaded, train mode, one SGD step."
    proxy.load_state_dict(model.state_dict()); proxy.train()
    opt = torch.optim.SGD(proxy.parameters(), lr=lr)      # train_trades_cifar.py:279 (lr=args.lr), train_cifar10.py:241
    loss = -proxy_loss(proxy)
    opt.zero_grad(); loss.backward(); opt.step()
    return diff_in_weights(model, proxy)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trades_kl(adv, nat):
    return F.kl_div(F.log_softmax(adv, dim=1), F.softmax(nat, dim=1), reduction='batchmean')


def official_trades_awp_step(model, proxy, opt, x, y, gamma=0.005, beta=6., eps=8/255, step=2/255, steps=10,
                             awp=True):
    "train_trades_cifar.py:101-120 (perturb_input, l_inf) and 177-206 (train): snapshots perturbed, updated, restored."
    model.eval()
    x_adv = x.detach() + 0.001 * torch.randn(x.shape, dtype=x.dtype)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1), reduction='sum')
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step * torch.sign(grad.detach())
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0., 1.)
    model.train()
    if awp:
        diff = calc_awp(model, proxy, 0.1, lambda p: F.cross_entropy(p(x), y) + beta * trades_kl(p(x_adv), p(x)))
        add_weights(model, diff, gamma)
    logits_adv = model(x_adv)
    loss_robust = trades_kl(logits_adv, model(x))
    loss = F.cross_entropy(model(x), y) + beta * loss_robust
    perturbed = weights(model)                   # with the buffers its passes moved, as the library's loss leaves them
    opt.zero_grad(); loss.backward(); opt.step()
    updated = weights(model)
    if awp: add_weights(model, diff, -gamma)
    return dict(x_adv=x_adv, perturbed=perturbed, updated=updated, restored=weights(model))


def official_at_awp_step(model, proxy, opt, x, y, gamma=0.01, eps=8/255, alpha=2/255, steps=10, pick_and_log=False):
    """train_cifar10.py:72-125 (attack_pgd, l_inf, one restart, the model in train mode as the previous step left it)
    and 336-365 (the step; its inputs without the script's normalisation, which the toy network does not have)."""
    model.train()
    delta = torch.zeros_like(x).uniform_(-eps, eps)
    delta = torch.max(torch.min(delta, 1 - x), 0 - x)
    delta.requires_grad = True
    for _ in range(steps):
        loss = F.cross_entropy(model(x + delta), y)
        grad, = torch.autograd.grad(loss, [delta])
        d = torch.clamp(delta + alpha * torch.sign(grad), min=-eps, max=eps)
        delta.data = torch.max(torch.min(d, 1 - x), 0 - x).detach()
    if pick_and_log:
        with torch.no_grad(): model(x + delta)
    x_adv = torch.clamp(x + delta.detach(), 0, 1)
    diff = calc_awp(model, proxy, 0.01, lambda p: F.cross_entropy(p(x_adv), y))
    add_weights(model, diff, gamma)
    loss = F.cross_entropy(model(x_adv), y)
    perturbed = weights(model)
    opt.zero_grad(); loss.backward(); opt.step()
    updated = weights(model)
    add_weights(model, diff, -gamma)
    if pick_and_log:
        with torch.no_grad(): model(x)
    return dict(x_adv=x_adv, perturbed=perturbed, updated=updated, restored=weights(model))


# ---- the library's step, as train_epoch runs a batch ----------------------------------------------------------------
def library_step(method, model, opt, x, y, epoch=0, faithful=True, **cfg):
    """resolve_run, awp_loss (or training_loss before the warm-up), the SGD step, the direction removed and the passes
    after the step (`after_step`, when faithful), as train_epoch runs a batch: snapshots."""
    c, m = resolve_run(TrainConfig(method=method, faithful=faithful, **cfg))
    points = []
    inner = M.inner_point
    def record(*a):
        points.append(inner(*a)); return points[-1]
    M.inner_point = record
    try:
        if adaad.train.awp_on(c, epoch):
            loss, diff = awp_loss(m, model, model, copy.deepcopy(model), None, x, y, c.awp_gamma, awp_facts(m)[2],
                                  epoch=epoch, num_classes=10, faithful=faithful)
        else: (loss, _), diff = M.training_loss(m, model, None, x, y, epoch=epoch, faithful=faithful), None
    finally: M.inner_point = inner
    perturbed = weights(model)
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    updated = weights(model)
    if diff is not None: add_into_weights(model, diff, -c.awp_gamma)
    if faithful: M.after_step(m, model, x, epoch)
    return dict(x_adv=points[-1], perturbed=perturbed, updated=updated, restored=weights(model))


def sgd(model, wd=5e-4):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=wd)


def batch(n=16, seed=0):
    "Float64 images in [0.1, 0.9] (no clip into [0, 1] binds within 8/255), every class present."
    g = torch.Generator().manual_seed(seed)
    return 0.1 + 0.8 * torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64), torch.arange(n) % 10


def compare(ours, theirs):
    assert ours.keys() == theirs.keys()
    for k in ('x_adv', 'perturbed', 'updated', 'restored'):
        a, b = ours[k], theirs[k]
        if k == 'x_adv': a, b = {'x_adv': a}, {'x_adv': b}
        assert a.keys() == b.keys()
        for n in b: torch.testing.assert_close(a[n], b[n], rtol=RTOL, atol=ATOL, msg=lambda m: f'{k} {n}: {m}')


def two_steps(method, official, faithful=True, **kw):
    """Two consecutive steps (epoch 0, AWP on) of the library (`faithful=True` unless said) and of the official code
    from one float64 start and RNG."""
    S = tiny(seed=0).double()
    ours_net, theirs_net = copy.deepcopy(S), copy.deepcopy(S)
    o_opt, t_opt, proxy = sgd(ours_net), sgd(theirs_net), tiny(seed=5).double()
    ours, theirs = [], []
    for i in range(2):
        x, y = batch(seed=i)
        torch.manual_seed(10 + i); ours.append(library_step(method, ours_net, o_opt, x, y, faithful=faithful, steps=3,
                                                         awp_warmup=0))
        torch.manual_seed(10 + i); theirs.append(official(theirs_net, proxy, t_opt, x, y, steps=3, **kw))
    return ours, theirs


# ---- the tests ------------------------------------------------------------------------------------------------------
def test_trades_awp_takes_the_official_step():
    "Two TRADES-AWP steps: x~, the perturbed, updated and restored weights and the BatchNorm buffers, to rounding."
    ours, theirs = two_steps('trades-awp', official_trades_awp_step)
    for o, t in zip(ours, theirs): compare(o, t)
    assert not torch.equal(ours[0]['perturbed']['0.weight'], ours[0]['restored']['0.weight'])


def test_at_awp_takes_the_official_step():
    """Two AT-AWP steps (train-mode ascent, uniform start) with `faithful=True`: the script's train-mode pass at x~ that
    picks the best restart (AT_AWP/train_cifar10.py:122) and its pass at x after the step for the log (:365) included,
    so the BatchNorm buffers agree too."""
    ours, theirs = two_steps('pgd-at-awp', official_at_awp_step, pick_and_log=True)
    for o, t in zip(ours, theirs): compare(o, t)


def test_at_awp_by_default_drops_the_pick_and_log_passes():
    "The default runs neither extra pass: the script without them is its trajectory, the script with them is not."
    ours, theirs = two_steps('pgd-at-awp', official_at_awp_step, faithful=False)
    for o, t in zip(ours, theirs): compare(o, t)
    _, with_passes = two_steps('pgd-at-awp', official_at_awp_step, faithful=False, pick_and_log=True)
    with pytest.raises(AssertionError, match='running_mean'): compare(ours[0], with_passes[0])


def test_the_trainer_runs_the_extra_passes_when_faithful(tmp_path, monkeypatch):
    """`train` with pgd-at-awp: after one batch, faithful=True has counted two more train-mode BatchNorm passes than the
    default (the pick at x~ and the pass at x after the step), on top of the inner steps' and the loss's."""
    monkeypatch.setattr(adaad.train, 'create_model', toy)
    cfg = TrainConfig(method='pgd-at-awp', student='toy', epochs=1, batch_size=16, steps=2, val_n=8, val_steps=1,
                      diagnostics=False)
    counts = {}
    for faithful in (False, True):
        out = tmp_path / str(faithful)
        r = train(dataclasses.replace(cfg, faithful=faithful), out_dir=out, device='cpu', progress=False,
                  data=toy_data(), time_limit=1e-9)
        assert r['status'] == 'paused'
        counts[faithful] = int(read_checkpoint(out / 'last.pt')['state_dict']['1.num_batches_tracked'])
    assert counts == {False: 2 + 1, True: 2 + 1 + 2}, counts


def test_the_reference_sees_a_missing_perturbation():
    "The comparison fails when the reference skips AWP: the step would pass without the option."
    ours, theirs = two_steps('trades-awp', official_trades_awp_step, awp=False)
    with pytest.raises(AssertionError, match='perturbed 0.weight'): compare(ours[0], theirs[0])


def test_the_perturbation_is_gamma_times_each_weights_norm():
    "||w~ - w|| = gamma ||w|| for conv and linear weights; BatchNorm weights, biases and buffers untouched."
    S, (x, y) = tiny(seed=0).double(), batch()
    before = weights(S)
    m = M.get_method('pgd-at-awp', steps=2)
    _, diff = awp_loss(m, S, S, copy.deepcopy(S), None, x, y, 0.02, 0.01)
    assert sorted(diff) == sorted(awp_weights(S)) == ['0.weight', '5.weight']
    for k, p in S.named_parameters():
        d = (p - before[k]).norm()
        if k in diff: torch.testing.assert_close(d, 0.02 * before[k].norm(), rtol=1e-12, atol=0)
        else: assert d == 0, k


def test_warmup_is_respected():
    "Before awp_warmup the step is the base method's (no perturbation); from it on, AWP's; trades-awp's default is 9."
    assert [resolve(TrainConfig(method='trades-awp', epochs=e)).awp_warmup for e in (200, 100, 8)] == [9, 4, 0]
    assert resolve(TrainConfig(method='pgd-at-awp')).awp_warmup == 0
    S, (x, y) = tiny(seed=0).double(), batch()
    steps = {}
    for epoch in (1, 2):
        net = copy.deepcopy(S)
        torch.manual_seed(0)
        steps[epoch] = library_step('trades-awp', net, sgd(net), x, y, epoch=epoch, steps=2, epochs=4, awp_warmup=2)
    assert torch.equal(steps[1]['perturbed']['0.weight'], S.state_dict()['0.weight'])
    assert not torch.equal(steps[2]['perturbed']['0.weight'], S.state_dict()['0.weight'])
    c = resolve(TrainConfig(method='trades-awp', epochs=4, awp_warmup=2))
    assert [adaad.train.awp_on(c, e) for e in range(4)] == [False, False, True, True]


def test_defaults_are_the_official_scripts():
    "The AWP scripts' gamma, warm-up, epochs, schedule, weight decay, beta and budget; off for the other methods."
    t, a = resolve(TrainConfig(method='trades-awp')), resolve(TrainConfig(method='pgd-at-awp'))
    assert (t.awp_gamma, t.awp_warmup, t.epochs, t.milestones, t.weight_decay, t.method_kwargs['kl_weight'],
            t.eps, t.step_size, t.steps) == (0.005, 9, 200, (99, 149), 5e-4, 6., 8/255, 2/255, 10)
    assert (a.awp_gamma, a.awp_warmup, a.epochs, a.milestones, a.weight_decay, a.eps, a.step_size,
            a.method_kwargs['init'], a.method_kwargs['attack_bn']) == (0.01, 0, 200, (100, 150), 5e-4, 8/255, 2/255,
                                                                      'uniform', 'train')
    assert awp_facts(M.get_method('trades-awp'))[2] == 0.1 and awp_facts(M.get_method('pgd-at-awp'))[2] == 0.01
    for name in ('trades', 'pgd-at', 'adaad'):
        c = resolve(TrainConfig(method=name))
        assert (c.awp_gamma, c.awp_warmup) == (None, None), name
    c = resolve(TrainConfig(method='adaad', awp_gamma=0.01))            # any method can use it
    assert (c.awp_gamma, c.awp_warmup) == (0.01, 0)
    assert resolve(TrainConfig(method='trades-awp', awp_gamma=0.)).awp_warmup is None   # the scripts' --awp-gamma 0
    assert 'trades-awp' in M.known_methods() and 'pgd-at-awp' in M.known_methods()


@pytest.mark.parametrize('kw,msg', [
    (dict(awp_gamma=-0.1), 'awp_gamma must be a finite number >= 0'),
    (dict(awp_gamma=float('nan')), 'awp_gamma must be a finite number >= 0'),
    (dict(awp_warmup=-1), 'awp_warmup must be'),
    (dict(awp_warmup=1.5), 'awp_warmup must be'),
    (dict(method='pgd-at', awp_warmup=2), 'awp_warmup needs awp_gamma > 0'),
    (dict(method='trades-awp', awp_gamma=0., awp_warmup=2), 'awp_warmup needs awp_gamma > 0'),
    (dict(method='trades-awp', epochs=5, awp_warmup=5), 'awp_warmup must be < epochs (5)')])
def test_bad_values_are_named(kw, msg):
    with pytest.raises(ValueError, match=msg.replace('(', r'\(').replace(')', r'\)')): resolve(TrainConfig(**kw))


def test_a_run_from_before_awp_is_the_same_run(tmp_path):
    "A folder whose identity predates awp_gamma and awp_warmup is still recognised (non-AWP methods keep None)."
    ident = run_identity(TrainConfig(method='pgd-at', epochs=2))
    old = json.loads(json.dumps(ident, default=str))
    for k in ('awp_gamma', 'awp_warmup'): del old['config'][k]
    (tmp_path / 'identity.json').write_text(json.dumps(old)); (tmp_path / 'last.pt').touch()
    check_identity(tmp_path, ident)
    with pytest.raises(ValueError, match='config.awp_gamma'):
        check_identity(tmp_path, run_identity(TrainConfig(method='pgd-at', epochs=2, awp_gamma=0.01)))


def toy(name=None, num_classes=10, **kw):
    "The `tiny` network for any architecture name, its seed drawn from the global RNG (which the trainer seeds)."
    return tiny(num_classes, seed=int(torch.randint(2 ** 31, (), device='cpu')))


def toy_data(n=48, val=8):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (n + val, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n + val) % 10
    return CifarSplit(x[:n], y[:n], 10, split='train'), CifarSplit(x[n:], y[n:], 10, split='test')


def test_trains_and_a_resumed_run_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    """`adaad.train.train` with trades-awp on a toy (AWP from epoch 1): paused after every batch and resumed, it ends
    on the same weights and BatchNorm buffers as a run without pauses, which differ from a run without AWP."""
    monkeypatch.setattr(adaad.train, 'create_model', toy)
    data = toy_data()
    cfg = TrainConfig(method='trades-awp', student='toy', epochs=2, batch_size=16, steps=2, val_n=8, val_steps=1,
                      awp_warmup=1, diagnostics=False)
    r = train(cfg, out_dir=tmp_path / 'whole', device='cpu', progress=False, data=data)
    assert r['status'] == 'done'
    for _ in range(6):
        p = train(cfg, out_dir=tmp_path / 'paused', device='cpu', progress=False, data=data, time_limit=1e-9)
        assert p['status'] == 'paused'
    assert train(cfg, out_dir=tmp_path / 'paused', device='cpu', progress=False, data=data)['status'] == 'done'
    train(dataclasses.replace(cfg, awp_gamma=0., awp_warmup=None), out_dir=tmp_path / 'plain', device='cpu',
          progress=False, data=data)
    whole, paused, plain = (read_checkpoint(tmp_path / d / 'final.pt')['state_dict']
                            for d in ('whole', 'paused', 'plain'))
    for k in whole: torch.testing.assert_close(paused[k], whole[k], rtol=0, atol=0, msg=k)
    assert not torch.equal(plain['0.weight'], whole['0.weight'])
    assert json.loads((tmp_path / 'whole' / 'config.json').read_text())['awp_gamma'] == 0.005


def test_the_option_is_on_the_command_line():
    "`adaad train --awp-gamma 0.01 --awp-warmup 2` sets the two fields; a bad value is refused naming the option."
    from adaad.cli import config_from_args, parser
    a = parser().parse_args(['train', '--method', 'adaad', '--awp-gamma', '0.01', '--awp-warmup', '2'])
    c = config_from_args(a)
    assert (c.awp_gamma, c.awp_warmup) == (0.01, 2)
    with pytest.raises(SystemExit): parser().parse_args(['train', '--awp-gamma', '-1'])


def _ddp_worker(rank, world, port, out):
    "One gloo rank training pgd-at-awp on its half of each batch; its final weights saved as rank{rank}.pt."
    import os
    from adaad.models import MODELS
    from test_train import _marked_data, _NoBN
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    MODELS['_nobn'] = lambda num_classes, **kw: _NoBN(num_classes)
    torch.set_num_threads(1)
    cfg = TrainConfig(method='pgd-at-awp', student='_nobn', epochs=1, batch_size=32, val_n=32, steps=2,
                      awp_gamma=0.05)
    r = train(cfg, out_dir=out, device='cpu', progress=False, data=_marked_data())
    torch.save(r['model'].state_dict(), f'{out}/rank{rank}.pt')
    torch.distributed.destroy_process_group()


def test_distributed_ranks_perturb_alike(tmp_path):
    """Two gloo ranks, each with its half of every batch: the proxy's gradients are averaged, so both perturb their
    weights alike and end on the same weights (a rank-local perturbation would leave the weight decay, taken on the
    perturbed weights, different on each rank)."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    for k in a: assert torch.equal(a[k], b[k]), k
