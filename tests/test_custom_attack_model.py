"""A new attack and a new architecture are one definition each, in the user's own module (`tests/user_methods.py`), with
nothing in the library edited: `evaluate`, `create_model`, `train`, the presets and the `adaad` command (which imports
the module with `--import`) find them by name, and the sanity flags read what the attack declares."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from adaad.attacks import ATTACKS, pgd, register_attack
from adaad.models import MODELS, create_model, register_model
from user_methods import UserCNN, user_pgd2

pytestmark = pytest.mark.usefixtures('one_thread')


def _images(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_the_registries_find_both_by_name():
    assert ATTACKS['user-pgd2'].fn is user_pgd2 and ATTACKS['user-pgd2'].radius() == 8 / 255 and MODELS['user-cnn'] is UserCNN
    m = create_model('user-cnn', 7, width=4)
    assert isinstance(m, UserCNN) and m.arch == 'user-cnn' and m(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_evaluate_runs_the_new_attack_on_the_new_architecture():
    from adaad.evaluate import evaluate
    torch.manual_seed(0); model = create_model('user-cnn')
    x, y = _images()
    r = evaluate(model, x, y, suite=['clean', 'fgsm', 'user-pgd2'], eps=4 / 255, batch_size=8, progress=False)
    assert list(r.accuracy) == ['clean', 'fgsm', 'user-pgd2'] and r.accuracy['user-pgd2'] <= r.accuracy['clean']
    spec = r.config['suite'][2]
    assert spec['attack'] == 'user_pgd2' and spec['kwargs'] == dict(eps=4 / 255)   # eps set on the declared budget
    xa = user_pgd2(model, x, y, eps=4 / 255)
    assert torch.equal(r.correct['user-pgd2'], model.eval()(xa).argmax(1) == y)


def test_the_sanity_flags_read_its_declarations():
    from adaad.evaluate import EvalResult, black_box_pairs, order_flags, order_pairs, square_flags
    pairs = order_pairs(['clean', 'fgsm', 'user-pgd2', 'cw2', 'aa'])
    assert ('fgsm', 'user-pgd2') in pairs and ('user-pgd2', 'aa') in pairs and not any('cw2' in p and 'clean' not in p for p in pairs)
    assert order_flags({'clean': 90., 'fgsm': 40., 'user-pgd2': 50.}) == [
        'ordering: user-pgd2 accuracy 50.00% > fgsm accuracy 40.00% (expected fgsm >= user-pgd2)']
    assert black_box_pairs(['square', 'user-pgd2']) == [('square', 'user-pgd2')]
    assert square_flags({'user-pgd2': 50., 'square': 30.})[0].startswith('black-box: square accuracy 30.00% < user-pgd2')
    other = {'user-pgd2': ATTACKS['user-pgd2'].replace(eps=16 / 255)}   # another budget: not comparable with FGSM at 8/255
    assert order_flags({'fgsm': 40., 'user-pgd2': 50.}, other) == []
    r = EvalResult.from_correct({'clean': [1, 1, 1, 1], 'fgsm': [1, 0, 0, 0], 'user-pgd2': [1, 1, 0, 0]})
    assert r.flags == ['ordering: user-pgd2 accuracy 50.00% > fgsm accuracy 25.00% (expected fgsm >= user-pgd2)']


def test_bad_registrations_are_refused_naming_the_parameter():
    def other(model, x, y, eps=8 / 255): return x
    with pytest.raises(ValueError, match="name 'user-pgd2' is already registered .*user_methods.user_pgd2"):
        register_attack('user-pgd2', other, white_box=True, multi_step=True, norm='linf', budget='eps')
    register_attack('user-pgd2', user_pgd2, white_box=True, multi_step=True, norm='linf', budget='eps')   # the same definition again
    with pytest.raises(TypeError, match=r"register_attack\('test-x'\): declare norm, budget"):
        register_attack('test-x', other, white_box=True, multi_step=True)
    with pytest.raises(ValueError, match='budget must name a keyword argument of other'):
        register_attack('test-x', other, white_box=True, multi_step=True, norm='linf', budget='radius')
    with pytest.raises(TypeError, match='multi_step must be True or False'):
        register_attack('test-x', other, white_box=True, multi_step='yes', norm='linf', budget='eps')
    with pytest.raises(ValueError, match='name must be a lower-case attack name'):
        register_attack('clean', other, white_box=True, multi_step=True, norm='linf', budget='eps')
    assert 'test-x' not in ATTACKS
    with pytest.raises(ValueError, match="name 'user-cnn' is already registered"): register_model('user-cnn', lambda num_classes: nn.Linear(8, num_classes))
    with pytest.raises(ValueError, match='not of the patterns'): register_model('wrn-10-3', UserCNN)
    with pytest.raises(TypeError, match='taking the number of classes'): register_model('test-y', lambda: None)
    with pytest.raises(ValueError, match="suite lists unknown attack 'test-nope'"):
        from adaad.evaluate import resolve_suite; resolve_suite(['clean', 'test-nope'])


def _data():
    from adaad.data import CifarSplit
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (40, 3, 32, 32), generator=g, dtype=torch.uint8), torch.randint(0, 10, (40,), generator=g)
    return CifarSplit(x[:32], y[:32], 10, split='train'), CifarSplit(x[32:], y[32:], 10, split='test')


def test_train_distils_into_the_new_architecture(tmp_path):
    from adaad.train import TrainConfig, train
    torch.manual_seed(0)
    r = train(TrainConfig(method='adaad', student='user-cnn', epochs=1, batch_size=16, steps=1, val_n=8, val_steps=1),
              teacher=create_model('user-cnn').eval(), out_dir=tmp_path, data=_data(), progress=False)
    assert r['status'] == 'done' and isinstance(r['model'], UserCNN)
    assert json.loads((tmp_path / 'config.json').read_text())['student'] == 'user-cnn'


def test_presets_name_them():
    "A preset's suite and students are names: the new attack is a column, the new architecture a student."
    from adaad.evaluate import resolve_suite
    from adaad.presets import preset_config, train_config
    from adaad.repro import eval_suite
    cfg = preset_config('quick', suite=('clean', 'user-pgd2'), students={'RN-18': 'user-cnn'})
    assert [s.name for s in resolve_suite(eval_suite(cfg))] == ['clean', 'user-pgd2']
    assert train_config(cfg, 'pgd-at', cfg['students']['RN-18'], device='cpu').validate().student == 'user-cnn'


def _adaad(*args, **kw):
    "Run `adaad --import user_methods ARGS` in a fresh process."
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get('PYTHONPATH', '')]),
               OMP_NUM_THREADS='1')
    return subprocess.run([str(Path(sys.executable).with_name('adaad')), '--import', 'user_methods', *args],
                          capture_output=True, text=True, env=env, **kw)


def test_the_command_line_evaluates_the_new_attack_and_trains_the_new_architecture(tmp_path, data_root):
    from adaad.checkpoint import atomic_save
    torch.manual_seed(0); atomic_save(create_model('user-cnn').state_dict(), tmp_path / 'w.pt')
    common = ['--data-root', str(data_root), '--device', 'cpu', '--no-progress']
    out = _adaad('eval', '--ckpt', str(tmp_path / 'w.pt'), '--arch', 'user-cnn', '--suite', 'clean,fgsm,user-pgd2',
                 '--n', '20', '--batch-size', '10', '--out', str(tmp_path / 'e.json'), *common)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(row) == {'clean', 'fgsm', 'user-pgd2', 'worst', 'flags'}
    assert json.loads((tmp_path / 'e.json').read_text())['config']['suite'][2]['attack'] == 'user_pgd2'
    out = _adaad('train', '--method', 'natural', '--student', 'user-cnn', '--epochs', '1', '--train-n', '20', '--val-n', '10',
                 '--val-steps', '1', '--batch-size', '10', '--out', str(tmp_path / 'run'), *common)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])['status'] == 'done'
    out = _adaad('eval', '--ckpt', str(tmp_path / 'w.pt'), '--arch', 'user-cnn', '--suite', 'clean,test-nope', *common)
    assert out.returncode == 2 and "unknown attack 'test-nope'" in out.stderr
