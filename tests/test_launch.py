"""The documented launch commands (adaad.presets.LAUNCH, quoted by README) run each preset at its own scale: each command,
and `make repro` for the same preset, is prepared by papermill (nothing runs) and the run it asks for is checked."""
import json, shlex, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch

from adaad.presets import LAUNCH, PRESETS, preset_config, train_config
from adaad.repro import _table_plan, scale_changes

ROOT = Path(__file__).resolve().parents[1]
RUN_KEYS = ('preset', 'methods', 'students', 'epochs', 'train_n', 'n_test', 'suite', 'teacher', 'seeds', 'out_dir', 'scratch', 'device')


def _prepare(cmd, tmp_path):
    "The run_table arguments (and scratch) of a papermill command line, prepared by papermill itself (`--prepare-only`)."
    papermill_cli = pytest.importorskip('papermill.cli')
    args = shlex.split(cmd.split('&&')[-1])
    i = next(i for i, a in enumerate(args) if a.endswith('papermill'))
    args = args[i + 1:]
    args[1] = str(tmp_path / 'prepared.ipynb')                  # the output notebook
    args[0] = str(ROOT / 'nbs' / 'repro_table.ipynb')
    args = [a for j, a in enumerate(args) if a != '--cwd' and (j == 0 or args[j - 1] != '--cwd')]
    papermill_cli.papermill.main([*args, '--prepare-only'], standalone_mode=False)
    cells = json.loads((tmp_path / 'prepared.ipynb').read_text())['cells']
    ns = {}
    for c in cells:   # the parameters, papermill's injected ones, and the notebook's own resolution of the unset sizes
        if {'parameters', 'injected-parameters', 'launch'} & set(c['metadata'].get('tags', [])): exec(''.join(c['source']), ns)
    return {k: ns[k] for k in RUN_KEYS}


def _check_full_scale(p, preset):
    "The prepared run is `preset` at its own scale, into a folder that stays (not a temporary one)."
    assert p['preset'] == preset and not p['scratch']
    cfg, out, _, seeds = _table_plan(preset, p['out_dir'], None, False, methods=p['methods'], suite=p['suite'], seeds=p['seeds'],
                                     epochs=p['epochs'], train_n=p['train_n'], teacher=p['teacher'], students=p['students'], n_test=p['n_test'])
    assert scale_changes(cfg) == []
    base = preset_config(preset)
    assert (cfg['n_test'], cfg['train'], cfg['students'], list(cfg['methods']), seeds) == \
        (base['n_test'], base['train'], base['students'], list(base['methods']), list(base['seeds']))
    return cfg, out


@pytest.mark.parametrize('preset', list(LAUNCH))
def test_documented_papermill_command_runs_the_preset_at_its_scale(preset, tmp_path):
    p = _prepare(LAUNCH[preset]['papermill'], tmp_path)
    _, out = _check_full_scale(p, preset)
    assert str(out) == f'runs/results/{preset}' and p['device'] == ('cuda' if preset.startswith('paper') else None)


@pytest.mark.parametrize('preset', list(LAUNCH))
def test_documented_make_command_runs_the_preset_at_its_scale(preset, tmp_path):
    if shutil.which('make') is None: pytest.skip('no make')
    make = shlex.split(LAUNCH[preset]['make'])
    assert make[:2] == ['make', 'repro']
    venv = Path(sys.executable).parent.parent
    r = subprocess.run(['make', '-n', '-C', str(ROOT), f'VENV={venv}', *make[1:]], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.replace('\\\n', ' ').splitlines() if 'papermill nbs/repro_table.ipynb' in l)
    p = _prepare(line, tmp_path)
    _check_full_scale(p, preset)
    assert p['device'] == ('cuda' if 'DEVICE=cuda' in make else None)


def test_the_notebook_left_at_its_sizes_runs_a_paper_preset_at_paper_scale(tmp_path):
    "The bare papermill call (sizes unset) runs the paper's scale; only the default smoke preset is cut for the notebook tests."
    p = _prepare('papermill nbs/repro_table.ipynb out.ipynb -p preset paper -p device cuda', tmp_path)
    _check_full_scale(p, 'paper')
    smoke = _prepare('papermill nbs/repro_table.ipynb out.ipynb', tmp_path)
    assert smoke['scratch'] and (smoke['train_n'], smoke['n_test']) == (256, 50)


def test_a_run_that_changes_a_paper_presets_sizes_is_labelled_reduced():
    "What the notebook's old defaults did to `-p preset paper`: the changes are named, and _header marks the run reduced."
    from adaad.repro import _header
    cfg = preset_config('paper', train=dict(train_n=256), n_test=50, students={'RN-18': 'wrn-10-1'}, methods=['adaad'])
    changes = scale_changes(cfg)
    assert changes == ['train.train_n: 256 (null)', 'n_test: 50 (10000)', 'students.RN-18: "wrn-10-1" ("resnet18")']
    assert scale_changes(preset_config('paper', methods=['adaad'], students={'RN-18': 'resnet18'}, seeds=[0, 1])) == []
    assert scale_changes(preset_config('paper', train=dict(amp=True, compile=True))) == []   # speed, with the precision recorded

    class Data:   # the few attributes _header reads of the test and training sets
        source = dict(official=True)
        def __len__(self): return 50
    ctx = dict(cfg=cfg, test=Data(), train_full=Data(), device='cpu', data_root='data', time_limit=None, out=ROOT / 'runs' / 'x',
               runs=ROOT / 'runs' / 'y')
    h = _header(ctx, 'table')
    assert h['reduced'] and h['scale_changes'] == changes and 'REDUCED' in h['scale'] and 'n_test: 50 (10000)' in h['scale']
    assert h['device'].startswith('cpu (') and h['precision'] == 'fp32'
    assert not _header(dict(ctx, cfg=preset_config('paper')), 'table')['reduced']
    assert set(LAUNCH) == {'quick', 'paper', 'paper-cifar100'} and set(LAUNCH) <= set(PRESETS)


def test_a_preset_that_asks_for_cuda_stops_with_one_clear_message_where_none_is_visible(tmp_path, monkeypatch):
    from adaad.repro import run_table
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(ValueError, match=r"device 'cuda' is not available: no CUDA GPU is visible to PyTorch here \(PyTorch "):
        run_table('paper', device='cuda', data_root=str(tmp_path / 'no-data'), out_dir=str(tmp_path / 'o'), runs_dir=str(tmp_path / 'r'))


@pytest.mark.timeout(900)
def test_progress_lines_and_results_name_the_device_and_precision(data_root, tmp_path, one_thread):
    "Where no device is asked for: CUDA if visible, else the CPU, said in the first progress line, every training's, and results.json."
    from adaad.repro import run_table
    lines = []
    res = run_table('quick', dry_run=True, methods=['pgd-at'], data_root=str(data_root), out_dir=str(tmp_path / 'o'),
                    runs_dir=str(tmp_path / 'r'), log=lines.append)
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    assert res['device'].startswith(dev + (' (' if dev == 'cuda' else ' (no CUDA GPU visible)'))
    assert res['precision'] in ('fp32', 'bf16 autocast') or res['precision'].startswith('fp32 (TF32')
    assert lines[0].startswith(f"preset quick on {res['device']}, {res['precision']}: DRY RUN")
    training = [l for l in lines if ': training ' in l]
    assert training and all(f" on {dev}, {res['precision']} (" in l for l in training)
    assert json.loads((tmp_path / 'o' / 'results.json').read_text())['device'] == res['device']


def test_paper_presets_train_channels_last_in_fp32_unless_amp_passes_its_check(monkeypatch):
    "The paper presets: channels_last, fp32 (TF32 as PyTorch's default); amp=True only after amp_guard's check of the teacher."
    import adaad.repro as R
    from adaad.data import CifarSplit
    for p in ('paper', 'paper-cifar100'):
        tc = train_config(preset_config(p), 'adaad', 'resnet18', device='cuda')
        assert tc.channels_last and not tc.amp
    assert R._table_plan('paper', None, None, False, amp=True)[0]['train']['amp'] is True
    with pytest.raises(ValueError, match='amp must be True, False or None'): R.run_table('paper', amp='bf16')
    data = CifarSplit(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), 10)
    lines = []
    ctx = dict(train_full=data, device=torch.device('cpu'), cfg=dict(eval_batch=2), log=lines.append)
    for diff, ok in ((0.5, True), (R.AMP_LIMIT + 1, False)):
        monkeypatch.setattr(R, 'amp_check', lambda m, x, y, **k: dict(n=len(x), pgd_fp32=40., pgd_amp=40. + diff, pgd_diff=diff,
                                                                     sign_agreement=0.99))
        if ok: assert R.amp_guard(torch.nn.Identity(), ctx)['pgd_diff'] == diff and 'under bf16' in lines[-1]
        else:
            with pytest.raises(ValueError, match='amp=True refused: bf16 weakens PGD-10 on the teacher'): R.amp_guard(torch.nn.Identity(), ctx)


def test_readme_quotes_every_launch_command():
    "README's reproduction section quotes the make and papermill command of each paper preset as LAUNCH holds it."
    readme = (ROOT / 'README.md').read_text()
    for preset in ('paper', 'paper-cifar100'):
        assert LAUNCH[preset]['make'] in readme and LAUNCH[preset]['papermill'] in readme, preset
    assert 'make repro ' in readme and LAUNCH['quick']['make'].replace(' PRESET=quick', '') in readme
