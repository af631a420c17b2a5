"""Teachers a user can trust: RobustBench files in each of their layouts (with the input normalisation they carry), the
accuracy check before any student trains, and the teacher file's digest recorded on first use and checked on reuse."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adaad.checkpoint import load_robustbench, load_teacher, split_normalization
from adaad.models import CIFAR10_MEAN, CIFAR10_STD, ROBUSTBENCH, WideResNet, create_robustbench


def rb_wrn_keys(depth, width, sub_block1):
    "The state-dict keys of RobustBench's (and TRADES's) WideResNet, spelled out from its layer names."
    n, keys = (depth - 4) // 6, ['conv1.weight']
    bn = lambda p: [f'{p}.{s}' for s in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')]
    stages = [('block1', 16, 16 * width)] + ([('sub_block1', 16, 16 * width)] if sub_block1 else []) + \
             [('block2', 16 * width, 32 * width), ('block3', 32 * width, 64 * width)]
    for name, cin, cout in stages:
        for i in range(n):
            p = f'{name}.layer.{i}'
            keys += bn(f'{p}.bn1') + [f'{p}.conv1.weight'] + bn(f'{p}.bn2') + [f'{p}.conv2.weight']
            if i == 0 and cin != cout: keys.append(f'{p}.convShortcut.weight')
    return set(keys + bn('bn1') + ['fc.weight', 'fc.bias'])


def ref_wrn(sd, x, depth=10):
    "A WideResNet forward written from the state dict alone (eval-mode BN, pre-activation blocks, average pool, linear)."
    bn = lambda p, t: F.batch_norm(t, sd[f'{p}.running_mean'], sd[f'{p}.running_var'], sd[f'{p}.weight'], sd[f'{p}.bias'], False, 0., 1e-5)
    out = F.conv2d(x, sd['conv1.weight'], padding=1)
    for block, stride in (('block1', 1), ('block2', 2), ('block3', 2)):
        for i in range((depth - 4) // 6):
            p, s = f'{block}.layer.{i}', stride if i == 0 else 1
            a = F.relu(bn(f'{p}.bn1', out))
            h = F.conv2d(F.relu(bn(f'{p}.bn2', F.conv2d(a, sd[f'{p}.conv1.weight'], stride=s, padding=1))), sd[f'{p}.conv2.weight'], padding=1)
            out = h + (F.conv2d(a, sd[f'{p}.convShortcut.weight'], stride=s) if f'{p}.convShortcut.weight' in sd else out)
    return F.linear(F.relu(bn('bn1', out)).mean((2, 3)), sd['fc.weight'], sd['fc.bias'])


def random_wrn_state(sub_block1, seed=0):
    "A WRN-10-1 state dict in RobustBench's key layout with random weights and batch-norm statistics (so BN is not the identity)."
    torch.manual_seed(seed)
    sd = WideResNet(10, 1, 10, sub_block1=sub_block1).state_dict()
    for k, v in sd.items():
        if k.endswith('running_var'): sd[k] = torch.rand_like(v) + 0.5
        elif k.endswith(('running_mean', 'bias')) or (k.endswith('weight') and v.ndim == 1): sd[k] = torch.randn_like(v) * 0.3 + (k.endswith('weight'))
    assert set(sd) == rb_wrn_keys(10, 1, sub_block1)
    return sd


@pytest.fixture
def small_entries():
    "Small stand-ins of the two new layouts: a normalising WRN (Rice2020Overfitting's) and a WRN with TRADES's sub_block1."
    ROBUSTBENCH[('cifar10', '_t_norm')] = dict(arch='wrn-10-1', sub_block1=False, normalize=(CIFAR10_MEAN, CIFAR10_STD), clean=80., aa=50.)
    ROBUSTBENCH[('cifar10', '_t_trades')] = dict(arch='wrn-10-1', sub_block1=True, clean=80., aa=50.)
    yield
    del ROBUSTBENCH[('cifar10', '_t_norm')], ROBUSTBENCH[('cifar10', '_t_trades')]


def test_the_new_robustbench_names_have_the_original_layout():
    "Zhang2019Theoretically: WRN-34-10 with sub_block1, raw input; Rice2020Overfitting: WRN-34-20 behind its CIFAR-10 normalisation."
    with torch.device('meta'):
        z, r = create_robustbench('Zhang2019Theoretically'), create_robustbench('Rice2020Overfitting')
        assert set(z.state_dict()) == rb_wrn_keys(34, 10, True)
        assert set(r.model.state_dict()) == rb_wrn_keys(34, 20, False)
    e = ROBUSTBENCH[('cifar10', 'Rice2020Overfitting')]
    assert e['normalize'] == ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)) and (e['clean'], e['aa']) == (85.34, 53.42)
    assert (ROBUSTBENCH[('cifar10', 'Zhang2019Theoretically')]['clean'], ROBUSTBENCH[('cifar10', 'Zhang2019Theoretically')]['aa']) == (84.92, 53.08)


@pytest.mark.parametrize('layout', ['mu-sigma', 'normalize-model', 'model-prefix', 'bare', 'module-mu-sigma'])
def test_a_normalising_robustbench_file_loads_in_each_layout(tmp_path, small_entries, layout):
    "Each layout loads with weights_only=True, and the teacher computes the network of the normalised image: net((x - mu) / sigma)."
    sd = random_wrn_state(False)
    mu, sigma = torch.tensor([0.3, 0.5, 0.6]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    files = {'mu-sigma': dict(sd, mu=mu, sigma=sigma), 'module-mu-sigma': {f'module.{k}': v for k, v in dict(sd, mu=mu, sigma=sigma).items()},
             'normalize-model': {'normalize.mean': mu, 'normalize.std': sigma, **{f'model.{k}': v for k, v in sd.items()}},
             'model-prefix': {f'model.{k}': v for k, v in sd.items()}, 'bare': sd}
    torch.save(files[layout], tmp_path / 'rb.pt')
    if layout in ('model-prefix', 'bare'):   # no normalisation in the file: the model's own (CIFAR-10 mean and std)
        mu, sigma = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    x = torch.rand(4, 3, 32, 32)
    t = load_teacher(tmp_path / 'rb.pt', robustbench='_t_norm')
    with torch.no_grad():
        assert torch.allclose(t(x), ref_wrn(sd, (x - mu) / sigma), atol=1e-5)
        assert torch.allclose(load_robustbench('_t_norm', tmp_path / 'rb.pt')(x), ref_wrn(sd, (x - mu) / sigma), atol=1e-5)
        assert not torch.allclose(t(x), ref_wrn(sd, x), atol=1e-3)   # the normalisation is applied, not skipped


def test_the_trades_layout_loads_with_its_extra_stage(tmp_path, small_entries):
    "TRADES's WideResNet has a sub_block1 stage its forward never uses: the file loads, the output is the plain network's."
    sd = random_wrn_state(True)
    torch.save({f'module.{k}': v for k, v in sd.items()}, tmp_path / 'trades.pt')
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad(): assert torch.allclose(load_teacher(tmp_path / 'trades.pt', robustbench='_t_trades')(x), ref_wrn(sd, x), atol=1e-5)
    with pytest.raises(ValueError, match="lacks.*sub_block1"):   # without the stage it is not TRADES's layout
        torch.save({k: v for k, v in sd.items() if not k.startswith('sub_block1')}, tmp_path / 'no-sub.pt')
        load_teacher(tmp_path / 'no-sub.pt', robustbench='_t_trades')


def test_a_normalisation_the_model_does_not_have_is_refused(tmp_path, small_entries):
    sd = random_wrn_state(True)
    torch.save(dict(sd, mu=torch.zeros(1, 3, 1, 1), sigma=torch.ones(1, 3, 1, 1)), tmp_path / 'rb.pt')
    with pytest.raises(ValueError, match=r"rb.pt.*carries an input normalisation.*'_t_trades' takes raw images"):
        load_teacher(tmp_path / 'rb.pt', robustbench='_t_trades')
    for bad, msg in [(dict(sd, mu=torch.zeros(3)), 'holds mu without sigma'),
                     (dict(sd, mu=torch.zeros(3), sigma=torch.zeros(3)), '3 positive standard deviations'),
                     ({'normalize.mean': torch.zeros(3), 'normalize.std': torch.ones(3), **sd}, 'not all under model.')]:
        with pytest.raises(ValueError, match=msg): split_normalization(bad)


# ---- the accuracy check before any student trains, and the teacher file's digest (trust on first use) ----

def _table(tmp_path, data_root, teacher, tag='a', **check):
    "A one-cell smoke table (natural student, 1 epoch on 64 images, 20 test images) with teacher spec `teacher`; the results dict."
    from adaad.presets import preset_config
    from adaad.repro import run_table
    cfg = preset_config('smoke', teacher=None, standard_teacher=None)
    cfg.update(teacher=teacher, teacher_check=dict(n=50, **check))
    return run_table(cfg, students={'RN-18': 'wrn-10-1'}, methods=['natural'], train_n=64, epochs=1, n_test=20, data_root=str(data_root),
                     out_dir=str(tmp_path / f'res-{tag}'), runs_dir=str(tmp_path / f'runs-{tag}'), device='cpu')


def _rb_file(path, seed=0):
    torch.save({f'module.{k}': v for k, v in random_wrn_state(True, seed).items()}, path)
    return path


def test_a_teacher_clearly_below_its_recorded_accuracy_stops_the_table_before_any_student(tmp_path, data_root, small_entries, monkeypatch):
    "A random network in the place of a RobustBench teacher recorded at 80% clean / 50% AA: refused, naming the file and the numbers."
    import adaad.repro
    f = _rb_file(tmp_path / 'weak.pt')
    spec = dict(source='robustbench', name='_t_trades', path=str(f))
    with pytest.raises(RuntimeError, match=r"teacher file .*weak.pt is clearly below the accuracy recorded for it: on the first 50 test "
                                           r"images it has \d+\.\d% clean and \d+\.\d% under PGD-10, but .*_t_trades.* gives 80% clean and 50% under aa"):
        _table(tmp_path, data_root, spec)
    assert sorted(p.name for p in (tmp_path / 'runs-a').iterdir()) == ['teachers.json']      # no student was trained
    assert (tmp_path / 'res-a' / 'evals' / 'teacher-check.json').exists()
    def no_eval(*a, **k): raise AssertionError('the cached check was evaluated again')
    monkeypatch.setattr(adaad.repro, 'evaluate', no_eval)                                    # a rerun reads the cached check
    with pytest.raises(RuntimeError, match='clearly below'): _table(tmp_path, data_root, spec)


def test_a_teacher_at_its_recorded_accuracy_trains_and_the_check_and_digest_are_in_the_results(tmp_path, data_root, small_entries):
    from adaad.core import file_sha256
    ROBUSTBENCH[('cifar10', '_t_trades')].update(clean=0., aa=0.)      # anything passes
    f = _rb_file(tmp_path / 'ok.pt')
    res = _table(tmp_path, data_root, dict(source='robustbench', name='_t_trades', path=str(f)))
    t = json.loads((tmp_path / 'res-a' / 'results.json').read_text())['teacher']
    assert res['status'] == 'done' and t['sha256'] == file_sha256(f) and t['check']['verdict'] == 'passed' and t['check']['n'] == 50
    assert set(t['check']['measured']) == {'clean', 'pgd10'} and t['check']['expected']['attack'] == 'aa'
    assert json.loads((tmp_path / 'runs-a' / 'teachers.json').read_text())['teacher']['sha256'] == t['sha256']
    old = t['sha256']
    _rb_file(f, seed=1)                                                  # the file changes under the same runs and results
    with pytest.raises(ValueError, match=rf"teacher file .*ok.pt has SHA-256 {file_sha256(f)}, but .*teachers.json records SHA-256 {old}"):
        _table(tmp_path, data_root, dict(source='robustbench', name='_t_trades', path=str(f)))


def test_a_results_folder_refuses_a_changed_teacher_file(tmp_path):
    "A results.json that records another digest (a reassembly into the same results folder) is refused too, naming both."
    from adaad.repro import trust_teacher_file
    f = tmp_path / 't.pt'; f.write_bytes(b'one')
    (tmp_path / 'res').mkdir(); (tmp_path / 'res' / 'results.json').write_text(json.dumps(dict(teacher=dict(sha256='0' * 64))))
    with pytest.raises(ValueError, match=r"t.pt has SHA-256 [0-9a-f]{64}, but .*results.json records SHA-256 0{64}"):
        trust_teacher_file(f, 'teacher', tmp_path / 'runs', tmp_path / 'res')
    got = trust_teacher_file(f, 'teacher', tmp_path / 'runs2')           # first use: recorded
    assert trust_teacher_file(f, 'teacher', tmp_path / 'runs2') == got    # reuse of the same file: accepted


def test_a_file_teacher_is_checked_against_the_record_beside_it(tmp_path, data_root):
    "The shipped teachers' records (teachers/*.json) give clean and PGD-10 accuracy: a file below them is refused."
    from adaad.core import file_sha256
    from adaad.models import create_model
    from adaad.repro import teacher_expectation
    f = tmp_path / 'small.pt'; torch.manual_seed(0); torch.save(create_model('wrn-10-1').state_dict(), f)
    rec = dict(name='small', sha256=file_sha256(f), n_test=1000, accuracy=dict(clean=55.0, fgsm=36.0, pgd10=35.0))
    f.with_suffix('.json').write_text(json.dumps(rec))
    spec = dict(source='checkpoint', arch='wrn-10-1', path=str(f))
    assert teacher_expectation(dict(spec, ckpt=str(f)))['robust'] == 35.0
    with pytest.raises(RuntimeError, match=r'small.pt is clearly below.*gives 55% clean and 35% under pgd10'):
        _table(tmp_path, data_root, spec)
    f.with_suffix('.json').write_text(json.dumps(dict(rec, sha256='0' * 64)))   # a record of another file: nothing to check against
    assert teacher_expectation(dict(spec, ckpt=str(f))) is None
    shipped = json.loads((Path(__file__).parents[1] / 'teachers' / 'quick-resnet18-w8.json').read_text())
    assert {'clean', 'pgd10'} <= set(shipped['accuracy'])                 # what the shipped teachers are checked against


def _tiny_cifar10(root, n=40):
    "A CIFAR-10 folder in the official layout with `n` random images per file (the check then runs on all `n` test images)."
    import pickle
    import numpy as np
    folder = root / 'cifar-10-batches-py'; folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        with open(folder / name, 'wb') as fh:
            pickle.dump({'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8), 'labels': [int(v) for v in rng.integers(0, 10, n)]}, fh)
    return root


def test_adaad_train_checks_a_robustbench_teacher_first(tmp_path, small_entries, capsys):
    "Before `adaad train` trains, its teacher is checked (on the first 1,000 test images, here all 40 of a tiny folder)."
    from adaad.cli import main
    data_root = _tiny_cifar10(tmp_path / 'data')
    f = _rb_file(tmp_path / 'weak.pt')
    with pytest.raises(SystemExit) as e:
        main(['train', '--method', 'rslad', '--student', 'wrn-10-1', '--teacher', str(f), '--teacher-robustbench', '_t_trades',
              '--data-root', str(data_root), '--epochs', '1', '--train-n', '32', '--device', 'cpu', '--no-progress', '--out', str(tmp_path / 's')])
    err = capsys.readouterr().err
    assert e.value.code != 0 and 'weak.pt is clearly below' in err and 'under PGD-10' in err
    assert not (tmp_path / 's' / 'last.pt').exists()
    assert json.loads((tmp_path / 's' / 'teacher-check.json').read_text())['key']['n'] == 40
