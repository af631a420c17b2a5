"The benchmark's reference implementation computes the library's maths, and its FLOP accounting matches performance.md."
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'bench'))
import bench  # noqa: E402
import naive  # noqa: E402
from adaad.methods import training_loss  # noqa: E402
from adaad.models import create_model  # noqa: E402


@pytest.fixture(autouse=True)
def _threads(one_thread): yield


@pytest.mark.parametrize('method', bench.METHODS)
def test_naive_step_computes_the_library_loss(method):
    "Same seed, same start, same ascent, same loss: the benchmark's ratio compares implementations, not maths."
    torch.manual_seed(0)
    s, t = create_model('wrn-10-1'), create_model('wrn-10-1').eval()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    state = {k: v.clone() for k, v in s.state_dict().items()}
    opt = torch.optim.SGD(s.parameters(), lr=0.)
    torch.manual_seed(1)
    ref = naive.STEPS_BY_METHOD[method](s, t, opt, x, y).item()
    s.load_state_dict(state)
    torch.manual_seed(1)
    ours, _ = training_loss(method, s, t, x, y, num_classes=10, **(dict(begin=0) if method == 'adaiad' else {}))
    assert ours.item() == pytest.approx(ref, rel=1e-3)


def test_flop_accounting_matches_performance_md():
    fs = bench.forward_flops(create_model('resnet18'))
    ft10, ft20 = bench.forward_flops(create_model('wrn-34-10')), bench.forward_flops(create_model('wrn-34-20'))
    assert fs / 1e9 == pytest.approx(1.111, abs=1e-3) and ft10 / 1e9 == pytest.approx(13.318, abs=1e-3)
    assert ft20 / 1e9 == pytest.approx(53.164, abs=1e-3)
    # performance.md §2.3: AdaAD official 321.9 / 1198.5 GFLOP, ours (no dead branch) 305.2; RSLAD 42.2; PGD-AT 25.6 (ours)
    assert bench.step_flops('adaad', fs, ft10, 'naive') / 1e9 == pytest.approx(321.9, abs=0.1)
    assert bench.step_flops('adaad', fs, ft20, 'naive') / 1e9 == pytest.approx(1198.5, abs=0.1)
    assert bench.step_flops('adaad', fs, ft10, 'ours') / 1e9 == pytest.approx(305.2, abs=0.1)
    assert bench.step_flops('rslad', fs, ft10, 'naive') / 1e9 == pytest.approx(42.2, abs=0.1)
    assert bench.step_flops('pgd-at', fs, 0, 'ours') / 1e9 == pytest.approx(25.6, abs=0.1)


def test_markdown_table_has_every_row():
    rows = [dict(kind='train_step', method='adaad', pair='small', student='a', teacher='b', variant=v, images_per_s=1.,
                 speedup=None if v == 'naive' else 2., gflop_per_image=1., tflops=0.1, peak_fraction=0.2)
            for v in ('naive', 'fast')]
    res = dict(rows=rows, args=dict(batch_size=8), provenance=dict(hardware=dict(processor='x', torch_threads=2), commit='0' * 40,
                                                                   dirty=False, date='d', peaks_tflops=dict(bf16=1.), peak_kind='k'))
    res['projections'] = bench.projections(rows)
    md = bench.markdown(res)
    assert '| adaad | small (a <- b) | naive | 1.0 |' in md and '| adaad | small (a <- b) | fast | 1.0 | 2.00x |' in md
    assert '20.0%' in md
    # one AdaAD run: 200 epochs x 50,000 images at 1 image/s
    assert f"| adaad | small | fast | 200 | {200 * 50_000 / 3600:.1f} | {200 * 50_000 / 3600 / 8:.1f} |" in md
