"The command line: help text, refusals that name the bad option, and a tiny end-to-end run."
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaad.cli import main, parser
from adaad.checkpoint import atomic_save
from adaad.models import create_model


def free_port():
    "A TCP port nobody listens on now (for torchrun's rendezvous)."
    import socket
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _run(args, capsys):
    with pytest.raises(SystemExit) as e: main(args)
    return e.value.code, capsys.readouterr()


def _sub(cmd):
    return next(a for a in parser()._actions if a.dest == 'cmd').choices[cmd]


@pytest.mark.parametrize('cmd', ['train', 'teacher'])
def test_help_lists_every_trainconfig_field_with_its_default(cmd):
    "Each TrainConfig field has an option whose help shows the field's help text and default (fails if a field is left out)."
    import dataclasses
    from adaad.train import TrainConfig
    sub = _sub(cmd)
    by_dest = {a.dest: a for a in sub._actions}
    text = ' '.join(sub.format_help().split())
    for f in dataclasses.fields(TrainConfig):
        act = by_dest[f.name]
        default = 'pgd-at' if (cmd, f.name) == ('teacher', 'method') else {} if f.name == 'method_kwargs' else f.default
        assert act.help.endswith(f'(default: {default})'), (f.name, act.help)
        assert ' '.join(f.metadata['help'].split()) in text and act.option_strings[0] in text, f.name


def test_eval_help_documents_every_option_with_default():
    sub = _sub('eval')
    for act in sub._actions:
        if act.option_strings and act.dest not in ('help', 'no_progress', 'ckpt'): assert '(default:' in act.help, act.dest


@pytest.mark.parametrize('args,msg', [
    (['train', '--method', 'nope'], "invalid choice: 'nope'"),
    (['train', '--eps', '0'], r'--eps: .*must be a number in \(0, 1\]'),
    (['train', '--eps', '9/5'], r'--eps: .*must be a number in \(0, 1\]'),
    (['train', '--eps', 'abc'], '--eps: .*not a number'),
    (['train', '--steps', '0'], '--steps: .*must be an integer >= 1'),
    (['train', '--lr', '0'], '--lr: .*must be a number > 0'),
    (['train', '--method', 'adaad', '--set', 'adv_share=0.5', '--teacher', 'x.pt', '--teacher-arch', 'wrn-10-1'], 'checkpoint not found'),
    (['train', '--method', 'adaad'], '--method adaad needs --teacher'),
    (['train', '--teacher', 'x.pt'], 'exactly one of --teacher-arch or --teacher-robustbench'),
    (['teacher', '--method', 'adaad'], r"--method for a teacher must be a method that reads no teacher: one of \[.*'pgd-at', 'trades'.*\], got 'adaad'"),
    (['train', '--method', 'akd', '--teacher', 'x.pt', '--teacher-arch', 'wrn-10-1', '--natural-teacher-arch', 'wrn-10-1'], '--natural-teacher-arch / --natural-teacher-robustbench need --natural-teacher'),
    (['--import', 'no_such_module_xyz', 'train'], '--import no_such_module_xyz'),
    (['eval', '--ckpt', 'x.pt'], 'exactly one of --arch or --robustbench'),
])
def test_bad_values_are_refused_by_name(args, msg, capsys):
    code, out = _run(args, capsys)
    assert code == 2 and __import__('re').search(msg, out.err), out.err


COMMANDS = ('train', 'teacher', 'eval', 'table', 'compare')


@pytest.mark.parametrize('cmd', COMMANDS)
def test_every_command_takes_import(cmd, capsys):
    "`--import MODULE` after any command is parsed by it and imported before the command runs (a missing module is refused by name)."
    assert set(next(a for a in parser()._actions if a.dest == 'cmd').choices) == set(COMMANDS)
    assert any('--import' in a.option_strings for a in _sub(cmd)._actions)
    code, out = _run([cmd, '--import', 'no_such_module_xyz'], capsys)
    assert code == 2 and '--import no_such_module_xyz' in out.err, out.err


def test_teacher_takes_any_registered_method_without_a_teacher(capsys):
    """`adaad teacher` asks each method whether it reads a teacher: the user's teacher-free method (tests/user_methods.py)
    passes that check (the command then stops at the next one, the device); a distillation method is refused, naming
    --method and the accepted methods, the user's among them."""
    code, out = _run(['teacher', '--import', 'user_methods', '--method', 'user-pgd', '--device', 'nodevice'], capsys)
    assert code == 2 and '--device' in out.err and '--method' not in out.err, out.err
    code, out = _run(['teacher', '--import', 'user_methods', '--method', 'user-rslad'], capsys)
    assert code == 2 and __import__('re').search(r"--method for a teacher must be a method that reads no teacher: one of \[.*'user-pgd'.*\], got 'user-rslad'", out.err)


def test_missing_checkpoint_and_class_mismatch(tmp_path, capsys, data_root):
    code, out = _run(['train', '--teacher', str(tmp_path / 'missing.pt'), '--teacher-arch', 'wrn-10-1'], capsys)
    assert code == 2 and 'checkpoint not found' in out.err
    atomic_save(create_model('wrn-10-1', 100).state_dict(), tmp_path / 't100.pt')
    code, out = _run(['train', '--teacher', str(tmp_path / 't100.pt'), '--teacher-arch', 'wrn-10-1'], capsys)
    assert code == 2 and 'does not fit' in out.err  # a 100-class file read as a 10-class teacher
    code, out = _run(['eval', '--ckpt', str(tmp_path / 't100.pt'), '--robustbench', 'Nobody2099'], capsys)
    assert code == 2 and 'unknown RobustBench model' in out.err


def test_teacher_train_eval_end_to_end(tmp_path, data_root, capsys):
    common = ['--data-root', str(data_root), '--epochs', '1', '--train-n', '64', '--val-n', '32', '--batch-size', '32',
              '--steps', '1', '--device', 'cpu', '--no-progress']
    main(['teacher', '--arch', 'wrn-10-1', '--out', str(tmp_path / 't')] + common)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])['status'] == 'done'
    main(['train', '--method', 'rslad', '--student', 'wrn-10-1', '--teacher', str(tmp_path / 't' / 'final.pt'),
          '--teacher-arch', 'wrn-10-1', '--out', str(tmp_path / 's')] + common)
    assert (tmp_path / 's' / 'DONE').exists()
    tr = json.loads((tmp_path / 's' / 'trainings.json').read_text())    # which code trained which epochs
    assert [(r['epochs'], r['status']) for r in tr] == [([0, 1], 'done')] and 'commit' in tr[0]
    main(['eval', '--ckpt', str(tmp_path / 's' / 'final.pt'), '--arch', 'wrn-10-1', '--n', '20', '--data-root', str(data_root),
          '--device', 'cpu', '--no-progress', '--out', str(tmp_path / 'e.json')])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(row) >= {'clean', 'pgd10'} and json.loads((tmp_path / 'e.json').read_text())['n'] == 20


def test_console_script_installed():
    "The `adaad` executable that `pip install` puts beside the interpreter runs and lists its commands."
    exe = Path(sys.executable).with_name('adaad')
    out = subprocess.run([str(exe), '--help'], capture_output=True, text=True)
    assert out.returncode == 0 and all(c in out.stdout for c in COMMANDS), out.stderr
    out = subprocess.run([str(exe), 'train', '--help'], capture_output=True, text=True)
    assert '--eps-ramp-epochs' in out.stdout and '--natural-teacher' in out.stdout


@pytest.mark.parametrize('flags, compile_, fold, nesterov', [([], False, None, None),
                                                            (['--compile', '--no-fold-teacher', '--no-nesterov'], True, False, False),
                                                            (['--fold-teacher', '--nesterov'], False, True, True)])
def test_speed_flags_reach_the_config(flags, compile_, fold, nesterov):
    "--fold-teacher and --nesterov: unset, None (fold unless faithful; the method's official momentum); either way when given."
    from adaad.cli import config_from_args
    a = parser().parse_args(['train', '--method', 'adaad', '--student', 'wrn-10-1', '--teacher', 't.pt',
                             '--teacher-arch', 'wrn-10-1', *flags])
    c = config_from_args(a)
    assert (c.compile, c.fold_teacher, c.nesterov) == (compile_, fold, nesterov)


def test_every_field_reaches_the_config():
    "Options of fields the old command line lacked (val_steps, drop_last, momentum, single_decay, inner, eps schedule)."
    from adaad.cli import config_from_args
    a = parser().parse_args(['train', '--val-steps', '3', '--drop-last', '--momentum', '0.5', '--single-decay', '--inner', 'trades',
                             '--eps', '16/255', '--eps-start', '4/255', '--eps-ramp-epochs', '5', '--set', 'adv_share=0.5', '--batch-size', '64'])
    c = config_from_args(a)
    assert (c.val_steps, c.drop_last, c.momentum, c.single_decay, c.inner, c.eps, c.eps_start, c.eps_ramp_epochs) == \
           (3, True, 0.5, True, 'trades', 16 / 255, 4 / 255, 5)
    assert c.method_kwargs == {'adv_share': 0.5} and c.batch_size == 64


def test_eval_in_pieces_resumes_and_exports_model_info(tmp_path, data_root, capsys):
    "`adaad eval` with --shard-size and --pieces writes one file per (attack, shard), reads them back, and --model-info writes RobustBench's fields."
    atomic_save(create_model('wrn-10-1').state_dict(), tmp_path / 'w.pt')
    args = ['eval', '--ckpt', str(tmp_path / 'w.pt'), '--arch', 'wrn-10-1', '--n', '20', '--batch-size', '10', '--shard-size', '10',
            '--suite', 'clean,aa', '--aa-attacks', 'apgd-ce', '--pieces', str(tmp_path / 'pieces'), '--model-info', str(tmp_path / 'info.json'),
            '--data-root', str(data_root), '--device', 'cpu', '--no-progress']
    main(args)
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(list((tmp_path / 'pieces').glob('*.json'))) == 4
    info = json.loads((tmp_path / 'info.json').read_text())
    assert {'clean_acc', 'autoattack_acc', 'eps', 'architecture', 'dataset', 'threat_model'} <= set(info)
    assert info['unreliable'] and '20 test images' in info['footnote'] and info['adaad']['ckpt_sha256']
    main(args)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == first


def test_eval_without_device_runs_on_cuda_where_visible_else_the_cpu_and_says_which(monkeypatch, capsys):
    "`adaad eval` with no --device does what its help says (CUDA where a GPU is visible, else the CPU) and prints the device."
    import types
    from adaad.cli import _check_outputs
    assert 'cuda if a CUDA GPU is visible, else cpu' in next(a.help for a in _sub('eval')._actions if a.dest == 'device')
    for visible, dev in ((True, 'cuda'), (False, 'cpu')):
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: visible)
        a = types.SimpleNamespace(device=None, out=None, model_info=None, pieces=None, ckpt=None)
        _check_outputs(a)
        assert a.device == torch.device(dev) and f'adaad eval: on {dev}' in capsys.readouterr().err
    a = types.SimpleNamespace(device="cuda", out=None, model_info=None, pieces=None, ckpt=None)
    with pytest.raises(ValueError, match=r"no CUDA GPU is visible to PyTorch here \(PyTorch .*(CPU-only|built for CUDA)"):
        _check_outputs(a)


def test_eval_under_torchrun_splits_the_pieces_and_equals_one_process(tmp_path, data_root):
    "`torchrun --nproc-per-node 2 -m adaad.cli eval ... --n-test` on CPU (gloo): both ranks attack pieces, rank 0 writes one process's result."
    import os
    atomic_save(create_model('wrn-10-1').state_dict(), tmp_path / 'w.pt')
    args = ['eval', '--ckpt', str(tmp_path / 'w.pt'), '--arch', 'wrn-10-1', '--n-test', '40', '--batch-size', '10', '--suite', 'clean,pgd10',
            '--data-root', str(data_root), '--device', 'cpu', '--no-progress']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    run = lambda pre, *extra: subprocess.run([sys.executable, *pre, '-m', 'adaad.cli', *args, *extra], capture_output=True, text=True, env=env, timeout=600)
    two = run(['-m', 'torch.distributed.run', '--nproc-per-node', '2', '--master-port', str(free_port())], '--pieces', str(tmp_path / 'p'), '--out', str(tmp_path / 'two.json'))
    assert two.returncode == 0, two.stderr[-3000:]
    one = run([], '--out', str(tmp_path / 'one.json'))
    assert one.returncode == 0, one.stderr[-3000:]
    r1, r2 = (json.loads((tmp_path / f).read_text()) for f in ('one.json', 'two.json'))
    assert r2['correct'] == r1['correct'] and r2['accuracy'] == r1['accuracy'] and r2['n'] == 40 and r2['config']['processes'] == 2
    assert len(two.stdout.strip().splitlines()) == 1                      # rank 0 alone prints the result
    assert sorted(f.name for f in (tmp_path / 'p').glob('*.json')) == ['clean-0-20.json', 'clean-20-40.json', 'pgd10-0-20.json', 'pgd10-20-40.json']


@pytest.mark.parametrize('args, msg', [
    (['--slurm-partition', 'gpu'], '--slurm-partition need --executor slurm'),
    (['--executor', 'local', '--slurm-time', '60'], '--slurm-time need --executor slurm'),
    (['--gpus-per-job', '2'], '--gpus-per-job needs --executor slurm or local'),
    (['--cell', 'RN-18/adaad/0', '--executor', 'slurm'], '--cell trains one cell in this process'),
    (['--executor', 'pbs'], "invalid choice: 'pbs'")])
def test_table_cluster_options_are_refused_without_their_executor(args, msg, capsys):
    code, out = _run(['table', '--preset', 'smoke', *args], capsys)
    assert code == 2 and msg in out.err


def test_table_cluster_options_parse():
    a = parser().parse_args(['table', '--executor', 'slurm', '--slurm-partition', 'gpu', '--slurm-time', '60', '--gpus-per-job', '2',
                             '--cpus-per-job', '16', '--cell', 'RN-18/adaad/1'])
    assert (a.executor, a.slurm_partition, a.slurm_time, a.gpus_per_job, a.cpus_per_job, a.cell) == ('slurm', 'gpu', 60, 2, 16, 'RN-18/adaad/1')
