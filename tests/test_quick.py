"""`make repro`'s default preset, `quick`: its shipped teacher (digest-checked, with the record of how it was made), the
precision chosen from the hardware, the progress lines, and a reduced run of the whole table from the shipped teacher."""
import json, os, subprocess
from pathlib import Path

import pytest
import torch

from adaad.presets import PRESETS, preset_config, train_config
from adaad.repro import shipped_teacher_file, shipped_record

ROOT = Path(__file__).resolve().parents[1]
SPEC = PRESETS['quick']['teacher']


def test_the_shipped_teacher_matches_its_digest_and_record():
    "The committed file's SHA-256 is the preset's and its record's; the record says how it was made and how it scores."
    from adaad.core import file_sha256
    p = shipped_teacher_file(SPEC)
    rec = shipped_record(p)
    assert rec['sha256'] == SPEC['sha256'] == file_sha256(p)
    assert rec['arch'] == SPEC['arch'] and rec['command'] == 'make teacher PRESET=quick' and len(rec['git']['commit']) == 40
    assert {k: v for k, v in rec['train'].items() if k in SPEC['train']} == \
        {k: list(v) if isinstance(v, tuple) else v for k, v in SPEC['train'].items()}
    assert rec['n_test'] == 1000 and rec['accuracy']['pgd10'] > 25, rec['accuracy']   # robust: well above a natural model's ~0


def test_the_shipped_teacher_loads_weights_only_and_is_robust(cifar_test):
    "It loads with weights_only (through load_teacher) and keeps the accuracies its record states on the same images."
    from adaad.checkpoint import load_teacher
    from adaad.evaluate import evaluate
    p = shipped_teacher_file(SPEC)
    t = load_teacher(p, arch=SPEC['arch'])
    r = evaluate(t, cifar_test.x[:200], cifar_test.y[:200], suite=['clean'], progress=False)
    assert r.accuracy['clean'] > 45


def test_a_teacher_file_with_another_digest_is_refused(tmp_path):
    "A damaged shipped teacher is refused, naming the file and both digests."
    from adaad.core import file_sha256
    bad = tmp_path / 'quick-resnet18-w8.pt'
    bad.write_bytes(Path(shipped_teacher_file(SPEC)).read_bytes()[:-7] + b'damaged')
    with pytest.raises(ValueError) as e: shipped_teacher_file(dict(SPEC, path=str(bad)))
    msg = str(e.value)
    assert str(bad) in msg and file_sha256(bad) in msg and SPEC['sha256'] in msg


def test_quick_trains_in_fp32_everywhere_and_auto_follows_the_hardware():
    """The preset trains in fp32 on every machine (so a fresh run compares with the committed seeds in one precision);
    'auto', where a preset asks for it, is bf16 only where the CPU computes it natively (emulated bf16 is slower)."""
    from adaad.fast import native_bf16
    cfg = preset_config('quick')
    assert cfg['train']['amp'] is False and train_config(cfg, 'adaad', 'resnet18-w4', device='cpu').amp is False
    auto = preset_config('quick', train=dict(amp='auto'))
    assert train_config(auto, 'adaad', 'resnet18-w4', device='cpu').amp is native_bf16('cpu')
    with pytest.raises(ValueError, match="amp must be True, False or 'auto'"): train_config(cfg, 'adaad', 'resnet18-w4', amp='on')


def test_make_repro_names_the_presets_for_an_unknown_one():
    p = subprocess.run(['make', '-s', 'repro', 'PRESET=unknown'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "PRESET must be one of ['quick', 'smoke'" in p.stderr and "got 'unknown'" in p.stderr


def test_a_reduced_quick_table_runs_from_the_shipped_teacher_with_progress_lines(data_root, tmp_path, one_thread):
    "The quick preset end to end at toy size: teacher from the shipped file, a line per training and per attack."
    from adaad.repro import run_table
    lines = []
    res = run_table('quick', methods=['natural', 'adaad'], train_n=64, epochs=1, n_test=40, data_root=str(data_root),
                    out_dir=tmp_path / 'out', runs_dir=tmp_path / 'runs', log=lines.append)
    assert res['status'] == 'done' and res['teacher']['source'] == 'shipped' and res['teacher']['record']['sha256'] == SPEC['sha256']
    assert [r['method'] for r in res['rows']] == ['teacher', 'natural', 'adaad']
    starts = [l for l in lines if 'training resnet18-w4' in l]
    assert len(starts) == 2 and starts[0].startswith('[1/2] RN-18 natural seed 0') and ('fp32' in starts[0] or 'bf16' in starts[0])
    for what in ('teacher', 'RN-18 natural seed 0', 'RN-18 adaad seed 0'):
        assert {a for a in ('clean', 'fgsm', 'pgd10') if any(l.strip().startswith(f'{what}') and f': {a} ' in l for l in lines)} \
            == {'clean', 'fgsm', 'pgd10'}, (what, lines)
    assert sum('trained in' in l for l in lines) == 2
