#!/usr/bin/env python3
"""Paired comparisons between any two rows of a stored table, beyond the reference rows `run_table` writes.

    python tools/paired.py results/cpu-strong adaiad:ard adaiad:rslad adaad-ramp16:adaad-eps16 --student RN-18
    python tools/paired.py results/cpu-strong-long adaad:adaad pgd-at:pgd-at --against results/cpu-strong --seeds 0

    python tools/paired.py results/cpu-strong-long --against results/cpu-strong --seeds 0 --interaction adaiad:adaad

Reads the per-image correctness of each row's evaluations (`evals/` of the results folder, every seed in results.json,
or those of `--seeds`) and writes `pairs.json` there: for each pair and attack, `adaad.stats.compare` (row a minus row
b, paired by seed): the image-level test (McNemar for one seed, sign-flip over seeds: these networks), and with two or
more seeds the seed-level test (paired t-test, two-level bootstrap, probability of improvement: the methods). These
pairs are asked for after the table was made, so they are **exploratory**: outside the table's declared family, with
Holm's correction only within the pairs of this call (`p_holm`). With `--against OTHER`, row b is read from the results
folder OTHER (the same test images are required: each evaluation file's `test_sha256` and `n` must agree), the output
is `pairs_vs_<OTHER's name>.json`, and it lists every preset setting in which the two results differ. With
`--interaction a:b` (and `--against`), it also tests the change of the difference a - b between the two folders (a
lead that grew or vanished), per attack, with `adaad.stats.interaction`."""
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


def row_seeds(res, student, method, seeds=None):
    "The seeds of one row, in the order of `row_files`."
    have = sorted(r.get('seed', 0) for r in res['rows'] if r.get('student') == student and r.get('method') == method)
    return [s for s in have if seeds is None or s in seeds]


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
    from adaad.stats import compare, interaction
    from adaad.report import correct_family, preset_differences
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('folder'); ap.add_argument('pairs', nargs='+', help='row_a:row_b (method names of the table)')
    ap.add_argument('--student', default='RN-18'); ap.add_argument('--attacks', default='clean,pgd10,aa')
    ap.add_argument('--against', default=None, help='results folder of row b (default: the same folder)')
    ap.add_argument('--seeds', default=None, help='comma-separated seeds to compare (default: every seed of each row)')
    ap.add_argument('--interaction', nargs='*', default=[], help='row_a:row_b whose difference is compared between the folder and --against')
    a = ap.parse_args(argv)
    try: seeds = None if a.seeds is None else [int(s) for s in a.seeds.split(',')]
    except ValueError: raise SystemExit(f'--seeds must be comma-separated integers such as 0,1,2, got {a.seeds!r}')
    other = a.against or a.folder
    res = json.loads((Path(a.folder) / 'results.json').read_text())
    res_b = json.loads((Path(other) / 'results.json').read_text())
    if a.interaction and not a.against: raise SystemExit('--interaction needs --against OTHER: the change is between two results folders')
    out = dict(source=str(Path(a.folder) / 'results.json'), git=res.get('git'), student=a.student, seeds=seeds, exploratory=True,
               note='pairs chosen after the table was seen: exploratory, outside the declared family; Holm only within these pairs',
               pairs={})
    if a.against:
        diffs = preset_differences(res, res_b) if res.get('config') and res_b.get('config') else None
        out.update(against=str(Path(other) / 'results.json'), against_git=res_b.get('git'), preset_differences=diffs)
        if diffs: print('preset differences (this folder -> --against):', '; '.join(diffs))
    for pair in a.pairs:
        if pair.count(':') != 1: raise SystemExit(f'pairs must look like row_a:row_b, got {pair!r}')
        m1, m2 = pair.split(':')
        fa, fb = row_files(res, a.folder, a.student, m1, seeds), row_files(res_b, other, a.student, m2, seeds)
        if test_images(fa, a.folder) != test_images(fb, other):
            raise SystemExit(f'{pair}: rows evaluated on different test images ({a.folder} and {other}: n or test_sha256 differ)')
        sa, sb = row_seeds(res, a.student, m1, seeds), row_seeds(res_b, a.student, m2, seeds)
        try: out['pairs'][pair] = {k: dict(compare(row_correct(fa, m1, k), row_correct(fb, m2, k), seeds_a=sa, seeds_b=sb), student=a.student,
                                           method=m1, reference=m2, attack=k) for k in a.attacks.split(',')}
        except ValueError as e: raise SystemExit(f'{pair}: {e}')
    flat = [c for p in out['pairs'].values() for c in p.values()]
    if flat: correct_family(flat)
    for pair, cs in out['pairs'].items():
        for c in cs.values(): c['verdict'] = 'exploratory: ' + c['verdict']
        cells = ', '.join(f"{k} {c['diff']:+.1f} [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}] p={c['p']:.2g} ({c['level']}; Holm {c['p_holm']:.2g})"
                          for k, c in cs.items())
        print(f"{pair.replace(':', ' - ')}: {cells}")
    if a.interaction: out['interactions'] = {}
    for pair in a.interaction:
        if pair.count(':') != 1: raise SystemExit(f'--interaction: pairs must look like row_a:row_b, got {pair!r}')
        m1, m2 = pair.split(':')
        f1a, f1b = row_files(res, a.folder, a.student, m1, seeds), row_files(res, a.folder, a.student, m2, seeds)
        f2a, f2b = row_files(res_b, other, a.student, m1, seeds), row_files(res_b, other, a.student, m2, seeds)
        if len({test_images(f, w) for f, w in ((f1a, a.folder), (f1b, a.folder), (f2a, other), (f2b, other))}) != 1:
            raise SystemExit(f'--interaction {pair}: rows evaluated on different test images')
        out['interactions'][pair] = {k: interaction(row_correct(f1a, m1, k), row_correct(f1b, m2, k), row_correct(f2a, m1, k),
                                                    row_correct(f2b, m2, k)) for k in a.attacks.split(',')}
        print(f'change of {m1} - {m2} (this folder minus --against): ' + ', '.join(
            f"{k} {c['diff1']:+.1f} vs {c['diff2']:+.1f}: {c['change']:+.1f} p={c['image_p']:.2g}" for k, c in out['interactions'][pair].items()))
    write_json(Path(a.folder) / ('pairs.json' if not a.against else f'pairs_vs_{Path(other).resolve().name}.json'), out)


if __name__ == '__main__':
    main()
