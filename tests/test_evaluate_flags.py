"""An evaluation that checks itself: gradient-masked models (input rounding, saturated logits) raise the sanity flags
(PGD loss flat, black-box Square beating PGD, pyautoattack's own checks); a normal model raises none; the table marks
flagged rows."""
import json
import logging

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from adaad.evaluate import (EvalResult, captured_log, evaluate, loss_flags, order_flags, results_table, square_flags)

from toys import brightest_channel

pytestmark = pytest.mark.usefixtures('one_thread')


def toy(n=32, c=10, seed=0): return brightest_channel(n, c, seed)


class Rounded(nn.Module):
    "Input quantised to 255 levels: `round` has zero gradient everywhere, the function itself is almost unchanged."
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, x): return self.m(torch.round(x * 255) / 255)


class Saturated(nn.Module):
    "Logits scaled by 1e4: softmax saturates, so cross-entropy and its gradient are exactly 0 on correct points."
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, x): return 1e4 * self.m(x)


SUITE = ['clean', 'fgsm', 'pgd10', 'square']


@pytest.fixture(scope='module')
def plain_result():
    model, x, y = toy()
    return evaluate(model, x, y, suite=SUITE, batch_size=16, progress=False, square=dict(n_queries=100))


def test_normal_model_raises_no_flag(plain_result):
    r = plain_result
    assert r.ok and r.flags == [], r.flags
    curve = r.diagnostics['pgd10']['loss']
    assert len(curve) == 11 and curve[-1] > curve[0]
    assert r.accuracy['pgd10'] <= r.accuracy['fgsm'] < r.accuracy['clean'] == 100


@pytest.mark.parametrize('wrap', [Rounded, Saturated])
def test_gradient_masked_model_raises_flags(wrap, plain_result):
    """Both masks fool PGD; Square sees through both. Rounding leaves PGD's mean loss flat; with saturated logits the few
    points the random start flips carry huge losses that do rise, so there the black-box flag is the one that fires."""
    model, x, y = toy()
    r = evaluate(wrap(model), x, y, suite=SUITE, batch_size=16, progress=False, square=dict(n_queries=100))
    assert not r.ok
    if wrap is Rounded:
        assert any(f.startswith('loss: pgd10 mean loss did not rise over its 10 steps') for f in r.flags), r.flags
    assert any(f.startswith('black-box: square accuracy') and '< pgd10 accuracy' in f for f in r.flags), r.flags
    assert r.accuracy['pgd10'] > plain_result.accuracy['pgd10'] + 20  # the masked model looks robust to PGD ...
    assert r.accuracy['square'] < r.accuracy['pgd10']                 # ... and is not
    assert r.worst <= r.accuracy['square']                             # the per-example worst case sees through it


def test_autoattack_checks_become_flags():
    "pyautoattack's zero-gradient check (APGD-DLR) fires on the rounded model and lands in the flags; not on the plain one."
    model, x, y = toy(16)
    kw = dict(suite=['clean', 'aa'], batch_size=16, progress=False, aa=dict(version='custom', attacks=['apgd-dlr']))
    masked = evaluate(Rounded(model), x, y, **kw)
    assert any(f.startswith('autoattack-check: aa: there are') and 'zero gradient' in f for f in masked.flags), masked.flags
    assert masked.diagnostics['aa']['warnings']
    plain = evaluate(model, x, y, **kw)
    assert plain.flags == [] and 'aa' not in plain.diagnostics


def test_captured_log_keeps_warnings_only_and_detaches():
    lg = logging.getLogger('auto-attack'); n = len(lg.handlers)
    with captured_log() as msgs:
        lg.debug('progress'); lg.info('info'); lg.warning('w1'); lg.error('e1')
    lg.warning('after')
    assert msgs == ['w1', 'e1'] and len(lg.handlers) == n


def test_table_marks_flagged_rows(plain_result):
    model, x, y = toy(16)
    masked = evaluate(Rounded(model), x, y, suite=['clean', 'pgd10'], batch_size=16, progress=False)
    t = results_table({'plain': plain_result, 'rounded': masked})
    lines = t.splitlines()
    assert lines[0] == '| model | clean | fgsm | pgd10 | square | worst | ⚠ |'
    row = next(l for l in lines if l.startswith('| rounded'))
    assert row.startswith('| rounded ⚠ |') and row.endswith(f'| {len(masked.flags)} |')
    assert next(l for l in lines if l.startswith('| plain')).startswith('| plain |')
    assert any(l.startswith('⚠ rounded: loss: pgd10') for l in lines)
    with pytest.raises(TypeError, match='results must be an EvalResult or a non-empty dict'): results_table({})


def test_diagnostics_survive_json(tmp_path, plain_result):
    plain_result.to_json(tmp_path / 'r.json')
    back = EvalResult.from_json(tmp_path / 'r.json')
    assert back.diagnostics == json.loads(json.dumps(plain_result.diagnostics)) and back.flags == plain_result.flags
    d = plain_result.to_dict(); del d['diagnostics']
    assert EvalResult.from_dict(d).diagnostics == {}  # files written before diagnostics existed still load


def test_order_square_and_loss_flags_by_hand():
    assert order_flags({'clean': 90., 'fgsm': 50., 'pgd10': 45., 'pgd20': 44., 'cwinf': 44., 'aa': 40.}) == []
    f = order_flags({'clean': 90., 'fgsm': 50., 'pgd10': 45., 'aa': 46.})
    assert f == ['ordering: aa accuracy 46.00% > pgd10 accuracy 45.00% (expected pgd10 >= aa)']
    assert square_flags({'pgd10': 45., 'square': 44.9}) == []                   # within AutoAttack's 0.2-point tolerance
    assert len(square_flags({'pgd10': 45., 'pgd20': 44., 'fgsm': 60., 'square': 30.})) == 2  # FGSM is not compared
    assert square_flags({'pgd10': 45.}) == []
    assert loss_flags({'pgd10': [2., 2.5, 3.]}) == []
    assert len(loss_flags({'pgd10': [2., 2.5, 2.], 'cwinf': [0., 0.]})) == 2


ACC = st.floats(0, 100, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(ACC, min_size=4, max_size=4))
def test_order_flags_fire_exactly_when_the_chain_breaks(vals):
    "clean >= fgsm >= pgd10 >= aa raises nothing; any inversion in the chain is named."
    acc = dict(zip(['clean', 'fgsm', 'pgd10', 'aa'], vals))
    chain = ['clean', 'fgsm', 'pgd10', 'aa']
    broken = any(acc[b] > acc[a] for i, a in enumerate(chain) for b in chain[i + 1:])
    assert bool(order_flags(acc)) == broken
    assert order_flags(dict(zip(chain, sorted(vals, reverse=True)))) == []


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-50, 50, allow_nan=False), min_size=2, max_size=12))
def test_loss_flag_is_start_versus_end(curve):
    assert bool(loss_flags({'pgd10': curve})) == (not curve[-1] > curve[0] + 1e-4 * max(1., abs(curve[0])))
