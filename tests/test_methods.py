"Methods: the registry's defaults, `training_loss` for every method, faithful vs lean passes, plug-and-play, and errors."
import copy
import math

import pytest
import torch
import torch.nn as nn

import adaad.inner as inner_mod
from adaad.train import lr_at
from adaad.losses import kl, rslad_loss, triangle_term
from adaad.methods import (ALIASES, METHODS, Logits, Method, get_method, known_methods, method_hparams,
                           training_loss)


pytestmark = pytest.mark.usefixtures('one_thread')


def tiny(c=10, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, c))


@pytest.fixture
def setup():
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,))
    S, T = tiny(seed=0), tiny(seed=1).eval()
    return S, T, x, y


def fresh(S):
    return copy.deepcopy(S)


@pytest.mark.parametrize('name', known_methods())
@pytest.mark.parametrize('epoch', [0, 60])
@pytest.mark.parametrize('faithful', [False, True])
def test_training_loss_runs_for_every_method(setup, name, epoch, faithful):
    S, T, x, y = setup
    S.eval()
    loss, logs = training_loss(name, S, T, x, y, epoch=epoch, num_classes=10, faithful=faithful)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    grads = [p.grad for p in S.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in T.parameters()) and all(p.requires_grad for p in T.parameters())
    assert S.training and not T.training                                     # student left in train mode
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in logs.values()) and 'loss' in logs
    assert not logs['loss'].requires_grad


def count_student_passes(S):
    calls = []
    S.register_forward_hook(lambda m, i, o: calls.append(1))
    return calls


@pytest.mark.parametrize('name,epoch,lean,faithful', [
    ('adaad', 0, 1, 2), ('adaiad', 0, 1, 3), ('adaiad', 60, 2, 4), ('pgd-at', 0, 1, 2), ('trades', 0, 2, 3),
    ('ard', 0, 1, 2), ('iad', 0, 1, 2), ('iad', 60, 2, 3), ('rslad', 0, 2, 2), ('akd', 0, 1, 1), ('mmard', 0, 2, 2),
    ('natural', 0, 1, 1)])
def test_outer_passes_lean_and_faithful(setup, name, epoch, lean, faithful):
    "Student forwards after the 10 inner steps: the default runs only what the loss needs, faithful=True the official sequence."
    S, T, x, y = setup
    for f, n in ((False, lean), (True, faithful)):
        s = fresh(S); calls = count_student_passes(s)
        training_loss(name, s, T, x, y, epoch=epoch, faithful=f)
        extra = 1 if name == 'trades' else 0                                 # TRADES' inner computes p_S(x) once
        assert len(calls) == (0 if name == 'natural' else 10) + extra + n, (name, f, len(calls))


@pytest.mark.parametrize('name', ['adaad', 'adaiad', 'ard', 'pgd-at', 'rslad'])
def test_faithful_changes_only_batchnorm_statistics(setup, name):
    S, T, x, y = setup
    out = {}
    for f in (False, True):
        s = fresh(S); torch.manual_seed(5)
        loss, _ = training_loss(name, s, T, x, y, epoch=60, faithful=f)
        loss.backward()
        out[f] = loss.detach(), [p.grad for p in s.parameters()], s[1].running_mean.clone()
    assert torch.allclose(out[False][0], out[True][0], rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(out[False][1], out[True][1]))
    assert torch.equal(out[False][2], out[True][2]) == (name == 'rslad')    # RSLAD has no dead pass


def test_adaad_loss_at_the_inner_point(setup):
    "training_loss('adaad') = mean over B*C of KL(p_T(x~)||p_S(x~)) with S in train mode at the inner's x~."
    S, T, x, y = setup
    s1, s2 = fresh(S), fresh(S)
    torch.manual_seed(3); loss, _ = training_loss('adaad', s1, T, x, y, num_classes=10)
    torch.manual_seed(3); xt = inner_mod.adaad_inner(s2, T, x)
    s2.train()
    with torch.no_grad(): t = T(xt)
    assert torch.allclose(loss, kl(t, s2(xt), reduction='sum') / (8 * 10))


def test_adaad_reduction_follows_num_classes(setup):
    S, T, x, y = setup
    S100, T100 = tiny(100, 0), tiny(100, 1).eval()
    y100 = torch.randint(0, 100, (8,))
    losses = {}
    for k, kw in dict(auto={}, c100=dict(num_classes=100), mean_all=dict(reduction='mean_all')).items():
        torch.manual_seed(1); losses[k] = training_loss('adaad', fresh(S100), T100, x, y100, **kw)[0]
    assert torch.allclose(losses['auto'], losses['c100']) and torch.allclose(losses['mean_all'] * 100, losses['auto'])


def test_plug_and_play_uses_the_other_methods_inner(setup, monkeypatch):
    S, T, x, y = setup
    used = []
    for n in ('adaad', 'rslad'):
        f = inner_mod.INNERS[n]
        monkeypatch.setitem(inner_mod.INNERS, n, lambda *a, _f=f, _n=n, **k: used.append((_n, k)) or _f(*a, **k))
    training_loss('rslad', S, T, x, y, inner='adaad')
    assert used[-1][0] == 'adaad' and used[-1][1]['init'] == 'gaussian' and 't_nat' not in used[-1][1]
    training_loss('ard', S, T, x, y, inner='rslad', eps=4 / 255)
    assert used[-1][0] == 'rslad' and used[-1][1]['eps'] == 4 / 255 and 't_nat' in used[-1][1]


def test_plug_and_play_mmard_triangle_on_another_base(setup):
    "mmard with base=rslad = RSLAD's loss + triangle at MMARD's x~ = rslad with inner=mmard + triangle."
    S, T, x, y = setup
    s1, s2 = fresh(S), fresh(S)
    torch.manual_seed(4); a, _ = training_loss('mmard', s1, T, x, y, base='rslad')
    torch.manual_seed(4); b, _ = training_loss('rslad', s2, T, x, y, inner='mmard')
    assert a > b
    torch.manual_seed(4); xt = inner_mod.mmard_inner(fresh(S), T, x, y)
    s3 = fresh(S).train()
    with torch.no_grad():
        sn, sa, tn, ta = s3(x), s3(xt), T(x), T(xt)
        assert torch.allclose(b, rslad_loss(sa, sn, tn), rtol=1e-5)
        assert torch.allclose(a, rslad_loss(sa, sn, tn) + triangle_term(sn, sa, ta), rtol=1e-5)


def test_akd_uses_the_standard_teacher(setup):
    S, T, x, y = setup
    T2 = tiny(seed=2).eval()
    torch.manual_seed(2); a, _ = training_loss('akd', fresh(S), T, x, y)
    torch.manual_seed(2); b, _ = training_loss('akd-chen', fresh(S), T, x, y, teacher_st=T2)
    torch.manual_seed(2); c, _ = training_loss('akd2', fresh(S), T, x, y, teacher_st=T)
    assert not torch.allclose(a, b) and torch.allclose(a, c)
    assert get_method('akd-maroto').outer is not get_method('akd').outer


def test_registry_defaults():
    "The official defaults of methods.md §3, §4, §6, §8.5, §8.6."
    M = METHODS
    assert set(M) >= {'natural', 'pgd-at', 'trades', 'ard', 'iad', 'rslad', 'akd', 'akd-maroto', 'adaad', 'adaiad', 'mmard'}
    assert (M['natural'].needs_teacher, M['natural'].inner, M['natural'].weight_decay) == (False, 'natural', 5e-4)
    for n in ('adaad', 'adaiad', 'mmard'):
        assert (M[n].weight_decay, M[n].epochs, M[n].milestones, M[n].single_decay) == (5e-4, 200, (100, 150), False)
    assert (M['rslad'].weight_decay, M['rslad'].epochs, M['rslad'].milestones) == (2e-4, 300, (215, 260, 285))
    assert (M['pgd-at'].weight_decay, M['pgd-at'].epochs, M['pgd-at'].milestones) == (5e-4, 110, (100, 105))
    for n in ('ard', 'iad', 'akd'):
        assert (M[n].weight_decay, M[n].epochs, M[n].single_decay, M[n].attack_bn, M[n].init) == (2e-4, 200, True, 'train', 'uniform')
    assert M['trades'].weight_decay == 2e-4 and M['trades'].beta == 6. and M['trades'].eps == 0.031
    assert (M['adaad'].alpha, M['adaad'].tau) == (1., None)
    assert (M['adaiad'].tau, M['adaiad'].alpha, M['adaiad'].beta, M['adaiad'].begin, M['adaiad'].inner) == (30., 1., 0.1, 60, 'adaad')
    assert (M['iad'].tau, M['iad'].alpha, M['iad'].beta, M['iad'].begin) == (1., 1., 0.1, 60)
    assert (M['ard'].tau, M['ard'].alpha) == (30., 1.)
    assert M['pgd-at'].init == 'gaussian_clipped' and not M['pgd-at'].needs_teacher and not M['trades'].needs_teacher
    for n in ('adaad', 'adaiad', 'rslad', 'trades', 'pgd-at', 'mmard'):
        assert M[n].attack_bn == 'eval'
    for m in M.values():
        assert m.steps == (0 if m.name == 'natural' else 10) and isinstance(m, Method) and m.source
    assert all(a in known_methods() and v in METHODS for a, v in ALIASES.items())


def test_lr_schedules():
    method_lr = lambda name, e: lr_at(e, METHODS[name].lr, METHODS[name].milestones, METHODS[name].single_decay)
    assert [method_lr('adaad', e) for e in (0, 99)] == [0.1, 0.1]
    assert math.isclose(method_lr('adaad', 100), 0.01) and math.isclose(method_lr('adaad', 150), 0.001)
    assert math.isclose(method_lr('pgd-at', 105), 0.001)
    assert math.isclose(method_lr('ard', 100), 0.01) and math.isclose(method_lr('ard', 199), 0.01)    # single decay
    assert math.isclose(method_lr('rslad', 285), 1e-4) and math.isclose(method_lr('rslad', 284), 1e-3)


def test_errors(setup):
    S, T, x, y = setup
    with pytest.raises(ValueError, match="method must be one of .*'adaad'.*'mmard'"):
        training_loss('adad', S, T, x, y)
    with pytest.raises(ValueError, match='eps'):
        training_loss('adaad', S, T, x, y, eps=8)
    with pytest.raises(ValueError, match='takes no tau; accepted: .*alpha'):
        training_loss('adaad', S, T, x, y, tau=2.)
    with pytest.raises(ValueError, match='needs a teacher'):
        training_loss('adaad', S, None, x, y)
    with pytest.raises(ValueError, match='needs a teacher'):
        training_loss('pgd-at', S, None, x, y, inner='adaad')
    with pytest.raises(ValueError, match='inner'):
        training_loss('adaad', S, T, x, y, inner='sgd')
    with pytest.raises(ValueError, match='base'):
        training_loss('mmard', S, T, x, y, base='mmard')
    with pytest.raises(ValueError, match='attack_bn'):
        method_hparams('ard', attack_bn='frozen')
    with pytest.raises(ValueError, match='epoch'):
        training_loss('adaad', S, T, x, y, epoch=-1)
    for n in ('pgd-at', 'trades', 'natural'):                                # no teacher needed
        assert torch.isfinite(training_loss(n, S, None, x, y)[0])


def test_logits_cache(setup):
    S, T, x, y = setup
    lg = Logits(S, T, x)
    with pytest.raises(ValueError, match='x_adv'):
        lg.s_adv
    lg.x_adv = x.flip(0)
    assert lg.s_nat is lg.s_nat and not lg.t_nat.requires_grad
    with pytest.raises(ValueError, match='teacher_st'):
        lg.t('adv', standard=True)


@pytest.mark.parametrize('name', ['ard', 'adaiad', 'adaad', 'rslad'])
def test_bf16_autocast_keeps_kl_losses_in_float32(setup, name):
    "Under bf16 autocast, the KL losses (tau^2 = 900 for ARD/AdaIAD) stay float32 and close to the float32 run."
    S, T, x, y = setup
    torch.manual_seed(6)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low, _ = training_loss(name, fresh(S), T, x, y, epoch=60)
    torch.manual_seed(6); ref, _ = training_loss(name, fresh(S), T, x, y, epoch=60)
    assert low.dtype == torch.float32 and low > 0 and torch.allclose(low, ref, rtol=0.05)
