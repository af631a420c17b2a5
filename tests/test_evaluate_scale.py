"""Evaluation at scale: sharded equals unsharded, several processes (2 gloo ranks under torchrun) equal one, and an
evaluation stopped midway resumes without redoing its finished (attack, shard) pieces."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adaad.evaluate as E
from adaad.evaluate import evaluate, shards

ROOT = Path(__file__).resolve().parents[1]
from toys import brightest_channel

pytestmark = pytest.mark.usefixtures('one_thread')


def toy(n=64, c=10, seed=0): return brightest_channel(n, c, seed)


def same(r1, r2):
    return set(r1.correct) == set(r2.correct) and all(torch.equal(r1.correct[k], r2.correct[k]) for k in r1.correct)


def test_shards_cover_the_images_in_order():
    assert shards(10, 4) == [(0, 10)] and shards(10, 2, 4) == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(ValueError, match='shard_size .* must be a multiple of batch_size'): shards(10, 3, 4)


def test_sharded_batched_attacks_equal_unsharded():
    "Batch j of the whole set has seed + j whether or not the set is cut into shards (PGD's random start)."
    m, x, y = toy()
    one = evaluate(m, x, y, suite=['clean', 'fgsm', 'pgd10'], batch_size=8, progress=False)
    many = evaluate(m, x, y, suite=['clean', 'fgsm', 'pgd10'], batch_size=8, shard_size=16, progress=False)
    assert same(one, many) and one.accuracy['pgd10'] < 100 and many.config['shard_size'] == 16


def test_resume_skips_finished_pieces(tmp_path, monkeypatch):
    "A run that dies after three pieces leaves them on disk; the rerun attacks only the rest and equals an uninterrupted run."
    m, x, y = toy()
    ref = evaluate(m, x, y, suite=['clean', 'pgd10'], batch_size=8, shard_size=16, progress=False)
    calls, real = [], E._run_batched
    def dying(*a, **k):
        if len(calls) == 3: raise KeyboardInterrupt('killed')
        calls.append(1); return real(*a, **k)
    monkeypatch.setattr(E, '_run_batched', dying)
    with pytest.raises(KeyboardInterrupt): evaluate(m, x, y, suite=['clean', 'pgd10'], batch_size=8, shard_size=16, pieces_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob('*.json'))) == 3
    calls.clear(); monkeypatch.setattr(E, '_run_batched', lambda *a, **k: calls.append(1) or real(*a, **k))
    again = evaluate(m, x, y, suite=['clean', 'pgd10'], batch_size=8, shard_size=16, pieces_dir=tmp_path, progress=False)
    assert len(calls) == 8 - 3 and same(again, ref)


def test_a_piece_of_another_model_is_not_reused(tmp_path):
    m, x, y = toy()
    evaluate(m, x, y, suite=['clean'], batch_size=8, pieces_dir=tmp_path, progress=False)
    with torch.no_grad(): m[2].weight.mul_(-1)                       # another model, same folder
    r = evaluate(m, x, y, suite=['clean'], batch_size=8, pieces_dir=tmp_path, progress=False)
    assert r.accuracy['clean'] < 50


SCRIPT = '''
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from test_evaluate_scale import toy
from adaad.evaluate import evaluate
dist.init_process_group('gloo'); torch.set_num_threads(1)
m, x, y = toy()
r = evaluate(m, x, y, suite=['clean', 'pgd10', 'aa'], batch_size=8, shard_size=16, progress=False, aa=dict(version='custom', attacks=['apgd-ce']))
if dist.get_rank() == 0: open(sys.argv[1], 'w').write(json.dumps({k: v.tolist() for k, v in r.correct.items()}))
dist.destroy_process_group()
'''


def test_two_gloo_processes_equal_one(tmp_path):
    "torchrun with 2 CPU ranks: each attacks its pieces, the gathered per-image correctness equals one process's."
    (tmp_path / 'ev.py').write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29533',
                          str(tmp_path / 'ev.py'), str(tmp_path / 'r.json'), str(Path(__file__).parent)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads((tmp_path / 'r.json').read_text())
    m, x, y = toy()
    one = evaluate(m, x, y, suite=['clean', 'pgd10', 'aa'], batch_size=8, shard_size=16, progress=False, aa=dict(version='custom', attacks=['apgd-ce']))
    assert {k: v.tolist() for k, v in one.correct.items()} == got
