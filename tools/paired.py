#!/usr/bin/env python3
"""Paired comparisons between any two rows of a stored table, beyond the reference rows `run_table` writes.

    python tools/paired.py results/cpu-strong adaiad:ard adaiad:rslad adaad-ramp16:adaad-eps16 --student RN-18

Reads the per-image correctness of each row's evaluations (`evals/` of the results folder, every seed in results.json)
and writes `pairs.json` there: for each pair and attack, the difference in points (row a minus row b), its 95% paired
bootstrap interval and the exact p-value of `adaad.stats.compare` (McNemar for one seed, sign-flip over seeds)."""
import argparse, json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def row_correct(res, folder, student, method, attack):
    "The (seeds, images) correctness of one row under one attack, from the row's stored evaluation files."
    import numpy as np
    from adaad.evaluate import EvalResult
    rows = [r for r in res['rows'] if r.get('student') == student and r.get('method') == method]
    if not rows: raise SystemExit(f'no row {method!r} for student {student!r} in {folder}/results.json')
    files = [r['eval'] for r in sorted(rows, key=lambda r: r.get('seed', 0)) if r.get('eval')]
    if not files: raise SystemExit(f'row {method!r} of {student!r} has no stored evaluation file')
    ev = [EvalResult.from_dict(json.loads((Path(folder) / f).read_text())['result']) for f in files]   # {key, wall_s, result}
    for e in ev:
        if attack != 'worst' and attack not in e.correct:
            raise SystemExit(f"--attacks: {attack!r} is not in row {method!r}'s evaluation; accepted: {sorted(e.correct) + ['worst']}")
    return np.stack([e.worst_correct.numpy() if attack == 'worst' else e.correct[attack].numpy() for e in ev])


def main(argv=None):
    from adaad.core import write_json
    from adaad.stats import compare
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('folder'); ap.add_argument('pairs', nargs='+', help='row_a:row_b (method names of the table)')
    ap.add_argument('--student', default='RN-18'); ap.add_argument('--attacks', default='clean,pgd10,aa')
    a = ap.parse_args(argv)
    res = json.loads((Path(a.folder) / 'results.json').read_text())
    out = dict(source=str(Path(a.folder) / 'results.json'), git=res.get('git'), student=a.student, pairs={})
    for pair in a.pairs:
        if pair.count(':') != 1: raise SystemExit(f'pairs must look like row_a:row_b, got {pair!r}')
        m1, m2 = pair.split(':')
        out['pairs'][pair] = {k: compare(row_correct(res, a.folder, a.student, m1, k), row_correct(res, a.folder, a.student, m2, k))
                              for k in a.attacks.split(',')}
        cells = ', '.join(f"{k} {c['diff']:+.1f} [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}] p={c['p']:.2g}" for k, c in out['pairs'][pair].items())
        print(f'{m1} - {m2}: {cells}')
    write_json(Path(a.folder) / 'pairs.json', out)


if __name__ == '__main__':
    main()
