"""The benchmark's reference implementation computes the library's maths, its FLOP accounting matches the hand-computed
FLOPs of the official passes, and the GPU benchmark's script (`make bench-gpu`) runs every step in its CPU dry run."""
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
    # hand-computed from the forward FLOPs: AdaAD official 321.9 / 1198.5 GFLOP, ours (no dead branch) 305.2; RSLAD 42.2; PGD-AT 25.6 (ours)
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


def _row(method='adaad', pair='r18-wrn34-20', variant='fast', speedup=3.2, peak_fraction=0.4, device='cuda'):
    return dict(kind='train_step', method=method, pair=pair, student='s', teacher='t', variant=variant, device=device,
                images_per_s=10., speedup=speedup, gflop_per_image=1., tflops=1., peak_fraction=peak_fraction)


def test_targets_are_checked_on_the_rows_they_name():
    "The GPU target needs both the speedup and the fraction of peak, and only on AdaAD R18 <- WRN-34-20's fast row."
    met, = bench.check_targets([_row(), _row(method='rslad', speedup=1.0)], 'cuda')
    assert met['met'] and '3.20x' in met['measured'] and '40.0%' in met['measured']
    assert not bench.check_targets([_row(peak_fraction=0.3)], 'cuda')[0]['met']
    assert not bench.check_targets([_row(speedup=2.9)], 'cuda')[0]['met']
    assert bench.check_targets([_row(pair='small')], 'cuda') == []                   # no such row: nothing claimed
    cpu = bench.check_targets([_row(pair='small', method=m, speedup=sp, device='cpu') for m, sp in
                               (('adaad', 2.0), ('ard', 1.4))], 'cpu')
    assert [c['met'] for c in cpu] == [True, False]


def test_report_merges_files_and_keeps_each_provenance(tmp_path):
    "One table from per-pair files; each file's commit stays visible; a tree copied without git says 'unknown'."
    import json
    import report
    prov = lambda commit: dict(hardware=dict(gpu='H', processor='x', torch_threads=1), commit=commit, dirty=False, date='d',
                               peaks_tflops=dict(bf16=1.), peak_kind='k')
    files = []
    for i, (pair, commit) in enumerate((('r18-wrn34-20', 'a' * 40), ('r18-wrn34-10', None))):
        res = dict(args=dict(batch_size=8, device='cuda'), provenance=prov(commit), rows=[_row(pair=pair)], wall_s=1.)
        files.append(tmp_path / f'{i}.json'); files[-1].write_text(json.dumps(res))
    md = report.main([str(f) for f in files] + ['--out', str(tmp_path / 'all.md')])
    assert 'commit aaaaaaaaaa' in md and 'commit unknown' in md
    assert md.count('| adaad | r18-wrn34-') == 2 and '| speedup >= 3.0x, peak >= 35% | adaad r18-wrn34-20 fast |' in md
    assert (tmp_path / 'all.md').read_text() == md
    (tmp_path / 'bad.json').write_text('{"rows": []}')
    with pytest.raises(SystemExit, match='not a bench.py result'): report.main([str(tmp_path / 'bad.json')])


def test_host_syncs_counts_only_the_watched_computation():
    "Calls inside the step's watch count; the data fetch before it (CPU augmentation in naive's loader) does not."
    def step(watch=None):
        torch.ones(1).item()                      # the loader's side
        with watch:
            t = torch.arange(3.)
            t.sum().item(); t.tolist()
    n, cuda, examples = bench.host_syncs(step, torch.device('cpu'))
    assert (n, cuda, examples) == (2, None, ['item', 'tolist'])


def test_bench_refuses_a_run_with_nothing_to_time(capsys):
    "No pair and no --eval would write an empty result file: the error names --pairs and the accepted pairs."
    with pytest.raises(SystemExit):
        bench.main(['--pairs'])
    err = capsys.readouterr().err
    assert '--pairs' in err and 'r18-wrn34-20' in err and '--eval' in err


def test_bench_refuses_a_peak_matrix_of_no_size(capsys):
    "A peak measured on an empty matrix product would divide every fraction of peak by nothing: the error names --peak-n."
    with pytest.raises(SystemExit):
        bench.main(['--peak-n', '0'])
    assert '--peak-n' in capsys.readouterr().err


GPU_STEPS = {'adaad': ('adaad', ('naive', 'ours', 'fast')), 'adaad-compile': ('adaad', ('fast',)),
             'others': ('adaiad rslad ard pgd-at', ('ours', 'fast')), 'mnv2': ('adaad pgd-at', ('fast',))}


def _gpu_script(tmp_path, **env):
    "Run bench/gpu.sh with `env` added (one thread, results under tmp_path); returns the completed process."
    import os, subprocess
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'OUT': str(tmp_path), 'PY': sys.executable, 'PYTHONPATH': str(root), **env}
    return subprocess.run(['bash', str(root / 'bench' / 'gpu.sh')], env=env, capture_output=True, text=True, timeout=800)


def test_gpu_benchmark_dry_run_writes_every_step(tmp_path):
    "`make bench-gpu DRY_RUN=1`'s script on the CPU: every step's JSON, table and log, the rows it names, one joined table."
    import json
    import report
    p = _gpu_script(tmp_path, DRY_RUN='1')
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert 'every step finished' in p.stdout
    for tag, (methods, variants) in GPU_STEPS.items():
        (f,) = tmp_path.glob(f'*-cpu-{tag}.json')
        res = json.loads(f.read_text())
        got = sorted((r['method'], r['variant']) for r in res['rows'])
        assert got == sorted((m, v) for m in methods.split() for v in variants), tag
        assert all(r['pair'] == 'small' and r['batch_size'] == 4 and not r['amp'] and not r['compile'] for r in res['rows'])
        md = f.with_suffix('.md').read_text()
        assert md.count('| small (wrn-16-1 <- wrn-10-2) |') == len(got) and (tmp_path / f'{tag}.log').is_file()
    (f,) = tmp_path.glob('*-cpu-eval.json')
    assert [r['attack'] for r in json.loads(f.read_text())['rows']] == ['pgd10', 'aa-reduced']
    assert '| pgd10 | wrn-16-1 | untrained | 16 |' in f.with_suffix('.md').read_text()
    md = report.main(sorted(map(str, tmp_path.glob('*-cpu-*.json'))))
    assert md.count('| small (wrn-16-1 <- wrn-10-2) |') == 14 and md.count('\n- `') == 5


def test_gpu_benchmark_reports_a_step_past_its_limit(tmp_path):
    "A step that outlives its time limit is stopped, the next steps still run, and the script exits 1 naming each."
    slow = tmp_path / 'slow-python'
    slow.write_text('#!/bin/sh\nexec sleep 30\n'); slow.chmod(0o755)
    p = _gpu_script(tmp_path, DRY_RUN='1', STEP_LIMIT='1', PY=str(slow))
    assert p.returncode == 1
    assert p.stdout.count('stopped at its time limit of 1s') == 5
    assert '5 of 5 steps did not finish' in p.stderr and 'eval (time limit)' in p.stderr


@pytest.mark.parametrize('env, named', [(dict(DRY_RUN='yes'), 'DRY_RUN'), (dict(DRY_RUN='1', STEP_LIMIT='0'), 'STEP_LIMIT'),
                                        (dict(DRY_RUN='1', STEP_LIMIT='ten'), 'STEP_LIMIT')])
def test_gpu_benchmark_refuses_bad_settings(tmp_path, env, named):
    "A bad DRY_RUN or STEP_LIMIT stops the script before any step, naming the variable and what it accepts."
    p = _gpu_script(tmp_path, **env)
    assert p.returncode == 2 and named in p.stderr and 'must be' in p.stderr and '==' not in p.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the refusal on a machine without a CUDA GPU')
def test_gpu_benchmark_without_a_gpu_points_to_the_dry_run(tmp_path):
    "Without CUDA the GPU benchmark stops before writing anything and names the CPU dry run instead."
    p = _gpu_script(tmp_path)
    assert p.returncode == 2 and 'no CUDA GPU' in p.stderr and 'DRY_RUN=1' in p.stderr and not list(tmp_path.iterdir())
def test_flop_accounting_of_every_paper_method():
    "The passes of each method's step as the library runs it, in units of the forward FLOPs (student 1, teacher 10, standard teacher 5)."
    fs, ft, st = 1, 10, 5
    ours = {m: bench.step_flops(m, fs, ft, 'ours', k=10, ft_st=st) for m in ('natural', 'pgd-at', 'trades', 'ard', 'iad', 'rslad', 'akd', 'adaad', 'adaiad')}
    assert ours == {'natural': 3, 'pgd-at': 23, 'trades': 27, 'ard': 33, 'iad': 46, 'rslad': 36, 'akd': 38, 'adaad': 233, 'adaiad': 236}
    assert bench.step_flops('adaad', fs, ft, 'ours') == ours['adaad']   # k defaults to the official 10 steps


def test_projection_of_a_preset_from_its_trainings():
    "Every training of a preset with its own epochs, images and inner steps; wall times from the FLOPs at a stated rate."
    import project
    rows = project.trainings('gpu-small')
    assert [r['what'] for r in rows][:3] == ['teacher', 'standard_teacher', 'RN-18/pgd-at/s0'] and len(rows) == 2 + 2 * 8
    fs, fm = (bench.forward_flops(create_model(a)) for a in ('resnet18', 'mobilenetv2'))
    t = rows[0]
    assert (t['method'], t['arch'], t['epochs'], t['images'], t['steps']) == ('pgd-at', 'resnet18', 15, 49_000, 10)
    assert t['flops'] == 15 * 49_000 * bench.step_flops('pgd-at', fs, 0, 'ours', k=10)
    assert (rows[1]['method'], rows[1]['steps'], rows[1]['flops']) == ('natural', 0, 15 * 49_000 * 3 * fs)   # AKD's standard teacher
    a = next(r for r in rows if r['what'] == 'MN-V2/adaad/s0')
    assert a['flops'] == 8 * 49_000 * bench.step_flops('adaad', fm, fs, 'ours', k=10)
    p = project.project('gpu-small', rate_official=1e12, peak=1e15, utilisation=0.5)
    evals = project.evaluations('gpu-small')
    total = sum(r['flops'] for r in rows) + sum(e['flops'] for e in evals)
    assert p['hours_gpu_1'] == pytest.approx(total / 5e14 / 3600) and p['days_official_1'] == pytest.approx(total / 1e12 / 86400)
    assert max(r['flops'] for r in rows) / 5e14 / 3600 <= p['hours_gpu_8'] < p['hours_gpu_1']
    assert project.longest_first([4, 3, 3, 2], 2) == 6 and project.longest_first([5, 1], 8) == 5
    # the official code's rate: its AdaAD step (1,198.5 GFLOP) x 50,000 images in the 45.9 minutes of one logged epoch
    assert project.official_rate() / 1e12 == pytest.approx(1198.5e9 * 50_000 / 2753 / 1e12, rel=1e-3)
    assert project.duration(90) == '2 min' and project.duration(5 * 3600) == '5.0 h' and project.duration(30 * 86400) == '30 days'


def test_projection_states_its_precision_and_counts_the_teachers_evaluation_and_the_schedule():
    """The paper presets train in fp32 (TF32 convolutions): priced at the TF32 peak, not bf16's. The teacher's final
    evaluation (AutoAttack standard and CW2 on 10,000 images) is counted, and eight GPUs take the cells as schedule_cells assigns them."""
    import project
    from adaad.models import ROBUSTBENCH
    from adaad.jobs import schedule_cells
    assert (project.precision('paper'), project.precision('paper-cifar100'), project.precision('gpu-small')) == ('tf32', 'tf32', 'bf16')
    ev = project.evaluations('paper')
    t = ev[0]
    ft = bench.forward_flops(create_model('wrn-34-20'))
    r = ROBUSTBENCH[('cifar10', 'Chen2021LTD_WRN34_20')]['aa'] / 100
    per = ft + 3 * ft + 21 * ft + 2001 * ft + (200 * ft + r * (3600 * ft + 5000 * ft) + ft)   # clean, FGSM, PGD-10, CW2-1000, AA
    assert (t['what'], t['arch'], t['images']) == ('teacher-eval', 'wrn-34-20', 10_000) and t['flops'] == pytest.approx(10_000 * per)
    assert len(ev) == 1 + 2 * 8
    p = project.project('paper', rate_official=1e12, utilisation=0.5)
    assert p['precision'] == 'tf32' and p['gpu_peak_tflops'] == pytest.approx(494.7) and p['teacher_eval_eflop'] == pytest.approx(t['flops'] / 1e18)
    rows = p['trainings']
    teachers = sum(x['flops'] for x in rows if x['what'] in ('teacher', 'standard_teacher'))
    cost = {x['what']: x['flops'] for x in rows if x['what'] not in ('teacher', 'standard_teacher')}
    for e in ev[1:]: cost[e['what'][:-len('-eval')]] += e['flops']
    span = max(sum(cost[c] for c in w) for w in schedule_cells(list(cost.items()), 8))
    assert p['hours_gpu_8'] == pytest.approx((teachers + span + t['flops']) / (494.7e12 * 0.5) / 3600)
    assert 'tf32 (495 TFLOP/s peak)' in project.markdown([p])


def test_gpu_check_dry_run_runs_every_step_and_writes_its_report(tmp_path, data_root, capsys):
    "`make gpu-check DRY_RUN=1`'s script on the CPU: the paper preset's AdaAD step rate and its first batches end to end."
    import json, shutil, subprocess
    import gpu_check
    assert gpu_check.main(['--dry-run', '--out', str(tmp_path), '--data-root', str(data_root)]) == 0
    rep = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert rep['dry_run'] and rep['device'].startswith('cpu') and all(s['ok'] for s in rep['steps'].values())
    (row,) = rep['steps']['rate']['rows']
    assert (row['pair'], row['batch_size'], row['precision'], row['channels_last'], row['epochs']) == ('small', 4, 'fp32', True, 200)
    e2e = rep['steps']['end-to-end']
    assert e2e['status'] == 'done' and [r['method'] for r in e2e['rows']] == ['teacher', 'adaad']
    assert list(e2e['full_suite']['accuracy']) == ['clean', 'fgsm', 'pgd10', 'cw2', 'aa'] and Path(e2e['checkpoint']).is_file()
    out = capsys.readouterr().out
    assert 'gpu_check on cpu' in out and 'training wrn-10-1, 1 epochs on cpu, fp32' in out and 'every step passed' in out
    if shutil.which('make'):   # the make target runs this script, with --dry-run only under DRY_RUN, under 8 minutes
        root, venv = Path(__file__).resolve().parents[1], Path(sys.executable).parent.parent
        n = lambda *a: subprocess.run(['make', '-n', '-C', str(root), f'VENV={venv}', 'gpu-check', *a], capture_output=True, text=True).stdout
        assert 'timeout 480 ' in n('DRY_RUN=1') and 'bench/gpu_check.py --dry-run' in n('DRY_RUN=1') and '--dry-run' not in n()


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the refusal on a machine without a CUDA GPU')
def test_gpu_check_without_a_gpu_stops_with_one_message(tmp_path, capsys):
    import gpu_check
    assert gpu_check.main(['--out', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--device 'cuda' is not available: no CUDA GPU is visible" in err and '--dry-run' in err and not list(tmp_path.iterdir())
