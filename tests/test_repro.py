"The reproduction notebooks, executed under papermill with a tiny preset: outputs parse, a second run reuses the first."
import json
import os
from pathlib import Path

import pytest

from adaad.report import PAPER_TABLE, load_results, paper_comparison
from adaad.presets import PRESETS, preset_config

ROOT = Path(__file__).resolve().parents[1]


def _run(nb, out, params):
    papermill = pytest.importorskip('papermill')
    papermill.execute_notebook(str(ROOT / 'nbs' / nb), str(out), kernel_name='python3', cwd=str(ROOT / 'nbs'),
                               parameters=params, progress_bar=False)
    return json.loads(Path(out).read_text())


def _outputs(nb_json):
    return '\n'.join(''.join(o.get('text', '')) + ''.join(o.get('data', {}).get('text/plain', ''))
                     for c in nb_json['cells'] if c['cell_type'] == 'code' for o in c.get('outputs', []))


def test_presets_are_data():
    assert set(PRESETS) == {'quick', 'smoke', 'cpu-small', 'cpu-long', 'cpu-strong', 'cpu-strong-long', 'cpu-strong-field',
                            'cpu-strong-field2', 'cpu-faithful', 'cpu-faithful-2', 'gpu-small', 'paper', 'paper-cifar100'}
    assert json.dumps(PRESETS)  # plain data only
    assert PRESETS['paper']['n_test'] == 10000 and PRESETS['paper']['teacher']['name'] == 'Chen2021LTD_WRN34_20'
    own = ('scale', 'methods', 'variants', 'method_kwargs', 'family')
    for p in ('cpu-strong-field', 'cpu-strong-field2'):   # the same teacher, students and settings as cpu-strong
        assert {k: v for k, v in PRESETS[p].items() if k not in own + ('standard_teacher',)} == \
            {k: v for k, v in PRESETS['cpu-strong'].items() if k not in own + ('standard_teacher',)}, p
    for p in ('cpu-faithful', 'cpu-faithful-2'):                                             # quick's trainings
        assert {k: PRESETS[p][k] for k in ('teacher', 'students', 'train', 'n_test', 'suite')} == \
            {k: PRESETS['quick'][k] for k in ('teacher', 'students', 'train', 'n_test', 'suite')}, p
    assert PRESETS['cpu-faithful-2']['standard_teacher'] == PRESETS['cpu-strong-field2']['standard_teacher']
    assert sum(len(v) for v in PAPER_TABLE.values()) == 16
    with pytest.raises(ValueError, match='preset must be one of'): preset_config('huge')


def test_cpu_strong_field_keeps_its_fair_ard_cells_without_nesterov():
    "Its committed Fair-ARD cells were trained with plain momentum: the preset resumes them so; every other row as before."
    from adaad.train import resolve
    from adaad.presets import train_config
    c = preset_config('cpu-strong-field')
    assert {m: resolve(train_config(c, m, 'resnet18-w8')).nesterov for m in c['methods']} == {m: False for m in c['methods']}
    assert resolve(train_config(dict(c, variants={}), 'fair-ard', 'resnet18-w8')).nesterov is True   # the default


def test_cifar100_preset_has_the_official_settings():
    "paper-cifar100: RobustBench's CIFAR-100 LTD teacher, CIFAR-100 in every training, ARD's batch 256, AdaAD's batchmean KL."
    from adaad.losses import adaad_reduction
    from adaad.models import ROBUSTBENCH
    from adaad.presets import dataset_of, train_config
    from adaad.train import TrainConfig, build_method, resolve
    c = preset_config('paper-cifar100')
    assert dataset_of(c) == 'cifar100' and c['n_test'] == 10000 and c['aa'] is None and c['eval_shard'] == 1000
    t = c['teacher']
    assert (t['source'], t['name']) == ('robustbench', 'Chen2021LTD_WRN34_10') and ROBUSTBENCH[('cifar100', t['name'])]['sub_block1']
    assert set(c['methods']) == set(PRESETS['paper']['methods']) and c['students'] == PRESETS['paper']['students']
    tcs = {m: resolve(train_config(c, m, 'resnet18')) for m in c['methods']}
    assert all(tc.dataset == 'cifar100' for tc in tcs.values())
    assert {m: tc.batch_size for m, tc in tcs.items()} == {m: 256 if m == 'ard' else 128 for m in c['methods']}
    assert {m: (tc.epochs, tc.steps) for m, tc in tcs.items()} == {m: (tc.epochs, tc.steps) for m, tc in
                                                                  ((m, resolve(train_config(preset_config('paper'), m, 'resnet18'))) for m in c['methods'])}
    assert adaad_reduction(100) == 'batchmean' and build_method(tcs['adaad']).reduction is None   # chosen from the classes
    assert resolve(TrainConfig(**{'dataset': 'cifar100', **c['standard_teacher']['train']})).student == 'wrn-34-10'


def test_table_and_sweep_notebooks(tmp_path, data_root):
    tiny = dict(preset='smoke', methods=['natural', 'adaad'], students={'RN-18': 'wrn-10-1'}, train_n=64, n_test=40,
                data_root=str(data_root), out_dir=str(tmp_path / 'res'), runs_dir=str(tmp_path / 'runs'))
    nb = _run('repro_table.ipynb', tmp_path / 't1.ipynb', tiny)
    assert 'only show that the pipeline works' in _outputs(nb)
    res = load_results(tmp_path / 'res')
    assert res['status'] == 'done' and res['reduced'] and [r['method'] for r in res['rows']] == ['teacher', 'natural', 'adaad']
    for r in res['rows']:
        assert set(r['cells']) == set(PRESETS['smoke']['suite']) and r['n'] == 40
        for c in r['cells'].values():
            assert c['ci95'][0] <= c['acc'] <= c['ci95'][1] and c['correct'] == round(c['acc'] * 40 / 100)
    assert res['git']['commit'] and res['hardware']['torch'] and 'official' in res['data']
    for f in ('table.md', 'table.tex', 'vs_paper.md'): assert (tmp_path / 'res' / f).stat().st_size > 0
    assert 'Reduced-scale run' in (tmp_path / 'res' / 'vs_paper.md').read_text()
    ckpt = Path(res['runs']['RN-18/adaad/0']) / 'final.pt'
    mtime = ckpt.stat().st_mtime_ns

    _run('repro_table.ipynb', tmp_path / 't2.ipynb', tiny)   # second run: trainings and evaluations are reused
    res2 = load_results(tmp_path / 'res')
    assert ckpt.stat().st_mtime_ns == mtime
    assert all(r['eval_cached'] for r in res2['rows'])
    assert all((r['train'].get('train_wall_s') or 0.) == 0. for r in res2['rows'])
    assert [r['cells'] for r in res2['rows']] == [r['cells'] for r in res['rows']]
    # every trained row (the smoke teacher is trained too) names the call that trained it: commit, epochs, wall time
    for a, b in zip(res['rows'], res2['rows']):
        t = a['train']['trainings']
        assert len(t) == 1 and t[0]['commit'] == res['git']['commit'] and t[0]['wall_s'] > 0 and t[0]['epochs'][0] == 0
        assert b['train']['trainings'] == t                                  # the reuse adds no training

    sweep = dict(preset='smoke', eps_list=[4, 8], steps=2, train_n=64, n_test=40, data_root=str(data_root),
                 out_dir=str(tmp_path / 'sweep'), runs_dir=str(tmp_path / 'runs'), figure=str(tmp_path / 'fig' / 'eps_sweep'))
    _run('repro_eps_sweep.ipynb', tmp_path / 's1.ipynb', sweep)
    sw = json.loads((tmp_path / 'sweep' / 'eps_sweep.json').read_text())
    assert sw['status'] == 'done' and [p['eps_255'] for p in sw['points']] == [4, 8]
    assert sw['teacher']['wall_s'] == 0.   # the table's teacher run was reused
    for p in sw['points']:
        for c in p['cells'].values(): assert c['ci95'][0] <= c['acc'] <= c['ci95'][1]
    assert (tmp_path / 'fig' / 'eps_sweep.png').stat().st_size > 0 and (tmp_path / 'fig' / 'eps_sweep.pdf').exists()


def test_natural_rows_are_selected_by_clean_accuracy():
    "Selecting a naturally trained network by PGD accuracy picks its barely trained first epoch; clean accuracy is used."
    from adaad.presets import preset_config, train_config
    from adaad.repro import selected_checkpoint
    cfg = preset_config('cpu-small')
    tc = lambda m: train_config(cfg, m, 'wrn-10-1')
    assert selected_checkpoint('best_pgd', tc('natural')) == 'best_clean'
    assert selected_checkpoint('best_pgd', tc('adaad')) == selected_checkpoint('best_pgd', tc('pgd-at')) == 'best_pgd'
    assert selected_checkpoint('final', tc('natural')) == 'final'


def test_preset_train_dicts_are_trainconfig_arguments():
    "Every preset's train dict, variants, method_kwargs and teacher configs build valid TrainConfigs."
    from adaad.presets import preset_config, train_config
    from adaad.train import TrainConfig, resolve
    for name in PRESETS:
        cfg = preset_config(name)
        for arch in cfg['students'].values():
            for row in list(cfg['methods']) + list(cfg['variants']): resolve(train_config(cfg, row, arch))
        for role in ('teacher', 'standard_teacher'):
            spec = cfg.get(role)
            if spec and spec['source'] in ('train', 'shipped'): resolve(TrainConfig(**spec['train']))
        assert 'akd' not in cfg['methods'] or cfg.get('standard_teacher'), f'{name}: AKD needs a standard teacher'


def test_git_info_names_changed_files_but_not_the_runs_outputs(tmp_path):
    "A re-run rewrites its own tracked outputs before provenance is read: those do not make the tree dirty, code does."
    import subprocess
    from adaad.repro import git_info
    run = lambda *a: subprocess.run(['git', *a], cwd=tmp_path, check=True, capture_output=True)
    run('init', '-q'); run('config', 'user.email', 'a@b'); run('config', 'user.name', 'a')
    (tmp_path / 'results' / 'p').mkdir(parents=True); (tmp_path / 'results' / 'p' / 'results.json').write_text('{}')
    (tmp_path / 'code.py').write_text('x = 1\n')
    run('add', '.'); run('commit', '-qm', 'c')
    (tmp_path / 'results' / 'p' / 'results.json').write_text('{"new": 1}')
    g = git_info(tmp_path, outputs=[tmp_path / 'results' / 'p'])
    assert g['dirty'] is False and g['dirty_files'] == [] and len(g['commit']) == 40
    (tmp_path / 'code.py').write_text('x = 2\n')
    g = git_info(tmp_path, outputs=[tmp_path / 'results' / 'p'])
    assert g['dirty'] is True and g['dirty_files'] == ['code.py']


def test_teacher_file_is_found_from_the_notebooks_folder_too(tmp_path, monkeypatch):
    "Presets name teacher files from the repository root; `make repro` runs the notebook from nbs/."
    from adaad.repro import repo_root, teacher_file
    monkeypatch.chdir(repo_root() / 'nbs')
    assert teacher_file('settings.ini', 'x') == (repo_root() / 'settings.ini').resolve()
    monkeypatch.chdir(tmp_path)
    (tmp_path / 't.pt').write_text('')
    assert teacher_file('t.pt', 'x') == (tmp_path / 't.pt').resolve()           # where the code runs comes first
    with pytest.raises(FileNotFoundError, match=r'nope\.pt is missing .*train it first'):
        teacher_file('runs/nope.pt', 'train it first')


def test_git_info_outside_a_checkout_reads_the_recorded_provenance(tmp_path, monkeypatch):
    "A copied tree without .git takes the commit recorded at copy time, or says it does not know."
    import json
    from adaad.repro import git_info
    monkeypatch.delenv('ADAAD_GIT_INFO', raising=False)
    monkeypatch.setenv('GIT_CEILING_DIRECTORIES', str(tmp_path.parent))
    assert git_info(tmp_path) == dict(commit=None, dirty=None, dirty_files=None)
    rec = tmp_path / 'git.json'
    rec.write_text(json.dumps(dict(commit='a' * 40, dirty=True, dirty_files=['x.py'])))
    monkeypatch.setenv('ADAAD_GIT_INFO', str(rec))
    g = git_info(tmp_path)
    assert (g['commit'], g['dirty'], g['dirty_files']) == ('a' * 40, True, ['x.py']) and str(rec) in g['source']
    rec.write_text('{"dirty": false}')
    with pytest.raises(ValueError, match='ADAAD_GIT_INFO'): git_info(tmp_path)


def test_the_reduced_autoattack_is_a_registered_attack_that_reads_the_committed_evaluations():
    "`aa-reduced` is an attack of the registry; a preset's `aa` column built from it keys exactly as the committed evaluations do."
    import glob
    from adaad.attacks import ATTACKS, autoattack_reduced
    from adaad.repro import _suite_key, eval_suite
    assert ATTACKS['aa-reduced'].fn is autoattack_reduced and ATTACKS['aa-reduced'].ensemble
    checked = 0
    for preset in ('smoke', 'cpu-small', 'cpu-long', 'cpu-strong', 'cpu-strong-long'):
        for f in sorted(glob.glob(str(ROOT / 'results' / preset / 'evals' / '*.json')))[:1]:
            key = json.loads(Path(f).read_text())['key']
            assert _suite_key(eval_suite(preset_config(preset))) == key['suite'], f
            checked += 1
    assert checked >= 4


def test_record_training_keeps_the_epochs_of_a_call_that_ended_without_recording(tmp_path):
    "Calls that trained epochs 0-2 and 4-5 recorded; the killed call between them appears as unrecorded epochs 2-4."
    from adaad.repro import record_training
    log = tmp_path / 'metrics.jsonl'
    def logged(n): log.write_text(''.join(json.dumps(dict(epoch=e, train_s=1.)) + '\n' for e in range(n)))
    logged(2)
    assert [r['epochs'] for r in record_training(tmp_path, 0, dict(wall_s=3., status='paused'))] == [[0, 2]]
    logged(4)                                                     # a call trains epochs 2 and 3, then is killed
    logged(5)
    rows = record_training(tmp_path, 4, dict(wall_s=2., status='done'))
    assert [(r['epochs'], r['status']) for r in rows] == [([0, 2], 'paused'), ([2, 4], 'unrecorded'), ([4, 5], 'done')]
    assert rows[1]['commit'] is None and rows[2]['commit'] == rows[0]['commit']
    assert json.loads((tmp_path / 'trainings.json').read_text()) == rows
    assert record_training(tmp_path, 5, dict(wall_s=0., status='done')) == rows   # a reused run adds nothing
    # `train`'s own epochs: a resume from the previous checkpoint redoes epoch 4; a call killed after DONE leaves a gap
    rows = record_training(tmp_path, None, dict(wall_s=1., status='done', epochs=[4, 6]))
    assert rows[-1]['epochs'] == [4, 6]
    rows = record_training(tmp_path, None, dict(wall_s=0., status='done', epochs=[8, 8]))
    assert [(r['epochs'], r['status']) for r in rows[-2:]] == [([4, 6], 'done'), ([6, 8], 'unrecorded')]
    other = tmp_path / 'old'; other.mkdir()                       # a run from before the record: reused, it stays []
    assert record_training(other, None, dict(wall_s=0., status='done', epochs=[8, 8])) == [] and not (other / 'trainings.json').exists()


def test_the_former_import_paths_still_work():
    """adaad.repro's names of the job engine forward to adaad.jobs with a FutureWarning naming it; its preset names are
    adaad.presets' own, imported without a warning and listed in its __all__."""
    import warnings
    import adaad.jobs, adaad.presets, adaad.repro
    with pytest.warns(FutureWarning, match=r'adaad\.repro\.run_table_parallel moved to adaad\.jobs\.run_table_parallel'):
        from adaad.repro import run_table_parallel
    assert run_table_parallel is adaad.jobs.run_table_parallel
    with pytest.warns(FutureWarning, match=r'adaad\.repro\.schedule_cells moved to adaad\.jobs\.schedule_cells'):
        assert adaad.repro.schedule_cells is adaad.jobs.schedule_cells
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        from adaad.repro import PRESETS, preset_config, train_config
    assert (PRESETS, preset_config, train_config) == (adaad.presets.PRESETS, adaad.presets.preset_config, adaad.presets.train_config)
    assert {'PRESETS', 'preset_config', 'train_config', 'LAUNCH'} <= set(adaad.repro.__all__)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"): adaad.repro.no_such_name


def test_the_modules_import_one_way_jobs_repro_presets():
    "adaad.presets imports neither adaad.repro nor adaad.jobs, and adaad.repro does not import adaad.jobs."
    import subprocess, sys
    code = ("import sys, adaad.presets; assert not {'adaad.repro', 'adaad.jobs'} & set(sys.modules), 'presets'\n"
            "import adaad.repro; assert 'adaad.jobs' not in sys.modules, 'repro'")
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


def test_schedule_cells_puts_the_costliest_first_onto_the_least_loaded_worker():
    "Longest processing time first: ties go to the lowest worker, every cell placed once (here every worker ends at 16)."
    from adaad.jobs import schedule_cells
    cells = [(f'c{i}', c) for i, c in enumerate([7, 7, 6, 6, 5, 5, 4, 4, 4])]
    plan = schedule_cells(cells, 3)
    assert plan == [['c0', 'c4', 'c6'], ['c1', 'c5', 'c7'], ['c2', 'c3', 'c8']]
    assert sorted(sum(plan, [])) == sorted(c for c, _ in cells)
    assert schedule_cells([], 2) == [[], []] and schedule_cells([('x', 0)], 1) == [['x']]
    with pytest.raises(ValueError, match='n_workers must be'): schedule_cells(cells, 0)
    with pytest.raises(ValueError, match='each cost must be a number >= 0'): schedule_cells([('x', float('nan'))], 2)


def test_workers_get_their_own_gpu_and_a_share_of_the_cores():
    from adaad.jobs import worker_devices, worker_threads
    assert worker_devices('cuda', 8, gpus=8) == [f'cuda:{w}' for w in range(8)]
    assert worker_devices('cuda', 5, gpus=2) == ['cuda:0', 'cuda:1', 'cuda:0', 'cuda:1', 'cuda:0']
    assert worker_devices('cpu', 2) == ['cpu', 'cpu'] and worker_devices('cuda:1', 2, gpus=4) == ['cuda:1', 'cuda:1']
    with pytest.raises(ValueError, match='no CUDA GPU is visible'): worker_devices('cuda', 2, gpus=0)
    assert (worker_threads(8, cores=16), worker_threads(2, cores=2), worker_threads(4, cores=2)) == (2, 1, 1)


def test_the_heavy_cells_are_spread_over_the_workers_longest_first():
    "Training FLOPs put AdaAD and AdaIAD (teacher queried at every inner step) on different workers, ahead of the cheap rows, where round-robin dealing put both on one."
    from adaad.jobs import training_flops, worker_plan
    from adaad.presets import preset_config, train_config
    cfg = preset_config('smoke', methods=['natural', 'adaad', 'pgd-at', 'adaiad'], seeds=[0, 1])   # dealt round-robin: both heavy rows on worker 1
    cells = [('RN-18', 'wrn-10-1', m, s) for s in (0, 1) for m in cfg['methods']]
    costs = [(c, training_flops(train_config(cfg, c[2], c[1], seed=c[3]), 1000, teacher_flops=5e7)) for c in cells]
    f = {c[2]: v for c, v in costs}
    assert f['adaad'] > f['pgd-at'] > f['natural'] > 0
    plan = worker_plan(costs, 2, [0, 1])
    assert sorted(map(len, plan)) == [4, 4] and all({c[2] for c in w if c[3] == 0} & {'adaad', 'adaiad'} for w in plan)
    for w in plan: assert [c[3] for c in w] == sorted(c[3] for c in w) and w[0][2] in ('adaad', 'adaiad')   # seed by seed, heaviest first


def test_the_slurm_script_asks_for_a_gpu_the_time_the_partition_and_a_requeue_signal(tmp_path, monkeypatch):
    "What sbatch would receive for each cell's job: written by submitit without a cluster (an `srun` stand-in on PATH)."
    pytest.importorskip('submitit')
    from adaad.jobs import table_executor
    (tmp_path / 'bin').mkdir(); (tmp_path / 'bin' / 'srun').write_text('#!/bin/sh\nexit 0\n'); (tmp_path / 'bin' / 'srun').chmod(0o755)
    monkeypatch.setenv('PATH', f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    ex = table_executor('slurm', tmp_path / 'jobs', gpus_per_job=1, cpus_per_job=8, timeout_min=1440, partition='gpu-long')
    text = ex._executor._make_submission_file_text('python -u -m submitit.core._submit jobs', 'uid')
    for line in ('--gpus-per-node=1', '--time=1440', '--partition=gpu-long', '--cpus-per-task=8', '--signal=USR2@'):
        assert f'#SBATCH {line}' in text, line
    with pytest.raises(ValueError, match="executor must be one of"): table_executor('pbs', tmp_path)


def test_a_table_job_requeues_itself_to_resume():
    pytest.importorskip('submitit')
    from submitit.helpers import DelayedSubmission
    from adaad.jobs import TableJob
    again = TableJob(dict(cells=[('RN-18', 'wrn-10-1', 'adaad', 0)])).checkpoint()
    assert isinstance(again, DelayedSubmission) and isinstance(again.function, TableJob) and again.function.job['cells'][0][2] == 'adaad'


@pytest.mark.timeout(1800)
def test_a_dry_run_through_submitit_equals_the_process_pool(tmp_path, data_root):
    "The smoke preset's dry run, its cells as submitit jobs (debug executor, in this process), gives the pool's rows."
    pytest.importorskip('submitit')
    from adaad.jobs import run_table_parallel
    kw = dict(dry_run=True, data_root=str(data_root), methods=['pgd-at', 'adaad'], students={'RN-18': 'wrn-10-1'}, suite=['clean', 'pgd10'])
    pool = run_table_parallel('smoke', workers=2, out_dir=str(tmp_path / 'a'), runs_dir=str(tmp_path / 'ra'), **kw)
    lines = []
    jobs = run_table_parallel('smoke', executor='debug', out_dir=str(tmp_path / 'b'), runs_dir=str(tmp_path / 'rb'), log=lines.append, **kw)
    assert pool['status'] == jobs['status'] == 'done' and any('3 jobs submitted (debug)' in l for l in lines)
    assert [(r['method'], {k: c['acc'] for k, c in r['cells'].items()}) for r in pool['rows']] == \
           [(r['method'], {k: c['acc'] for k, c in r['cells'].items()}) for r in jobs['rows']]
    assert all(r['eval_cached'] for r in jobs['rows']) and all(r['train']['train_wall_s'] == 0. for r in jobs['rows'][1:])


def test_training_curves_of_a_table_with_more_rows_than_colours(tmp_path):
    "plot_training_curves draws every row of a 22-row table (cpu-faithful's), 20 colours before any repeats."
    from adaad.report import plot_training_curves
    rows = [dict(student='RN-18', method=f'm{i}', train=dict(curve=[dict(epoch=e, val_clean=10. + i, val_pgd=5.)
                                                                   for e in range(2)])) for i in range(22)]
    fig = plot_training_curves(dict(rows=rows, preset='cpu-faithful'), tmp_path / 'curves')
    lines = fig.axes[0].get_lines()
    assert len(lines) == 22 and len({l.get_color() for l in lines[:20]}) == 20
    assert (tmp_path / 'curves.png').exists()


def _children(pid, marker=b'adaad.jobs'):
    "The pids of the live processes whose parent is `pid` and whose command line holds `marker` (from /proc)."
    out = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try: fields, cmd = stat.read_text().rsplit(')', 1)[1].split(), (stat.parent / 'cmdline').read_bytes()
        except OSError: continue
        if int(fields[1]) == pid and fields[0] != 'Z' and marker in cmd: out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path('/proc/self/stat').exists(), reason='reads the process table from /proc')
def test_a_terminated_table_stops_its_workers(data_root, tmp_path):
    """SIGTERM to `adaad table` while its two workers train: it stops them before it exits (orphaned, they would train
    on until their cell ended)."""
    import signal, subprocess, sys, time
    cmd = [sys.executable, '-m', 'adaad.cli', 'table', '--preset', 'cpu-faithful', '--dry-run', '--workers', '2',
           '--out', str(tmp_path / 'out'), '--runs', str(tmp_path / 'runs'), '--data-root', str(data_root)]
    err = open(tmp_path / 'stderr.txt', 'w')
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        t0, workers = time.time(), []
        while len(workers) < 2 and p.poll() is None and time.time() - t0 < 300:
            workers = _children(p.pid); time.sleep(0.05)
        assert len(workers) == 2, (workers, p.poll(), (tmp_path / 'stderr.txt').read_text()[-2000:])
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 128 + signal.SIGTERM
        assert not [w for w in workers if Path(f'/proc/{w}').exists()], workers      # stopped and reaped by then
    finally:
        if p.poll() is None: p.kill()
        err.close()
