"Methods: the registry's defaults, `training_loss` for every method, faithful vs lean passes, plug-and-play, and errors."
import copy
import math

import pytest
import torch
import torch.nn as nn

from adaad.core import kl
from adaad.inner import Budget
from adaad.train import TrainConfig, lr_at, resolve
from adaad.losses import rslad_loss, triangle_term
from adaad.methods import (ALIASES, METHODS, Combo, Logits, Method, get_method, inner_point, known_methods, training_loss)


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


def point(method, S, T, x, y, seed):
    "The inner point of `method` with the RNG seeded."
    torch.manual_seed(seed)
    return inner_point(get_method(method), Logits(S, T, x), y)


@pytest.mark.parametrize('name', known_methods())
@pytest.mark.parametrize('epoch', [0, 60])
@pytest.mark.parametrize('faithful', [False, True])
def test_training_loss_runs_for_every_method(setup, name, epoch, faithful):
    S, T, x, y = setup
    S.eval()
    peers = {k: tiny(seed=3) for k in get_method(name).peer_archs('tiny')}   # PeerAiD trains a peer beside the student
    loss, logs = training_loss(name, S, T, x, y, epoch=epoch, num_classes=10, faithful=faithful, natural_teacher=tiny(seed=2).eval(),
                               peers=peers)
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
    ('ard', 0, 1, 2), ('iad', 0, 1, 3), ('iad', 60, 2, 4), ('rslad', 0, 2, 2), ('akd', 0, 1, 1), ('mmard', 0, 2, 2),
    ('natural', 0, 1, 1), ('igdm', 0, 2, 2), ('saad', 0, 2, 3)])
def test_outer_passes_lean_and_faithful(setup, name, epoch, lean, faithful):
    "Student forwards after the 10 inner steps: the default runs only what the loss needs, faithful=True the official sequence."
    S, T, x, y = setup
    for f, n in ((False, lean), (True, faithful)):
        s = fresh(S); calls = count_student_passes(s)
        training_loss(name, s, T, x, y, epoch=epoch, faithful=f, natural_teacher=T)
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
    xt = point('adaad', s2, T, x, y, 3)
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


def test_plug_and_play_uses_the_inner_methods_objective_and_budget(setup):
    "rslad with inner=adaad trains at AdaAD's x~; ard with inner=rslad uses RSLAD's start, BN mode and the given eps."
    S, T, x, y = setup
    c = get_method('rslad', inner='adaad')
    torch.manual_seed(7); a = inner_point(c, Logits(S, T, x), y)
    assert torch.equal(a, point('adaad', S, T, x, y, 7)) and not torch.equal(a, point('rslad', S, T, x, y, 7))
    c = get_method('ard', inner='rslad', eps=4 / 255)
    assert c.budget == Budget(eps=4 / 255) and isinstance(c.outer, type(get_method('ard')))
    assert (c.weight_decay, c.single_decay, c.name) == (2e-4, True, 'ard (inner rslad)')


def test_the_budget_follows_the_method_that_supplies_the_inner():
    "adaad with TRADES' inner keeps TRADES' 0.031 / 0.007 (the budget used to come from the outer method)."
    c = resolve(TrainConfig(method='adaad', inner='trades'))
    assert (c.eps, c.step_size, c.steps, c.epochs, c.weight_decay) == (0.031, 0.007, 10, 200, 5e-4)
    c = resolve(TrainConfig(method='trades', inner='adaad'))
    assert (c.eps, c.step_size, c.epochs, c.weight_decay) == (8 / 255, 2 / 255, 76, 2e-4)


def test_plug_and_play_mmard_triangle_on_another_base(setup):
    "mmard with base=rslad = RSLAD's loss + triangle at MMARD's x~ = rslad with inner=mmard + triangle."
    S, T, x, y = setup
    s1, s2 = fresh(S), fresh(S)
    torch.manual_seed(4); a, _ = training_loss('mmard', s1, T, x, y, base='rslad')
    torch.manual_seed(4); b, _ = training_loss('rslad', s2, T, x, y, inner='mmard')
    assert a > b
    xt = point('mmard', fresh(S), T, x, y, 4)
    s3 = fresh(S).train()
    with torch.no_grad():
        sn, sa, tn, ta = s3(x), s3(xt), T(x), T(xt)
        assert torch.allclose(b, rslad_loss(sa, sn, tn), rtol=1e-5)
        assert torch.allclose(a, rslad_loss(sa, sn, tn) + triangle_term(sn, sa, ta), rtol=1e-5)


def test_akd_needs_a_standard_teacher_unless_told_otherwise(setup):
    "AKD refuses without a standard teacher; robust_as_standard=True equals passing the robust teacher as T_st."
    S, T, x, y = setup
    with pytest.raises(ValueError, match='standard teacher'):
        training_loss('akd', fresh(S), T, x, y)
    T2 = tiny(seed=2).eval()
    torch.manual_seed(2); a, _ = training_loss('akd', fresh(S), T, x, y, robust_as_standard=True)
    torch.manual_seed(2); b, _ = training_loss('akd-chen', fresh(S), T, x, y, natural_teacher=T2)
    torch.manual_seed(2); c, _ = training_loss('akd2', fresh(S), T, x, y, natural_teacher=T)
    assert not torch.allclose(a, b) and torch.allclose(a, c)
    assert get_method('akd').needs_natural_teacher and not get_method('akd', robust_as_standard=True).needs_natural_teacher
    assert type(get_method('akd-maroto')).loss is not type(get_method('akd')).loss


def test_akd_loss_matches_the_official_formula(setup):
    "AKD2.py: (1-a1-a2) CE(S(x~)) + a1 tau^2 KL(T(x~)||S(x~)) + a2 tau^2 KL(T_st(x~)||S(x~)), batchmean, all at x~."
    S, T, x, y = setup
    T2 = tiny(seed=2).eval()
    s = fresh(S)
    torch.manual_seed(9); loss, _ = training_loss('akd', s, T, x, y, natural_teacher=T2, tau=2.)
    xt = point('akd', fresh(S), T, x, y, 9)
    s2 = fresh(S).train()                      # train-mode BN normalises with the batch: its running statistics do not matter
    with torch.no_grad():
        sa, ta, tsa = s2(xt), T(xt), T2(xt)
        ls = lambda z: torch.log_softmax(z / 2, 1)
        kd = lambda t: (ls(t).exp() * (ls(t) - ls(sa))).sum(1).mean()
        want = 0.25 * torch.nn.functional.cross_entropy(sa, y) + 0.5 * 4 * kd(ta) + 0.25 * 4 * kd(tsa)
    assert torch.allclose(loss, want, rtol=1e-5)


def test_registry_defaults():
    "The official defaults of every method, from its official script."
    M = {n: get_method(n) for n, c in METHODS.items() if c.__module__ == 'adaad.methods'}   # not the tests' own methods
    assert set(M) >= {'natural', 'pgd-at', 'trades', 'ard', 'iad', 'rslad', 'akd', 'akd-maroto', 'adaad', 'adaiad', 'mmard', 'igdm', 'fair-ard'}
    assert (M['natural'].uses_teacher, M['natural'].budget, M['natural'].weight_decay) == (False, None, 5e-4)
    for n in ('adaad', 'adaiad', 'mmard'):
        assert (M[n].weight_decay, M[n].epochs, M[n].milestones, M[n].single_decay) == (5e-4, 200, (100, 150), False)
    assert (M['rslad'].weight_decay, M['rslad'].epochs, M['rslad'].milestones) == (2e-4, 300, (215, 260, 285))
    assert (M['pgd-at'].weight_decay, M['pgd-at'].epochs, M['pgd-at'].milestones) == (5e-4, 110, (100, 105))
    for n in ('ard', 'iad', 'akd'):
        assert (M[n].weight_decay, M[n].epochs, M[n].single_decay, M[n].budget.attack_bn, M[n].budget.init) == (2e-4, 200, True, 'train', 'uniform')
    assert M['trades'].weight_decay == 2e-4 and M['trades'].kl_weight == 6. and M['trades'].budget.eps == 0.031
    assert (M['adaad'].adv_share, M['adaad'].reduction) == (1., None) and not hasattr(M['adaad'], 'tau')
    assert (M['adaiad'].tau, M['adaiad'].distill_share, M['adaiad'].reliability_exponent, M['adaiad'].start) == (30., 1., 0.1, 60)
    assert (M['iad'].tau, M['iad'].distill_share, M['iad'].reliability_exponent, M['iad'].start) == (1., 1., 0.1, 60)   # epoch 60 of the official 200
    assert (M['ard'].tau, M['ard'].kl_share) == (30., 1.) and (M['akd'].robust_kl_share, M['akd'].standard_kl_share, M['akd'].tau) == (0.5, 0.25, 1.)
    assert M['pgd-at'].budget.init == 'gaussian_clipped' and not M['pgd-at'].uses_teacher and not M['trades'].uses_teacher
    for n in ('adaad', 'adaiad', 'rslad', 'trades', 'pgd-at', 'mmard'):
        assert M[n].budget.attack_bn == 'eval'
    for m in M.values():
        assert isinstance(m, Method) and m.source and m.__doc__ and (m.budget is None or m.budget.steps == 10)
    assert all(a in known_methods() and v in METHODS for a, v in ALIASES.items())


def test_trades_schedule_counts_epochs_from_one_like_its_script():
    "train_trades_cifar10.py: epochs 1..76, lr*0.1 when epoch >= 75, *0.01 >= 90, *0.001 >= 100; ours is 0-based."
    m = get_method('trades')
    official = lambda e1: 0.1 * (0.001 if e1 >= 100 else 0.01 if e1 >= 90 else 0.1 if e1 >= 75 else 1)
    for e0 in range(0, 110):
        assert math.isclose(lr_at(e0, 0.1, m.milestones, m.single_decay), official(e0 + 1)), e0
    assert m.epochs == 76 and lr_at(74, 0.1, m.milestones) == pytest.approx(0.01)   # the last two epochs at 0.01


def test_ard_batch_size_follows_its_script_per_dataset():
    "goldblum/AdversariallyRobustDistillation main.py: batch 128 on CIFAR-10, 256 on CIFAR-100."
    assert resolve(TrainConfig(method='ard')).batch_size == 128
    assert resolve(TrainConfig(method='ard', dataset='cifar100')).batch_size == 256
    assert resolve(TrainConfig(method='adaad', dataset='cifar100')).batch_size == 128
    assert resolve(TrainConfig(method='ard', dataset='cifar100', batch_size=64)).batch_size == 64


def test_lr_schedules():
    method_lr = lambda name, e: lr_at(e, 0.1, get_method(name).milestones, get_method(name).single_decay)
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
    with pytest.raises(ValueError, match='takes no tau; accepted: .*adv_share'):
        training_loss('adaad', S, T, x, y, tau=2.)
    with pytest.raises(ValueError, match='needs a teacher'):
        training_loss('adaad', S, None, x, y)
    with pytest.raises(ValueError, match='needs a teacher'):
        training_loss('pgd-at', S, None, x, y, inner='adaad')
    with pytest.raises(ValueError, match='inner|method must be one of'):
        training_loss('adaad', S, T, x, y, inner='sgd')
    with pytest.raises(ValueError, match='base'):
        training_loss('mmard', S, T, x, y, base='mmard')
    with pytest.raises(ValueError, match='attack_bn'):
        get_method('ard', attack_bn='frozen')
    with pytest.raises(ValueError, match='tau must be > 0'):
        get_method('ard', tau=0.)
    with pytest.raises(ValueError, match="adv_share must be <class 'float'>"):
        get_method('adaad', adv_share='1')
    with pytest.raises(ValueError, match='reduction'):
        get_method('adaad', reduction='mean')
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
    with pytest.raises(ValueError, match='natural_teacher'):
        lg.t('adv', natural=True)


def test_rslad_shares_the_teachers_clean_logits_between_inner_and_loss(setup):
    "One teacher forward on x per RSLAD batch (the inner's target and the loss's T(x) are the same tensor)."
    S, T, x, y = setup
    calls = []
    T.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    training_loss('rslad', S, T, x, y)
    assert len(calls) == 1


@pytest.mark.parametrize('name', ['ard', 'adaiad', 'adaad', 'rslad'])
def test_bf16_autocast_keeps_kl_losses_in_float32(setup, name):
    "Under bf16 autocast, the KL losses (tau^2 = 900 for ARD/AdaIAD) stay float32 and close to the float32 run."
    S, T, x, y = setup
    torch.manual_seed(6)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low, _ = training_loss(name, fresh(S), T, x, y, epoch=60)
    torch.manual_seed(6); ref, _ = training_loss(name, fresh(S), T, x, y, epoch=60)
    assert low.dtype == torch.float32 and low > 0 and torch.allclose(low, ref, rtol=0.05)


def test_combo_refuses_non_methods():
    with pytest.raises(ValueError, match='Combo needs two Method instances'):
        Combo(outer='adaad', inner=get_method('ard'))


# ---- shares and weights: one name, one meaning; the former names still work ----------------------------------------
FORMER = [('ard', 'kl_weight', 'kl_share'), ('ard', 'alpha', 'kl_share'), ('akd-maroto', 'kl_weight', 'kl_share'),
          ('akd-maroto', 'alpha', 'kl_share'), ('adaad', 'adv_weight', 'adv_share'), ('adaad', 'alpha', 'adv_share'),
          ('iad', 'distill_weight', 'distill_share'), ('iad', 'alpha', 'distill_share'),
          ('adaiad', 'distill_weight', 'distill_share'), ('adaiad', 'alpha', 'distill_share'),
          ('akd', 'robust_kl_weight', 'robust_kl_share'), ('akd', 'alpha', 'robust_kl_share'),
          ('akd', 'standard_kl_weight', 'standard_kl_share'), ('akd', 'alpha2', 'standard_kl_share')]


@pytest.mark.parametrize('name,old,new', FORMER)
def test_a_former_name_sets_the_share_with_a_warning(name, old, new):
    "`get_method`, the class itself and `--set` take a former name (the first or the second) for the share, warning."
    from adaad.cli import config_from_args, parser
    from adaad.methods import method_class
    want = get_method(name, **{new: 0.2})
    with pytest.warns(FutureWarning, match=rf'{name}: {old} is deprecated, use {new}'):
        assert get_method(name, **{old: 0.2}) == want
    with pytest.warns(FutureWarning, match=rf'{name}: {old} is deprecated, use {new}'):
        assert method_class(name)(**{old: 0.2}) == want
    a = parser().parse_args(['train', '--method', name, '--set', f'{old}=0.2'])
    with pytest.warns(FutureWarning, match=rf'{name}: {old} is deprecated, use {new}'):
        kw = resolve(config_from_args(a)).method_kwargs
    assert kw[new] == 0.2 and old not in kw
    with pytest.raises(ValueError, match=rf'{name}: {old} is the former name of {new}; pass {new} only'):
        method_class(name)(**{old: 0.2, new: 0.2})


def test_added_weights_keep_their_names():
    "TRADES' `kl_weight` and PeerAiD's `distill_weight` are added weights, not shares: no warning, no [0, 1] bound."
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert get_method('trades', kl_weight=8.).kl_weight == 8. and get_method('peeraid', distill_weight=3.).distill_weight == 3.
    with pytest.raises(ValueError, match=r'ard: kl_share must be in \[0, 1\] \(the share of the KL term'):
        get_method('ard', kl_share=1.5)


def test_former_names_in_a_record_map_to_the_outer_method_first():
    "A recorded former name is the outer method's field where it has it (the older record kept the outer's value)."
    from adaad.methods import recorded_fields
    assert recorded_fields('ard', None, dict(kl_weight=0.5, tau=30.)) == dict(kl_share=0.5, tau=30.)
    assert recorded_fields('trades', 'ard', dict(kl_weight=6.)) == dict(kl_weight=6.)          # TRADES' own field
    assert recorded_fields('ard', 'trades', dict(kl_weight=1.)) == dict(kl_share=1.)           # ARD's, as the outer
    assert recorded_fields('adaiad', None, dict(alpha=1., beta=0.1)) == dict(distill_share=1., reliability_exponent=0.1)


def _run_data():
    from adaad.data import CifarSplit
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (48, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(48) % 10
    return CifarSplit(x[:32], y[:32], 10, split='train'), CifarSplit(x[32:], y[32:], 10, split='test')


def _as_older(folder, renames):
    "Rewrite the identity and config of run `folder` with the method fields under their former names (an older adaad's)."
    import json
    f = folder / 'identity.json'; d = json.loads(f.read_text())
    d['config']['method_kwargs'] = {renames.get(k, k): v for k, v in d['config']['method_kwargs'].items()}
    f.write_text(json.dumps(d)); return d


def test_a_run_folder_written_under_former_names_is_the_same_run(tmp_path):
    "A finished ARD run recorded with `kl_weight` is reused by a call with `kl_share` (or `kl_weight`); another value is refused."
    from adaad.models import create_model
    from adaad.train import train
    cfg = TrainConfig(method='ard', student='wrn-10-1', epochs=1, batch_size=16, steps=1, val_n=8, val_steps=1,
                      method_kwargs=dict(kl_share=0.5))
    torch.manual_seed(0); teacher = create_model('wrn-10-1').eval()
    run = lambda c: train(c, teacher=teacher, out_dir=tmp_path, device='cpu', progress=False, data=_run_data())
    assert run(cfg)['status'] == 'done'
    assert 'kl_weight' in _as_older(tmp_path, {'kl_share': 'kl_weight'})['config']['method_kwargs']
    r = run(cfg)
    assert r['status'] == 'done' and r['wall_s'] == 0.                                       # reused, not trained again
    with pytest.warns(FutureWarning, match='ard: kl_weight is deprecated, use kl_share'):
        r = run(TrainConfig(**{**cfg.__dict__, 'method_kwargs': dict(kl_weight=0.5)}))
    assert r['status'] == 'done' and r['wall_s'] == 0.
    with pytest.raises(ValueError, match=r'holds another run: config\.method_kwargs\.kl_share: 0\.5 \(folder\) != 0\.25'):
        run(TrainConfig(**{**cfg.__dict__, 'method_kwargs': dict(kl_share=0.25)}))
