"""`python -m adaad.faithful`: the measured departures of the default from `faithful=True`, as README documents it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adaad.core import read_sealed
from adaad.faithful import effect_cell, measured_effects


def _run(*args, data_root):
    return subprocess.run([sys.executable, '-m', 'adaad.faithful', *args, '--data-root', str(data_root)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})


def test_the_documented_command_writes_sealed_departures(data_root, tmp_path):
    "PGD-AT's default drops a dead train-mode pass: one step leaves the weights equal and the BatchNorm statistics not."
    out = tmp_path / 'fs'
    r = _run('--out', str(out), '--methods', 'pgd-at', '--steps', '1', data_root=data_root)
    assert r.returncode == 0, r.stderr
    res = read_sealed(out / 'results.json', 'results file')
    (step,) = res['departures']['pgd-at']
    assert step['weights'] < 1e-5 < step['bn'] and res['git']['commit'] and res['hardware']['torch']
    assert '| pgd-at |' in (out / 'table.md').read_text()
    again = _run('--out', str(out), '--methods', 'pgd-at', '--steps', '1', data_root=data_root)   # never written over
    assert again.returncode != 0 and 'exists and is not empty: choose another --out' in again.stderr
    assert json.loads((out / 'results.json').read_text())['departures'] == res['departures']


def test_a_method_with_a_natural_teacher_gets_the_presets(data_root, tmp_path):
    "AKD reads cpu-faithful-2's natural teacher; its default only folds the teachers: one step leaves both nearly equal."
    out = tmp_path / 'fs'
    r = _run('--out', str(out), '--preset', 'cpu-faithful-2', '--methods', 'akd', '--steps', '1', data_root=data_root)
    assert r.returncode == 0, r.stderr
    (step,) = read_sealed(out / 'results.json', 'results file')['departures']['akd']
    assert step['weights'] < 1e-4 and step['bn'] < 1e-4, step


@pytest.mark.parametrize('args,msg', [(('--steps', '0'), '--steps must be an integer >= 1, got 0'),
                                      (('--preset', 'smoke'), "preset 'smoke' trains its own teacher"),
                                      (('--preset', 'papr'), 'preset must be one of'),
                                      (('--methods', 'adad'), "'adad'"),
                                      (('--methods', 'akd'), "preset 'cpu-faithful' has no standard teacher"),
                                      (('--preset', 'quick'), "preset 'quick' trains no method both ways")])
def test_bad_input_is_refused_by_name(data_root, tmp_path, args, msg):
    r = _run('--out', str(tmp_path / 'x'), *args, data_root=data_root)
    assert r.returncode == 2 and msg in r.stderr and not (tmp_path / 'x').exists(), r.stderr[-500:]


ROOT = Path(__file__).resolve().parents[1]
MEASURED = 'measured: 3 steps; trained'                         # README's column of the measured effects


def readme_methods():
    "README's table of methods: {--method: {column: cell}}."
    lines = (ROOT / 'README.md').read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('| method | `--method` |'))
    head = [c.strip() for c in lines[start].strip('|').split('|')]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith('|'): break
        cells = [c.strip() for c in line.strip('|').split('|')]
        rows[cells[1].strip('`')] = dict(zip(head, cells))
    return rows


def committed_effects():
    "`measured_effects` of the committed step measurements beside the presets that train each method both ways."
    res = lambda name: read_sealed(ROOT / 'results' / name / 'results.json', 'results file')
    return {**measured_effects(res('faithful-steps'), res('cpu-faithful')),
            **measured_effects(res('faithful-steps-2'), res('cpu-faithful-2'))}


def test_readme_quotes_each_methods_measured_effect():
    """Every method README's table lists has its measured cell from the committed results (`effect_cell`): the weights
    apart after three steps, then faithful minus default trained over three seeds (PGD-10, seed-level p); a method
    without official code says '—', one not measured says so."""
    rows, effects = readme_methods(), committed_effects()
    assert set(effects) <= set(rows), sorted(set(effects) - set(rows))
    for m, row in rows.items():
        cell = row[MEASURED]
        if m in effects: assert cell.startswith(effect_cell(effects[m])), (m, cell, effect_cell(effects[m]))
        else: assert cell == ('—' if row['official scripts'].startswith('none public') else 'not measured'), (m, cell)


def test_effect_cell_prints_what_results_hold():
    "Percent of the faithful run's movement from 0.5% up, else one significant digit; the difference signed; p to 0.01."
    assert effect_cell(dict(weights_apart=0.4449, diff=0.2, seed_p=0.779)) == '44%; +0.2 (p 0.78)'
    assert effect_cell(dict(weights_apart=4.05e-6, diff=-0.6, seed_p=0.66)) == '4e-6; -0.6 (p 0.66)'
    steps = dict(departures={'a': [dict(weights=0.1), dict(weights=0.3)], 'b': [dict(weights=0.2)]})
    table = dict(comparisons=[dict(method='a-faithful', reference='a', attack='pgd10', diff=1., seed_p=.5, p_holm=1.),
                              dict(method='a-faithful', reference='a', attack='clean', diff=9., seed_p=.1, p_holm=1.)])
    assert measured_effects(steps, table) == {'a': dict(weights_apart=0.3, diff=1., seed_p=.5, p_holm=1.)}
    with pytest.raises(ValueError, match='2 students'):
        measured_effects(steps, dict(comparisons=table['comparisons'][:1] * 2))
