"""The evidence machinery: paired tests and bootstrap intervals against independent computations, per-class counts,
seeds, the comparisons in a results table, and bad input."""
import itertools
import math

import numpy as np
import pytest
import torch

from adaad.stats import bootstrap_ci, compare, mcnemar_exact, per_class, sign_flip_pvalue


def pair(n10, n01, n11, n00):
    "Correctness vectors with the given counts of (a right, b wrong), (a wrong, b right), both right, both wrong."
    a = np.array([1] * n10 + [0] * n01 + [1] * n11 + [0] * n00, bool)
    b = np.array([0] * n10 + [1] * n01 + [1] * n11 + [0] * n00, bool)
    return a, b


@pytest.mark.parametrize('n10,n01', [(10, 2), (0, 0), (5, 5), (1, 9), (30, 12), (0, 7)])
def test_mcnemar_exact_matches_the_binomial_formula(n10, n01):
    "p = min(1, 2 * P(X <= min(n10, n01))), X ~ Bin(n10 + n01, 1/2), computed with math.comb."
    a, b = pair(n10, n01, 40, 20)
    m = n10 + n01
    want = 1. if m == 0 else min(1., 2 * sum(math.comb(m, k) for k in range(min(n10, n01) + 1)) / 2 ** m)
    assert mcnemar_exact(a, b) == pytest.approx(want, rel=1e-12)
    assert sign_flip_pvalue(a, b) == pytest.approx(want, rel=1e-12)      # one seed: the same test


def test_sign_flip_over_seeds_matches_enumeration():
    "The exact sign-flip p-value equals the share of all 2^k sign assignments with |T| >= |t| (brute force)."
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 14)) < 0.6, rng.random((3, 14)) < 0.5
    d = (a.astype(int) - b.astype(int)).sum(0)
    nz = d[d != 0]
    t = abs(nz.sum())
    count = sum(abs(sum(s * v for s, v in zip(signs, nz))) >= t for signs in itertools.product((-1, 1), repeat=len(nz)))
    assert len(nz) <= 20
    assert sign_flip_pvalue(a, b) == pytest.approx(count / 2 ** len(nz), rel=1e-9)


def test_bootstrap_matches_resampling_images():
    "The multinomial shortcut gives the interval that resampling image indices gives (to Monte Carlo accuracy)."
    a, b = pair(40, 15, 300, 145)
    lo, hi = bootstrap_ci(a, b, n_boot=20000, seed=1)
    rng = np.random.default_rng(2)
    idx = rng.integers(0, len(a), size=(20000, len(a)))
    boot = 100 * (a[idx].mean(1) - b[idx].mean(1))
    ref = np.quantile(boot, [0.025, 0.975])
    assert abs(lo - ref[0]) < 0.35 and abs(hi - ref[1]) < 0.35 and lo < 5 < hi
    assert bootstrap_ci(a, b, seed=3) == bootstrap_ci(a, b, seed=3)       # seeded


def test_compare_reports_the_difference_and_resolution():
    a, b = pair(30, 10, 500, 460)
    c = compare(a, b)
    assert c['diff'] == pytest.approx(2.0) and (c['n10'], c['n01'], c['n']) == (30, 10, 1000)
    assert c['resolved'] and c['p'] < 0.05 and c['ci95'][0] < 2 < c['ci95'][1] and c['test'] == 'exact McNemar'
    c2 = compare(a, a)
    assert c2['diff'] == 0 and c2['p'] == 1 and not c2['resolved']


def test_seeds_that_disagree_are_flagged():
    a1, b1 = pair(30, 10, 500, 460)
    a2, b2 = pair(10, 30, 500, 460)
    c = compare(np.stack([a1, a2]), np.stack([b1, b2]))
    assert c['per_seed'] == pytest.approx([2., -2.]) and not c['consistent'] and c['seeds'] == 2


@pytest.mark.parametrize('a,b,msg', [
    (np.ones(10, bool), np.ones(9, bool), 'same images'),
    (np.ones((2, 10), bool), np.ones((3, 10), bool), 'same images'),
    (np.ones(0, bool), np.ones(0, bool), 'shape'),
    (np.full(5, 2), np.ones(5), '0/1'),
])
def test_bad_input_names_the_problem(a, b, msg):
    with pytest.raises(ValueError, match=msg): compare(a, b)


def test_per_class_counts_sum_to_the_totals():
    rng = np.random.default_rng(0)
    y, c = rng.integers(0, 10, 500), rng.random(500) < 0.4
    pc = per_class(c, y)
    assert sum(pc['correct']) == c.sum() and sum(pc['total']) == 500
    assert all(pc['correct'][k] == (c & (y == k)).sum() for k in range(10))
    assert pc['worst'][1] == min(pc['acc']) and pc['acc'][pc['worst'][0]] == pc['worst'][1]
    with pytest.raises(ValueError, match='labels must give one class per image'): per_class(c, y[:10])


def test_eval_results_carry_per_class_counts():
    from adaad.evaluate import EvalResult
    y = torch.tensor([0, 0, 1, 1, 2])
    r = EvalResult.from_correct({'clean': [1, 1, 1, 0, 1], 'pgd10': [1, 0, 0, 0, 1]}, labels=y)
    assert r.per_class['clean']['correct'] == [2, 1, 1] and r.per_class['worst']['correct'] == [1, 0, 1]
    assert EvalResult.from_dict(r.to_dict()).per_class == r.per_class


def test_seed_lists_and_references_are_checked():
    from adaad.repro import check_seeds
    from adaad.report import add_comparisons
    assert check_seeds((0, 1, 2)) == [0, 1, 2]
    for bad in ([], [0, 0], [-1], ['0'], None):
        with pytest.raises(ValueError, match='seeds must be a non-empty list of distinct ints'): check_seeds(bad)
    res = dict(config=dict(suite=['clean']), rows=[dict(student='RN-18', method='adaad', seed=0)])
    with pytest.raises(ValueError, match=r"references must be rows of the table: \['trades'\]"):
        add_comparisons(res, '.', references=['trades'])


def test_diagnostics_of_a_student_equal_to_its_teacher():
    "KL 0 and full agreement at x and at x~ when the student is a copy of the teacher; the caller's RNG and BN stats untouched."
    import copy
    from adaad.data import CifarSplit
    from adaad.diagnostics import diagnose
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(32, 10))
    data = CifarSplit(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (40,)), 10)
    bn, state = net[1].running_mean.clone(), torch.get_rng_state()
    for method in ('adaad', 'ard'):
        d = diagnose(net, copy.deepcopy(net).eval(), data, method, batch_size=16)
        assert d['diag_kl_nat'] < 1e-6 and d['diag_kl_adv'] < 1e-6 and d['diag_agree_nat'] == d['diag_agree_adv'] == 100.
        assert d['diag_teacher_acc'] == d['diag_student_acc'] and d['diag_fool_both'] in (None, 100.)
    assert torch.equal(net[1].running_mean, bn) and torch.equal(torch.get_rng_state(), state) and net.training


def test_paired_tool_reads_stored_rows_and_matches_mcnemar(tmp_path):
    """tools/paired.py on a hand-made results folder: each pair's AA difference and p-value are those of the counts
    (a right and b wrong 10 times, the reverse twice), over the rows' stored evaluation files; an unknown row is refused."""
    import json, subprocess, sys
    from pathlib import Path
    from adaad.evaluate import EvalResult
    a, b = pair(10, 2, 40, 20)
    (tmp_path / 'evals').mkdir()
    rows = []
    for name, c in (('x', a), ('y', b)):
        r = EvalResult.from_correct({'clean': c, 'aa': c}, labels=torch.zeros(len(c), dtype=torch.long))
        (tmp_path / 'evals' / f'{name}.json').write_text(json.dumps(dict(key={}, wall_s=0, result=r.to_dict())))
        rows.append(dict(student='S', method=name, seed=0, eval=f'evals/{name}.json'))
    (tmp_path / 'results.json').write_text(json.dumps(dict(rows=rows, git=None)))
    tool = Path(__file__).resolve().parents[1] / 'tools' / 'paired.py'
    run = lambda *p: subprocess.run([sys.executable, str(tool), str(tmp_path), *p, '--student', 'S', '--attacks', 'clean,aa'],
                                    capture_output=True, text=True)
    assert run('x:y').returncode == 0
    got = json.loads((tmp_path / 'pairs.json').read_text())['pairs']['x:y']['aa']
    assert got['diff'] == pytest.approx(100 * 8 / 72) and got['p'] == pytest.approx(mcnemar_exact(a, b), rel=1e-12)
    bad = run('x:z')
    assert bad.returncode != 0 and "no row 'z' for student 'S'" in bad.stderr
    bad = subprocess.run([sys.executable, str(tool), str(tmp_path), 'x:y', '--student', 'S', '--attacks', 'cw2'], capture_output=True, text=True)
    assert bad.returncode != 0 and "--attacks: 'cw2' is not in row 'x'" in bad.stderr


def test_paired_tool_against_another_folder_needs_the_same_test_images(tmp_path):
    """--against reads row b from another results folder: x there vs x here is the McNemar of their counts; a folder
    whose evaluation ran on other test images, and a seed a row lacks, are refused by name."""
    import json, subprocess, sys
    from pathlib import Path
    from adaad.evaluate import EvalResult
    a, b = pair(3, 11, 30, 20)
    def folder(name, c, sha):
        d = tmp_path / name; (d / 'evals').mkdir(parents=True)
        r = EvalResult.from_correct({'aa': c}, labels=torch.zeros(len(c), dtype=torch.long))
        (d / 'evals' / 'x.json').write_text(json.dumps(dict(key=dict(n=len(c), test_sha256=sha), wall_s=0, result=r.to_dict())))
        (d / 'results.json').write_text(json.dumps(dict(rows=[dict(student='S', method='x', seed=0, eval='evals/x.json')], git=None)))
        return d
    new, old, moved = folder('new', a, 'abc'), folder('old', b, 'abc'), folder('moved', b, 'def')
    tool = Path(__file__).resolve().parents[1] / 'tools' / 'paired.py'
    run = lambda other, *p: subprocess.run([sys.executable, str(tool), str(new), 'x:x', '--student', 'S', '--attacks', 'aa',
                                            '--against', str(other), *p], capture_output=True, text=True)
    assert run(old).returncode == 0
    got = json.loads((new / 'pairs_vs_old.json').read_text())['pairs']['x:x']['aa']
    assert got['diff'] == pytest.approx(100 * (3 - 11) / 64) and got['p'] == pytest.approx(mcnemar_exact(a, b), rel=1e-12)
    bad = run(moved)
    assert bad.returncode != 0 and 'different test images' in bad.stderr and not (new / 'pairs_vs_moved.json').exists()
    bad = run(old, '--seeds', '1')
    assert bad.returncode != 0 and "--seeds: row 'x'" in bad.stderr and 'seeds [0]' in bad.stderr
    bad = run(old, '--seeds', 'first')
    assert bad.returncode != 0 and "--seeds must be comma-separated integers" in bad.stderr
