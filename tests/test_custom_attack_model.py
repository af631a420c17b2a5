"""A new attack and a new architecture are one definition each, made here, in a test file, with nothing in the library
edited: `evaluate`, `create_model`, `train`, the presets and the `adaad` command (which imports this file's module with
`--import`) find them by name, and the sanity flags read what the attack declares."""
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

pytestmark = pytest.mark.usefixtures('one_thread')


@register_attack('test-pgd3', white_box=True, multi_step=True, norm='linf', budget='eps')
def pgd3(model, x, y, eps=8 / 255, seed=None):
    "Test attack: three signed-gradient steps of eps/3 from the clean point."
    return pgd(model, x, y, eps=eps, step_size=eps / 3, steps=3, random_start=False)


@register_model('test-tiny-cnn')
class TinyCNN(nn.Module):
    "Test architecture: one strided convolution with BatchNorm, global pooling and a linear layer."
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, num_classes)
    def forward(self, x): return self.fc(self.body(x))


def _images(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_the_registries_find_both_by_name():
    assert ATTACKS['test-pgd3'].fn is pgd3 and ATTACKS['test-pgd3'].radius() == 8 / 255 and MODELS['test-tiny-cnn'] is TinyCNN
    m = create_model('test-tiny-cnn', 7, width=4)
    assert isinstance(m, TinyCNN) and m.arch == 'test-tiny-cnn' and m(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_evaluate_runs_the_new_attack_on_the_new_architecture():
    from adaad.evaluate import evaluate
    torch.manual_seed(0); model = create_model('test-tiny-cnn')
    x, y = _images()
    r = evaluate(model, x, y, suite=['clean', 'fgsm', 'test-pgd3'], eps=4 / 255, batch_size=8, progress=False)
    assert list(r.accuracy) == ['clean', 'fgsm', 'test-pgd3'] and r.accuracy['test-pgd3'] <= r.accuracy['clean']
    spec = r.config['suite'][2]
    assert spec['attack'] == 'pgd3' and spec['kwargs'] == dict(eps=4 / 255)   # eps set on the declared budget
    xa = pgd3(model, x, y, eps=4 / 255)
    assert torch.equal(r.correct['test-pgd3'], model.eval()(xa).argmax(1) == y)


def test_the_sanity_flags_read_its_declarations():
    from adaad.evaluate import EvalResult, black_box_pairs, order_flags, order_pairs, square_flags
    pairs = order_pairs(['clean', 'fgsm', 'test-pgd3', 'cw2', 'aa'])
    assert ('fgsm', 'test-pgd3') in pairs and ('test-pgd3', 'aa') in pairs and not any('cw2' in p and 'clean' not in p for p in pairs)
    assert order_flags({'clean': 90., 'fgsm': 40., 'test-pgd3': 50.}) == [
        'ordering: test-pgd3 accuracy 50.00% > fgsm accuracy 40.00% (expected fgsm >= test-pgd3)']
    assert black_box_pairs(['square', 'test-pgd3']) == [('square', 'test-pgd3')]
    assert square_flags({'test-pgd3': 50., 'square': 30.})[0].startswith('black-box: square accuracy 30.00% < test-pgd3')
    other = {'test-pgd3': ATTACKS['test-pgd3'].replace(eps=16 / 255)}   # another budget: not comparable with FGSM at 8/255
    assert order_flags({'fgsm': 40., 'test-pgd3': 50.}, other) == []
    r = EvalResult.from_correct({'clean': [1, 1, 1, 1], 'fgsm': [1, 0, 0, 0], 'test-pgd3': [1, 1, 0, 0]})
    assert r.flags == ['ordering: test-pgd3 accuracy 50.00% > fgsm accuracy 25.00% (expected fgsm >= test-pgd3)']


def test_bad_registrations_are_refused_naming_the_parameter():
    def other(model, x, y, eps=8 / 255): return x
    with pytest.raises(ValueError, match="name 'test-pgd3' is already registered .*test_custom_attack_model.pgd3"):
        register_attack('test-pgd3', other, white_box=True, multi_step=True, norm='linf', budget='eps')
    register_attack('test-pgd3', pgd3, white_box=True, multi_step=True, norm='linf', budget='eps')   # the same definition again
    with pytest.raises(TypeError, match=r"register_attack\('test-x'\): declare norm, budget"):
        register_attack('test-x', other, white_box=True, multi_step=True)
    with pytest.raises(ValueError, match='budget must name a keyword argument of other'):
        register_attack('test-x', other, white_box=True, multi_step=True, norm='linf', budget='radius')
    with pytest.raises(TypeError, match='multi_step must be True or False'):
        register_attack('test-x', other, white_box=True, multi_step='yes', norm='linf', budget='eps')
    with pytest.raises(ValueError, match='name must be a lower-case attack name'):
        register_attack('clean', other, white_box=True, multi_step=True, norm='linf', budget='eps')
    assert 'test-x' not in ATTACKS
    with pytest.raises(ValueError, match="name 'test-tiny-cnn' is already registered"): register_model('test-tiny-cnn', lambda num_classes: nn.Linear(8, num_classes))
    with pytest.raises(ValueError, match='not of the patterns'): register_model('wrn-10-3', TinyCNN)
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
    r = train(TrainConfig(method='adaad', student='test-tiny-cnn', epochs=1, batch_size=16, steps=1, val_n=8, val_steps=1),
              teacher=create_model('test-tiny-cnn').eval(), out_dir=tmp_path, data=_data(), progress=False)
    assert r['status'] == 'done' and isinstance(r['model'], TinyCNN)
    assert json.loads((tmp_path / 'config.json').read_text())['student'] == 'test-tiny-cnn'


def test_presets_name_them():
    "A preset's suite and students are names: the new attack is a column, the new architecture a student."
    from adaad.evaluate import resolve_suite
    from adaad.repro import eval_suite, preset_config, train_config
    cfg = preset_config('quick', suite=('clean', 'test-pgd3'), students={'RN-18': 'test-tiny-cnn'})
    assert [s.name for s in resolve_suite(eval_suite(cfg))] == ['clean', 'test-pgd3']
    assert train_config(cfg, 'pgd-at', cfg['students']['RN-18'], device='cpu').validate().student == 'test-tiny-cnn'


def _adaad(*args, **kw):
    "Run `adaad --import test_custom_attack_model ARGS` in a fresh process."
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get('PYTHONPATH', '')]),
               OMP_NUM_THREADS='1')
    return subprocess.run([str(Path(sys.executable).with_name('adaad')), '--import', 'test_custom_attack_model', *args],
                          capture_output=True, text=True, env=env, **kw)


def test_the_command_line_evaluates_the_new_attack_and_trains_the_new_architecture(tmp_path, data_root):
    from adaad.checkpoint import atomic_save
    torch.manual_seed(0); atomic_save(create_model('test-tiny-cnn').state_dict(), tmp_path / 'w.pt')
    common = ['--data-root', str(data_root), '--device', 'cpu', '--no-progress']
    out = _adaad('eval', '--ckpt', str(tmp_path / 'w.pt'), '--arch', 'test-tiny-cnn', '--suite', 'clean,fgsm,test-pgd3',
                 '--n', '20', '--batch-size', '10', '--out', str(tmp_path / 'e.json'), *common)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(row) == {'clean', 'fgsm', 'test-pgd3', 'worst', 'flags'}
    assert json.loads((tmp_path / 'e.json').read_text())['config']['suite'][2]['attack'] == 'pgd3'
    out = _adaad('train', '--method', 'natural', '--student', 'test-tiny-cnn', '--epochs', '1', '--train-n', '20', '--val-n', '10',
                 '--val-steps', '1', '--batch-size', '10', '--out', str(tmp_path / 'run'), *common)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])['status'] == 'done'
    out = _adaad('eval', '--ckpt', str(tmp_path / 'w.pt'), '--arch', 'test-tiny-cnn', '--suite', 'clean,test-nope', *common)
    assert out.returncode == 2 and "unknown attack 'test-nope'" in out.stderr
