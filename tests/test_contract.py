"""The method contract has no silent traps: an inner objective cannot hand the loss a pass without a gradient, and a
class fact (the official schedule) cannot become a hyper-parameter field by an annotation."""
import dataclasses
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adaad.inner import Budget, fixed_target_objective
from adaad.methods import InnerView, Logits, Method, get_method, inner_point, training_loss

pytestmark = pytest.mark.usefixtures('one_thread')


def tiny(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 10))


@dataclass(frozen=True)
class CleanTarget(Method):
    "A scratch method whose objective reads S(x) from its view, and whose loss has a clean CE term."
    name = 'test-clean-target'
    needs_teacher = False
    budget: Budget | None = Budget(steps=2)
    def objective(self, lg, y): return fixed_target_objective(lg.student, lg.s_nat)
    def passes(self, epoch): return ('nat', 'adv')
    def loss(self, lg, y, epoch):
        return torch.nn.functional.cross_entropy(lg.s_nat, y) + torch.nn.functional.cross_entropy(lg.s_adv, y)


def _loss_and_grads(method, S, x, y):
    "One batch as `training_loss` runs it, keeping x~: (loss, its gradients, x~)."
    lg = Logits(S, None, x)
    lg.x_adv = inner_point(method, lg, y)
    S.train()
    loss = method.loss(lg, y, 0)
    return loss, torch.autograd.grad(loss, list(S.parameters())), lg.x_adv


def test_an_objective_that_reads_the_clean_pass_leaves_the_loss_its_gradient():
    "The objective's S(x) has no graph; the loss's S(x) is computed afresh with one: the gradient is the formula's, clean term included."
    S, x, y = tiny(0), torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    loss, grads, x_adv = _loss_and_grads(CleanTarget(), S, x, y)
    ref = F.cross_entropy(S(x), y) + F.cross_entropy(S(x_adv), y)
    assert torch.allclose(loss, ref)
    for g, r in zip(grads, torch.autograd.grad(ref, list(S.parameters()))): assert torch.allclose(g, r, atol=1e-6)


def test_trades_reads_its_inner_target_from_the_view():
    "TRADES' inner target p_S(x) is the view's (no graph); its loss is the formula on fresh passes, gradients included."
    S, x, y = tiny(0), torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    loss, grads, x_adv = _loss_and_grads(get_method('trades', steps=2), S, x, y)
    s_nat = S(x)
    ref = F.cross_entropy(s_nat, y) + 6. * F.kl_div(F.log_softmax(S(x_adv), 1), F.softmax(s_nat, 1), reduction='batchmean')
    assert torch.allclose(loss, ref, atol=1e-6)
    for g, r in zip(grads, torch.autograd.grad(ref, list(S.parameters()))): assert torch.allclose(g, r, atol=1e-5)


def test_the_view_shares_teacher_logits_and_keeps_student_passes_apart():
    S, T, x = tiny(0), tiny(1), torch.rand(4, 3, 8, 8)
    lg = Logits(S, T, x, x_adv=x.flip(0)); v = InnerView(lg)
    assert v.t_nat is lg.t_nat and not v.s_nat.requires_grad and ('s', 'nat') not in lg.cache
    assert lg.s_nat.requires_grad and lg.s_nat is not v.s_nat
    with pytest.raises(TypeError, match='inner objective has none'): v.replay(('nat',))


@pytest.mark.parametrize('fact', ['epochs', 'milestones', 'weight_decay', 'needs_teacher'])
def test_an_annotated_class_fact_is_refused_at_definition(fact):
    "`epochs: int = 50` in a subclass would turn the schedule into a field (recorded as a hyper-parameter): refused by name."
    ann = {'epochs': int, 'milestones': tuple, 'weight_decay': float, 'needs_teacher': bool}[fact]
    with pytest.raises(TypeError, match=rf"Bad: {fact} is a fact of the method .*write `{fact} = \.\.\.` without an annotation"):
        type('Bad', (Method,), {'__annotations__': {fact: ann}, fact: ann()})


def test_a_class_fact_without_annotation_is_the_trainer_default():
    @dataclass(frozen=True)
    class Short(Method):
        name = 'test-short'
        epochs, milestones = 50, (40,)
        w: float = 1.
    assert Short.epochs == 50 and [f for f in Short().hparams()] == ['w', 'init', 'attack_bn']


@pytest.mark.parametrize('name', ['iad', 'adaiad'])
def test_introspection_starts_at_a_fraction_of_the_run(name):
    "`begin` None: the run's `begin_fraction` (0.3, epoch 60 of the official 200); an explicit `begin` wins; plug-ins follow."
    from adaad.train import TrainConfig, build_method, resolve
    assert get_method(name).start == 60 and get_method(name, begin_fraction=0.5).start == 100
    for epochs, start in ((6, 2), (16, 5), (200, 60)):
        cfg = resolve(TrainConfig(method=name, epochs=epochs))
        assert cfg.method_kwargs['begin'] == start and build_method(cfg).start == start
    assert resolve(TrainConfig(method=name, epochs=16, method_kwargs=dict(begin=6))).method_kwargs['begin'] == 6
    cfg = resolve(TrainConfig(method='fair-ard', epochs=10, eps_start=2 / 255, eps_ramp_epochs=3, method_kwargs=dict(base=name)))
    from adaad.train import method_at
    assert build_method(cfg)._base.start == 3 and method_at(build_method(cfg), cfg, 0)._base.start == 3
    with pytest.raises(ValueError, match=rf'{name}: begin_fraction must be in \[0, 1\]'): get_method(name, begin_fraction=1.5)


@pytest.mark.parametrize('name,old,new', [('trades', 'beta', 'kl_weight'), ('ard', 'alpha', 'kl_share'),
                                          ('iad', 'alpha', 'distill_share'), ('iad', 'beta', 'reliability_exponent'),
                                          ('akd', 'alpha', 'robust_kl_share'), ('akd', 'alpha2', 'standard_kl_share'),
                                          ('akd-maroto', 'alpha', 'kl_share'), ('adaad', 'alpha', 'adv_share'),
                                          ('adaiad', 'alpha', 'distill_share'), ('adaiad', 'beta', 'reliability_exponent')])
def test_loss_weights_are_named_for_what_they_weigh_and_the_former_names_still_work(name, old, new):
    "A former field name sets the new field with a FutureWarning naming both; passing both is refused."
    with pytest.warns(FutureWarning, match=rf'{name}: {old} is deprecated, use {new}'):
        m = get_method(name, **{old: 0.2})
    assert getattr(m, new) == 0.2 and old not in m.hparams()
    with pytest.raises(ValueError, match=rf'{name}: {old} is the former name of {new}; pass {new} only'):
        get_method(name, **{old: 0.2, new: 0.1})


def test_the_command_line_takes_a_former_name_with_a_warning():
    from adaad.cli import config_from_args, parser
    from adaad.train import resolve
    a = parser().parse_args(['train', '--method', 'adaad', '--set', 'alpha=0.5'])
    with pytest.warns(FutureWarning, match='adaad: alpha is deprecated, use adv_share'):
        assert resolve(config_from_args(a)).method_kwargs['adv_share'] == 0.5


@dataclass(frozen=True)
class ReadsBoth(CleanTarget):
    "The same loss (S(x), then S(x~)) with the default declaration, ('adv',): S(x) is read undeclared."
    name = 'test-reads-both'
    def passes(self, epoch): return ('adv',)


def test_a_loss_that_reads_an_undeclared_pass_is_refused():
    "The default `passes` is ('adv',): a loss that also reads S(x) is refused, naming the pass and what to declare."
    S, x, y = tiny(0), torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=r"test-reads-both: its loss read the student pass\(es\) \['nat'\] at epoch 0.*`passes`"):
        training_loss(ReadsBoth(), S, None, x, y)


@pytest.mark.parametrize('declared', [('nat', 'adv'), ('adv', 'nat')])
def test_the_batchnorm_order_follows_the_declaration_not_the_reading(declared):
    "The same loss, declared in two orders: the BatchNorm running mean is the one of the declared order, whatever the loss reads first."
    S, x, y = tiny(0), torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
    m = dataclasses.replace(ReadsBoth())
    object.__setattr__(m, 'passes', lambda epoch: declared)
    torch.manual_seed(1); training_loss(m, S, None, x, y)
    lg = Logits(tiny(0), None, x)
    torch.manual_seed(1); x_adv = inner_point(ReadsBoth(), lg, y)   # the same x~ (eval-mode BN, the same start)
    ref = tiny(0).train()
    for at in declared: ref(x if at == 'nat' else x_adv)
    other = tiny(0).train()
    for at in reversed(declared): other(x if at == 'nat' else x_adv)
    assert not torch.equal(other[1].running_mean, ref[1].running_mean)   # the order shows in the statistics
    assert torch.equal(S[1].running_mean, ref[1].running_mean)


def test_a_former_name_of_the_outer_method_stays_with_it_in_a_combo():
    "With another method's inner, `alpha` still sets the outer AdaAD's `adv_share` (with the warning), not the inner's."
    with pytest.warns(FutureWarning, match='adaad: alpha is deprecated, use adv_share'):
        m = get_method('adaad', inner='trades', alpha=0.3)
    assert m.outer.adv_share == 0.3
