"""The methods since AdaAD (IGDM, Fair-ARD, SAAD, PeerAiD): formula tests on hand-made logits, one-step checks against the official
training steps (written out here from the official files each test names), bad input, and one tiny run through `train`."""
import copy
import dataclasses
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adaad.checkpoint import read_checkpoint
from adaad.data import CifarSplit
from adaad.losses import (class_weights, igdm_loss, igdm_term, ard_loss, peeraid_peer_loss, peeraid_student_loss, renyi_entropy,
                          saad_loss, saad_weights)
from adaad.methods import FairARD, IGDM, Logits, get_method, training_loss
from adaad.models import create_model
from adaad.train import TrainConfig, resolve, train

pytestmark = pytest.mark.usefixtures('one_thread')


def tiny(c=10, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, c))


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def grads(net):
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def kl_rows(p_logits, q_logits):
    "Per-row KL(softmax(p) || softmax(q)), written with explicit exponentials (float64)."
    p_logits, q_logits = p_logits.double(), q_logits.double()
    lp = p_logits - p_logits.exp().sum(1, keepdim=True).log()
    lq = q_logits - q_logits.exp().sum(1, keepdim=True).log()
    return (lp.exp() * (lp - lq)).sum(1)


# ---- (a) formulas on hand-made logits -------------------------------------------------------------------------
def test_igdm_term_and_ramp_on_hand_made_logits():
    "arXiv 2312.03286: KL(sigma(T+ - T-) || sigma(S+ - S-)) averaged over examples, weight gamma * t / 200, t 1-based."
    g = torch.Generator().manual_seed(0)
    sp, sm, tp, tm = (torch.randn(5, 10, generator=g, dtype=torch.float64) for _ in range(4))
    want = kl_rows(tp - tm, sp - sm).mean()
    assert torch.allclose(igdm_term(sp, sm, tp, tm), want, rtol=1e-12)
    base = torch.tensor(0.7, dtype=torch.float64)
    for epoch, gamma in ((0, 1.), (99, 1.), (199, 10.)):
        got = igdm_loss(base, sp, sm, tp, tm, epoch=epoch, matching_weight=gamma)
        assert torch.allclose(got, base + gamma * (epoch + 1) / 200 * want, rtol=1e-12)
    assert igdm_term(sp + 5, sm + 5, sp, sm).abs() < 1e-12        # equal differences: no gradient mismatch


def official_weight_assign(kappa_total, per_class, beta):
    "NISP-official/Fair-ARD Fair-ARD.py weight_assign, after main()'s division by len(dataset)/num_classes."
    kappa = kappa_total / per_class
    r = (1 / (kappa + 1e-5)) ** beta
    r = r * (len(kappa) / r.sum())
    return r.clamp(5 / 6, 5 / 2)


def test_igdm_warns_once_when_its_ramp_and_the_run_differ():
    "A run shorter or longer than IGDM's ramp is told where the term's weight ends, once; a ramp that fits, or IGDM as an inner only, is silent."
    import warnings
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('default')
        for _ in range(3): resolve(TrainConfig(method='igdm', epochs=30))
        resolve(TrainConfig(method='igdm', epochs=16, method_kwargs=dict(ramp_epochs=8)))
    assert [str(x.message).split(', so')[0] for x in w] == ["igdm: ramp_epochs=200 differs from the run's 30 epochs",
                                                            "igdm: ramp_epochs=8 differs from the run's 16 epochs"]
    assert 'ends at 30/200 of matching_weight' in str(w[0].message) and 'ends at 16/8' in str(w[1].message)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert resolve(TrainConfig(method='igdm', epochs=30, method_kwargs=dict(ramp_epochs=30))).method_kwargs['ramp_epochs'] == 30
        resolve(TrainConfig(method='igdm'))                              # the class's 200 epochs and ramp
        resolve(TrainConfig(method='ard', inner='igdm', epochs=30))      # IGDM's inner point only: its ramp plays no part
    with pytest.warns(UserWarning, match='ends at 30/200'):
        resolve(TrainConfig(method='fair-ard', epochs=30, method_kwargs=dict(base='igdm')))   # IGDM's loss under a plug-in


def test_class_weights_follow_weight_assign_on_balanced_counts():
    kappa = torch.tensor([40., 3., 0., 17., 20., 9., 1., 39., 25., 12.], dtype=torch.float64)
    counts = torch.full((10,), 4., dtype=torch.float64)
    for beta in (2., 0.5, 0.):
        assert torch.allclose(class_weights(kappa, counts, beta), official_weight_assign(kappa, 4., beta), rtol=1e-12)
    w = class_weights(kappa, counts)
    assert w[2] == 5 / 2 and w[0] == 5 / 6 and w.min() >= 5 / 6 and w.max() <= 5 / 2


def test_class_weights_per_class_mean_and_unseen_classes():
    "Our normalisation: the mean over the class's examples; a class not seen keeps 1 and is not normalised over."
    w = class_weights(torch.tensor([8., 2., 0.]), torch.tensor([4., 1., 0.]), 1.)
    r = torch.tensor([1 / (2 + 1e-5), 1 / (2 + 1e-5)])
    assert torch.allclose(w, torch.cat([(r * 2 / r.sum()).clamp(5 / 6, 5 / 2), torch.ones(1)]))


def cached(s_adv, s_nat, t_nat, t_adv, y):
    "A Logits object holding hand-made logits (no network runs)."
    lg = Logits(None, None, torch.zeros(len(y), 1), torch.zeros(len(y), 1), num_classes=s_adv.shape[1])
    lg.cache = {('s', 'adv'): s_adv, ('s', 'nat'): s_nat, ('t', 'nat'): t_nat, ('t', 'adv'): t_adv}
    return lg


def test_fair_ard_loss_weights_each_example_by_its_class():
    "Fair-ARD.py (alpha = 1): tau^2 (1/B) sum_i w_{y_i} KL_i / C; Fair-RSLAD.py: (1/(B C)) sum_i w_{y_i} (5/6 M_i(x~) + 1/6 M_i(x))."
    g = torch.Generator().manual_seed(1)
    sa, sn, tn, ta = (torch.randn(7, 10, generator=g, dtype=torch.float64) for _ in range(4))
    y = torch.tensor([0, 3, 3, 5, 0, 9, 3])
    w = torch.linspace(5 / 6, 5 / 2, 10, dtype=torch.float64)
    tau = 30.
    want_ard = (w[y] * tau ** 2 * kl_rows(tn / tau, sa / tau) / 10).mean()
    pt = F.softmax(tn, 1)
    m_rows = lambda s: (pt * (torch.log(pt + 1e-5) - F.log_softmax(s, 1))).sum(1)     # Fair-RSLAD.py kl_loss, summed
    want_rslad = (w[y] * (5 / 6 * m_rows(sa) + 1 / 6 * m_rows(sn))).sum() / (7 * 10)
    for m, want in ((FairARD(), want_ard), (FairARD(base='rslad'), want_rslad)):
        lg = cached(sa, sn, tn, ta, y); lg.state = dict(weights=w)
        assert torch.allclose(m.loss(lg, y, 0), want, rtol=1e-10), m.base
    lg = cached(sa, sn, tn, ta, y)                                           # no state: uniform weights, the base's loss
    assert torch.allclose(FairARD().loss(lg, y, 0), ard_loss(sa, tn, tau=tau), rtol=1e-12)


# ---- (b) one step against the official training step --------------------------------------------------------------
@pytest.fixture
def batch():
    """Float64 networks and batch: the ARD KL at temperature 30 is a difference of nearly equal terms, which float32 rounds
    to about 1e-4 relative; in float64 both sides agree to about 1e-12."""
    torch.manual_seed(0)
    x, y = torch.rand(20, 3, 8, 8, dtype=torch.float64), torch.arange(20) % 10   # balanced: 2 images per class
    return tiny(seed=0).double(), tiny(seed=1).double().eval(), x, y


def official_adaad_inner(model, teacher, x, step_size, epsilon, steps=10):
    "HongsinLee/saad attacks.py adaad_inner_loss: eval-mode student, start x + 0.001 N(0, 1), sign steps on sum KL(T || S)."
    model.eval(); teacher.eval()
    x_adv = x.detach() + 0.001 * torch.randn(x.shape, dtype=x.dtype)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(teacher(x_adv), dim=1), reduction='none').sum()
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - epsilon), x + epsilon), 0.0, 1.0)
    model.train()
    return torch.clamp(x_adv, 0.0, 1.0).detach()


def official_igdm_step(student, teacher, x, epoch1, igdm_alpha=1., step_size=8 / 255, epsilon=2 / 255):
    """HongsinLee/saad igdm.py, the body of the training loop at 1-based epoch `epoch1` (its inner call passes
    step_size=8/255, epsilon=2/255): KL_batchmean(S(x+d) || T(x+d)) + igdm_alpha * epoch/200 * KL_batchmean of the differences."""
    student.train()
    inputs_adv = official_adaad_inner(student, teacher, x, step_size=step_size, epsilon=epsilon)
    with torch.no_grad():
        delta = inputs_adv - x
        teacher_plus, teacher_minus = teacher(inputs_adv), teacher(x - delta)
    student_plus, student_minus = student(x + delta), student(x - delta)
    kl = lambda s, t: F.kl_div(F.log_softmax(s, dim=1), F.softmax(t, dim=1), reduction='batchmean')
    igdm = kl(student_plus - student_minus, teacher_plus - teacher_minus)
    return kl(student_plus, teacher_plus) + igdm_alpha * (epoch1 / 200) * igdm


@pytest.mark.parametrize('epoch', [0, 37])
def test_igdm_one_step_matches_igdm_py(batch, epoch):
    "Loss and student gradient equal to igdm.py's at the same start (its swapped budget: eps=2/255, step_size=8/255)."
    S, T, x, y = batch
    s1, s2 = copy.deepcopy(S), copy.deepcopy(S)
    torch.manual_seed(7); ours, _ = training_loss('igdm', s1, T, x, y, epoch=epoch, num_classes=10, eps=2 / 255, step_size=8 / 255)
    torch.manual_seed(7); theirs = official_igdm_step(s2, T, x, epoch + 1)
    ours.backward(); theirs.backward()
    assert rel(ours, theirs) < 1e-10 and rel(grads(s1), grads(s2)) < 1e-9, (ours.item(), theirs.item())
    assert all(p.grad is None for p in T.parameters())


def official_fair_ard_step(student, teacher, x, y, reweight, temp=30., alpha=1., epsilon=8 / 255, step_size=2 / 255, steps=10):
    """NISP-official/Fair-ARD Fair-ARD.py: AttackPGD.forward (uniform start, train mode, sum CE, Kappa counted before each
    step) and train()'s per-example loss weighted by reweight[y_i]; returns (loss, per-class Kappa sums)."""
    student.train()
    kappa = torch.zeros(len(x), dtype=torch.float32)
    xa = x.detach() + torch.zeros_like(x).uniform_(-epsilon, epsilon)
    for _ in range(steps):
        xa.requires_grad_()
        out = student(xa)
        kappa += (out.max(1, keepdim=True)[1].squeeze(1) == y).float()
        with torch.enable_grad(): loss = F.cross_entropy(out, y, reduction='sum')
        grad = torch.autograd.grad(loss, [xa])[0]
        xa = torch.clamp(torch.min(torch.max(xa.detach() + step_size * torch.sign(grad.detach()), x - epsilon), x + epsilon), 0.0, 1.0)
    outputs = student(xa)
    teacher_outputs, basic_outputs = teacher(x), student(x)
    kl, ce = [], []
    for i in range(len(outputs)):
        kl.append(F.kl_div(F.log_softmax(outputs[i] / temp, dim=0), F.softmax(teacher_outputs[i] / temp, dim=0), reduction='sum') / out.shape[1] * reweight[y[i]])   # the script's default 'mean'
        ce.append(F.cross_entropy(basic_outputs[i].unsqueeze(0), y[i].unsqueeze(0)) * reweight[y[i]])
    loss = alpha * temp * temp * torch.stack(kl).sum() / len(outputs) + (1 - alpha) * torch.stack(ce).sum() / len(outputs)
    return loss, torch.zeros(10).index_add_(0, y, kappa)


def test_fair_ard_two_steps_match_fair_ard_py(batch):
    """Epoch 0 (uniform weights): same loss, gradient, Kappa counts and BatchNorm history (faithful passes); the weights
    after the epoch are weight_assign's; epoch 1 with those weights: same loss and gradient."""
    S, T, x, y = batch
    m = get_method('fair-ard')
    st = m.new_state(10)
    s1, s2 = copy.deepcopy(S), copy.deepcopy(S)
    torch.manual_seed(3); ours, _ = training_loss(m, s1, T, x, y, epoch=0, num_classes=10, faithful=True, state=st)
    torch.manual_seed(3); theirs, kappa = official_fair_ard_step(s2, T, x, y, torch.ones(10))
    ours.backward(); theirs.backward()
    assert rel(ours, theirs) < 1e-10 and rel(grads(s1), grads(s2)) < 1e-9
    assert torch.equal(st['correct'], kappa) and torch.equal(st['count'], torch.full((10,), 2.))
    assert torch.allclose(s1[1].running_mean, s2[1].running_mean)
    m.end_epoch(st, 0)
    assert torch.allclose(st['weights'], official_weight_assign(kappa, 20 / 10, 2.)) and st['correct'].sum() == 0
    w = torch.linspace(5 / 6, 5 / 2, 10)                                    # weights that surely differ per class
    st['weights'].copy_(w)
    s1, s2 = copy.deepcopy(S), copy.deepcopy(S)
    torch.manual_seed(4); ours, _ = training_loss(m, s1, T, x, y, epoch=1, num_classes=10, state=st)
    torch.manual_seed(4); theirs, _ = official_fair_ard_step(s2, T, x, y, w)
    ours.backward(); theirs.backward()
    assert rel(ours, theirs) < 1e-10 and rel(grads(s1), grads(s2)) < 1e-9, (ours.item(), theirs.item())
    torch.manual_seed(4); unweighted, _ = training_loss('ard', copy.deepcopy(S), T, x, y, epoch=1)
    assert rel(unweighted, ours) > 1e-3                                      # the weights change the loss


def official_saad_inner(model, teacher, x, y, step_size=2 / 255, epsilon=8 / 255, steps=10, lam=1.):
    """HongsinLee/saad attacks.py saad_inner_loss: the teacher's true-class input gradient once at x, start x + 0.001 N,
    eval-mode student, sign steps on sum KL(softmax(corrected T) || S) with T_y corrected by lam <grad, x' - x>."""
    model.eval(); teacher.eval()
    x_temp = x.detach(); x_temp.requires_grad_(True)
    t = teacher(x_temp)
    rows = torch.arange(len(y))
    g = torch.autograd.grad(t[rows, y].sum(), x_temp)[0]
    x_adv = x.detach() + 0.001 * torch.randn(x.shape, dtype=x.dtype)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            corrected = t.detach().clone()
            corrected[rows, y] += lam * torch.einsum('bchw,bchw->b', g, x_adv - x)
            loss = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(corrected, dim=1), reduction='sum')
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = torch.clamp(torch.min(torch.max(x_adv.detach() + step_size * torch.sign(grad.detach()), x - epsilon), x + epsilon), 0., 1.)
    model.train()
    return x_adv.detach()


def official_saad_step(student, teacher, x, y, epoch1, epochs, igdm_alpha=1., beta=0., gamma=1.):
    """HongsinLee/saad saad.py, the loss of one step at 1-based epoch `epoch1` of `epochs`: per-sample KLs (utils.py
    samplewise_kl_div, the target detached), Renyi entropy of the teacher at x~ (samplewise_renyi_entropy), w, w_norm."""
    student.train()
    with torch.no_grad(): teacher_clean = teacher(x)
    xa = official_saad_inner(student, teacher, x, y)
    with torch.no_grad():
        delta = xa - x
        tp, tm = teacher(xa), teacher(x - delta)
    sp, sm, sc = student(xa), student(x - delta), student(x)
    kl = lambda s, t: F.kl_div(F.log_softmax(s, dim=1), F.softmax(t, dim=1).detach(), reduction='none').sum(1)
    p = F.softmax(tp, dim=1)
    ent = -(p * torch.log(p + 1e-12)).sum(1) if gamma == 1 else torch.log((p ** gamma).sum(1) + 1e-12) / (1 - gamma)
    w = torch.clamp(5 * (ent - ent.min().item()), min=0.)
    w_norm = (w - w.min()) / (w.max() - w.min() + 1e-8)
    igdm = igdm_alpha * (epoch1 / epochs) * kl(sp - sm, tp - tm)
    return (w * (kl(sp, tp) + igdm) + beta * (1 - w_norm) * kl(sc, teacher_clean)).mean()


@pytest.mark.parametrize('epoch,kw', [(0, {}), (37, dict(clean_weight=0.5, entropy_order=2., matching_weight=10.))])
def test_saad_one_step_matches_saad_py(batch, epoch, kw):
    "Inner point, loss and student gradient equal to saad.py's at the same start, main.sh's settings and others."
    S, T, x, y = batch
    s1, s2 = copy.deepcopy(S), copy.deepcopy(S)
    m = get_method('saad', **kw).for_run(60)
    torch.manual_seed(7); ours, _ = training_loss(m, s1, T, x, y, epoch=epoch, num_classes=10)
    torch.manual_seed(7); theirs = official_saad_step(s2, T, x, y, epoch + 1, 60, igdm_alpha=kw.get('matching_weight', 1.),
                                                      beta=kw.get('clean_weight', 0.), gamma=kw.get('entropy_order', 1.))
    ours.backward(); theirs.backward()
    assert rel(ours, theirs) < 1e-10 and rel(grads(s1), grads(s2)) < 1e-9, (ours.item(), theirs.item())
    assert all(p.grad is None for p in T.parameters())


def test_saad_inner_point_matches_saad_inner_loss(batch):
    "The inner point itself, and the linearisation matters: lambda = 0 gives another point."
    from adaad.inner import find_inner, saad_objective, Budget
    S, T, x, y = batch
    torch.manual_seed(1); ours = find_inner(lambda: saad_objective(S, T, x, y), S, T, x, Budget())
    torch.manual_seed(1); theirs = official_saad_inner(S, T, x, y)
    assert torch.allclose(ours, theirs, atol=1e-12)
    torch.manual_seed(1); other = find_inner(lambda: saad_objective(S, T, x, y, correction=0.), S, T, x, Budget())
    assert not torch.allclose(other, theirs)


def test_saad_weights_and_loss_on_hand_made_logits():
    "w_i = 5 (H_i - min H); the loss is the formula written with explicit exponentials; beta = 0 drops the clean term."
    g = torch.Generator().manual_seed(0)
    sa, ta, sm, tm, sn, tn = (torch.randn(6, 10, generator=g, dtype=torch.float64) for _ in range(6))
    lp = ta - ta.exp().sum(1, keepdim=True).log()
    h = -(lp.exp() * lp).sum(1)
    assert torch.allclose(renyi_entropy(ta), h, atol=1e-10)
    assert torch.allclose(renyi_entropy(ta, 2.), -(2 * lp).exp().sum(1).log(), atol=1e-10)
    w, wn = saad_weights(ta)
    assert torch.allclose(w, 5 * (h - h.min()), atol=1e-9) and wn.min() == 0 and abs(wn.max() - 1) < 1e-6
    for epoch, gamma, beta in ((0, 1., 0.), (9, 10., 0.7)):
        want = (w * (kl_rows(ta, sa) + gamma * (epoch + 1) / 40 * kl_rows(ta - tm, sa - sm)) + beta * (1 - wn) * kl_rows(tn, sn)).mean()
        got = saad_loss(sa, ta, sm, tm, sn, tn, epoch, gamma, 40, beta)
        assert torch.allclose(got, want, rtol=1e-10)
    with pytest.raises(ValueError, match='clean_weight > 0 needs s_nat and t_nat'): saad_loss(sa, ta, sm, tm, clean_weight=1.)


def official_peeraid_step(student, peer, x, y, k_train=10, epsilon=8 / 255, alpha=2 / 255, T=5., gamma1=1., gamma2=0.1,
                           re_kd_temperature=1., lamb1=0., lamb2=1., lamb3=1.):
    """jaewonalive/PeerAiD main.py train_kd, one batch: the peer's clean logits in eval mode, attack_function.py
    LinfPeerAttack on the student (eval, x + 0.001 N, sum KL towards the peer), then loss_peer + loss_student with
    nn.KLDivLoss()'s default mean over all elements."""
    peer.eval()
    with torch.no_grad(): peer_logits = peer(x)
    peer.train()
    student.eval()
    xa = x.detach() + 0.001 * torch.randn(x.shape, dtype=x.dtype)
    for _ in range(k_train):
        xa.requires_grad_()
        with torch.enable_grad():
            loss_kl = F.kl_div(F.log_softmax(student(xa), dim=1), F.softmax(peer_logits, dim=1), reduction='none').sum()
        grad = torch.autograd.grad(loss_kl, [xa])[0]
        xa = torch.clamp(torch.min(torch.max(xa.detach() + alpha * torch.sign(grad.detach()), x - epsilon), x + epsilon), 0, 1)
    student.train(); xa = xa.detach()
    kl_mean = lambda inp, tgt, t: F.kl_div(F.log_softmax(inp / t, dim=1), F.softmax(tgt / t, dim=1), reduction='mean')
    adv_outputs = peer(xa)
    student_logit_target = student(xa)
    loss_peer = F.cross_entropy(adv_outputs, y) * gamma1 + kl_mean(adv_outputs, student_logit_target, re_kd_temperature) * gamma2 * re_kd_temperature ** 2
    peer_outputs = adv_outputs.clone().detach()
    student_outputs = student(xa)
    logit_nat = student(x)
    loss_student = (F.cross_entropy(student_outputs, y) * lamb1 + kl_mean(student_outputs, peer_outputs, T) * (lamb2 * T * T)
                    + kl_mean(student_outputs, logit_nat, T) * (lamb3 * T * T))
    return loss_peer + loss_student


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")   # the script's nn.KLDivLoss() default, on purpose
@pytest.mark.parametrize('kw', [{}, dict(ce_weight=0.3, peer_kl_weight=1., clean_weight=0.5, peer_tau=2.)])
def test_peeraid_one_step_matches_main_py(batch, kw):
    "Loss and the gradients of student and peer equal to train_kd's at the same start (the official CIFAR-10 settings and others)."
    S, T, x, y = batch
    P = tiny(seed=3).double()
    s1, s2, p1, p2 = copy.deepcopy(S), copy.deepcopy(S), copy.deepcopy(P), copy.deepcopy(P)
    torch.manual_seed(7); ours, _ = training_loss(get_method('peeraid', **kw), s1, None, x, y, peers={'peer': p1})
    torch.manual_seed(7); theirs = official_peeraid_step(s2, p2, x, y, lamb1=kw.get('ce_weight', 0.), gamma2=kw.get('peer_kl_weight', 0.1),
                                                         lamb3=kw.get('clean_weight', 1.), re_kd_temperature=kw.get('peer_tau', 1.))
    ours.backward(); theirs.backward()
    assert rel(ours, theirs) < 1e-10 and rel(grads(s1), grads(s2)) < 1e-9 and rel(grads(p1), grads(p2)) < 1e-9, (ours.item(), theirs.item())


def test_peeraid_gamma2_follows_the_dataset_unless_given():
    "gamma_2 as the README's commands pass it: 0.1 on CIFAR-10, 1 on CIFAR-100 (in the run's record and in a batch); a value given is kept."
    assert [resolve(TrainConfig(method='peeraid', dataset=d)).method_kwargs['peer_kl_weight'] for d in ('cifar10', 'cifar100')] == [0.1, 1.]
    assert resolve(TrainConfig(method='peeraid', dataset='cifar100', method_kwargs=dict(peer_kl_weight=0.3))).method_kwargs['peer_kl_weight'] == 0.3
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 3, 8, 8, generator=g), torch.arange(4)
    S, P = tiny(100, seed=0), tiny(100, seed=1)
    loss = lambda **kw: training_loss(get_method('peeraid', **kw), copy.deepcopy(S), None, x, y, num_classes=100, peers={'peer': copy.deepcopy(P)})[0]
    torch.manual_seed(1); default = loss()
    torch.manual_seed(1); given = loss(peer_kl_weight=1.)
    torch.manual_seed(1); other = loss(peer_kl_weight=0.1)
    assert default == given and default != other
    assert resolve(TrainConfig(method='peeraid', inner='adaad', dataset='cifar100')).method_kwargs['peer_kl_weight'] == 1.   # a combination too
    with pytest.raises(ValueError, match=r'peer_kl_weight=None takes the official value for 10 \(cifar10\) or 100 \(cifar100\) classes, but the batch has 7'):
        training_loss('peeraid', tiny(7, seed=0), None, x, y % 7, peers={'peer': tiny(7, seed=1)})


@pytest.mark.parametrize('method, key, values', [('saad', 'matching_weight', [1., 10.]), ('peeraid', 'peer_kl_weight', [0.1, 1.]),
                                                  ('igdm', 'matching_weight', [1., 1.])])
def test_dataset_defaults_in_the_run_record(method, key, values):
    "SAAD's gamma (saad.py: 1 for cifar10, 10 for cifar100) and PeerAiD's gamma_2 follow the dataset; IGDM's stays 1 (igdm.py is silent)."
    assert [resolve(TrainConfig(method=method, dataset=d)).method_kwargs[key] for d in ('cifar10', 'cifar100')] == values


def test_peeraid_losses_on_hand_made_logits():
    "The two losses written with explicit exponentials: a mean over B*C for each KL, the peer detached in the student's."
    g = torch.Generator().manual_seed(0)
    sa, pa, sn = (torch.randn(6, 10, generator=g, dtype=torch.float64) for _ in range(3))
    y = torch.arange(6) % 10
    ce = lambda z: (z.exp().sum(1).log() - z[torch.arange(6), y]).mean()
    want_p = 0.7 * ce(pa) + 0.2 * 4 * kl_rows(sa / 2, pa / 2).sum() / 60
    assert torch.allclose(peeraid_peer_loss(pa, sa, y, 0.7, 0.2, 2.), want_p, rtol=1e-10)
    want_s = 0.1 * ce(sa) + 0.9 * 25 * kl_rows(pa / 5, sa / 5).sum() / 60 + 0.4 * 25 * kl_rows(sn / 5, sa / 5).sum() / 60
    assert torch.allclose(peeraid_student_loss(sa, pa, y, sn, 0.1, 0.9, 0.4, 5.), want_s, rtol=1e-10)
    p, s_ = pa.clone().requires_grad_(True), sa.clone().requires_grad_(True)
    peeraid_student_loss(s_, p, y, sn).backward()
    assert p.grad is None and s_.grad.abs().sum() > 0                        # the peer learns only from its own loss


def test_peeraid_trains_its_peer_and_resumes_exactly(tmp_path):
    "The trainer builds the peer, trains it in the same optimiser, keeps it in last.pt; paused after every step it ends bit-identical."
    cfg = TrainConfig(method='peeraid', student='wrn-10-1', epochs=2, batch_size=16, steps=2, val_n=8, val_steps=1, milestones=(1,),
                      swa=False, method_kwargs=dict(peer_arch='wrn-10-2'))
    a = train(cfg, out_dir=tmp_path / 'a', device='cpu', progress=False, data=_data())
    peer = read_checkpoint(tmp_path / 'a' / 'last.pt')['peers']['peer']
    fresh = create_model('wrn-10-2').state_dict()
    assert peer.keys() == fresh.keys() and any(not torch.equal(peer[k], fresh[k]) for k in peer if k.endswith('weight'))
    while True:
        b = train(cfg, out_dir=tmp_path / 'b', device='cpu', progress=False, data=_data(), time_limit=1e-9)
        if b['status'] == 'done': break
    sa, sb = a['model'].state_dict(), b['model'].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    pb = read_checkpoint(tmp_path / 'b' / 'last.pt')['peers']['peer']
    assert all(torch.equal(peer[k], pb[k]) for k in peer)


# ---- (c) bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['igdm', 'fair-ard'])
def test_plug_in_bases_are_checked(name):
    with pytest.raises(ValueError, match=rf"{name}: base 'natural' has no inner maximisation"):
        get_method(name, base='natural')
    with pytest.raises(ValueError, match="base must be one of .*'adaad'"):
        get_method(name, base='no-such-method')
    with pytest.raises(ValueError, match='base must be one of'):
        get_method(name, base=name)
    with pytest.raises(ValueError, match=rf"{name}: base must be <class 'str'>"):
        get_method(name, base=None)
    with pytest.raises(ValueError, match='base'):
        resolve(TrainConfig(method=name, method_kwargs=dict(base='natural')))


def test_plug_in_fields_are_checked():
    with pytest.raises(ValueError, match='base_reduction must be one of'):
        get_method('igdm', base_reduction='mean')
    with pytest.raises(ValueError, match='igdm: ramp_epochs must be >= 1'):
        get_method('igdm', ramp_epochs=0)
    with pytest.raises(ValueError, match='igdm: matching_weight must be >= 0'):
        get_method('igdm', matching_weight=-1.)
    with pytest.raises(ValueError, match='fair-ard: class_weight_exponent must be >= 0'):
        get_method('fair-ard', class_weight_exponent=-2.)
    with pytest.raises(ValueError, match='min_class_weight must be <= max_class_weight'):
        get_method('fair-ard', min_class_weight=3.)
    with pytest.raises(ValueError, match=r'saad: ramp_epochs must be >= 1 \(E, the epochs'):
        get_method('saad', ramp_epochs=0)
    with pytest.raises(ValueError, match=r"saad: clean_weight must be >= 0 \(beta"):
        get_method('saad', clean_weight=-1.)
    with pytest.raises(ValueError, match=r"peeraid: peer_arch: unknown model name 'no-net'"):
        get_method('peeraid', peer_arch='no-net')
    with pytest.raises(ValueError, match=r"method 'peeraid' trains peer beside the student; pass peers="):
        training_loss('peeraid', tiny(), None, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))


def test_plug_in_budget_follows_the_base_unless_set():
    assert dataclasses.asdict(get_method('igdm').budget) == dataclasses.asdict(get_method('adaad').budget)
    ard = get_method('ard').budget
    for name in ('igdm', 'fair-ard'):
        b = get_method(name, base='ard').budget
        assert (b.eps, b.step_size, b.init, b.attack_bn) == (ard.eps, ard.step_size, ard.init, ard.attack_bn)
    assert get_method('fair-ard', base='adaad').budget.init == 'gaussian'
    m = get_method('igdm', eps=2 / 255, step_size=8 / 255, base='ard')       # a set budget stays when the base changes
    assert (m.budget.eps, m.budget.step_size, m.budget.init) == (2 / 255, 8 / 255, 'uniform')
    f = get_method('fair-ard', base='rslad')
    assert (f.epochs, f.milestones, f.weight_decay) == (300, (215, 260, 285), 2e-4) and f.teacher_in_inner
    assert (get_method('fair-ard').single_decay, get_method('fair-ard').teacher_in_inner) == (True, False)
    i = get_method('igdm')
    assert (i.epochs, i.milestones, i.weight_decay, i.matching_weight, i.ramp_epochs) == (200, (100, 150), 2e-4, 1., 200)
    assert i._base.reduction == 'batchmean' and get_method('igdm', base_reduction=None)._base.reduction is None


# ---- (d) one tiny run through train ------------------------------------------------------------------------------
def _data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (48, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(48) % 10
    return CifarSplit(x[:32], y[:32], 10, split='train'), CifarSplit(x[32:], y[32:], 10, split='test')


@pytest.mark.parametrize('name', ['igdm', 'fair-ard', 'saad'])
def test_trains_through_train(tmp_path, name):
    cfg = TrainConfig(method=name, student='wrn-10-1', epochs=2, batch_size=16, steps=2, val_n=8, val_steps=1, milestones=(1,))
    torch.manual_seed(5); teacher = create_model('wrn-10-1').eval()
    out = train(cfg, teacher=teacher, out_dir=tmp_path, device='cpu', progress=False, data=_data())
    assert out['status'] == 'done'
    log = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in log] == [0, 1] and all(r['loss'] > 0 for r in log)
    st = read_checkpoint(tmp_path / 'last.pt').get('method_state')
    if name == 'fair-ard':   # the weights of the epoch after the last, and the counts reset
        assert st is not None and st['count'].sum() == 0 and ((st['weights'] >= 5 / 6 - 1e-6) & (st['weights'] <= 5 / 2 + 1e-6)).all()
    else: assert st is None


def test_fair_ard_resumes_exactly(tmp_path):
    "Pausing after every step and resuming gives bit-identical weights: the class state is checkpointed."
    cfg = TrainConfig(method='fair-ard', student='wrn-10-1', epochs=2, batch_size=16, steps=2, val_n=8, val_steps=1, milestones=(1,))
    torch.manual_seed(5); teacher = create_model('wrn-10-1').eval()
    a = train(cfg, teacher=teacher, out_dir=tmp_path / 'a', device='cpu', progress=False, data=_data())
    while True:
        b = train(cfg, teacher=teacher, out_dir=tmp_path / 'b', device='cpu', progress=False, data=_data(), time_limit=1e-9)
        if b['status'] == 'done': break
    sa, sb = a['model'].state_dict(), b['model'].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ca, cb = (read_checkpoint(tmp_path / d / 'last.pt')['method_state'] for d in 'ab')
    assert all(torch.equal(ca[k], cb[k]) for k in ca) and ca['weights'].unique().numel() > 1   # weights that differ by class


def test_renyi_floor_and_fair_ard_counts_keep_their_former_names():
    "renyi_entropy's `eps` (a constant in the logs, not a radius) is `floor`; class_weights' `kappa` is `correct`: both warn."
    z, correct, counts = torch.randn(4, 10, dtype=torch.float64), torch.tensor([9., 0., 4.]), torch.tensor([1., 1., 1.])
    with pytest.warns(FutureWarning, match='renyi_entropy: eps is deprecated, use floor'):
        assert torch.equal(renyi_entropy(z, 2., eps=1e-3), renyi_entropy(z, 2., floor=1e-3))
    assert not torch.equal(renyi_entropy(z, 2., floor=1e-3), renyi_entropy(z, 2.))
    with pytest.warns(FutureWarning, match='class_weights: kappa is deprecated, use correct'):
        assert torch.equal(class_weights(kappa=correct, counts=counts), class_weights(correct, counts))


def test_fair_ard_resumes_a_checkpoint_with_the_former_state_key(tmp_path):
    "A Fair-ARD checkpoint whose per-class counts are stored as 'kappa' (an older adaad's) resumes to the same weights."
    from adaad.checkpoint import atomic_save
    cfg = TrainConfig(method='fair-ard', student='wrn-10-1', epochs=2, batch_size=16, steps=2, val_n=8, val_steps=1, milestones=(1,))
    torch.manual_seed(5); teacher = create_model('wrn-10-1').eval()
    run = lambda d, **k: train(cfg, teacher=teacher, out_dir=tmp_path / d, device='cpu', progress=False, data=_data(), **k)
    a = run('a')
    assert run('b', time_limit=1e-9)['status'] != 'done'                   # paused after a step, mid-epoch
    f = tmp_path / 'b' / 'last.pt'; st = read_checkpoint(f)
    assert st['method_state']['correct'].sum() > 0                          # counts of the epoch so far
    st['method_state']['kappa'] = st['method_state'].pop('correct'); atomic_save(st, f, checksum=True)
    b = run('b')
    sa, sb = a['model'].state_dict(), b['model'].state_dict()
    assert b['status'] == 'done' and all(torch.equal(sa[k], sb[k]) for k in sa)
