"""Bad input: every public entry point, tried with invalid values, answers with an error that names the parameter and
what it accepts. Hypothesis covers the large input spaces (budgets, step counts, shapes, ranges)."""
import math
import re

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings, strategies as st

from adaad.attacks import autoattack, cw_l2, fgsm, pgd, square
from adaad.evaluate import evaluate, resolve_suite, wilson_ci
from adaad.checkpoint import atomic_save, load_model
from adaad.models import create_model
from adaad.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures('one_thread')

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def toy(n=4, c=10):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, c, 4, 4, generator=g)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, c))
    return model.eval(), x, x.mean((2, 3)).argmax(1)


MODEL, X, Y = toy()
BAD_EPS = st.one_of(st.floats(max_value=0., allow_nan=False), st.floats(min_value=1., exclude_min=True),
                    st.just(float('nan')))
EPS_MSG = r'eps must be a number in \(0, 1\]'


# ---- attacks ----------------------------------------------------------------------------------------------------------
@SETTINGS
@given(eps=BAD_EPS, attack=st.sampled_from([fgsm, pgd]))
def test_attack_eps_outside_unit_interval(eps, attack):
    with pytest.raises(ValueError, match=EPS_MSG): attack(MODEL, X, Y, eps=eps)


@SETTINGS
@given(steps=st.integers(max_value=0))
def test_pgd_and_cw_steps_below_one(steps):
    with pytest.raises(ValueError, match=r'steps must be an integer >= 1'): pgd(MODEL, X, Y, steps=steps)
    with pytest.raises(ValueError, match=r'steps must be an integer >= 1'): cw_l2(MODEL, X, Y, steps=steps)


@pytest.mark.parametrize('steps', [2.5, '10', True])
def test_pgd_steps_not_an_integer(steps):
    with pytest.raises(TypeError, match=r'steps must be an integer >= 1'): pgd(MODEL, X, Y, steps=steps)


@SETTINGS
@given(shape=st.lists(st.integers(1, 4), min_size=0, max_size=6).filter(lambda s: len(s) != 4))
def test_images_of_the_wrong_rank(shape):
    with pytest.raises(ValueError, match=r'x must be a 4-D tensor \(N, C, H, W\), got shape'):
        fgsm(MODEL, torch.rand(shape), Y)


@SETTINGS
@given(lo=st.floats(-10, -1e-3), hi=st.floats(1.001, 10), which=st.booleans())
def test_images_out_of_range(lo, hi, which):
    x = X.clone(); x[0, 0, 0, 0] = lo if which else hi
    with pytest.raises(ValueError, match=r'x must be in \[0, 1\], got values in'): pgd(MODEL, x, Y)


@pytest.mark.parametrize('value', [float('nan'), float('inf'), -float('inf')])
def test_non_finite_images(value):
    x = X.clone(); x[1, 2, 3, 0] = value
    with pytest.raises(ValueError, match=r'x must be finite, got 1 NaN/inf values'): fgsm(MODEL, x, Y)
    with pytest.raises(ValueError, match=r'x must be finite'): evaluate(MODEL, x, Y, progress=False)


def test_uint8_images_to_an_attack_say_how_to_convert():
    with pytest.raises(TypeError, match=r'x must be a floating-point tensor.*x\.float\(\) / 255'):
        pgd(MODEL, (X * 255).to(torch.uint8), Y)


@pytest.mark.parametrize('y,err,msg', [
    (torch.tensor([0, 1]), ValueError, r'y must have shape \(N,\) = \(4,\) to match x'),
    (torch.tensor([0., 1., 2., 3.]), TypeError, r'y must be an integer tensor'),
    (torch.tensor([0, -1, 2, 3]), ValueError, r'y must hold class indices >= 0'),
    ([0, 1, 2, 3], TypeError, r'y must be an integer torch\.Tensor')])
def test_bad_labels(y, err, msg):
    with pytest.raises(err, match=msg): pgd(MODEL, X, y)


def test_labels_beyond_the_model_classes():
    with pytest.raises(ValueError, match=r'y must hold class indices in \[0, 10\)|classes'): pgd(MODEL, X, torch.tensor([0, 1, 2, 10]))


@pytest.mark.parametrize('kw,msg', [(dict(step_size=0.), r'step_size must be a finite number > 0'),
                                    (dict(step_size=-1 / 255), r'step_size must be a finite number > 0'),
                                    (dict(restarts=0), r'restarts must be an integer >= 1'),
                                    (dict(loss='mse'), r'loss'),
                                    (dict(seed=-1), r'seed must be an integer >= 0')])
def test_bad_pgd_options(kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg): pgd(MODEL, X, Y, **kw)


@pytest.mark.parametrize('fn,kw,msg', [
    (autoattack, dict(version='fast'), r"version must be one of \['standard', 'plus', 'rand', 'custom'\], got 'fast'"),
    (autoattack, dict(version='custom', attacks=['pgd']), r'attacks must be a non-empty list drawn from'),
    (autoattack, dict(attacks=['apgd-ce']), r"attacks must be a list drawn from .* exactly when version='custom'"),
    (square, dict(n_queries=0), r'n_queries must be an integer >= 1'),
    (cw_l2, dict(c=-0.1), r'c must be a finite number > 0'),
    (cw_l2, dict(kappa=-1.), r'kappa must be a finite number >= 0')])
def test_bad_attack_options(fn, kw, msg):
    with pytest.raises(ValueError, match=msg): fn(MODEL, X, Y, **kw)


# ---- evaluation -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('kw,err,msg', [
    (dict(suite='fast'), ValueError, r"suite must be one of \['paper', 'quick'\]"),
    (dict(suite=['clean', 'pgd7']), ValueError, r"unknown attack 'pgd7': accepted names are"),
    (dict(suite=[]), ValueError, r'suite must be one of .* or a non-empty list'),
    (dict(suite=['clean', 'clean']), ValueError, r'must not name an attack twice'),
    (dict(batch_size=0), ValueError, r'batch_size must be an integer >= 1, got 0'),
    (dict(seed=-3), ValueError, r'seed must be an integer >= 0'),
    (dict(suite='quick', cw2=dict(steps=1)), ValueError, r'overrides name attacks not in the suite'),
    (dict(suite='quick', pgd10=5), TypeError, r'override pgd10 must be a dict')])
def test_bad_evaluate_options(kw, err, msg):
    with pytest.raises(err, match=msg): evaluate(MODEL, X, Y, progress=False, **kw)


@SETTINGS
@given(eps=BAD_EPS)
def test_evaluate_eps_outside_unit_interval(eps):
    with pytest.raises(ValueError, match=EPS_MSG): resolve_suite('paper', eps=eps)


def test_bad_confidence_interval_counts():
    with pytest.raises(ValueError, match=r'k must be in \[0, n\] = \[0, 5\], got 6'): wilson_ci(6, 5)
    with pytest.raises(ValueError, match=r'n must be an integer >= 1, got 0'): wilson_ci(0, 0)


# ---- models and checkpoints ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['resnet50', 'wrn-34', 'vit', ''])
def test_unknown_model_name_lists_the_known_ones(name):
    "The message lists the built-in names (and any the user registered: other test modules register some)."
    with pytest.raises(ValueError, match=r"unknown model name .*; known: mobilenetv2, preact_resnet18, resnet18, (.*, )?wrn-D-W"):
        create_model(name)


@SETTINGS
@given(n=st.one_of(st.integers(max_value=1), st.floats(allow_nan=False), st.text(max_size=3)))
def test_bad_class_counts(n):
    with pytest.raises((TypeError, ValueError), match=r'num_classes must be an integer >= 2'): create_model('wrn-10-1', n)


def test_checkpoint_of_another_architecture(tmp_path):
    atomic_save(create_model('wrn-10-1').state_dict(), tmp_path / 'w.pt')
    with pytest.raises(ValueError, match=r"checkpoint w\.pt does not fit model 'mobilenetv2'"): load_model('mobilenetv2', tmp_path / 'w.pt')
    with pytest.raises(ValueError, match=r"does not fit model 'wrn-10-1'.*shape mismatches.*\[100, 64\] vs model"):
        atomic_save(create_model('wrn-10-1', 100).state_dict(), tmp_path / 'c100.pt'); load_model('wrn-10-1', tmp_path / 'c100.pt')


def test_missing_checkpoint_and_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'checkpoint not found: .*nope\.pt'): load_model('wrn-10-1', tmp_path / 'nope.pt')
    (tmp_path / 'text.pt').write_text('hello')
    with pytest.raises(ValueError, match=r'refusing to load .*text\.pt'): load_model('wrn-10-1', tmp_path / 'text.pt')


# ---- data -------------------------------------------------------------------------------------------------------------
def test_unknown_dataset_and_split(tmp_path):
    from adaad.data import load_cifar
    with pytest.raises(ValueError, match=r"mnist"): load_cifar('mnist', 'train', root=tmp_path)
    with pytest.raises(ValueError, match=r"valid"): load_cifar('cifar10', 'valid', root=tmp_path)


def test_empty_and_wrong_data_root(tmp_path):
    from adaad.data import load_cifar
    with pytest.raises(FileNotFoundError, match=r'cifar-10-batches-py'): load_cifar('cifar10', 'test', root=tmp_path)
    (tmp_path / 'cifar-10-batches-py').mkdir()
    with pytest.raises(FileNotFoundError, match=r'is incomplete: missing \[.test_batch.\]'): load_cifar('cifar10', 'test', root=tmp_path)
    (tmp_path / 'cifar-10-batches-py' / 'test_batch').write_bytes(b'not a pickle')
    with pytest.raises(ValueError, match=r'corrupt CIFAR file .*test_batch'): load_cifar('cifar10', 'test', root=tmp_path)


# ---- training ---------------------------------------------------------------------------------------------------------
@SETTINGS
@given(eps=BAD_EPS)
def test_train_config_eps(eps):
    with pytest.raises(ValueError, match=r'eps must be a number in \(0, 1\]'): TrainConfig(eps=eps).validate()


@pytest.mark.parametrize('field,value,msg', [
    ('method', 'adaad2', r"method must be one of .*'adaad'.*; got 'adaad2'"),
    ('student', 'resnet19', r"student: unknown model name 'resnet19'; known:"),
    ('dataset', 'svhn', r"dataset must be one of 'cifar10', 'cifar100'; got 'svhn'"),
    ('lr', 0., r'lr must be a number > 0, got 0'), ('lr', float('nan'), r'lr must be a number > 0'),
    ('weight_decay', -1e-4, r'weight_decay must be a finite number >= 0'),
    ('epochs', 0, r'epochs must be an integer >= 1, got 0'), ('steps', 0, r'steps must be an integer >= 1, got 0'),
    ('batch_size', 2.5, r'batch_size must be an integer >= 1'), ('val_n', 0, r'val_n must be an integer >= 1'),
    ('step_size', 0., r'step_size must be a number in \(0, 1\]'), ('save_every', -1, r'save_every must be an integer >= 0, got -1'),
    ('momentum', -0.5, r'momentum must be a number in \[0, 1\)'), ('milestones', (0, 'x'), r'milestones must be'),
    ('val_source', 'train', r"val_source must be one of 'holdout', 'test'"), ('single_decay', 1, r'single_decay must be True or False'),
    ('eps_start', 2 / 255, r'eps_start and eps_ramp_epochs go together'), ('inner', 'sgd', r"inner must be one of .*; got 'sgd'")])
def test_bad_train_config(field, value, msg):
    with pytest.raises(ValueError, match=msg): TrainConfig(**{field: value}).validate()


def test_an_inner_maximisation_of_no_step_is_refused_wherever_a_method_trains():
    "With steps=0 PGD-AT would train on its (noisy) start point, a clean image, and call it adversarial training."
    from adaad.methods import get_method, training_loss
    from adaad.train import resolve
    with pytest.raises(ValueError, match=r"method 'pgd-at': steps must be an integer >= 1 .* got 0"):
        training_loss(get_method('pgd-at', steps=0), create_model('wrn-10-1'), None, torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r'steps must be an integer >= 1'): resolve(TrainConfig(method='pgd-at', steps=0))
    assert resolve(TrainConfig(method='natural', steps=None)).steps is None


def test_an_eps_ramp_longer_than_the_run_is_refused():
    from adaad.train import resolve
    with pytest.raises(ValueError, match=r'eps_ramp_epochs must be at most epochs \(4\), got 5'):
        resolve(TrainConfig(method='adaad', epochs=4, eps=16 / 255, step_size=4 / 255, eps_start=4 / 255, eps_ramp_epochs=5))
    assert resolve(TrainConfig(method='adaad', epochs=4, eps=16 / 255, step_size=4 / 255, eps_start=4 / 255, eps_ramp_epochs=4))


@pytest.mark.parametrize('kw, err, msg', [
    (dict(x=torch.zeros(4, 3, 32, 32)), TypeError, r'x must be a uint8 tensor of shape \(N, 3, 32, 32\), got a torch.float32'),
    (dict(x=torch.zeros(4, 1, 28, 28, dtype=torch.uint8)), ValueError, r'x must have shape \(N, 3, 32, 32\), got \(4, 1, 28, 28\)'),
    (dict(y=torch.arange(4, dtype=torch.int32)), TypeError, r'y must be an int64 tensor of shape \(N,\), got a torch.int32'),
    (dict(y=torch.arange(3)), ValueError, r'y must have shape \(N,\) = \(4,\), one label per image of x, got \(3,\)'),
    (dict(y=torch.tensor([0, 1, -1, 2])), ValueError, r'y must hold class indices in \[0, 10\), got values in \[-1, 2\]'),
    (dict(y=torch.tensor([0, 1, 10, 2])), ValueError, r'y must hold class indices in \[0, 10\), got values in \[0, 10\]'),
    (dict(x=torch.zeros(0, 3, 32, 32, dtype=torch.uint8), y=torch.zeros(0, dtype=torch.long)), ValueError, r'at least one example'),
    (dict(num_classes=1), ValueError, r'num_classes must be an integer >= 2, got 1')])
def test_a_split_of_bad_shape_dtype_or_labels_is_refused(kw, err, msg):
    from adaad.data import CifarSplit
    good = dict(x=torch.zeros(4, 3, 32, 32, dtype=torch.uint8), y=torch.arange(4), num_classes=10)
    with pytest.raises(err, match=msg): CifarSplit(**{**good, **kw})
    assert len(CifarSplit(**good).subset([1, 2])) == 2


def test_pgd_runs_the_loss_registered_under_its_name_and_refuses_others(monkeypatch):
    "A loss added to LOSSES is the one PGD climbs: a flat one leaves x where it is, cross-entropy under another name moves it as 'ce'."
    from adaad.attacks import LOSSES, ce_loss
    monkeypatch.setitem(LOSSES, 'flat', lambda z, y: 0 * z.sum(1)); monkeypatch.setitem(LOSSES, 'xent', ce_loss)
    run = lambda loss: pgd(MODEL, X, Y, loss=loss, random_start=False, steps=3)
    assert torch.equal(run('flat'), X) and torch.equal(run('xent'), run('ce')) and not torch.equal(run('ce'), X)
    with pytest.raises(ValueError, match=r"loss must be one of \['ce', 'cw', 'flat', 'xent'\], got 'dlr'"): pgd(MODEL, X, Y, loss='dlr')
    with pytest.raises(ValueError, match=r"kappa applies to a loss that takes it .* loss 'ce' takes none, got kappa=5"):
        pgd(MODEL, X, Y, loss='ce', kappa=5)


def test_the_default_budget_is_one_constant_everywhere():
    "Every default attack radius is adaad.core.EPS itself (not a literal standing beside it)."
    import inspect
    from adaad.attacks import autoattack_reduced
    from adaad.core import EPS
    from adaad.fast import amp_check
    from adaad.inner import Budget, sign_ascent
    from adaad.train import validate
    from adaad.cli import parser
    fns = (fgsm, pgd, autoattack, square, autoattack_reduced, sign_ascent, amp_check, validate)
    assert all(inspect.signature(f).parameters['eps'].default is EPS for f in fns)
    assert Budget().eps is EPS and parser().parse_args(['eval', '--ckpt', 'w.pt', '--arch', 'wrn-10-1']).eps is EPS


def _split(n, classes=10):
    from adaad.data import CifarSplit
    return CifarSplit(torch.zeros(n, 3, 32, 32, dtype=torch.uint8), torch.arange(n) % classes, classes)


def test_teacher_with_other_class_count_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"teacher has 100 classes but dataset 'cifar10' has 10"):
        train(TrainConfig(method='adaad', student='wrn-10-1', epochs=1), teacher=create_model('wrn-10-1', 100),
              out_dir=tmp_path, device='cpu', progress=False, data=(_split(8), _split(8)))


def test_train_time_limit_and_data(tmp_path):
    cfg = TrainConfig(method='natural', student='wrn-10-1', epochs=1)
    with pytest.raises(ValueError, match=r'time_limit must be a number of seconds > 0 .*, got -5'):
        train(cfg, out_dir=tmp_path, device='cpu', progress=False, data=(_split(8), _split(8)), time_limit=-5)
    with pytest.raises(ValueError, match=r'data must be a pair \(train split, validation split\)'):
        train(cfg, out_dir=tmp_path, device='cpu', progress=False, data=_split(8))


def test_empty_data_root_for_training(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'cifar-10-batches-py'):
        train(TrainConfig(method='natural', student='wrn-10-1', epochs=1, data_root=str(tmp_path)), out_dir=tmp_path / 'r',
              device='cpu', progress=False)


# ---- command line -----------------------------------------------------------------------------------------------------
def _cli(args, capsys):
    from adaad.cli import main
    with pytest.raises(SystemExit) as e: main(args)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize('args,msg', [
    (['train', '--eps=-8/255'], r'--eps: .*must be a number in \(0, 1\]'),
    (['train', '--eps', '1/0'], r'--eps: .*not a number or fraction'),
    (['train', '--step-size', '2'], r'--step-size: .*must be a number in \(0, 1\]'),
    (['train', '--batch-size', '0'], r'--batch-size: .*must be an integer >= 1'),
    (['train', '--epochs', 'ten'], r'--epochs: .*not a number'),
    (['train', '--epochs', '2.5'], r'--epochs: .*must be an integer >= 1'),
    (['train', '--dataset', 'mnist'], r"--dataset: invalid choice: 'mnist'"),
    (['train', '--val-source', 'x'], r"--val-source: invalid choice"),
    (['eval', '--ckpt', 'x.pt', '--arch', 'resnet18', '--n', '0'], r'--n: .*must be an integer >= 1'),
    (['eval', '--ckpt', 'x.pt', '--arch', 'resnet18', '--eps', '300/255'], r'--eps: .*must be a number in \(0, 1\]'),
    (['teacher', '--arch', 'resnet18', '--method', 'adaad'], r"--method for a teacher must be a method that reads no teacher: one of \[.*'natural', 'pgd-at', 'trades'.*\], got 'adaad'")])
def test_cli_refuses_bad_options_by_name(args, msg, capsys):
    code, err = _cli(args, capsys)
    assert code == 2 and re.search(msg, err), err


def test_cli_errors_from_the_library_name_the_parameter(tmp_path, capsys):
    atomic_save(create_model('wrn-10-1').state_dict(), tmp_path / 'w.pt')
    code, err = _cli(['eval', '--ckpt', str(tmp_path / 'w.pt'), '--arch', 'wrn-10-2', '--data-root', str(tmp_path)], capsys)
    assert code == 2 and "does not fit model 'wrn-10-2'" in err, err
    code, err = _cli(['eval', '--ckpt', str(tmp_path / 'w.pt'), '--arch', 'wrn-10-1', '--data-root', str(tmp_path)], capsys)
    assert code == 2 and 'cifar-10-batches-py' in err, err
    code, err = _cli(['eval', '--ckpt', str(tmp_path / 'missing.pt'), '--arch', 'wrn-10-1'], capsys)
    assert code == 2 and 'checkpoint not found' in err, err
    for args, msg in [(['--save-every', '-1'], '--save-every: must be an integer >= 0'), (['--lr', '-0.1'], '--lr: must be a number > 0'),
                      (['--time-limit', '0'], '--time-limit must be a number of seconds > 0'),
                      (['--student', 'resnet19'], "student: unknown model name 'resnet19'")]:
        code, err = _cli(['teacher', '--method', 'pgd-at', '--out', str(tmp_path / 'r'), '--data-root', str(tmp_path)] + args
                         if args[0] != '--student' else ['train', '--method', 'natural', '--data-root', str(tmp_path)] + args, capsys)
        assert code == 2 and msg in err, (args, err)


@pytest.mark.parametrize('args, msg', [
    (['--train-n', '5'], '--train-n must be an integer in [10, 49000]'),
    (['--arch', 'resnet19'], "--arch: unknown model name 'resnet19'"),
    (['--eps-start', '0.1', '--eps-ramp-epochs', '2'], '--eps-start (0.1) must be <= eps ('),
    (['--swa', '--swa-start', '5', '--epochs', '3'], '--swa-start must be < --epochs (3)')])
def test_cli_config_errors_name_the_option_given(tmp_path, capsys, data_root, args, msg):
    "A value the training configuration refuses (alone, or with another) is named by its option, not by the field."
    base = ['teacher', '--method', 'pgd-at', '--out', str(tmp_path / 'r'), '--data-root', str(data_root),
            '--device', 'cpu']
    code, err = _cli(base + args, capsys)
    assert code == 2 and msg in err and 'train_n' not in err and 'Traceback' not in err, err


def test_preset_teacher_file_of_another_architecture_names_the_file(tmp_path):
    "The CIFAR-100 preset's teacher spec pointed at a file of another network and class count: the file and the model are named."
    from adaad.presets import preset_config
    from adaad.repro import obtain_teacher
    torch.save(create_model('wrn-10-1').state_dict(), tmp_path / 'teacher.pt')
    spec = dict(preset_config('paper-cifar100')['teacher'], path=str(tmp_path / 'teacher.pt'))
    with pytest.raises(ValueError, match=r"teacher file .*teacher\.pt cannot be loaded as RobustBench model 'Chen2021LTD_WRN34_10' for "
                                         r"cifar100: .*classifier has 10 outputs but cifar100 has 100 classes"):
        obtain_teacher(spec, tmp_path, None, 'cpu', dataset='cifar100')
    with pytest.raises(FileNotFoundError, match=r"teacher file .*nope\.pt is missing .*download Chen2021LTD_WRN34_10"):
        obtain_teacher(dict(spec, path=str(tmp_path / 'nope.pt')), tmp_path, None, 'cpu', dataset='cifar100')
