"Outer losses against their formulas, computed by hand (plain Python floats) on hand-made logits, with the official scales (relative to batchmean: AdaAD 1/10 on CIFAR-10, ARD 90, AdaIAD 900, RSLAD 1/10)."
import math

import pytest
import torch

from adaad.losses import (adaad_loss, adaad_reduction, adaiad_loss, akd_chen_loss, akd_maroto_loss, ard_loss, iad_loss,
                          introspection_term, kl, mmard_loss, pgd_at_loss, reliability_weights, rslad_loss, trades_loss,
                          triangle_term)

pytestmark = pytest.mark.usefixtures('one_thread')


# ---- hand references: lists of floats, no torch ----

def softmax(z, tau=1.):
    e = [math.exp(v / tau - max(z) / tau) for v in z]
    return [v / sum(e) for v in e]

def kl1(p_logits, q_logits, tau=1., log_eps=0.):
    "KL(softmax(p/tau) || softmax(q/tau)) of one example; log(p + log_eps) for the target when log_eps > 0."
    p, q = softmax(p_logits, tau), softmax(q_logits, tau)
    return sum(pc * ((math.log(pc + log_eps) if log_eps else math.log(pc)) - math.log(qc)) for pc, qc in zip(p, q))

def ce1(z, y): return -math.log(softmax(z)[y])

def rows(t): return t.tolist()

def ksum(P, Q, tau=1., log_eps=0.): return sum(kl1(p, q, tau, log_eps) for p, q in zip(rows(P), rows(Q)))

def ce_mean(Z, Y): return sum(ce1(z, y) for z, y in zip(rows(Z), Y.tolist())) / len(Y)

def close(t, v, rel=1e-9): return math.isclose(float(t), v, rel_tol=rel, abs_tol=1e-12)

# ---- hand-made logits ----

def logits(B, C, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, generator=g, dtype=torch.float64) * 2).requires_grad_(False)

B = 3

@pytest.fixture(params=[10, 100], ids=['cifar10', 'cifar100'])
def C(request): return request.param

@pytest.fixture
def L(C):
    "s_adv, s_nat, t_adv, t_nat, y for a batch of 3."
    return dict(s_adv=logits(B, C, 1), s_nat=logits(B, C, 2), t_adv=logits(B, C, 3), t_nat=logits(B, C, 4),
                y=torch.tensor([0, 1, C - 1]))


def test_kl_reductions(L, C):
    p, q = L['t_adv'], L['s_adv']
    s = ksum(p, q)
    assert close(kl(p, q), s) and close(kl(p, q, reduction='batchmean'), s / B) and close(kl(p, q, reduction='mean_all'), s / (B * C))
    assert all(close(v, kl1(a, b)) for v, a, b in zip(kl(p, q, reduction='none'), rows(p), rows(q)))
    assert close(kl(p, q, tau=4.), ksum(p, q, 4.)) and close(kl(p, q, log_eps=1e-5), ksum(p, q, 1., 1e-5))


def test_adaad_scales(L, C):
    "AdaAD: CIFAR-10 mean over B*C (batchmean/10), CIFAR-100 batchmean (boyellow/AdaAD main.py)."
    sa, ta, sn, tn = L['s_adv'], L['t_adv'], L['s_nat'], L['t_nat']
    scale = 1 / (B * 10) if C == 10 else 1 / B
    assert adaad_reduction(C) == ('mean_all' if C == 10 else 'batchmean')
    assert close(adaad_loss(sa, ta), scale * ksum(ta, sa))
    assert close(adaad_loss(sa, ta, sn, tn, adv_share=0.7), scale * (0.7 * ksum(ta, sa) + 0.3 * ksum(tn, sn)))
    assert close(adaad_loss(sa, ta, reduction='sum'), ksum(ta, sa))
    with pytest.raises(ValueError, match='s_nat'):
        adaad_loss(sa, ta, adv_share=0.5, t_nat=tn)


def test_pgd_at(L):
    assert close(pgd_at_loss(L['s_adv'], L['y']), ce_mean(L['s_adv'], L['y']))


def test_trades(L):
    sa, sn, y = L['s_adv'], L['s_nat'], L['y']
    assert close(trades_loss(sa, sn, y), ce_mean(sn, y) + 6 / B * ksum(sn, sa))
    assert close(trades_loss(sa, sn, y, kl_weight=1.), ce_mean(sn, y) + 1 / B * ksum(sn, sa))


def test_trades_target_not_detached(L):
    sa, y = L['s_adv'], L['y']
    sn = L['s_nat'].clone().requires_grad_(True)
    g_all, = torch.autograd.grad(trades_loss(sa, sn, y), [sn])
    g_ce, = torch.autograd.grad(torch.nn.functional.cross_entropy(sn, y), [sn])
    assert (g_all - g_ce).abs().max() > 1e-6                         # the KL pulls the clean branch too


def test_ard(L, C):
    "ARD: alpha tau^2 KL_mean_all(T(x)/tau || S(x~)/tau) + (1-alpha) CE(S(x), y); tau 30 -> 90 x batchmean on CIFAR-10."
    sa, sn, tn, y = L['s_adv'], L['s_nat'], L['t_nat'], L['y']
    assert close(ard_loss(sa, tn), 900 / (B * C) * ksum(tn, sa, 30.))
    if C == 10: assert close(ard_loss(sa, tn), 90 * kl(tn, sa, 30., 'batchmean'))
    assert close(ard_loss(sa, tn, y, sn, tau=2., kl_share=0.8), 0.8 * 4 / (B * C) * ksum(tn, sa, 2.) + 0.2 * ce_mean(sn, y))


def test_reliability_weights_by_hand():
    t = torch.tensor([[2., 0., 0.], [0., 0., 1.]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1])
    w = reliability_weights(t, y, reliability_exponent=0.1)
    p0 = math.exp(2) / (math.exp(2) + 2); p1 = 1 / (2 + math.e)
    assert close(w[0], p0 ** 0.1) and close(w[1], p1 ** 0.1) and not w.requires_grad
    assert torch.allclose(reliability_weights(t, y, 1.), torch.tensor([p0, p1], dtype=torch.float64))
    assert torch.equal(reliability_weights(t, y, 0.), torch.ones(2, dtype=torch.float64))


def adaiad_ref(L, epoch, tau=30., alpha=1., beta=0.1, begin=60):
    sa, sn, ta, y = L['s_adv'], L['s_nat'], L['t_adv'], L['y']
    v = alpha * tau ** 2 / B * ksum(ta, sa, tau)
    if epoch >= begin:
        w = [softmax(t)[yi] ** beta for t, yi in zip(rows(ta), y.tolist())]
        v += alpha / B * sum((1 - wi) * kl1(a, b) for wi, a, b in zip(w, rows(sn), rows(sa)))
    if alpha != 1: v += (1 - alpha) * ce_mean(sn, y)
    return v


@pytest.mark.parametrize('epoch', [0, 59, 60, 150])
def test_adaiad(L, epoch):
    "AdaIAD: tau^2 (1/B) sum KL_tau(T(x~)||S(x~)) [+ from epoch 60: (1/B) sum (1-w_i) KL(S(x)||S(x~))] + (1-lambda) CE."
    sa, sn, ta, y = L['s_adv'], L['s_nat'], L['t_adv'], L['y']
    assert close(adaiad_loss(sa, ta, y, sn, epoch), adaiad_ref(L, epoch))
    assert close(adaiad_loss(sa, ta, y, sn, epoch, tau=1.), adaiad_ref(L, epoch, tau=1.))
    assert close(adaiad_loss(sa, ta, y, sn, epoch, distill_share=0.6, reliability_exponent=0.5, begin=10), adaiad_ref(L, epoch, alpha=0.6, beta=0.5, begin=10))


def test_adaiad_warmup_switch(L):
    sa, sn, ta, y = L['s_adv'], L['s_nat'], L['t_adv'], L['y']
    teacher_only = 900 / B * ksum(ta, sa, 30.)
    assert close(adaiad_loss(sa, ta, y, None, epoch=59), teacher_only)            # no S(x) needed before begin
    assert adaiad_loss(sa, ta, y, sn, epoch=60) > adaiad_loss(sa, ta, y, sn, epoch=59)
    with pytest.raises(ValueError, match='s_nat'):
        adaiad_loss(sa, ta, y, None, epoch=60)
    # the introspection target S(x) is not detached and the weights are constants
    sn_ = sn.clone().requires_grad_(True); ta_ = ta.clone().requires_grad_(True)
    loss = adaiad_loss(sa, ta_, y, sn_, epoch=60)
    g_sn, g_ta = torch.autograd.grad(loss, [sn_, ta_])
    assert g_sn.abs().max() > 0
    g_ta_teacher_only, = torch.autograd.grad(900 * kl(ta_, sa, 30., 'batchmean'), [ta_])
    assert torch.allclose(g_ta, g_ta_teacher_only)                                # no gradient through w_i


def test_introspection_term_by_hand(L):
    sa, sn = L['s_adv'], L['s_nat']
    w = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
    ref = sum((1 - wi) * kl1(a, b) for wi, a, b in zip(w.tolist(), rows(sn), rows(sa))) / B
    assert close(introspection_term(sn, sa, w), ref)


@pytest.mark.parametrize('epoch', [0, 60])
def test_iad_i(L, epoch):
    "IAD-I: teacher on the clean input, not weighted; w from the teacher at x~; tau 1, alpha 1, beta 0.1, begin 60."
    sa, sn, ta, tn, y = L['s_adv'], L['s_nat'], L['t_adv'], L['t_nat'], L['y']
    ref = 1 / B * ksum(tn, sa)
    if epoch >= 60:
        w = [softmax(t)[yi] ** 0.1 for t, yi in zip(rows(ta), y.tolist())]
        ref += 1 / B * sum((1 - wi) * kl1(a, b) for wi, a, b in zip(w, rows(sn), rows(sa)))
    assert close(iad_loss(sa, tn, y, sn, ta, epoch), ref)
    ref2 = 0.5 * 9 / B * ksum(tn, sa, 3.) + (0.5 / B * sum((1 - softmax(t)[yi] ** 0.1) * kl1(a, b) for t, yi, a, b in
                                                         zip(rows(ta), y.tolist(), rows(sn), rows(sa))) if epoch >= 60 else 0) + 0.5 * ce_mean(sn, y)
    assert close(iad_loss(sa, tn, y, sn, ta, epoch, tau=3., distill_share=0.5), ref2)


def test_rslad(L, C):
    "RSLAD: 5/6 M(p_T(x), p_S(x~)) + 1/6 M(p_T(x), p_S(x)), M with log(p_T + 1e-5), = batchmean/10 on both datasets."
    sa, sn, tn = L['s_adv'], L['s_nat'], L['t_nat']
    M = lambda s: ksum(tn, s, 1., 1e-5) / (10 * B)
    assert close(rslad_loss(sa, sn, tn), 5 / 6 * M(sa) + 1 / 6 * M(sn))
    if C == 10:                                                    # the CIFAR-10 script: PyTorch's mean over B*C
        mean_all = lambda s: ksum(tn, s, 1., 1e-5) / (B * C)
        assert close(rslad_loss(sa, sn, tn), 5 / 6 * mean_all(sa) + 1 / 6 * mean_all(sn))
    else:                                                          # the CIFAR-100 script: 10 x mean over B*100
        assert close(rslad_loss(sa, sn, tn), 10 * (5 / 6 * ksum(tn, sa, 1., 1e-5) + 1 / 6 * ksum(tn, sn, 1., 1e-5)) / (B * 100))


def test_akd_chen(L):
    sa, ta, y = L['s_adv'], L['t_adv'], L['y']
    tst = L['t_nat']                                               # any other logits stand for the standard teacher
    ref = 0.25 * ce_mean(sa, y) + 0.5 / B * ksum(ta, sa) + 0.25 / B * ksum(tst, sa)
    assert close(akd_chen_loss(sa, ta, y, tst), ref)
    assert close(akd_chen_loss(sa, ta, y, ta), 0.25 * ce_mean(sa, y) + 0.75 / B * ksum(ta, sa))   # the robust teacher as T_st
    with pytest.raises(ValueError, match='t_adv_st'): akd_chen_loss(sa, ta, y)                     # no silent stand-in
    ref_vita = 0.3 * ce_mean(sa, y) + 0.6 * 4 / B * ksum(ta, sa, 2.) + 0.1 * 4 / B * ksum(tst, sa, 2.)
    assert close(akd_chen_loss(sa, ta, y, tst, tau=2., robust_kl_share=0.6, standard_kl_share=0.1), ref_vita)


def test_akd_maroto(L):
    sa, ta, y = L['s_adv'], L['t_adv'], L['y']
    assert close(akd_maroto_loss(sa, ta, y), 0.5 * ce_mean(sa, y) + 0.5 / B * ksum(ta, sa))
    assert close(akd_maroto_loss(sa, ta, y, tau=4., kl_share=0.9), 0.1 * ce_mean(sa, y) + 0.9 * 16 / B * ksum(ta, sa, 4.))


def test_mmard_triangle(L, C):
    "Our reading: base + gamma [KL(p_T(x~)||p_S(x)) + KL(p_S(x)||p_S(x~))], each reduced like AdaAD."
    sa, sn, ta = L['s_adv'], L['s_nat'], L['t_adv']
    scale = 1 / (B * 10) if C == 10 else 1 / B
    tri = scale * (ksum(ta, sn) + ksum(sn, sa))
    assert close(triangle_term(sn, sa, ta), tri)
    assert close(mmard_loss(torch.tensor(2., dtype=torch.float64), sn, sa, ta, triangle_weight=0.5), 2 + 0.5 * tri)


def test_bad_arguments(L):
    p, q = L['t_adv'], L['s_adv']
    with pytest.raises(ValueError, match='reduction'):
        kl(p, q, reduction='mean')
    with pytest.raises(ValueError, match='tau'):
        kl(p, q, tau=0.)
    with pytest.raises(ValueError, match='t_adv'):
        iad_loss(q, p, L['y'], L['s_nat'], None, epoch=60)


@pytest.mark.parametrize('fn,old,new', [(adaad_loss, 'alpha', 'adv_share'), (adaad_loss, 'adv_weight', 'adv_share'),
                                        (trades_loss, 'beta', 'kl_weight'), (ard_loss, 'alpha', 'kl_share'),
                                        (ard_loss, 'kl_weight', 'kl_share'), (akd_maroto_loss, 'alpha', 'kl_share'),
                                        (akd_maroto_loss, 'kl_weight', 'kl_share'), (iad_loss, 'distill_weight', 'distill_share'),
                                        (adaiad_loss, 'distill_weight', 'distill_share'),
                                        (akd_chen_loss, 'robust_kl_weight', 'robust_kl_share'),
                                        (akd_chen_loss, 'standard_kl_weight', 'standard_kl_share')])
def test_loss_weights_keep_their_former_names_with_a_warning(L, fn, old, new):
    "A loss function's weight under its former name gives the same loss with a FutureWarning; both names at once is refused."
    sa, ta, sn, tn, y = L['s_adv'], L['t_adv'], L['s_nat'], L['t_nat'], L['y']
    args = {adaad_loss: (sa, ta, sn, tn), trades_loss: (sa, sn, y), ard_loss: (sa, tn, y, sn), akd_maroto_loss: (sa, ta, y),
            iad_loss: (sa, tn, y, sn), adaiad_loss: (sa, ta, y, sn), akd_chen_loss: (sa, ta, y, tn)}[fn]
    with pytest.warns(FutureWarning, match=rf'{fn.__name__}: {old} is deprecated, use {new}'):
        assert close(fn(*args, **{old: 0.4}), float(fn(*args, **{new: 0.4})))
    with pytest.raises(TypeError, match=rf'give {new} only'): fn(*args, **{old: 0.4, new: 0.4})


def test_shares_and_weights_are_named_apart(L):
    "A share gives 1 minus itself to the other term (ARD, AKD); a weight adds its term (TRADES): the names say which."
    sa, tn, sn, ta, y = L['s_adv'], L['t_nat'], L['s_nat'], L['t_adv'], L['y']
    assert close(ard_loss(sa, tn, y, sn, tau=1., kl_share=0.), ce_mean(sn, y))            # all to the clean CE
    assert close(trades_loss(sa, sn, y, kl_weight=0.), ce_mean(sn, y))                     # no KL added
    assert close(akd_chen_loss(sa, ta, y, tn, robust_kl_share=0.5, standard_kl_share=0.5),
                 0.5 / B * ksum(ta, sa) + 0.5 / B * ksum(tn, sa))                           # nothing left for the CE


@pytest.mark.parametrize('fn,new', [(ard_loss, 'kl_share'), (akd_maroto_loss, 'kl_share'), (adaad_loss, 'adv_share')])
def test_a_chain_of_former_names_ends_at_the_name_now(L, fn, new):
    "`alpha` (the first name) and `*_weight` (the second) both set the share, each with a warning naming the share."
    sa, ta, sn, tn, y = L['s_adv'], L['t_adv'], L['s_nat'], L['t_nat'], L['y']
    args = {ard_loss: (sa, tn, y, sn), akd_maroto_loss: (sa, ta, y), adaad_loss: (sa, ta, sn, tn)}[fn]
    second = {'kl_share': 'kl_weight', 'adv_share': 'adv_weight'}[new]
    with pytest.warns(FutureWarning, match=rf'{fn.__name__}: alpha is deprecated, use {new}'): a = fn(*args, alpha=0.3)
    with pytest.warns(FutureWarning, match=rf'{fn.__name__}: {second} is deprecated, use {new}'): b = fn(*args, **{second: 0.3})
    assert close(a, float(fn(*args, **{new: 0.3}))) and close(b, float(a))
    with pytest.raises(TypeError, match=rf'give {new} only'), pytest.warns(FutureWarning): fn(*args, alpha=0.3, **{second: 0.3})
