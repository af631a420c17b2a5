#!/usr/bin/env python3
"""Paired comparisons between any two rows of a stored table, beyond the reference rows `run_table` writes.

    python tools/paired.py results/cpu-strong adaiad:ard adaiad:rslad adaad-ramp16:adaad-eps16 --student RN-18
    python tools/paired.py results/cpu-strong-long adaad:adaad pgd-at:pgd-at --against results/cpu-strong --seeds 0

Reads the per-image correctness of each row's evaluations (`evals/` of the results folder, every seed in results.json,
or those of `--seeds`) and writes `pairs.json` there: for each pair and attack, the difference in points (row a minus
row b), its 95% paired bootstrap interval and the exact p-value of `adaad.stats.compare` (McNemar for one seed,
sign-flip over seeds). With `--against OTHER`, row b is read from the results folder OTHER (the same test images are
required: each evaluation file's `test_sha256` and `n` must agree) and the output is `pairs_vs_<OTHER's name>.json`."""
import argparse, json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def row_files(res, folder, student, method, seeds=None):
    "The stored evaluation files ({key, wall_s, result}) of one row, by seed, optionally only `seeds`."
    rows = [r for r in res['rows'] if r.get('student') == student and r.get('method') == method]
    if not rows: raise SystemExit(f'no row {method!r} for student {student!r} in {folder}/results.json')
    if seeds is not None:
        have = sorted(r.get('seed', 0) for r in rows)
        rows = [r for r in rows if r.get('seed', 0) in seeds]
        if len(rows) != len(seeds): raise SystemExit(f'--seeds: row {method!r} in {folder} has seeds {have}, asked for {sorted(seeds)}')
    files = [r['eval'] for r in sorted(rows, key=lambda r: r.get('seed', 0)) if r.get('eval')]
    if len(files) != len(rows): raise SystemExit(f'row {method!r} of {student!r} has no stored evaluation file for every seed')
    return [json.loads((Path(folder) / f).read_text()) for f in files]


def test_images(files, where):
    "The (n, test_sha256) that every evaluation file of a row was computed on."
    ids = {(f['key'].get('n'), f['key'].get('test_sha256')) for f in files}
    if len(ids) != 1: raise SystemExit(f'{where}: the evaluation files of one row disagree on the test images ({ids})')
    return ids.pop()


def row_correct(files, method, attack):
    "The (seeds, images) correctness of one row under one attack, from the row's stored evaluation files."
    import numpy as np
    from adaad.evaluate import EvalResult
    ev = [EvalResult.from_dict(f['result']) for f in files]
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
    ap.add_argument('--against', default=None, help='results folder of row b (default: the same folder)')
    ap.add_argument('--seeds', default=None, help='comma-separated seeds to compare (default: every seed of each row)')
    a = ap.parse_args(argv)
    try: seeds = None if a.seeds is None else [int(s) for s in a.seeds.split(',')]
    except ValueError: raise SystemExit(f'--seeds must be comma-separated integers such as 0,1,2, got {a.seeds!r}')
    other = a.against or a.folder
    res = json.loads((Path(a.folder) / 'results.json').read_text())
    res_b = json.loads((Path(other) / 'results.json').read_text())
    out = dict(source=str(Path(a.folder) / 'results.json'), git=res.get('git'), student=a.student, seeds=seeds, pairs={})
    if a.against: out.update(against=str(Path(other) / 'results.json'), against_git=res_b.get('git'))
    for pair in a.pairs:
        if pair.count(':') != 1: raise SystemExit(f'pairs must look like row_a:row_b, got {pair!r}')
        m1, m2 = pair.split(':')
        fa, fb = row_files(res, a.folder, a.student, m1, seeds), row_files(res_b, other, a.student, m2, seeds)
        if test_images(fa, a.folder) != test_images(fb, other):
            raise SystemExit(f'{pair}: rows evaluated on different test images ({a.folder} and {other}: n or test_sha256 differ)')
        out['pairs'][pair] = {k: compare(row_correct(fa, m1, k), row_correct(fb, m2, k)) for k in a.attacks.split(',')}
        cells = ', '.join(f"{k} {c['diff']:+.1f} [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}] p={c['p']:.2g}" for k, c in out['pairs'][pair].items())
        print(f'{m1} - {m2}: {cells}')
    write_json(Path(a.folder) / ('pairs.json' if not a.against else f'pairs_vs_{Path(other).resolve().name}.json'), out)


if __name__ == '__main__':
    main()
