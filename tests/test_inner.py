"Inner maximisations: each climbs its own objective, keeps the budget, restores the networks, and queries the teacher as its method says."
import math

import pytest
import torch
import torch.nn as nn

from adaad.attacks import project_linf
from adaad.core import kl
from adaad.inner import (Budget, adaad_objective, attack_mode, ce_objective, check_budget, fixed_target_objective, find_inner,
                         init_point, mmard_objective, sign_ascent)
from adaad.methods import METHODS, Logits, get_method, inner_point


def get_inner(name):
    "The inner maximisation of method `name` as a function (student, teacher, x, y, **budget or method fields)."
    def inner(S, T, x, y, **kw):
        bn = kw.pop('bn', None)
        if bn is not None: kw['attack_bn'] = bn
        return inner_point(get_method(name, **kw), Logits(S, T, x), y)
    return inner

INNERS = {n: get_inner(n) for n in ('adaad', 'rslad', 'ard', 'pgd-at', 'trades', 'mmard', 'natural')}
adaad_inner, rslad_inner, ard_inner, trades_inner = (INNERS[n] for n in ('adaad', 'rslad', 'ard', 'trades'))
kl_sum = lambda p, q: kl(p, q, reduction='sum')

EPS = 8 / 255


pytestmark = pytest.mark.usefixtures('one_thread')


def tiny(c=10, seed=0):
    "A 3x8x8 -> c CNN with BatchNorm."
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, c))


def warm(m, x):
    "Give BatchNorm non-trivial running statistics, then eval mode."
    m.train()
    with torch.no_grad():
        for _ in range(3): m(x)
    return m.eval()


@pytest.fixture
def nets():
    torch.manual_seed(123)
    x = torch.rand(16, 3, 8, 8)
    x[0] = 0.; x[1] = 1.                      # images on the borders of [0, 1]
    y = torch.randint(0, 10, (16,))
    return warm(tiny(seed=0), x), warm(tiny(seed=1), x), x, y


def objective(name, S, T, x, y):
    "The objective inner `name` climbs, as a function of x'."
    if name == 'adaad': return adaad_objective(S, T)
    if name == 'rslad':
        with torch.no_grad(): return fixed_target_objective(S, T(x))
    if name == 'ard': return ce_objective(S, y, 'sum')
    if name == 'pgd-at': return ce_objective(S, y, 'mean')
    if name == 'trades':
        with torch.no_grad(): return fixed_target_objective(S, S(x))
    if name == 'mmard': return mmard_objective(S, T, y, 1.)
    raise KeyError(name)


BN = {'ard': 'train'}


ATTACKS = [n for n in INNERS if n != 'natural']


@pytest.mark.parametrize('name', ATTACKS)
def test_inner_climbs_its_objective_and_keeps_the_budget(nets, name):
    S, T, x, y = nets
    inner = get_inner(name)
    torch.manual_seed(7); x0 = inner(S, T, x, y, steps=0)           # the (projected) start
    torch.manual_seed(7); xt = inner(S, T, x, y)
    assert (xt - x).abs().max() <= EPS + 1e-6 and xt.min() >= 0 and xt.max() <= 1
    assert (x0 - x).abs().max() <= EPS + 1e-6 and not xt.requires_grad
    assert (xt - x).abs().max() > EPS / 2                         # it moved
    with attack_mode(S, T, BN.get(name, 'eval')), torch.no_grad():
        f = objective(name, S, T, x, y)
        start, end = f(x0).item(), f(xt).item()
        torch.manual_seed(11)   # the best of 20 random corners of the ball, as a yardstick
        corner = max(f(project_linf(x + EPS * torch.randn_like(x).sign(), x, EPS)).item() for _ in range(20))
    assert end > start and end - start > 3 * max(corner - start, 0), (name, start, end, corner)


@pytest.mark.parametrize('name', list(INNERS))
@pytest.mark.parametrize('training', [True, False])
def test_inner_restores_modes_and_flags(nets, name, training):
    S, T, x, y = nets
    S.train(training); T.train(not training)
    S[0].weight.requires_grad_(False); T[0].bias.requires_grad_(True); T[3].weight.requires_grad_(False)
    flags_s = [p.requires_grad for p in S.parameters()]; flags_t = [p.requires_grad for p in T.parameters()]
    t_buffers = [b.clone() for b in T.buffers()]
    get_inner(name)(S, T, x, y)
    assert S.training == training and T.training == (not training)
    assert [p.requires_grad for p in S.parameters()] == flags_s and [p.requires_grad for p in T.parameters()] == flags_t
    assert all(torch.equal(a, b) for a, b in zip(t_buffers, T.buffers()))       # teacher BN statistics frozen
    assert all(p.grad is None for p in [*S.parameters(), *T.parameters()])      # no weight gradients computed


@pytest.mark.parametrize('name', list(INNERS))
def test_student_bn_statistics_move_only_in_train_mode_attacks(nets, name):
    S, T, x, y = nets
    before = S[1].running_mean.clone()
    get_inner(name)(S, T, x, y)
    assert torch.equal(S[1].running_mean, before) == (name != 'ard')
    before = S[1].running_mean.clone()
    ard_inner(S, T, x, y, bn='eval')                                       # the documented alternative
    assert torch.equal(S[1].running_mean, before)


class Detached(nn.Module):
    "The same logits as `net`, but no gradient flows through it to its input."
    def __init__(self, net): super().__init__(); self.net = net
    def forward(self, z): return self.net(z.detach())


class Bumped(nn.Module):
    "Equal to `net` on the clean batch `x` (values and input gradients), different anywhere else in the ball."
    def __init__(self, net, x, k=50.):
        super().__init__(); self.net, self.x, self.k = net, x, k
        self.u = torch.randn(1, 10, generator=torch.Generator().manual_seed(0))
    def forward(self, z): return self.net(z) + self.k * ((z - self.x) ** 2).flatten(1).sum(1, keepdim=True) * self.u


def run(inner, S, T, x, y, seed=3):
    torch.manual_seed(seed)
    return inner(S, T, x, y)


def test_adaad_gradient_flows_through_the_teacher(nets):
    S, T, x, y = nets
    with torch.no_grad(): assert torch.equal(Detached(T)(x), T(x))
    # same values, no teacher gradient -> a different ascent: AdaAD's gradient depends on the teacher's
    assert not torch.equal(run(adaad_inner, S, T, x, y), run(adaad_inner, S, Detached(T), x, y))
    # and directly: d/dx' of the objective differs from its student-only part by the teacher path, which is non-zero
    xa = (x + 0.01 * torch.randn_like(x)).requires_grad_(True)
    with attack_mode(S, T):
        g_full, = torch.autograd.grad(adaad_objective(S, T)(xa), [xa])
        g_student, = torch.autograd.grad(adaad_objective(S, Detached(T))(xa), [xa])
    assert (g_full - g_student).abs().max() > 1e-3 * g_full.abs().max()


def test_adaad_queries_the_teacher_at_the_moving_point_rslad_only_at_x(nets):
    S, T, x, y = nets
    B = Bumped(T, x)
    with torch.no_grad(): assert torch.allclose(B(x), T(x)) and not torch.allclose(B(x + EPS), T(x + EPS))
    assert torch.equal(run(rslad_inner, S, T, x, y), run(rslad_inner, S, B, x, y))     # T seen at x only
    assert torch.equal(run(rslad_inner, S, T, x, y), run(rslad_inner, S, Detached(T), x, y))
    assert not torch.equal(run(adaad_inner, S, T, x, y), run(adaad_inner, S, B, x, y))


def test_rslad_uses_the_cached_teacher_logits(nets):
    "The RSLAD objective reads T(x) from the batch's Logits cache: computed there once, it is not recomputed."
    S, T, x, y = nets
    lg = Logits(S, T, x); t = lg.t_nat
    lg.teacher = None                                # any further teacher call would fail
    torch.manual_seed(3); a = inner_point(get_method('rslad'), lg, y)
    assert torch.equal(a, run(rslad_inner, S, T, x, y)) and lg.t_nat is t


def test_trades_target_is_the_students_clean_prediction(nets):
    S, T, x, y = nets
    # TRADES never looks at the teacher
    assert torch.equal(run(trades_inner, S, T, x, y), run(trades_inner, S, None, x, y))


def test_mmard_reduces_to_adaad_without_the_boundary_term(nets):
    S, T, x, y = nets
    a = run(adaad_inner, S, T, x, y)
    b = run(lambda *z: get_inner('mmard')(*z, boundary_weight=0.), S, T, x, y)
    assert torch.allclose(a, b) and not torch.equal(a, run(get_inner('mmard'), S, T, x, y))


def test_sign_ascent_on_a_linear_objective():
    x = torch.rand(3, 3, 8, 8) * 0.5 + 0.25
    w = torch.randn_like(x)
    for init in ('gaussian', 'gaussian_clipped', 'uniform'):
        xt = sign_ascent(lambda z: (w * z).sum(), x, EPS, 2 / 255, 10, init)
        assert torch.allclose(xt, x + EPS * w.sign(), atol=1e-6)
    assert torch.allclose(sign_ascent(lambda z: (w * z).sum(), x, EPS, 2 / 255, 2), x + 4 / 255 * w.sign(), atol=6e-3)


def test_starts():
    x = torch.full((4, 3, 8, 8), 1.)
    torch.manual_seed(0); g = init_point(x, EPS)
    assert g.max() > 1 and (g - x).abs().max() < 0.01                # gaussian, std 0.001, not clipped
    assert init_point(x, EPS, 'gaussian_clipped').max() <= 1
    u = init_point(torch.full((64, 3, 8, 8), .5), EPS, 'uniform') - .5
    assert u.abs().max() <= EPS + 1e-7 and u.abs().max() > 0.9 * EPS and abs(u.mean()) < 1e-3


def test_kl_sum():
    p, q = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    P, Q = p.softmax(1), q.softmax(1)
    assert torch.allclose(kl_sum(p, q), (P * (P.log() - Q.log())).sum())


@pytest.mark.parametrize('kw,word', [(dict(eps=8), 'eps'), (dict(eps=-1 / 255), 'eps'), (dict(eps=math.nan), 'eps'),
                                     (dict(step_size=2), 'step_size'), (dict(steps=-1), 'steps'), (dict(steps=2.), 'steps'),
                                     (dict(init='normal'), 'init'), (dict(bn='batch'), 'bn')])
def test_bad_arguments_raise_naming_the_parameter(nets, kw, word):
    S, T, x, y = nets
    with pytest.raises(ValueError, match=word):
        adaad_inner(S, T, x, y, **kw)
    assert not S.training and all(p.requires_grad for p in S.parameters())    # restored even on error


def test_natural_inner_is_the_identity(nets):
    S, T, x, y = nets
    assert torch.equal(get_inner('natural')(S, None, x, y), x)


def test_unknown_inner_lists_the_known_ones():
    with pytest.raises(ValueError, match="'adaad'.*'mmard'"):
        get_method('pgd-at', inner='madri')
    with pytest.raises(ValueError, match='eps'):
        check_budget(None, 0.1, 1)
    lib = [n for n, c in METHODS.items() if c.__module__ == 'adaad.methods']   # not the tests' own methods
    assert {n for n in lib if get_method(n).teacher_in_inner} == {'adaad', 'adaiad', 'rslad', 'mmard', 'igdm', 'saad'}   # igdm: its base, adaad


def test_budget_checks_name_the_field():
    for kw, word in ((dict(eps=8), 'eps'), (dict(step_size=-1.), 'step_size'), (dict(steps=1.5), 'steps'),
                     (dict(init='normal'), 'init'), (dict(attack_bn='batch'), 'attack_bn')):
        with pytest.raises(ValueError, match=word): Budget(**kw)


def test_budget_takes_its_former_bn_with_a_warning():
    "`Budget(bn=...)`, the former name of `attack_bn`, still works with a FutureWarning; both at once is refused."
    with pytest.warns(FutureWarning, match='Budget: bn is deprecated, use attack_bn'):
        assert Budget(bn='train') == Budget(attack_bn='train')
    with pytest.raises(TypeError, match='give attack_bn only'): Budget(bn='train', attack_bn='eval')


def test_find_inner_builds_the_objective_inside_the_attack_mode(nets):
    "A target computed from the student inside `make_objective` sees the attack's BN mode (TRADES' p_S(x) in eval mode)."
    S, T, x, y = nets
    S.train(); seen = []
    find_inner(lambda: seen.append(S.training) or ce_objective(S, y), S, T, x, Budget(steps=1, attack_bn='eval'))
    assert seen == [False] and S.training
