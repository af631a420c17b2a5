"The command line: help text, refusals that name the bad option, and a tiny end-to-end run."
import json
import subprocess
import sys

import pytest
import torch

from adaad.cli import main, parser
from adaad.models import atomic_save, create_model


def _run(args, capsys):
    with pytest.raises(SystemExit) as e: main(args)
    return e.value.code, capsys.readouterr()


@pytest.mark.parametrize('cmd', ['train', 'teacher', 'eval'])
def test_help_documents_every_option_with_default(cmd):
    sub = next(a for a in parser()._actions if a.dest == 'cmd').choices[cmd]
    text = sub.format_help()
    for act in sub._actions:
        if act.option_strings and act.dest != 'help': assert act.option_strings[-1] in text
    assert '(default:' in text


@pytest.mark.parametrize('args,msg', [
    (['train', '--method', 'nope'], "invalid choice: 'nope'"),
    (['train', '--eps', '0'], r'--eps: .*must be in \(0, 1\]'),
    (['train', '--eps', '9/5'], r'--eps: .*must be in \(0, 1\]'),
    (['train', '--eps', 'abc'], '--eps: .*not a number'),
    (['train', '--steps', '0'], '--steps: .*must be >= 1'),
    (['train', '--method', 'adaad'], '--method adaad needs --teacher'),
    (['train', '--teacher', 'x.pt'], 'exactly one of --teacher-arch or --teacher-robustbench'),
    (['teacher', '--method', 'adaad'], "--method for a teacher must be 'pgd-at' or 'trades'"),
    (['eval', '--ckpt', 'x.pt'], 'exactly one of --arch or --robustbench'),
])
def test_bad_values_are_refused_by_name(args, msg, capsys):
    code, out = _run(args, capsys)
    assert code == 2 and __import__('re').search(msg, out.err), out.err


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
    main(['eval', '--ckpt', str(tmp_path / 's' / 'final.pt'), '--arch', 'wrn-10-1', '--n', '20', '--data-root', str(data_root),
          '--device', 'cpu', '--no-progress', '--out', str(tmp_path / 'e.json')])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(row) >= {'clean', 'pgd10'} and json.loads((tmp_path / 'e.json').read_text())['n'] == 20


def test_console_script_installed():
    out = subprocess.run([sys.executable, '-m', 'adaad.cli', '--help'], capture_output=True, text=True)
    assert out.returncode == 0 and 'train' in out.stdout and 'teacher' in out.stdout


@pytest.mark.parametrize('flags, compile_, fold', [([], False, True), (['--compile', '--no-fold-teacher'], True, False)])
def test_speed_flags_reach_the_config(flags, compile_, fold):
    from adaad.cli import _config
    a = parser().parse_args(['train', '--method', 'adaad', '--student', 'wrn-10-1', '--teacher', 't.pt',
                             '--teacher-arch', 'wrn-10-1', *flags])
    c = _config(a, 'wrn-10-1')
    assert (c.compile, c.fold_teacher) == (compile_, fold)
