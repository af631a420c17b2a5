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


# ---- teacher files as users get them ------------------------------------------------------------------------------------
def _teacher_file(tmp_path, form, num_classes=10):
    "A wrn-10-1 saved in one of the layouts RobustBench and the official scripts use; (network, path)."
    import collections
    import numpy as np
    net = create_model('wrn-10-1', num_classes)
    sd, pre = net.state_dict(), collections.OrderedDict(('module.' + k, v) for k, v in net.state_dict().items())
    obj = {'plain': sd, 'plain-module': pre,                                   # RobustBench / AdaAD main.py (LTD teachers)
           'state_dict': {'state_dict': pre, 'epoch': 76, 'best_prec1': 55.3},   # IAD's scripts: DataParallel under 'state_dict'
           'model_state_dict': {'model_state_dict': sd, 'optimizer_state_dict': {'lr': 0.1}, 'epoch': 3},
           'net': {'net': sd, 'acc': 84.1, 'epoch': 109, 'arch': 'WideResNet'},   # AdaAD main.py's own checkpoints
           'numpy-scalar': {'state_dict': sd, 'best_acc': np.float64(55.3)},
           'namespace': {'net': pre, 'args': __import__('argparse').Namespace(lr=0.1)},
           'pickled-model': net}[form]
    torch.save(obj, tmp_path / f'{form}.pt')
    return net, tmp_path / f'{form}.pt'


@pytest.mark.parametrize('form', ['plain', 'plain-module', 'state_dict', 'model_state_dict', 'net'])
@pytest.mark.parametrize('dataset', ['cifar10', 'cifar100'])
def test_teacher_file_layouts_load(tmp_path, form, dataset):
    from adaad.checkpoint import load_teacher
    net, path = _teacher_file(tmp_path, form, 10 if dataset == 'cifar10' else 100)
    t = load_teacher(path, arch='wrn-10-1', dataset=dataset)
    assert _same(net, t) and not t.training and not any(p.requires_grad for p in t.parameters())


@pytest.mark.parametrize('form, obj', [('numpy-scalar', 'numpy._core.multiarray.scalar'), ('namespace', 'argparse.Namespace'),
                                       ('pickled-model', 'adaad.models.WideResNet')])
def test_teacher_file_with_objects_is_refused_then_converted_once(tmp_path, form, obj):
    "weights_only=True refuses the file, naming the object and the command; the command converts it, then it loads safely."
    import subprocess, sys
    from adaad.checkpoint import load_teacher
    net, path = _teacher_file(tmp_path, form)
    with pytest.raises(ValueError) as e: load_teacher(path, arch='wrn-10-1')
    msg = str(e.value)
    assert str(path) in msg and obj.replace('._core', '') in msg.replace('._core', '') and 'trust' in msg
    cmd = msg[msg.index('python -c'):]
    assert cmd.startswith('python -c "from adaad.checkpoint import convert_checkpoint; convert_checkpoint(')
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(f"{sys.executable} {cmd[len('python '):]}",
                       shell=True, capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': str(root)})
    assert r.returncode == 0, r.stderr
    converted = path.with_name(f'{path.stem}.weights.pt')
    assert _same(net, load_teacher(converted, arch='wrn-10-1')) and path.exists()


@pytest.mark.parametrize('arch, dataset, msg', [
    ('wrn-10-2', 'cifar10', r"teacher file .*plain-module\.pt cannot be loaded as 'wrn-10-2' with 10 classes \(cifar10\): .*shape mismatches"),
    ('resnet18', 'cifar10', r"teacher file .*plain-module\.pt cannot be loaded as 'resnet18'.*keys the model has"),
    ('wrn-10-1', 'cifar100', r"cannot be loaded as 'wrn-10-1' with 100 classes \(cifar100\).*classifier has 10 outputs but cifar100 has 100 classes")])
def test_teacher_file_of_another_architecture_or_class_count(tmp_path, arch, dataset, msg):
    from adaad.checkpoint import load_teacher
    _, path = _teacher_file(tmp_path, 'plain-module')
    with pytest.raises(ValueError, match=msg): load_teacher(path, arch=arch, dataset=dataset)


def test_robustbench_teacher_of_the_other_dataset_names_the_file(tmp_path):
    "A CIFAR-10 LTD-layout file given as the CIFAR-100 teacher (sub_block1, 100 classes) is refused, naming file and model."
    from adaad.checkpoint import load_teacher
    _, path = _teacher_file(tmp_path, 'plain-module')
    ROBUSTBENCH[('cifar100', '_test_small')] = dict(arch='wrn-10-1', sub_block1=True)
    try:
        with pytest.raises(ValueError, match=r"teacher file .*plain-module\.pt cannot be loaded as RobustBench model '_test_small' for cifar100.*"
                                             r"keys the model has and the checkpoint plain-module\.pt lacks, e\.g\. \['sub_block1.*classifier has 10 outputs"):
            load_teacher(path, robustbench='_test_small', dataset='cifar100')
    finally: del ROBUSTBENCH[('cifar100', '_test_small')]
