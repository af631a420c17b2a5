"""The evidence machinery: paired tests and bootstrap intervals against independent computations, per-class counts,
seeds, the comparisons in a results table, and bad input."""
import itertools
import math

import numpy as np
import pytest
import torch

from scipy import stats as st

from adaad.stats import (bootstrap_ci, compare, holm, interaction, mcnemar_exact, per_class, probability_of_improvement, seed_ttest,
                         seeds_needed, sign_flip_pvalue, ttest_power, two_level_bootstrap, two_level_bootstrap_ci)


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


class _Blank(torch.nn.Module):
    "A teacher with all-zero logits: uniform softmax (entropy ln 10 everywhere), predicting class 0 for every image."
    def forward(self, x): return torch.zeros(len(x), 10, dtype=x.dtype) + 0 * x.sum()


def test_transfer_diagnostics_against_a_teacher_of_known_entropy():
    """The transfer diagnostic and SAAD's entropy proxy: with a uniform teacher that always says class 0, the student's
    fooling points on images of class 0 fool only the student, all others fool both, and every entropy is ln 10."""
    import math
    from adaad.data import CifarSplit
    from adaad.diagnostics import diagnose
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(32, 10))
    y = torch.arange(40) % 10
    data = CifarSplit(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8), y, 10)
    d = diagnose(net, _Blank(), data, 'ard', batch_size=16)
    assert d['diag_teacher_acc'] == 10.                                     # right on the 4 images of class 0
    assert abs(d['diag_teacher_entropy'] - math.log(10)) < 1e-5
    assert d['diag_entropy_fool_both'] is not None and abs(d['diag_entropy_fool_both'] - math.log(10)) < 1e-5
    from adaad.data import batches
    from adaad.methods import Logits, get_method, inner_point
    torch.manual_seed(0); fooled = both = 0                                  # the same inner points, recomputed here
    for xb, yb in batches(data, 16):
        xa = inner_point(get_method('ard'), Logits(net.eval(), _Blank(), xb), yb)
        with torch.no_grad(): wrong = net.eval()(xa).argmax(1) != yb
        fooled, both = fooled + int(wrong.sum()), both + int((wrong & (yb != 0)).sum())
    assert 0 < both < fooled and abs(d['diag_fool_both'] - 100 * both / fooled) < 1e-9
    assert abs(d['diag_entropy_fool_student'] - math.log(10)) < 1e-5


def _compare(args, capsys):
    "`adaad compare ARGS` in this process: (exit code, stdout, stderr)."
    from adaad.cli import main
    try: main(['compare', *args]); code = 0
    except SystemExit as e: code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _stored_rows(folder, rows, key=None):
    "A results folder holding `rows` {method: (seeds, images) correctness under clean and aa}, one evaluation file per seed."
    from adaad.core import write_sealed
    from adaad.evaluate import EvalResult
    (folder / 'evals').mkdir(parents=True)
    out = []
    for name, c in rows.items():
        for s, cs in enumerate(np.atleast_2d(c)):
            r = EvalResult.from_correct({'clean': cs, 'aa': cs}, labels=torch.zeros(len(cs), dtype=torch.long))
            write_sealed(folder / 'evals' / f'{name}-{s}.json', dict(key=key or {}, wall_s=0, result=r.to_dict()), indent=None)
            out.append(dict(student='S', method=name, seed=s, eval=f'evals/{name}-{s}.json'))
    write_sealed(folder / 'results.json', dict(rows=out, git=None, config=dict(suite=['clean', 'aa'])))
    return folder


def test_compare_reads_stored_rows_and_matches_mcnemar(tmp_path, capsys):
    """`adaad compare` on a hand-made results folder: each pair's AA difference and p-value are those of the counts
    (a right and b wrong 10 times, the reverse twice), over the rows' stored evaluation files; an unknown row and an
    attack the rows lack are refused by name."""
    import json
    a, b = pair(10, 2, 40, 20)
    _stored_rows(tmp_path, dict(x=a, y=b))
    code, out, err = _compare([str(tmp_path), 'x:y', '--student', 'S', '--attacks', 'clean,aa'], capsys)
    assert code == 0, err
    d = json.loads((tmp_path / 'pairs.json').read_text())
    got = d['pairs']['x:y']['aa']
    assert got['diff'] == pytest.approx(100 * 8 / 72) and got['p'] == pytest.approx(mcnemar_exact(a, b), rel=1e-12)
    assert d['exploratory'] and got['verdict'].startswith('exploratory') and 'x - y: clean +11.1' in out
    assert got['p_holm'] == pytest.approx(min(1, 2 * got['p']))        # Holm within this call's two comparisons (clean and AA agree)
    code, _, err = _compare([str(tmp_path), 'x:z', '--student', 'S'], capsys)
    assert code == 2 and "no row 'z' for student 'S'" in err and "accepted: ['x', 'y']" in err
    code, _, err = _compare([str(tmp_path), 'x:y', '--student', 'S', '--attacks', 'cw2'], capsys)
    assert code == 2 and "attacks: ['cw2'] not in the evaluations of x:y; accepted: ['aa', 'clean', 'worst']" in err
    code, _, err = _compare([str(tmp_path), 'x-y', '--student', 'S'], capsys)
    assert code == 2 and 'pairs must be pairs row_a:row_b' in err


def test_compare_gives_the_p_value_of_the_tables_comparison(tmp_path, capsys):
    "Three seeds of two stored rows: `adaad compare x:pgd-at` gives the seed-level p-value and interval the table's own comparison gives."
    import json
    from adaad.report import add_comparisons, load_results
    rng = np.random.default_rng(0)
    _stored_rows(tmp_path, {'pgd-at': rng.random((3, 200)) < 0.4, 'x': rng.random((3, 200)) < [[0.5], [0.45], [0.55]]})
    res = load_results(tmp_path)
    add_comparisons(res, tmp_path)
    table = next(c for c in res['comparisons'] if (c['method'], c['reference'], c['attack']) == ('x', 'pgd-at', 'aa'))
    code, _, err = _compare([str(tmp_path), 'x:pgd-at', '--student', 'S', '--attacks', 'aa'], capsys)
    assert code == 0, err
    got = json.loads((tmp_path / 'pairs.json').read_text())['pairs']['x:pgd-at']['aa']
    assert table['level'] == got['level'] == 'seeds' and got['seeds'] == 3
    assert got['p'] == table['p'] and got['ci95'] == table['ci95'] and got['diff'] == table['diff']


def test_compare_against_another_folder_needs_the_same_test_images(tmp_path, capsys):
    """--against reads row b from another results folder: x there vs x here is the McNemar of their counts; a folder
    whose evaluation ran on other test images, and a seed a row lacks, are refused by name."""
    import json
    a, b = pair(3, 11, 30, 20)
    new = _stored_rows(tmp_path / 'new', dict(x=a), key=dict(n=len(a), test_sha256='abc'))
    old = _stored_rows(tmp_path / 'old', dict(x=b), key=dict(n=len(a), test_sha256='abc'))
    moved = _stored_rows(tmp_path / 'moved', dict(x=b), key=dict(n=len(a), test_sha256='def'))
    run = lambda other, *p: _compare([str(new), 'x:x', '--student', 'S', '--attacks', 'aa', '--against', str(other), *p], capsys)
    assert run(old)[0] == 0
    got = json.loads((new / 'pairs_vs_old.json').read_text())['pairs']['x:x']['aa']
    assert got['diff'] == pytest.approx(100 * (3 - 11) / 64) and got['p'] == pytest.approx(mcnemar_exact(a, b), rel=1e-12)
    code, _, err = run(moved)
    assert code == 2 and 'different test images' in err and not (new / 'pairs_vs_moved.json').exists()
    code, _, err = run(old, '--seeds', '1')
    assert code == 2 and "seeds: row 'x'" in err and 'has seeds [0]' in err
    code, _, err = run(old, '--seeds', 'first')
    assert code == 2 and '--seeds: must be comma-separated integers' in err


def test_compare_reproduces_the_committed_pairs():
    "`compare_pairs` recomputes, from the committed evaluations, the committed 16- against 8-epoch differences and their interaction."
    import json
    from pathlib import Path
    from adaad.report import compare_pairs
    root = Path(__file__).resolve().parents[1] / 'results'
    old = json.loads((root / 'cpu-strong-long' / 'pairs_vs_cpu-strong.json').read_text())
    d = compare_pairs(root / 'cpu-strong-long', ['adaiad:adaiad'], against=root / 'cpu-strong', seeds=[0], attacks=['aa'], interactions=['adaiad:adaad'])
    for k in ('diff', 'p', 'ci95', 'n10', 'n01'): assert d['pairs']['adaiad:adaiad']['aa'][k] == old['pairs']['adaiad:adaiad']['aa'][k]
    assert json.loads(json.dumps(d['interactions']['adaiad:adaad']['aa'])) == old['interactions']['adaiad:adaad']['aa']
    assert d['preset_differences'] == old['preset_differences']


def with_acc(accs, n=1000):
    "Per-image correctness, one row per seed, with the given accuracies in points."
    return np.stack([np.arange(n) < round(v * n / 100) for v in accs])


@pytest.mark.parametrize('acc_a,acc_b', [([14.2, 15.4, 15.3], [12.7, 11.5, 12.8]), ([0.5, 2.4, 0.6], [21.1, 24.0, 22.5]),
                                         ([30.0, 31.5, 29.0, 33.1, 30.2], [29.0, 31.0, 30.5, 31.0, 28.0])])
def test_seed_ttest_is_the_t_test_of_the_per_seed_differences(acc_a, acc_b):
    "t = mean / (sd / sqrt(S)) with S - 1 degrees of freedom, computed by hand; the interval is mean +- t_0.975 * sd / sqrt(S)."
    d = np.array(acc_a) - np.array(acc_b); S = len(d)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(S))
    r = seed_ttest(with_acc(acc_a), with_acc(acc_b), list(range(S)), list(range(S)))
    assert r['t'] == pytest.approx(t, rel=1e-6) and r['p'] == pytest.approx(2 * st.t.sf(abs(t), S - 1), rel=1e-6) and r['df'] == S - 1
    half = st.t.ppf(0.975, S - 1) * d.std(ddof=1) / math.sqrt(S)
    assert r['ci'] == pytest.approx([d.mean() - half, d.mean() + half], rel=1e-6)
    c = compare(with_acc(acc_a), with_acc(acc_b))
    assert c['level'] == 'seeds' and c['p'] == pytest.approx(r['p']) and c['seed_p'] == c['p'] and c['image_p'] < c['p'] + 1


def test_seed_level_needs_two_seeds_and_the_same_seeds():
    a, b = with_acc([20, 21, 22]), with_acc([19, 20, 20])
    with pytest.raises(ValueError, match='seed-level test needs two or more seeds'): seed_ttest(a[:1], b[:1])
    with pytest.raises(ValueError, match=r'seeds_b must be the seeds of seeds_a.*\[0, 1, 2\] and \[0, 1, 3\]'): seed_ttest(a, b, [0, 1, 2], [0, 1, 3])
    with pytest.raises(ValueError, match='seeds_b must be the seeds of seeds_a'): compare(a, b, seeds_a=[0, 1, 2], seeds_b=[2, 1, 0])
    with pytest.raises(ValueError, match='seeds_b must be the seeds of seeds_a'): compare(a[:1], b[:1], seeds_a=[0], seeds_b=[1])
    assert compare(a[:1], b[:1])['level'] == 'images' and compare(a[:1], b[:1])['seed_p'] is None


def test_two_level_bootstrap_matches_enumeration_on_a_tiny_case():
    """Two seeds of two images: every replicate is one of 4 seed draws times 4 x 4 image draws, all equally likely;
    the bootstrap's frequencies of each value match that exact distribution."""
    a = np.array([[1, 0], [1, 1]], bool); b = np.array([[0, 0], [0, 1]], bool)
    d = a.astype(int) - b.astype(int)
    exact = {}
    for s1, s2 in itertools.product(range(2), repeat=2):
        for i1, i2, j1, j2 in itertools.product(range(2), repeat=4):
            v = round(100 * ((d[s1, i1] + d[s1, i2]) / 2 + (d[s2, j1] + d[s2, j2]) / 2) / 2, 6)
            exact[v] = exact.get(v, 0) + 1 / 64
    boot = np.round(two_level_bootstrap(a, b, n_boot=200_000, seed=1), 6)
    got = {v: float((boot == v).mean()) for v in exact}
    assert set(np.unique(boot)) <= set(exact) and all(abs(got[v] - exact[v]) < 0.005 for v in exact), (got, exact)
    lo, hi = two_level_bootstrap_ci(a, b, n_boot=20_000, seed=2)
    assert lo <= 50 <= hi and (lo, hi) == two_level_bootstrap_ci(a, b, n_boot=20_000, seed=2)


def test_two_level_bootstrap_covers_a_known_difference():
    """Simulated trainings: per seed, true accuracies 0.50 + 0.03 and 0.50 plus a shared and a private seed effect
    (sd 0.02), 300 images each; the true mean difference is 3 points. The 95% interval covers it about 95% of the time."""
    rng = np.random.default_rng(0)
    hits, sims = 0, 200
    for _ in range(sims):
        shared = rng.normal(0, 0.02, 8)
        pa, pb = 0.53 + shared + rng.normal(0, 0.02, 8), 0.50 + shared + rng.normal(0, 0.02, 8)
        a, b = rng.random((8, 300)) < pa[:, None], rng.random((8, 300)) < pb[:, None]
        lo, hi = two_level_bootstrap_ci(a, b, n_boot=2000, seed=int(rng.integers(1 << 30)))
        hits += lo <= 3. <= hi
    assert 0.88 <= hits / sims <= 0.995, hits / sims


def test_probability_of_improvement_counts_pairs_of_trainings():
    "P(A > B) over all pairs of per-seed accuracies, ties half: counted by hand."
    xa, xb = [1., 2., 3.], [0., 2.5, 1.]
    want = sum((x > y) + 0.5 * (x == y) for x in xa for y in xb) / 9
    assert probability_of_improvement(xa, xb) == pytest.approx(want) == pytest.approx(6.5 / 9)
    assert probability_of_improvement([5, 6], [1, 2]) == 1. and probability_of_improvement([1, 2], [5, 6]) == 0.
    with pytest.raises(ValueError, match='acc_b must be a non-empty list'): probability_of_improvement([1.], [])


def test_holm_matches_the_step_down_rule_and_statsmodels():
    "Adjusted p_(k) = max over j <= k of min(1, (m - j + 1) p_(j)), by hand; the same as statsmodels' multipletests."
    from statsmodels.stats.multitest import multipletests
    p = [0.01, 0.04, 0.03, 0.005, 0.5, 0.0001]
    order = np.argsort(p); m = len(p); adj = np.empty(m); run = 0.
    for k, i in enumerate(order):
        run = max(run, min(1., (m - k) * p[i])); adj[i] = run
    got, rej = holm(p)
    assert got == pytest.approx(adj.tolist()) and got == pytest.approx(multipletests(p, method='holm')[1].tolist())
    assert rej == [bool(v < 0.05) for v in adj]
    with pytest.raises(ValueError, match='pvalues: the family of comparisons is empty'): holm([])
    with pytest.raises(ValueError, match=r'pvalues must lie in \[0, 1\]'): holm([0.1, 1.5])


def test_interaction_tests_the_change_of_a_lead():
    "A lead of 10 vs 2 discordant images that vanishes: the change is the lead (8 of 72 images), tested with McNemar's p; no change gives p = 1."
    a, b = pair(10, 2, 40, 20)
    r = interaction(a, b, b, b)
    assert r['change'] == pytest.approx(100 * 8 / 72) and r['image_p'] == pytest.approx(mcnemar_exact(a, b), rel=1e-12)
    assert interaction(a, b, a, b)['image_p'] == 1. and interaction(a, b, a, b)['seed_p'] is None
    with pytest.raises(ValueError, match='a2 and b2 must be evaluations of the same images'): interaction(a, b, a[:50], b[:50])


def test_power_and_seeds_needed():
    "The power agrees with statsmodels' noncentral t where that is finite; seeds needed grow as the level falls."
    from statsmodels.stats.power import TTestPower
    for es, S in ((0.5, 10), (1., 5), (2., 3)):
        assert ttest_power(es, 1., S) == pytest.approx(TTestPower().power(effect_size=es, nobs=S, alpha=0.05), abs=1e-6)
    assert seeds_needed(1., 1.) == 10 and seeds_needed(7.6, 1.3) == 3 and seeds_needed(2.6, 1.3, significance=0.05 / 75) > seeds_needed(2.6, 1.3)
    with pytest.raises(ValueError, match='sd must be a positive'): seeds_needed(1., 0.)
    with pytest.raises(ValueError, match='significance and power must lie in'): seeds_needed(1., 1., significance=1.5)
    with pytest.raises(ValueError, match='delta must be a non-zero'): seeds_needed(0., 1.)


def test_power_integral_agrees_with_statsmodels_and_with_simulation(monkeypatch):
    "The integral used where the noncentral t fails: equal to statsmodels wherever that is finite, many seeds and tiny levels included."
    import numpy as np, scipy.stats as st
    from statsmodels.stats.power import TTestPower
    rng = np.random.default_rng(0)
    x = rng.normal(1.5, 2.3, size=(40000, 5))                 # 40,000 simulated 5-seed experiments, true difference 1.5
    t = x.mean(1) / (x.std(1, ddof=1) / np.sqrt(5))
    simulated = (np.abs(t) > st.t.ppf(0.975, 4)).mean()
    assert ttest_power(1.5, 2.3, 5) == pytest.approx(simulated, abs=0.01)
    monkeypatch.setattr(st.nct, 'sf', lambda *a: np.nan)     # force the integral
    compared = 0
    for S in (2, 3, 10, 200, 300):
        for delta in (0.3, 1., 3.):
            for level in (0.05, 0.05 / 13, 0.05 / 75):
                want = TTestPower().power(effect_size=delta / 2.3, nobs=S, alpha=level)
                if np.isfinite(want):
                    assert ttest_power(delta, 2.3, S, level) == pytest.approx(want, abs=1e-6), (S, delta, level)
                    compared += 1
    assert compared >= 35
    assert ttest_power(1.5, 2.3, 5) == pytest.approx(simulated, abs=0.01)


def _table(tmp_path, accs, family=None):
    "A hand-made results folder: rows with per-seed AA and clean accuracies `accs` {method: [acc per seed]}."
    from adaad.core import write_sealed
    from adaad.evaluate import EvalResult
    (tmp_path / 'evals').mkdir(exist_ok=True)
    rows = []
    for m, per_seed in accs.items():
        for s, v in enumerate(per_seed):
            c = np.arange(400) < round(v * 4)
            r = EvalResult.from_correct({'clean': c, 'aa': c}, labels=torch.zeros(400, dtype=torch.long))
            write_sealed(tmp_path / 'evals' / f'{m}-{s}.json', dict(result=r.to_dict()), indent=None)
            rows.append(dict(student='S', arch='x', method=m, seed=s, n=400, eval=f'evals/{m}-{s}.json', cells={}))
    return dict(rows=rows, config=dict(suite=['clean', 'aa'], **({'family': family} if family else {})))


def test_a_table_corrects_within_its_declared_family(tmp_path):
    """By default every reference comparison under every column (clean, AA, worst), mirrors once: (3 + 3 - 1) x 3 = 15;
    a declared family of AA against PGD-AT and one pair has 4; resolved only after Holm, on the seed-level p-values."""
    from adaad.report import add_comparisons
    accs = {'pgd-at': [20, 22, 21], 'adaad': [25, 28, 26], 'ard': [22, 25, 23.5], 'adaiad': [27, 29, 28.5]}
    res = _table(tmp_path, accs)
    comps = add_comparisons(res, tmp_path, n_boot=200)
    assert res['family']['size'] == 15 and len(comps) == 2 * 3 * 3 and res['family']['source'].startswith('not declared')
    uniq = {}
    for c in comps:
        uniq.setdefault((c['attack'], frozenset((c['method'], c['reference']))), c['p'])
    want = holm(list(uniq.values()))[0]
    for c in comps:
        k = (c['attack'], frozenset((c['method'], c['reference'])))
        assert c['p_holm'] == pytest.approx(want[list(uniq).index(k)]) and c['resolved_in_family'] == (c['p_holm'] < 0.05)
    assert any(c['resolved'] and not c['resolved_in_family'] for c in comps)      # the correction changes a verdict
    res = _table(tmp_path, accs, family=dict(references=['pgd-at'], pairs=[['adaiad', 'ard']], attacks=['aa']))
    comps = add_comparisons(res, tmp_path, n_boot=200)
    assert res['family']['size'] == 4 and sum(c['in_family'] for c in comps) == 4
    assert all(c['p_holm'] is None and c['verdict'].startswith('descriptive') for c in comps if c['attack'] == 'clean')
    res = _table(tmp_path, accs, family=dict(references=['pgd-at'], pairs=[['adaiad', 'rslad']]))
    assert add_comparisons(res, tmp_path) == [] and res['family']['missing'] == ['rslad']


def test_a_table_refuses_rows_whose_seeds_differ(tmp_path):
    from adaad.report import add_comparisons
    res = _table(tmp_path, {'pgd-at': [20, 22, 21], 'adaad': [25, 28, 26]})
    res['rows'][-1]['seed'] = 5
    with pytest.raises(ValueError, match=r"rows 'adaad' and 'pgd-at' of 'S' must have the same seeds"): add_comparisons(res, tmp_path)


def test_the_significance_level_is_not_called_alpha():
    "`significance` (and `SIGNIFICANCE`) name the level; `alpha=` and `ALPHA` still work, with a FutureWarning naming the new name."
    import adaad.stats as st
    from adaad.stats import holm
    assert st.SIGNIFICANCE == 0.05
    with pytest.warns(FutureWarning, match='seeds_needed: alpha is deprecated, use significance'):
        assert seeds_needed(2.6, 1.3, alpha=0.01) == seeds_needed(2.6, 1.3, significance=0.01) > seeds_needed(2.6, 1.3)
    with pytest.warns(FutureWarning, match='holm: alpha is deprecated'):
        assert holm([0.02, 0.03], alpha=0.01)[1] == [False, False] and holm([0.02, 0.03])[1] == [True, True]
    with pytest.warns(FutureWarning, match='ttest_power: alpha is deprecated'):
        assert ttest_power(1., 1., 5, alpha=0.01) == ttest_power(1., 1., 5, significance=0.01) < ttest_power(1., 1., 5)
    with pytest.warns(FutureWarning, match='use SIGNIFICANCE'): assert st.ALPHA == 0.05
    with pytest.raises(TypeError, match='give significance only'): holm([0.5], significance=0.1, alpha=0.1)


def test_a_former_name_warns_where_a_users_module_will_see_it(tmp_path):
    "Former names warn with FutureWarning, which Python shows for code in a user's module (a DeprecationWarning it hides)."
    import subprocess, sys
    from pathlib import Path
    (tmp_path / 'usermod.py').write_text('from adaad.stats import holm\nholm([0.01, 0.04], alpha=0.05)\n')
    env = dict(__import__('os').environ, PYTHONPATH=f"{tmp_path}:{Path(__file__).resolve().parents[1]}")
    env.pop('PYTHONWARNINGS', None)
    p = subprocess.run([sys.executable, '-c', 'import usermod'], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and 'FutureWarning: holm: alpha is deprecated, use significance' in p.stderr, p.stderr[-2000:]
