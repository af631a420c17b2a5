"The model registry, parameter counts and safe checkpoint loading."
import os
from pathlib import Path

import pytest
import torch

from adaad.checkpoint import atomic_save, load_checkpoint, load_model, load_robustbench
from adaad.models import PARAM_COUNTS, ROBUSTBENCH, Normalized, count_params, create_model, create_robustbench

PYAA_MODEL = Path(__import__('pyautoattack').__file__).parent / 'examples' / 'model_test.pt'


@pytest.mark.parametrize('name', sorted(PARAM_COUNTS))
def test_parameter_counts(name):
    with torch.device('meta'): assert count_params(create_model(name)) == PARAM_COUNTS[name]


def test_parameter_counts_other_variants():
    with torch.device('meta'):
        assert count_params(create_model('resnet18', 100)) == 11_220_132
        assert count_params(create_model('mobilenetv2', 100)) == 2_412_212
        assert count_params(create_model('wrn-34-10', sub_block1=True)) == 48_262_586  # TRADES layout with the unused block


@pytest.mark.parametrize('name', ['resnet18', 'preact_resnet18', 'mobilenetv2', 'wrn-16-2'])
def test_forward_shapes(name):
    m = create_model(name, num_classes=7).eval()
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_unknown_model_and_bad_classes():
    with pytest.raises(ValueError, match=r"unknown model name 'vgg16'.*resnet18"): create_model('vgg16')
    with pytest.raises(ValueError, match='depth must be 6n\\+4'): create_model('wrn-33-10')
    with pytest.raises(ValueError, match='num_classes'): create_model('resnet18', num_classes=1)


def test_normalisation_layer():
    m = create_model('wrn-10-1', normalize=((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))).eval()
    x = torch.rand(2, 3, 32, 32)
    assert isinstance(m, Normalized) and torch.allclose(m(x), m.model((x - 0.5) / 0.25))


def _same(a, b): return all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize('form', ['raw', 'state_dict', 'net', 'model', 'module_prefix', 'nested'])
def test_checkpoint_forms_load(tmp_path, form):
    src = create_model('wrn-10-1')
    sd = src.state_dict()
    obj = {'raw': sd, 'state_dict': {'state_dict': sd, 'epoch': 3}, 'net': {'net': sd, 'clean_acc': 80.1, 'epoch': 7},
           'model': {'model': sd}, 'module_prefix': {'module.' + k: v for k, v in sd.items()},
           'nested': {'state_dict': {'module.' + k: v for k, v in sd.items()}, 'optimizer': {'lr': 0.1}}}[form]
    atomic_save(obj, tmp_path / 'c.pt')
    assert _same(src, load_model('wrn-10-1', tmp_path / 'c.pt'))
    norm = create_model('wrn-10-1', normalize=((0.5,) * 3, (0.5,) * 3))
    assert _same(src, load_checkpoint(norm, tmp_path / 'c.pt').model)


def test_checkpoint_errors_name_both_sides(tmp_path):
    atomic_save(create_model('wrn-10-1').state_dict(), tmp_path / 'c.pt')
    with pytest.raises(ValueError, match=r"does not fit model 'wrn-10-2'.*shape mismatches.*checkpoint c\.pt \[16, 16, 3, 3\] vs model \[32, 16, 3, 3\]"):
        load_model('wrn-10-2', tmp_path / 'c.pt')
    with pytest.raises(ValueError, match=r"does not fit model 'resnet18'.*keys the model has"):
        load_model('resnet18', tmp_path / 'c.pt')
    with pytest.raises(FileNotFoundError, match='checkpoint not found'): load_model('resnet18', tmp_path / 'missing.pt')
    atomic_save({'optimizer': {'lr': 0.1}}, tmp_path / 'o.pt')
    with pytest.raises(ValueError, match='no state dict'): load_model('wrn-10-1', tmp_path / 'o.pt')


def test_malicious_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / 'pwned'
    class Payload:
        def __reduce__(self): return (os.system, (f'touch {marker}',))
    torch.save({'state_dict': create_model('wrn-10-1').state_dict(), 'x': Payload()}, tmp_path / 'evil.pt')
    with pytest.raises(ValueError, match='weights_only=True'): load_model('wrn-10-1', tmp_path / 'evil.pt')
    assert not marker.exists()


def test_atomic_save_leaves_no_temporary_files(tmp_path):
    atomic_save({'a': torch.ones(3)}, tmp_path / 'sub' / 'x.pt')
    assert [p.name for p in (tmp_path / 'sub').iterdir()] == ['x.pt']


def test_robustbench_layout(tmp_path):
    "A file laid out as RobustBench ships LTD checkpoints (DataParallel prefix, TRADES key names) loads by name."
    with torch.device('meta'):
        keys = set(create_robustbench('Chen2021LTD_WRN34_20').state_dict())
    # key names of RobustBench's WideResNet (robustbench/model_zoo/architectures/wide_resnet.py)
    for k in ['conv1.weight', 'block1.layer.0.bn1.running_mean', 'block1.layer.0.convShortcut.weight',
              'block2.layer.4.conv2.weight', 'bn1.weight', 'fc.weight', 'fc.bias']:
        assert k in keys
    assert not any(k.startswith('sub_block1') for k in keys)
    with torch.device('meta'): c100 = create_robustbench('Chen2021LTD_WRN34_10', 'cifar100').state_dict()
    assert any(k.startswith('sub_block1') for k in c100) and c100['fc.weight'].shape == (100, 640)
    small = create_model('wrn-10-1')  # same code path on a small net: a prefixed 'state_dict' wrapper
    atomic_save({'state_dict': {'module.' + k: v for k, v in small.state_dict().items()}}, tmp_path / 'rb.pt')
    ROBUSTBENCH[('cifar10', '_test_small')] = dict(arch='wrn-10-1', sub_block1=False)
    try: assert _same(small, load_robustbench('_test_small', tmp_path / 'rb.pt'))
    finally: del ROBUSTBENCH[('cifar10', '_test_small')]
    with pytest.raises(ValueError, match='unknown RobustBench model'): create_robustbench('Nobody2099')


def test_real_checkpoint_from_pyautoattack(cifar_test):
    "pyautoattack ships a naturally trained kuangliu ResNet-18; it loads into our resnet18 and is accurate."
    if not PYAA_MODEL.is_file(): pytest.skip(f'{PYAA_MODEL} not installed')
    m = load_model('resnet18', PYAA_MODEL)
    with torch.no_grad(): acc = (m(cifar_test.x[:200].float() / 255).argmax(1) == cifar_test.y[:200]).float().mean()
    assert acc > 0.9
