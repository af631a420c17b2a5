"Evaluation: suites, Wilson intervals, per-example consistency, files, and the paper suite on a trained model."
import csv
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from adaad.attacks import ATTACKS, AttackSpec
from adaad.evaluate import (SUITES, EvalResult, evaluate, order_flags, resolve_suite, wilson_ci)


def toy(n=48, c=10, seed=0):
    "A hand-made linear model that tells the brightest channel of a (c, 4, 4) image: 100% clean, easy to attack."
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, 4, 4, generator=g)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(c), nn.Linear(c, c)).eval()
    with torch.no_grad(): model[3].weight.copy_(20 * torch.eye(c)); model[3].bias.zero_()
    return model, x, x.mean((2, 3)).argmax(1)


@pytest.fixture(scope='module')
def toy_result():
    model, x, y = toy()
    return evaluate(model, x, y, suite=['clean', 'fgsm', 'pgd10', 'cw2'], batch_size=16, progress=False,
                    cw2=dict(steps=30))


# ---------- suites ----------
def test_suites_are_the_paper_protocol():
    paper = {s.name: s for s in resolve_suite('paper')}
    assert list(paper) == ['clean', 'fgsm', 'pgd10', 'cw2', 'aa'] and list(SUITES['quick']) == ['clean', 'pgd10']
    assert paper['fgsm'].kwargs == dict(eps=8 / 255)
    p = paper['pgd10'].kwargs
    assert p['eps'] == 8 / 255 and p['steps'] == 10 and p['random_start'] and p['step_size'] is None   # eps/4 = 2/255
    assert paper['cw2'].kwargs == dict(c=0.1, kappa=0.01, lr=0.01, steps=1000, abort_early=True)
    assert paper['aa'].kwargs == dict(eps=8 / 255, version='standard') and paper['aa'].whole


def test_resolve_suite_overrides_and_eps():
    specs = resolve_suite('paper', eps=4 / 255, cw2=dict(steps=100), pgd10=dict(steps=20))
    kw = {s.name: s.kwargs for s in specs}
    assert kw['fgsm']['eps'] == kw['pgd10']['eps'] == kw['aa']['eps'] == 4 / 255 and 'eps' not in kw['cw2']
    assert kw['cw2']['steps'] == 100 and kw['pgd10']['steps'] == 20
    assert ATTACKS['cw2'].kwargs['steps'] == 1000                # the registry is not mutated
    custom = AttackSpec('pgd3', ATTACKS['pgd10'].fn, dict(steps=3))
    assert [s.name for s in resolve_suite(['clean', custom])] == ['clean', 'pgd3']


@pytest.mark.parametrize('kw,exc,msg', [
    (dict(suite='fast'), ValueError, r"suite must be one of \['paper', 'quick'\] or a list of attack names"),
    (dict(suite=[]), ValueError, r'suite must be one of'),
    (dict(suite=['clean', 'pgd7']), ValueError, r"suite lists unknown attack 'pgd7': accepted names are"),
    (dict(suite=['clean', 'clean']), ValueError, r'suite must not name an attack twice'),
    (dict(suite='quick', cw2=dict(steps=1)), ValueError, r"overrides name attacks not in the suite: \['cw2'\]"),
    (dict(suite='quick', pgd10=5), TypeError, r'override pgd10 must be a dict'),
    (dict(suite='quick', eps=-0.1), ValueError, r'eps must be a number in \(0, 1\] .*got -0.1'),
    (dict(suite='quick', eps=1.5), ValueError, r'eps must be a number in \(0, 1\] .*got 1.5'),
])
def test_resolve_suite_errors(kw, exc, msg):
    with pytest.raises(exc, match=msg): resolve_suite(**kw)


# ---------- Wilson interval ----------
def test_wilson_hand_computed():
    # k=81, n=100, z=1.96: centre (0.81 + 1.96^2/200) / (1 + 1.96^2/100) = 0.829208 / 1.038416 = 0.798531,
    # half-width 1.96 / 1.038416 * sqrt(0.81*0.19/100 + 1.96^2/40000) = 1.887491 * 0.040435 = 0.076322
    lo, hi = wilson_ci(81, 100)
    assert lo == pytest.approx(72.2209, abs=1e-3) and hi == pytest.approx(87.4853, abs=1e-3)
    lo, hi = wilson_ci(5, 10)                                 # the textbook example: (0.2366, 0.7634)
    assert lo == pytest.approx(23.659, abs=1e-3) and hi == pytest.approx(76.341, abs=1e-3)
    assert wilson_ci(0, 200)[0] == 0 and wilson_ci(0, 200)[1] == pytest.approx(1.8846, abs=1e-3)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 10_000), frac=st.floats(0, 1), z=st.floats(0.5, 4))
def test_wilson_contains_estimate(n, frac, z):
    k = round(frac * n)
    lo, hi = wilson_ci(k, n, z)
    assert 0 <= lo <= 100 * k / n <= hi <= 100
    assert hi - lo >= wilson_ci(4 * k, 4 * n, z)[1] - wilson_ci(4 * k, 4 * n, z)[0] - 1e-9   # more data, narrower


@pytest.mark.parametrize('k,n,exc,msg', [(5, 0, ValueError, r'n must be an integer >= 1, got 0'),
                                         (11, 10, ValueError, r'k must be in \[0, n\] = \[0, 10\], got 11'),
                                         (-1, 10, ValueError, r'k must be an integer >= 0, got -1'),
                                         (0.5, 10, TypeError, r'k must be an integer')])
def test_wilson_errors(k, n, exc, msg):
    with pytest.raises(exc, match=msg): wilson_ci(k, n)


# ---------- the result ----------
def test_result_consistent(toy_result):
    r = toy_result
    assert r.n == 48 and list(r.accuracy) == ['clean', 'fgsm', 'pgd10', 'cw2']
    for k, c in r.correct.items():
        assert c.dtype == torch.bool and c.shape == (48,)
        assert r.accuracy[k] == pytest.approx(100 * c.float().mean().item())
        lo, hi = r.ci95[k]
        assert lo <= r.accuracy[k] <= hi
    worst = torch.stack(list(r.correct.values())).all(0)
    assert torch.equal(r.worst_correct, worst) and r.worst == pytest.approx(100 * worst.float().mean().item())
    assert r.accuracy['clean'] == 100 and r.accuracy['pgd10'] <= r.accuracy['fgsm'] < 100 and r.accuracy['cw2'] < 100
    assert r.flags == [] and set(r.seconds) == set(r.accuracy) and all(t >= 0 for t in r.seconds.values())
    assert r.row() == {**r.accuracy, 'worst': r.worst}
    assert 'clean=100.00%' in repr(r)


def test_json_round_trip(toy_result, tmp_path):
    r = toy_result
    path = r.to_json(tmp_path / 'out' / 'eval.json')
    d = json.loads(path.read_text())
    assert d['correct']['clean'] == r.correct['clean'].tolist() and d['config']['seed'] == 0
    back = EvalResult.from_json(path)
    assert back.to_dict() == r.to_dict()
    assert all(torch.equal(back.correct[k], r.correct[k]) for k in r.correct)
    assert [p.name for p in path.parent.iterdir()] == ['eval.json']     # no temporary file left behind


def test_csv(toy_result, tmp_path):
    r = toy_result
    rows = list(csv.DictReader(r.to_csv(tmp_path / 'eval.csv').open()))
    assert [row['attack'] for row in rows] == [*r.accuracy, 'worst']
    for row in rows:
        assert float(row['accuracy']) == pytest.approx(r.row()[row['attack']], abs=1e-4) and int(row['n']) == 48
    r.to_csv(tmp_path / 'eval.csv')                                       # overwriting is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ['eval.csv']


def test_order_flags():
    assert order_flags({'clean': 90., 'fgsm': 40., 'pgd10': 30., 'cw2': 5., 'aa': 29.}) == []
    flags = order_flags({'clean': 50., 'fgsm': 20., 'pgd10': 25., 'aa': 60.})
    assert any('pgd10 accuracy 25.00% > fgsm' in f for f in flags)
    assert any('aa accuracy 60.00% > clean' in f for f in flags) and any('aa accuracy 60.00% > pgd10' in f for f in flags)
    r = EvalResult.from_correct({'clean': [1, 0], 'fgsm': [1, 1]})
    assert r.flags and 'fgsm accuracy 100.00% > clean' in r.flags[0]


# ---------- evaluate ----------
def test_data_object_uint8_matches_float():
    model, x, y = toy(16)
    q = (x * 255).round().to(torch.uint8)
    data = SimpleNamespace(x=q, y=y)
    a = evaluate(model, data, suite=['clean', 'fgsm'], progress=False)
    b = evaluate(model, q.float() / 255, y, suite=['clean', 'fgsm'], progress=False)
    assert a.correct.keys() == b.correct.keys() and all(torch.equal(a.correct[k], b.correct[k]) for k in a.correct)


def test_batch_size_and_seed():
    model, x, y = toy(40)
    a = evaluate(model, x, y, suite=['clean', 'fgsm', 'pgd10'], batch_size=7, progress=False, seed=1)
    b = evaluate(model, x, y, suite=['clean', 'fgsm', 'pgd10'], batch_size=40, progress=False, seed=1)
    assert torch.equal(a.correct['clean'], b.correct['clean']) and torch.equal(a.correct['fgsm'], b.correct['fgsm'])
    state = torch.random.get_rng_state()
    c = evaluate(model, x, y, suite=['pgd10'], batch_size=7, progress=False, seed=1)
    assert torch.equal(c.correct['pgd10'], a.correct['pgd10'])           # reproducible with the seed ...
    assert torch.equal(torch.random.get_rng_state(), state)               # ... without touching the global RNG


def test_eps_override_weakens_attacks():
    model, x, y = toy()
    small = evaluate(model, x, y, suite=['fgsm'], eps=1 / 255, progress=False)
    big = evaluate(model, x, y, suite=['fgsm'], eps=16 / 255, progress=False)
    assert small.accuracy['fgsm'] > big.accuracy['fgsm'] and small.config['suite'][0]['kwargs']['eps'] == 1 / 255


def test_model_mode_restored():
    model, x, y = toy(16)
    model.train()
    evaluate(model, x, y, suite=['clean', 'pgd10'], progress=False)
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_autoattack_through_evaluate():
    model, x, y = toy(12)
    r = evaluate(model, x, y, suite=['clean', 'aa'], batch_size=5, progress=False,
                 aa=dict(version='custom', attacks=['apgd-ce']))
    assert r.accuracy['clean'] == 100 and r.accuracy['aa'] < 100 and r.config['suite'][1]['kwargs']['version'] == 'custom'


@pytest.mark.parametrize('kw,exc,msg', [
    (dict(suite='fast'), ValueError, r'suite must be one of'),
    (dict(batch_size=0), ValueError, r'batch_size must be an integer >= 1, got 0'),
    (dict(seed=-1), ValueError, r'seed must be an integer >= 0'),
    (dict(eps=2.), ValueError, r'eps must be a number in \(0, 1\] .*got 2.0'),
    (dict(pgd10=dict(steps=0)), ValueError, r'steps must be an integer >= 1, got 0'),
])
def test_evaluate_bad_parameters(kw, exc, msg):
    model, x, y = toy(4)
    with pytest.raises(exc, match=msg): evaluate(model, x, y, progress=False, **kw)


def test_evaluate_bad_inputs():
    model, x, y = toy(4)
    with pytest.raises(ValueError, match=r'x must be in \[0, 1\]'): evaluate(model, x * 3, y, progress=False)
    with pytest.raises(ValueError, match=r'y must be given'): evaluate(model, x, progress=False)
    with pytest.raises(ValueError, match=r'y must be None when x is a data object'):
        evaluate(model, SimpleNamespace(x=x, y=y), y, progress=False)
    with pytest.raises(ValueError, match=r'y must have shape \(N,\) = \(4,\)'): evaluate(model, x, y[:2], progress=False)


# ---------- the paper suite on a naturally trained model (CIFAR-10) ----------
def test_paper_suite_natural_model(natural_model, cifar_test):
    "The paper's columns on 100 test images, with CW2 cut to 100 steps and AA to APGD-CE + APGD-T (the slow test runs all)."
    from adaad.data import first_n
    r = evaluate(natural_model, first_n(cifar_test, 100), suite='paper', progress=False, cw2=dict(steps=100),
                 aa=dict(version='custom', attacks=['apgd-ce', 'apgd-t']))
    a = r.accuracy
    assert r.n == 100 and a['clean'] > 15, a
    assert a['pgd10'] < 10 and a['aa'] <= a['pgd10'] <= a['fgsm'] <= a['clean'], a
    assert a['cw2'] <= a['clean'] and r.flags == [], (a, r.flags)
    assert r.worst <= min(a.values())


@pytest.mark.slow
def test_paper_suite_standard_natural_model(natural_model, cifar_test):
    "The full paper protocol (CW2 1,000 steps, standard AutoAttack) on 200 test images: minutes on a CPU."
    from adaad.data import first_n
    r = evaluate(natural_model, first_n(cifar_test, 200), suite='paper', progress=False)
    a = r.accuracy
    assert a['aa'] <= a['pgd10'] < 10 and a['cw2'] < a['clean'] and r.flags == [], (a, r.flags)
