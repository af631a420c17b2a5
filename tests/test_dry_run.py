"""Dry runs: every code path of the paper-scale presets (their architectures, teachers and teacher files, methods, suite,
sharded evaluation, model-info files and paper comparison) at toy size on the CPU, from `run_table`, the notebook and make."""
import json, os, pickle, re, shutil, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch

from adaad.report import PAPER_TABLE
from adaad.presets import PRESETS
from adaad.repro import DRY_RUN, run_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _threads(one_thread): yield


def write_cifar100(root, n=8):
    "A small folder in the official CIFAR-100 layout (random images, labels spread over the 100 classes)."
    folder = root / 'cifar-100-python'; folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ('train', 'test'):
        d = {b'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8), b'fine_labels': [int(v) for v in rng.integers(0, 100, n)],
             b'coarse_labels': [0] * n}
        with open(folder / name, 'wb') as f: pickle.dump(d, f, protocol=2)
    return root


def _dry(preset, data_root, tmp_path):
    "Run the dry run of `preset`; (results dict, out folder, seconds). The runs folder (GBs of checkpoints) is removed."
    out, runs = tmp_path / 'res', tmp_path / 'runs'
    t0 = time.time()
    res = run_table(preset, dry_run=True, data_root=str(data_root), out_dir=str(out), runs_dir=str(runs))
    teacher_dir = runs / 'dry-run-teachers'
    seconds = time.time() - t0
    print(f'dry run of {preset}: {seconds:.0f} s')
    res['_teacher_files'] = sorted(p.name for p in teacher_dir.glob('*.pt')) if teacher_dir.is_dir() else []
    if res['teacher'].get('source') == 'robustbench':   # the file as the official main.py reads it
        sd = torch.load(res['teacher']['ckpt'], weights_only=True)
        res['_teacher_keys_prefixed'] = all(k.startswith('module.') for k in sd)
    shutil.rmtree(runs)
    return res, out, seconds


def _check_common(res, out, preset):
    cfg = PRESETS[preset]
    students = [(label, arch, m) for label, arch in cfg['students'].items() for m in cfg['methods']]
    assert res['status'] == 'done' and res['dry_run'] and res['reduced']
    assert [(r['student'], r['arch'], r['method']) for r in res['rows'][1:]] == students
    for r in res['rows']:
        assert list(r['cells']) == list(cfg['suite']) and r['n'] == DRY_RUN['n_test']
    assert res['config']['train']['epochs'] == 1 and res['config']['eval_shard'] == DRY_RUN['eval_shard']
    assert res['wall_s'] > 0 and all(r['train'].get('status', 'done') == 'done' for r in res['rows'])
    # every evaluation went in shards, each (attack, shard) piece kept
    for r in res['rows']:
        pieces = out / 'evals' / (Path(r['eval']).stem + '.pieces')
        assert sorted(p.name for p in pieces.glob('*.json')) == sorted(f"{a}-{s}-{s + DRY_RUN['eval_shard']}.json" for a in cfg['suite'] for s in range(0, DRY_RUN['n_test'], DRY_RUN['eval_shard']))
    infos = sorted((out / 'model_info').glob('*.json'))
    assert len(infos) == len(students)
    for f in infos: assert json.loads(f.read_text())['dataset'] == res['dataset']
    vs = (out / 'vs_paper.md').read_text()
    assert vs.startswith('**Reduced-scale run') and 'DRY RUN of preset' in vs
    return vs


@pytest.mark.timeout(1800)   # a few CPU minutes; room for a machine shared with other work
def test_dry_run_paper(data_root, tmp_path):
    "The paper preset: the WRN-34-20 LTD teacher from a file in the official layout, AKD's WRN-34-10 standard teacher, 16 students."
    res, out, _ = _dry('paper', data_root, tmp_path)
    vs = _check_common(res, out, 'paper')
    assert res['_teacher_files'] == ['Chen2021LTD_WRN34_20.pt'] and res['_teacher_keys_prefixed']
    assert res['rows'][0]['arch'] == 'Chen2021LTD_WRN34_20' and res['standard_teacher']['arch'] == 'wrn-34-10'
    assert res['dataset'] == 'cifar10' and f"/ {PAPER_TABLE['RN-18']['adaad']['clean']:.2f} /" in vs


@pytest.mark.timeout(1800)
def test_dry_run_of_the_methods_since_adaad(data_root, tmp_path):
    """cpu-strong-field through the table: IGDM, SAAD (and its weight average), Fair-ARD (its class state) and PeerAiD
    (a peer network trained beside the student, no teacher) as rows beside PGD-AT, ARD and AdaAD, with the preset's family."""
    res, out, _ = _dry('cpu-strong-field', data_root, tmp_path)
    _check_common(res, out, 'cpu-strong-field')
    conf = {r['method']: r['train']['config'] for r in res['rows'][1:]}
    assert conf['saad']['swa'] and conf['peeraid']['swa'] and not conf['adaad']['swa']
    assert conf['peeraid']['method_kwargs']['peer_arch'] is None and conf['fair-ard']['method_kwargs']['base'] == 'ard'
    assert conf['fair-ard']['nesterov'] is False and not any(c['nesterov'] for c in conf.values())   # as committed
    fam = res['family']
    assert ('fair-ard', 'ard') in [tuple(p) for p in fam['pairs']] and fam['size'] > 0


@pytest.mark.timeout(1800)
def test_dry_run_paper_cifar100(tmp_path):
    "The CIFAR-100 preset on a CIFAR-100-format folder written here: its teacher, its dataset in every file, no CIFAR-10 number."
    root = write_cifar100(tmp_path / 'data')
    res, out, _ = _dry('paper-cifar100', root, tmp_path)
    vs = _check_common(res, out, 'paper-cifar100')
    assert res['_teacher_files'] == ['Chen2021LTD_WRN34_10.pt'] and res['_teacher_keys_prefixed']
    assert res['dataset'] == 'cifar100' and res['data']['train']['path'].endswith('cifar-100-python')
    assert res['paper']['teacher'] == dict(name='Chen2021LTD_WRN34_10', clean=64.07, aa=30.59)
    n_cols = len(PRESETS['paper-cifar100']['suite'])   # every student cell, and the teacher's columns RobustBench does not report
    assert vs.count('/ not available /') == 16 * n_cols + n_cols - 2 and '| 64.07 |' not in vs and '/ 64.07 /' in vs and 'RobustBench' in vs
    cifar10_numbers = {f'{v:.2f}' for rows in PAPER_TABLE.values() for cells in rows.values() for v in cells.values()}
    assert not [n for n in re.findall(r'/ (\d+\.\d\d) /', vs) if n in cifar10_numbers]


@pytest.mark.timeout(1800)
def test_dry_run_gpu_small_from_the_notebook(data_root, tmp_path):
    "gpu-small through the notebook's `dry_run` parameter, with the preset's students and methods as `make repro` passes them."
    papermill = pytest.importorskip('papermill')
    params = dict(preset='gpu-small', dry_run=True, methods=None, students=None, train_n=None, n_test=None, scratch=False,
                  data_root=str(data_root), out_dir=str(tmp_path / 'res'), runs_dir=str(tmp_path / 'runs'))
    t0 = time.time()
    papermill.execute_notebook(str(ROOT / 'nbs' / 'repro_table.ipynb'), str(tmp_path / 'nb.ipynb'), kernel_name='python3',
                               cwd=str(ROOT / 'nbs'), parameters=params, progress_bar=False)
    print(f'dry run of gpu-small (notebook): {time.time() - t0:.0f} s')
    shutil.rmtree(tmp_path / 'runs')
    res = json.loads((tmp_path / 'res' / 'results.json').read_text())
    _check_common(res, tmp_path / 'res', 'gpu-small')
    assert res['teacher']['arch'] == 'resnet18' and res['teacher']['train']['amp'] is True
    assert 'DRY RUN of preset gpu-small' in (tmp_path / 'nb.ipynb').read_text()


def test_dry_run_bad_input(tmp_path):
    "An unknown preset, and a CIFAR-100 preset pointed at a folder that holds CIFAR-10 only, are refused by name."
    with pytest.raises(ValueError, match=r"preset must be one of \['quick', 'smoke'.*'paper-cifar100'\], got 'papr'"):
        run_table('papr', dry_run=True, out_dir=str(tmp_path / 'o'), runs_dir=str(tmp_path / 'r'))
    with pytest.raises(ValueError, match='dry_run must be True or False'): run_table('paper', dry_run='yes')
    (tmp_path / 'd' / 'cifar-10-batches-py').mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"preset 'paper-cifar100' runs on cifar100 .*'cifar-100-python'.* holds cifar10"):
        run_table('paper-cifar100', dry_run=True, data_root=str(tmp_path / 'd'), out_dir=str(tmp_path / 'o'), runs_dir=str(tmp_path / 'r'))
    assert not (tmp_path / 'o' / 'results.json').exists()


def _make(*args):
    "`make -n` (print, run nothing) of the repository's Makefile with the running interpreter's environment as VENV."
    venv = Path(sys.executable).parent.parent
    return subprocess.run(['make', '-n', '-C', str(ROOT), f'VENV={venv}', *args], capture_output=True, text=True)


def test_make_repro_dry_run_command():
    "`make repro PRESET=... DRY_RUN=1` runs the notebook with dry_run True into runs/results/<preset>-dry-run, never with COMMIT=1."
    if shutil.which('make') is None: pytest.skip('no make')
    r = _make('repro', 'PRESET=paper-cifar100', 'DRY_RUN=1')
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if 'papermill nbs/repro_table.ipynb' in l)
    assert '-p dry_run True' in r.stdout and 'runs/results/paper-cifar100-dry-run/repro_table.ipynb' in line
    assert '-p committed None' in r.stdout
    assert '-p dry_run False' in _make('repro', 'PRESET=paper').stdout
    bad = _make('repro', 'PRESET=paper', 'DRY_RUN=1', 'COMMIT=1')
    assert bad.returncode != 0 and 'drop COMMIT=1' in bad.stderr
    # the recipe's first line refuses a preset that does not exist, naming PRESET and the accepted ones
    check = next(l for l in _make('repro', 'PRESET=papr', 'DRY_RUN=1').stdout.splitlines() if 'unknown_preset' in l)
    r = subprocess.run(check, shell=True, capture_output=True, text=True, cwd=ROOT, env={**os.environ, 'PYTHONPATH': str(ROOT)})
    assert r.returncode == 1 and "PRESET must be one of ['quick', 'smoke'" in r.stderr and "got 'papr'" in r.stderr


def _user_env():
    "The environment of a process that should find the user's module only where the user keeps it (tests/, given as the working folder or on PYTHONPATH)."
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))


@pytest.mark.timeout(1800)
def test_parallel_table_trains_a_user_method(data_root, tmp_path):
    """`adaad table --import user_methods --workers 2` on the quick preset's dry run, from the folder that holds the user's
    module: both cells, the user's method and a preset row, on the user's architecture and under the user's attack, are
    trained and evaluated by the worker processes (which import the module themselves), then the table is assembled
    without training or evaluating again."""
    out, runs = tmp_path / 'res', tmp_path / 'runs'
    cmd = [str(Path(sys.executable).with_name('adaad')), 'table', '--import', 'user_methods', '--preset', 'quick', '--dry-run',
           '--workers', '2', '--methods', 'pgd-at,user-rslad', '--students', 'RN-18=user-cnn', '--suite', 'clean,pgd10,user-pgd2',
           '--out', str(out), '--runs', str(runs), '--data-root', str(data_root)]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT / 'tests', capture_output=True, text=True, env=_user_env())
    print(f'adaad table --workers 2 (quick, dry run): {time.time() - t0:.0f} s')
    assert r.returncode == 0, r.stderr + ''.join(p.read_text() for p in out.glob('worker*.log'))
    res = json.loads((out / 'results.json').read_text())
    assert res['status'] == 'done' and res['dry_run'] and [row['method'] for row in res['rows']] == ['teacher', 'pgd-at', 'user-rslad']
    assert all(row['train']['train_wall_s'] == 0. and row['eval_cached'] for row in res['rows'][1:])   # the workers did both
    cfg = json.loads((Path(res['runs']['RN-18/user-rslad/0']) / 'config.json').read_text())
    assert (cfg['method'], cfg['student']) == ('user-rslad', 'user-cnn') and all(list(row['cells']) == ['clean', 'pgd10', 'user-pgd2'] for row in res['rows'])
    assert sorted(p.name for p in out.glob('worker*.log')) == ['worker0.log', 'worker1.log'] and '[2/2] RN-18' in r.stdout
    assert (out / 'training_curves.png').exists() and 'done: 3 rows' in r.stdout


@pytest.mark.timeout(1800)
def test_repro_notebook_imports_a_user_method(data_root, tmp_path, monkeypatch):
    """The reproduction notebook's `imports` (what `make repro IMPORT=...` passes, a comma-separated string) makes the user's
    method a row, the user's architecture its student and the user's attack a column."""
    papermill = pytest.importorskip('papermill')
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(ROOT / 'tests'), str(ROOT), os.environ.get('PYTHONPATH', '')]))
    params = dict(preset='quick', dry_run=True, methods=['user-rslad'], students={'RN-18': 'user-cnn'}, suite=['clean', 'pgd10', 'user-pgd2'],
                  train_n=None, n_test=None, scratch=False,
                  imports='user_methods', data_root=str(data_root), out_dir=str(tmp_path / 'res'), runs_dir=str(tmp_path / 'runs'))
    papermill.execute_notebook(str(ROOT / 'nbs' / 'repro_table.ipynb'), str(tmp_path / 'nb.ipynb'), kernel_name='python3',
                               cwd=str(ROOT / 'nbs'), parameters=params, progress_bar=False)
    res = json.loads((tmp_path / 'res' / 'results.json').read_text())
    assert res['status'] == 'done' and [r['method'] for r in res['rows']] == ['teacher', 'user-rslad']
    cfg = json.loads((Path(res['runs']['RN-18/user-rslad/0']) / 'config.json').read_text())
    assert (cfg['method'], cfg['student']) == ('user-rslad', 'user-cnn') and list(res['rows'][1]['cells']) == ['clean', 'pgd10', 'user-pgd2']


def test_make_repro_passes_imports():
    "`make repro IMPORT=mod1,mod2` hands the notebook `imports` and puts this folder on the kernel's PYTHONPATH."
    if shutil.which('make') is None: pytest.skip('no make')
    r = _make('repro', 'PRESET=quick', 'DRY_RUN=1', 'IMPORT=user_methods,other')
    line = next(l for l in r.stdout.splitlines() if 'papermill nbs/repro_table.ipynb' in l)
    assert r.returncode == 0 and '-p imports user_methods,other' in r.stdout and line.startswith(f'PYTHONPATH="{ROOT}')
    assert '-p imports' not in _make('repro', 'PRESET=quick').stdout


def test_make_repro_holds_the_kernels_to_avx2_on_request():
    "`make repro CPU_KERNELS=avx2` runs the notebook with ATen, MKL and oneDNN held to AVX2; another value is refused."
    if shutil.which('make') is None: pytest.skip('no make')
    line = next(l for l in _make('repro', 'CPU_KERNELS=avx2').stdout.splitlines() if 'papermill nbs/' in l)
    assert all(v in line.split('papermill')[0] for v in
               ('ATEN_CPU_CAPABILITY=avx2', 'MKL_ENABLE_INSTRUCTIONS=AVX2', 'ONEDNN_MAX_CPU_ISA=AVX2'))
    assert 'ATEN_CPU_CAPABILITY' not in _make('repro').stdout
    bad = _make('repro', 'CPU_KERNELS=sse4')
    assert bad.returncode != 0 and "CPU_KERNELS must be avx2" in bad.stderr and "got 'sse4'" in bad.stderr


def test_held_kernels_are_recorded_and_shown(monkeypatch):
    "A process whose kernels are held to a narrower set records the variables, and a results table's conditions say so."
    from adaad.repro import hardware_info
    from adaad.report import run_conditions
    for k in ('ATEN_CPU_CAPABILITY', 'MKL_ENABLE_INSTRUCTIONS', 'ONEDNN_MAX_CPU_ISA'): monkeypatch.delenv(k, raising=False)
    assert 'kernel_limits' not in hardware_info()
    monkeypatch.setenv('ONEDNN_MAX_CPU_ISA', 'AVX2')
    hw = hardware_info()
    assert hw['kernel_limits'] == {'ONEDNN_MAX_CPU_ISA': 'AVX2'}
    res = dict(hardware=hw, rows=[])
    assert 'kernels held to it: ONEDNN_MAX_CPU_ISA=AVX2' in run_conditions(res)['CPU kind']


def test_dry_run_cuts_every_multi_step_attack_of_the_suite(tmp_path):
    """Built-in attacks and a user's registered attack that takes `steps` run DRY_RUN['attack_steps'] steps (or queries)
    in a dry run; AutoAttack is cut through the preset's `aa`; an attack without steps or queries is left as it is."""
    import user_methods  # noqa: F401  (registers user-pgd2, which takes `steps`)
    from adaad.presets import preset_config
    from adaad.repro import dry_run_config
    cfg = preset_config('smoke')
    cfg['suite'] = ('clean', 'fgsm', 'pgd10', 'cw2', 'user-pgd2', 'square', 'aa')
    d, k = dry_run_config(cfg, tmp_path), DRY_RUN['attack_steps']
    assert d['attack_overrides'] == {'pgd10': dict(steps=k), 'cw2': dict(steps=k), 'user-pgd2': dict(steps=k), 'square': dict(n_queries=k)}
    assert d['aa']['n_iter'] == k


@pytest.mark.timeout(1800)
def test_a_cell_trained_under_torchrun_is_reused_by_the_table(data_root, tmp_path):
    """`torchrun --nproc-per-node 2 -m adaad.cli table --cell RN-18/pgd-at/0` (2 gloo ranks) trains one cell of the smoke
    preset's dry run into the table's folders; the table then reuses that training and its evaluation, and trains the other."""
    import socket
    from adaad.repro import run_table
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    common = ['--preset', 'smoke', '--dry-run', '--methods', 'pgd-at,natural', '--students', 'RN-18=wrn-10-1', '--suite', 'clean,pgd10',
              '--out', str(tmp_path / 'res'), '--runs', str(tmp_path / 'runs'), '--data-root', str(data_root)]
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node', '2', '--master-port', str(port), '-m', 'adaad.cli',
                        'table', '--cell', 'RN-18/pgd-at/0', *common], capture_output=True, text=True, env=_user_env(), timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'RN-18/pgd-at/0: done' in r.stdout and not (tmp_path / 'runs' / 'RN-18-wrn-10-1-natural-s0').exists()
    run = tmp_path / 'runs' / 'RN-18-wrn-10-1-pgd-at-s0'
    assert len(json.loads((run / 'trainings.json').read_text())) == 1      # rank 0 alone recorded the training
    res = run_table('smoke', dry_run=True, methods=['pgd-at', 'natural'], students={'RN-18': 'wrn-10-1'}, suite=['clean', 'pgd10'],
                    out_dir=str(tmp_path / 'res'), runs_dir=str(tmp_path / 'runs'), data_root=str(data_root))
    rows = {row['method']: row for row in res['rows']}
    assert rows['pgd-at']['train']['train_wall_s'] == 0. and rows['pgd-at']['eval_cached']             # reused, not retrained
    assert rows['natural']['train']['train_wall_s'] > 0. and not rows['natural']['eval_cached']
    with pytest.raises(ValueError, match="cell row must be one of 'pgd-at', 'natural'"):
        from adaad.jobs import run_table_cell
        run_table_cell('smoke', 'RN-18/adaad/0', dry_run=True, methods=['pgd-at', 'natural'], data_root=str(data_root),
                       out_dir=str(tmp_path / 'res'), runs_dir=str(tmp_path / 'runs'))


SBATCH = '''#!/bin/bash
# sbatch's stand-in: runs the submission script on this machine, in the background, as job $id
script="${@: -1}"; id=$(( (RANDOM << 8) + RANDOM % 256 + 1000 ))
SLURM_JOB_ID=$id SLURM_NTASKS=1 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_JOB_NUM_NODES=1 SLURM_JOB_NODELIST=localhost \\
  SLURM_NTASKS_PER_NODE=1 nohup bash "$script" >/dev/null 2>&1 &
echo "Submitted batch job $id"
'''
SRUN = '''#!/bin/bash
# srun's stand-in: its --output and --error (%j the job, %t the task), then the command
while [[ "$1" == --* ]]; do
  case "$1" in --output) out="${2//%j/$SLURM_JOB_ID}"; out="${out//%t/0}"; shift 2;; --error) err="${2//%j/$SLURM_JOB_ID}"; err="${err//%t/0}"; shift 2;; *) shift;; esac
done
exec "$@" >>"$out" 2>>"$err"
'''


@pytest.mark.timeout(1800)
def test_a_table_through_slurm_submits_one_job_per_cell_and_assembles_it(data_root, tmp_path):
    """`adaad table --executor slurm` with stand-ins for sbatch, srun and sacct that run each job on this machine: one job per
    cell and one for the teacher's evaluation, each script asking for the partition, the time and the requeue signal; the
    table is then assembled from the jobs' trainings and evaluations."""
    pytest.importorskip('submitit')
    bin_ = tmp_path / 'bin'; bin_.mkdir()
    for name, text in (('sbatch', SBATCH), ('srun', SRUN), ('sacct', '#!/bin/sh\nexit 0\n')):
        (bin_ / name).write_text(text); (bin_ / name).chmod(0o755)
    out = tmp_path / 'res'
    cmd = [sys.executable, '-m', 'adaad.cli', 'table', '--preset', 'smoke', '--dry-run', '--methods', 'pgd-at,natural', '--students', 'RN-18=wrn-10-1',
           '--suite', 'clean,pgd10', '--executor', 'slurm', '--slurm-partition', 'cpu-q', '--slurm-time', '90', '--gpus-per-job', '0',
           '--out', str(out), '--runs', str(tmp_path / 'runs'), '--data-root', str(data_root)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(_user_env(), PATH=f"{bin_}:{os.environ['PATH']}"), timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:] + ''.join(p.read_text()[-2000:] for p in (out / 'jobs').glob('*.err'))
    assert '3 jobs submitted (slurm)' in r.stdout and 'done: 3 rows' in r.stdout
    scripts = [p.read_text() for p in (out / 'jobs').glob('*_submission.sh')]
    assert len(scripts) == 3 and all('#SBATCH --partition=cpu-q' in s and '#SBATCH --time=90' in s and '#SBATCH --signal=USR2@' in s for s in scripts)
    res = json.loads((out / 'results.json').read_text())
    assert [row['method'] for row in res['rows']] == ['teacher', 'pgd-at', 'natural'] and all(row['eval_cached'] for row in res['rows'])
    assert all(row['train']['train_wall_s'] == 0. for row in res['rows'][1:])    # trained by the jobs, reused here
