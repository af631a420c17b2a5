"""`make repro`'s comparison of a fresh run with the committed one (`adaad.report.compare_results`): each cell placed
against the committed seeds' range and the prediction interval of one more training, with both sides' conditions."""
import numpy as np
import pytest
import statsmodels.api as sm

from adaad.report import compare_results, place_in_spread, prediction_interval, run_conditions, load_results
from adaad.repro import repo_root

ROOT = repo_root()


@pytest.mark.parametrize('values', [[21.8, 23.0, 20.7], [12.7, 11.5, 12.8, 13.2, 13.0], [1., 2.]])
def test_the_prediction_interval_is_the_regression_one(values):
    "The interval equals the observation interval of an intercept-only least-squares fit (statsmodels), computed apart."
    fit = sm.OLS(np.asarray(values), np.ones((len(values), 1))).fit()
    f = fit.get_prediction(np.ones((1, 1))).summary_frame(alpha=0.05)
    m, sd, lo, hi = prediction_interval(values)
    assert m == pytest.approx(np.mean(values)) and sd == pytest.approx(np.std(values, ddof=1))
    assert (lo, hi) == pytest.approx((f['obs_ci_lower'][0], f['obs_ci_upper'][0]))


def test_a_value_is_placed_inside_or_outside_with_its_distance():
    assert place_in_spread(22.0, [21.8, 23.0, 20.7]).startswith("within the seeds' range; inside")
    assert place_in_spread(16.3, [21.8, 23.0, 20.7]).startswith('below their range by 4.4; inside')
    assert place_in_spread(40.0, [21.8, 23.0, 20.7]).startswith('above their range by 17.0; OUTSIDE')
    assert place_in_spread(5.0, [7.0]).startswith('one committed seed (7.0)')
    assert place_in_spread(5.0, []) == 'no committed seed of this row'
    assert prediction_interval([0.5, 1.0, 6.0])[2] < 0                            # an accuracy's interval printed
    assert place_in_spread(0.8, [0.5, 1.0, 6.0]).endswith('inside the 95% prediction interval [0.0, 17.6]')  # from 0
    assert place_in_spread(99.5, [99.9, 99.0, 94.0]).endswith('interval [81.8, 100.0]')


def test_a_fresh_run_of_committed_seeds_is_placed_in_their_spread():
    """cpu-strong's seeds 0-2 against cpu-strong-5's seeds 0-4 (the same trainings for the rows both hold): every such
    cell lies in the five seeds' range and is recognised as the committed network; rows the five-seed run lacks say so."""
    a, b = ROOT / 'results' / 'cpu-strong', ROOT / 'results' / 'cpu-strong-5'
    text = compare_results(a, b)
    rows = [l for l in text.splitlines() if l.startswith('| RN-18 |')]
    shared = [l for l in rows if any(f'| {m} |' in l for m in ('pgd-at', 'ard', 'rslad', 'adaad', 'adaiad'))]
    assert len(shared) == 5 * 3 * 4 and all("within the seeds' range" in l and 'same network' in l for l in shared)
    assert all('no committed seed of this row' in l for l in rows if '| natural |' in l)
    assert 'CPU kind AVX2' in text and 'precision fp32' in text
    assert 'The two sides ran under the same recorded conditions' in text
    assert run_conditions(load_results(a))['training threads'] == 'not recorded'


def test_one_option_chooses_the_precision_of_make_repro_and_adaad_table():
    "PRECISION=fp32|bf16 reaches the notebook as amp False/True, anything else is refused; `adaad table --precision` likewise."
    import subprocess
    from adaad.cli import PRECISIONS, parser
    run = lambda *a: subprocess.run(['make', '-n', 'repro', *a], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert '-p amp True' in run('PRECISION=bf16').stdout and '-p amp False' in run('PRECISION=fp32').stdout
    assert '-p amp' not in run().stdout
    bad = run('PRECISION=fp16')
    assert bad.returncode != 0 and "PRECISION must be fp32 or bf16" in bad.stderr
    assert [PRECISIONS[parser().parse_args(['table', '--precision', p]).precision] for p in ('preset', 'fp32', 'bf16')] == [None, False, True]


def test_the_parallel_table_trains_its_cells_in_the_precision_asked(tmp_path, data_root):
    "run_table_parallel(amp=False) on a preset that asks for 'auto': every worker-trained row records fp32."
    from adaad.jobs import run_table_parallel
    from adaad.presets import preset_config
    res = run_table_parallel(preset_config('quick', train=dict(amp='auto')), workers=1, dry_run=True, amp=False, methods=['pgd-at'], data_root=str(data_root),
                             out_dir=str(tmp_path / 'out'), runs_dir=str(tmp_path / 'runs'))
    rows = [r for r in res['rows'] if r['method'] != 'teacher']
    assert res['status'] == 'done' and rows and all(r['train']['config']['amp'] is False for r in rows)
    assert all(r['train']['train_wall_s'] == 0. for r in rows)          # trained by the worker, not again by the assembly


def test_bf16_is_checked_whenever_a_table_trains_in_it():
    "guard_precision runs the bf16 check where the preset or the call resolves to bf16 (not only for amp=True), none in fp32."
    import torch
    from adaad.data import CifarSplit
    from adaad.repro import guard_precision
    from adaad.models import create_model
    g = torch.Generator().manual_seed(0)
    data = CifarSplit(torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(8) % 10, 10)
    lines, net = [], create_model('wrn-10-1').eval()
    ctx = lambda amp, dry: dict(cfg=dict(train=dict(amp=amp), eval_batch=8, dry_run=dry), device=torch.device('cpu'),
                                train_full=data, log=lines.append)
    assert guard_precision(ctx(False, False), net) is None and guard_precision(ctx(None, False), net) is None
    r = guard_precision(ctx(True, True), net)
    assert r['n'] == 8 and r['enforced'] is False and any('amp check on cpu' in l for l in lines)


def test_a_slurm_table_whose_teacher_would_train_on_this_cpu_is_refused(tmp_path, data_root):
    "--executor slurm from a machine without a GPU: a teacher still to be trained here is named, with the way out."
    from adaad.jobs import run_table_parallel
    with pytest.raises(ValueError, match=r"this process trains the table's teacher \(wrn-10-1, pgd-at\).*srun --gpus-per-node 1"):
        run_table_parallel('smoke', executor='slurm', device='cpu', data_root=str(data_root),
                           out_dir=str(tmp_path / 'out'), runs_dir=str(tmp_path / 'runs'))
    assert not (tmp_path / 'runs' / 'teacher-wrn-10-1-pgd-at').exists()
