"""What happens around a failure: one writer per run folder, a failed start that leaves the folder reusable, logs and
evaluation pieces that survive damage, outputs checked before the work, outputs that would replace an input or another
table refused, values a method gives no meaning refused, non-finite networks refused, one-line command-line errors (Ctrl-C,
failing imports and full disks included), and file modes that follow the umask.

Run as a script (`python tests/test_failures.py OUT`) this file is the worker of the two-process test: a tiny PGD-AT
run whose first training step waits until the file OUT/go exists."""
import errno
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_faults import tiny_config, tiny_data   # noqa: E402  (the tiny deterministic run the fault tests share)
from toys import brightest_channel                # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')


def _cli(args, capsys):
    "Run `adaad ARGS` in this process: (exit code, stdout, stderr); an exception other than SystemExit fails the test."
    from adaad.cli import main
    with pytest.raises(SystemExit) as e: main(args)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _worker(out):
    "The tiny run of the two-process test; its first training step waits for OUT/go."
    torch.set_num_threads(1)
    import adaad.methods as M
    from adaad.train import train
    real, go = M.training_loss, Path(out) / 'go'
    def held(*a, **k):
        t0 = time.time()
        while not go.exists() and time.time() - t0 < 120: time.sleep(0.05)
        return real(*a, **k)
    M.training_loss = held
    train(tiny_config(save_every=0), out_dir=out, device='cpu', progress=False, data=tiny_data())


# ---- one writer per run folder ------------------------------------------------------------------------------------
def test_two_trainings_into_one_folder_one_is_refused_at_once_and_the_log_stays_intact(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    start = lambda: subprocess.Popen([sys.executable, __file__, str(tmp_path)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
    a = start()
    try:
        t0 = time.time()
        while not (tmp_path / 'identity.json').exists() and a.poll() is None and time.time() - t0 < 120: time.sleep(0.05)
        b = start()
        try: b_err = b.communicate(timeout=90)[1]             # refused at once, while the first run waits
        except subprocess.TimeoutExpired: b.kill(); b.wait(); pytest.fail('the second process was not refused: it is training too')
        (tmp_path / 'go').touch()
        a_err = a.communicate(timeout=300)[1]
    finally:
        if a.poll() is None: a.kill()
    assert b.returncode != 0 and 'is in use by another process (training run pid' in b_err and f'pid {a.pid}' in b_err, b_err[-1500:]
    assert a.returncode == 0, a_err[-1500:]
    rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [0, 1] and (tmp_path / 'DONE').exists()


def test_a_held_run_folder_is_refused_naming_the_holder_and_free_once_released(tmp_path):
    from adaad.core import FolderBusy
    from adaad.train import start_run, train
    run = start_run(tiny_config(save_every=0), out_dir=tmp_path, device='cpu', progress=False, data=tiny_data())
    with pytest.raises(FolderBusy, match=rf'is in use by another process \(training run pid {os.getpid()} on .*, started \d{{4}}-'):
        train(tiny_config(save_every=0), out_dir=tmp_path, device='cpu', progress=False, data=tiny_data())
    run.close()
    start_run(tiny_config(save_every=0), out_dir=tmp_path, device='cpu', progress=False, data=tiny_data()).close()   # free again


def test_an_evaluation_holds_its_pieces_folder(tmp_path):
    from adaad.core import FolderBusy, FolderLock
    from adaad.evaluate import evaluate
    model, x, y = brightest_channel(16)
    with FolderLock(tmp_path, 'evaluation'):
        with pytest.raises(FolderBusy, match=r'in use by another process \(evaluation pid'):
            evaluate(model, x, y, suite=['clean'], batch_size=8, pieces_dir=tmp_path, progress=False)
    assert evaluate(model, x, y, suite=['clean'], batch_size=8, pieces_dir=tmp_path, progress=False).accuracy['clean'] == 100


# ---- a failed start leaves the folder reusable ----------------------------------------------------------------------
def test_a_start_that_diverged_before_its_first_checkpoint_leaves_the_folder_reusable(tmp_path):
    from adaad.train import train
    with pytest.raises(FloatingPointError, match=r'non-finite .*No checkpoint was written yet|non-finite weights'):
        train(tiny_config(save_every=0, lr=1e30), out_dir=tmp_path, device='cpu', progress=False, data=tiny_data())
    assert (tmp_path / 'identity.json').exists() and not (tmp_path / 'last.pt').exists()
    r = train(tiny_config(save_every=0, epochs=1, milestones=()), out_dir=tmp_path, device='cpu', progress=False, data=tiny_data())
    assert r['status'] == 'done' and json.loads((tmp_path / 'identity.json').read_text())['config']['lr'] == 0.1


def test_a_start_with_a_wrong_teacher_leaves_the_folder_reusable(tmp_path):
    from adaad.models import create_model
    from adaad.train import train
    cfg = tiny_config(method='adaad', epochs=1, milestones=(), save_every=0)
    with pytest.raises(ValueError, match=r"teacher has 100 classes but dataset 'cifar10' has 10"):
        train(cfg, teacher=create_model('wrn-10-1', 100), out_dir=tmp_path, device='cpu', progress=False, data=tiny_data())
    torch.manual_seed(0)
    r = train(cfg, teacher=create_model('wrn-10-1', 10).eval(), out_dir=tmp_path, device='cpu', progress=False, data=tiny_data())
    assert r['status'] == 'done'


def test_a_folder_with_a_checkpoint_still_refuses_another_run(tmp_path):
    from adaad.train import train
    train(tiny_config(save_every=0, epochs=1, milestones=()), out_dir=tmp_path, device='cpu', progress=False, data=tiny_data())
    with pytest.raises(ValueError, match=r'holds another run: config.lr: 0.1 \(folder\) != 0.05 \(now\)'):
        train(tiny_config(save_every=0, epochs=1, milestones=(), lr=0.05), out_dir=tmp_path, device='cpu', progress=False, data=tiny_data())


def test_non_finite_weight_decay_is_refused_by_name():
    from adaad.train import TrainConfig
    with pytest.raises(ValueError, match=r'weight_decay must be a finite number >= 0, got inf'): TrainConfig(weight_decay=math.inf).validate()


# ---- logs and pieces that tolerate damage ----------------------------------------------------------------------------
def test_a_torn_last_log_line_is_dropped_with_a_warning_naming_the_file(tmp_path):
    from adaad.train import end_epoch, start_run, train, train_epoch
    cfg = tiny_config(save_every=0)
    run = start_run(cfg, out_dir=tmp_path, device='cpu', progress=False, data=tiny_data())
    end_epoch(run, 0, train_epoch(run, 0)); run.close()
    log = tmp_path / 'metrics.jsonl'
    with open(log, 'a') as f: f.write('{"epoch": 1, "lr": 0.1, "loss"')          # a kill in the middle of an append
    with pytest.warns(UserWarning, match=re.escape(f'{log}: dropping its torn last line')):
        r = train(cfg, out_dir=tmp_path, device='cpu', progress=False, data=tiny_data())
    assert r['status'] == 'done' and [json.loads(l)['epoch'] for l in log.read_text().splitlines()] == [0, 1]


def test_a_damaged_log_line_before_the_last_names_the_file_and_line(tmp_path):
    from adaad.train import read_log
    (tmp_path / 'metrics.jsonl').write_text('{"epoch": 0}\n{"epo\n{"epoch": 1}\n')
    with pytest.raises(ValueError, match=r'metrics.jsonl, line 2, is not JSON'): read_log(tmp_path / 'metrics.jsonl')


def _pieces_eval(model, x, y, d):
    from adaad.evaluate import evaluate
    return evaluate(model, x, y, suite=['clean', 'pgd10'], batch_size=8, shard_size=16, pieces_dir=d, progress=False)


@pytest.mark.parametrize('damage, why', [
    (lambda f: f.write_text(f.read_text()[:40]), 'it is unreadable'),                                      # truncated
    (lambda f: f.write_text(json.dumps(dict(json.loads(f.read_text()), correct=[True] * 16))), 'does not match its digest'),  # edited
    (lambda f: f.write_text(json.dumps({k: v for k, v in json.loads(f.read_text()).items() if k != 'sha256'})), 'carries no digest')])
def test_a_damaged_evaluation_piece_is_computed_again_saying_so(tmp_path, damage, why):
    model, x, y = brightest_channel(48)
    with torch.no_grad(): model[2].weight.mul_(0.01)          # a weak model: PGD beats some images, so an edit shows
    first = _pieces_eval(model, x, y, tmp_path)
    assert not first.correct['pgd10'][:16].all()
    damage(tmp_path / 'pgd10-0-16.json')
    with pytest.warns(UserWarning, match=rf'evaluation piece .*pgd10-0-16.json: .*{why}.*computing it again'):
        again = _pieces_eval(model, x, y, tmp_path)
    assert torch.equal(again.correct['pgd10'], first.correct['pgd10'])


def test_a_piece_of_another_model_is_computed_again_saying_so(tmp_path):
    model, x, y = brightest_channel(48)
    _pieces_eval(model, x, y, tmp_path)
    with torch.no_grad(): model[2].weight.mul_(0.5)
    with pytest.warns(UserWarning, match=r'computed for other inputs'): _pieces_eval(model, x, y, tmp_path)


# ---- non-finite networks --------------------------------------------------------------------------------------------
def test_evaluate_refuses_a_network_with_nan_weights_naming_the_tensor():
    from adaad.evaluate import evaluate
    model, x, y = brightest_channel(16)
    with torch.no_grad(): model[2].bias[3] = float('nan')
    with pytest.raises(ValueError, match=r"model has non-finite weights \(first: '2.bias'\)"):
        evaluate(model, x, y, suite=['clean'], batch_size=8, progress=False)


def test_a_teacher_with_nan_weights_is_refused_before_any_batch(tmp_path):
    from adaad.models import create_model
    from adaad.train import train
    t = create_model('wrn-10-1')
    with torch.no_grad(): t.fc.weight[0, 0] = float('inf')
    with pytest.raises(ValueError, match=r"teacher has non-finite weights \(first: 'fc.weight'\)"):
        train(tiny_config(method='adaad', epochs=1), teacher=t, out_dir=tmp_path, device='cpu', progress=False, data=tiny_data())
    assert not (tmp_path / 'metrics.jsonl').exists()


def test_eval_of_a_nan_checkpoint_names_the_file(tmp_path, capsys):
    from adaad.checkpoint import atomic_save
    from adaad.models import create_model
    sd = create_model('wrn-10-1').state_dict(); sd['fc.bias'][0] = float('nan')
    atomic_save(sd, tmp_path / 'nan.pt')
    code, _, err = _cli(['eval', '--ckpt', str(tmp_path / 'nan.pt'), '--arch', 'wrn-10-1', '--device', 'cpu'], capsys)
    assert code == 2 and f'refusing {tmp_path / "nan.pt"}: it holds non-finite weights (first: \'fc.bias\')' in err, err


# ---- values a method gives no meaning ------------------------------------------------------------------------------
@pytest.mark.parametrize('method, kw, msg', [
    ('trades', dict(kl_weight=-6.), r"trades: kl_weight must be >= 0 \(the weight of the robustness KL term"),
    ('adaad', dict(adv_share=-1.), r'adaad: adv_share must be in \[0, 1\] \(the share of the adversarial KL'),
    ('ard', dict(kl_share=2.), r'ard: kl_share must be in \[0, 1\] \(the share of the KL term'),
    ('iad', dict(reliability_exponent=-0.1), r"iad: reliability_exponent must be >= 0 \(the exponent of the teacher's reliability"),
    ('adaiad', dict(begin=-2), r'adaiad: begin must be >= 0 \(the first epoch'),
    ('akd', dict(robust_kl_share=0.9, standard_kl_share=0.2), r'akd: robust_kl_share \+ standard_kl_share must be <= 1'),
    ('akd-maroto', dict(kl_share=1.5), r'akd-maroto: kl_share must be in \[0, 1\]'),
    ('mmard', dict(triangle_weight=-1.), r'mmard: triangle_weight must be >= 0'),
    ('igdm', dict(matching_weight=-1.), r'igdm: matching_weight must be >= 0 \(gamma, the weight of the gradient-matching term'),
    ('fair-ard', dict(class_weight_exponent=-2.), r"fair-ard: class_weight_exponent must be >= 0 \(beta"),
    ('fair-ard', dict(base='natural'), r"fair-ard: base 'natural' has no inner maximisation")])
def test_method_fields_outside_their_meaning_are_refused(method, kw, msg):
    from adaad.methods import get_method
    from adaad.train import TrainConfig, resolve
    with pytest.raises(ValueError, match=msg): get_method(method, **kw)
    with pytest.raises(ValueError, match=msg): resolve(TrainConfig(method=method, method_kwargs=kw))


def test_cli_refuses_options_the_method_ignores(capsys):
    code, _, err = _cli(['train', '--method', 'natural', '--eps', '4/255'], capsys)
    assert code == 2 and '--method natural has no inner maximisation: --eps would be ignored' in err, err
    code, _, err = _cli(['train', '--method', 'pgd-at', '--teacher', 't.pt', '--teacher-arch', 'wrn-10-1'], capsys)
    assert code == 2 and '--method pgd-at reads no teacher: drop --teacher' in err, err


def test_a_teacher_given_to_a_method_without_one_is_refused(tmp_path):
    from adaad.models import create_model
    from adaad.train import train
    with pytest.raises(ValueError, match=r"method 'pgd-at' reads no teacher; got teacher="):
        train(tiny_config(), teacher=create_model('wrn-10-1'), out_dir=tmp_path, device='cpu', progress=False, data=tiny_data())


@pytest.mark.parametrize('dataset', ['CIFAR10', 'imagenet'])
def test_load_teacher_checks_the_dataset_name(tmp_path, dataset):
    from adaad.checkpoint import atomic_save, load_teacher
    from adaad.models import create_model
    atomic_save(create_model('wrn-10-1').state_dict(), tmp_path / 'w.pt')
    with pytest.raises(ValueError, match=rf"dataset must be one of 'cifar10', 'cifar100'; got '{dataset}'"):
        load_teacher(tmp_path / 'w.pt', arch='wrn-10-1', dataset=dataset)


def test_statistics_parameters_are_checked():
    from adaad.stats import bootstrap_ci, compare, per_class
    a, b = torch.rand(50) > 0.3, torch.rand(50) > 0.5
    with pytest.raises(ValueError, match=r'n_boot must be an integer >= 1, got 0'): compare(a, b, n_boot=0)
    with pytest.raises(ValueError, match=r'level must be a number in \(0, 1\)'): bootstrap_ci(a, b, level=95)
    with pytest.raises(ValueError, match=r'labels must be < num_classes = 10, got label 10'): per_class([1, 0, 1], [0, 10, 3], num_classes=10)
    with pytest.raises(ValueError, match=r'labels must be >= 0'): per_class([1, 0], [0, -1])


def test_subset_sizes_name_their_field():
    from adaad.train import split_run_data
    tr, va = tiny_data()
    with pytest.raises(ValueError, match=r'train_n must be an integer in \[10, 86\] .*got 5'):
        split_run_data(tiny_config(train_n=5, val_n=10), tr)
    with pytest.raises(ValueError, match=r'val_n must be an integer in \[10, 96\] .*got 200'):
        split_run_data(tiny_config(val_n=200), tr)


# ---- outputs checked before the work, and kept after it ---------------------------------------------------------------
@pytest.fixture
def no_evaluation(monkeypatch):
    "Make `adaad.evaluate.evaluate` fail the test if called: a refusal must come before the work."
    import adaad.evaluate
    def evaluate(*a, **k): raise AssertionError('the evaluation ran before the refusal')
    monkeypatch.setattr(adaad.evaluate, 'evaluate', evaluate)


@pytest.fixture
def ckpt(tmp_path):
    from adaad.checkpoint import atomic_save
    from adaad.models import create_model
    torch.manual_seed(0)
    return str(atomic_save(create_model('wrn-10-1').state_dict(), tmp_path / 'w.pt'))


def test_model_info_without_aa_is_refused_before_the_evaluation(tmp_path, capsys, no_evaluation, ckpt):
    code, _, err = _cli(['eval', '--ckpt', ckpt, '--arch', 'wrn-10-1', '--suite', 'clean,pgd10', '--model-info', str(tmp_path / 'mi.json')], capsys)
    assert code == 2 and '--model-info needs aa in --suite' in err, err


@pytest.mark.parametrize('flag', ['--out', '--model-info', '--pieces'])
def test_unwritable_outputs_are_refused_before_the_evaluation(tmp_path, capsys, no_evaluation, ckpt, flag):
    (tmp_path / 'file').write_text('a file, not a folder')
    bad = str(tmp_path / 'file' / 'sub' / 'x.json')
    code, _, err = _cli(['eval', '--ckpt', ckpt, '--arch', 'wrn-10-1', '--suite', 'clean,aa', flag, bad, '--device', 'cpu'], capsys)
    assert code == 1 and f'{flag}: cannot write in' in err and 'Traceback' not in err, err


def test_an_unwritable_run_folder_is_refused_before_the_data(tmp_path, capsys):
    (tmp_path / 'file').write_text('x')
    code, _, err = _cli(['train', '--method', 'natural', '--out', str(tmp_path / 'file' / 'run'), '--data-root', str(tmp_path / 'none')], capsys)
    assert code == 1 and '--out: cannot write in' in err, err


def test_eval_prints_its_result_with_flags_first_and_keeps_it_when_the_write_fails(tmp_path, capsys, data_root, ckpt, monkeypatch):
    from adaad.evaluate import EvalResult
    def full(self, path): raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(EvalResult, 'to_json', full); monkeypatch.chdir(tmp_path)
    code, out, err = _cli(['eval', '--ckpt', ckpt, '--arch', 'wrn-10-1', '--suite', 'clean', '--n', '10', '--batch-size', '10',
                           '--data-root', str(data_root), '--device', 'cpu', '--no-progress', '--out', str(tmp_path / 'r.json')], capsys)
    row = json.loads(out.strip().splitlines()[-1])
    assert set(row) == {'clean', 'worst', 'flags'} and isinstance(row['flags'], list)
    assert code == 1 and 'No space left on device' in err and 'free some disk space' in err and 'Traceback' not in err, err
    kept = sorted(tmp_path.glob('adaad-eval-*.json'))
    assert len(kept) == 1 and str(kept[0].name) in err and json.loads(kept[0].read_text())['accuracy']['clean'] == row['clean']


# ---- one message, no traceback ------------------------------------------------------------------------------------
def test_an_absent_device_is_named_before_any_work(tmp_path, capsys, ckpt):
    dev = 'cuda:99' if torch.cuda.is_available() else 'cuda'
    for args in (['train', '--method', 'natural', '--out', str(tmp_path / 'r')], ['eval', '--ckpt', ckpt, '--arch', 'wrn-10-1']):
        code, _, err = _cli(args + ['--device', dev], capsys)
        assert code == 2 and f"--device '{dev}' is not available" in err and 'Traceback' not in err, err
    assert not (tmp_path / 'r' / 'identity.json').exists()


def test_a_diverging_loss_ends_in_one_message_without_a_false_last_checkpoint(tmp_path, capsys, data_root):
    code, _, err = _cli(['teacher', '--method', 'natural', '--arch', 'wrn-10-1', '--lr', '1e30', '--epochs', '1', '--train-n', '40',
                         '--val-n', '10', '--batch-size', '10', '--data-root', str(data_root), '--device', 'cpu', '--no-progress',
                         '--out', str(tmp_path / 'r')], capsys)
    assert code == 1 and 'non-finite' in err and 'Traceback' not in err and 'Last good checkpoint' not in err, err
    code, _, err = _cli(['--debug', 'teacher', '--method', 'natural', '--arch', 'wrn-10-1', '--lr', '1e30', '--epochs', '1', '--train-n', '40',
                         '--val-n', '10', '--batch-size', '10', '--data-root', str(data_root), '--device', 'cpu', '--no-progress',
                         '--out', str(tmp_path / 'r')], capsys)
    assert code == 1 and 'Traceback' in err, err[-500:]


def test_a_full_disk_while_checkpointing_ends_in_one_message(tmp_path, capsys, data_root, monkeypatch):
    real = torch.save
    def full(obj, f, *a, **k):
        if hasattr(f, 'write'): raise RuntimeError('[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed')
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', full)
    code, _, err = _cli(['teacher', '--method', 'natural', '--arch', 'wrn-10-1', '--epochs', '1', '--train-n', '20', '--val-n', '10',
                         '--batch-size', '10', '--data-root', str(data_root), '--device', 'cpu', '--no-progress', '--out', str(tmp_path / 'r')], capsys)
    assert code == 1 and 'the disk may be full' in err and str(tmp_path / 'r') in err and 'Traceback' not in err, err


def test_a_single_attack_name_is_a_suite(tmp_path, capsys, data_root, ckpt):
    from adaad.cli import main
    main(['eval', '--ckpt', ckpt, '--arch', 'wrn-10-1', '--suite', 'clean', '--n', '10', '--batch-size', '10',
          '--data-root', str(data_root), '--device', 'cpu', '--no-progress'])
    assert set(json.loads(capsys.readouterr().out.strip().splitlines()[-1])) == {'clean', 'worst', 'flags'}
    code, _, err = _cli(['eval', '--ckpt', ckpt, '--arch', 'wrn-10-1', '--suite', 'clean,pgd7'], capsys)
    assert code == 2 and "--suite: suite lists unknown attack 'pgd7'" in err, err


# ---- no output replaces an input or another table ------------------------------------------------------------------
@pytest.mark.parametrize('flag', ['--out', '--model-info'])
def test_an_eval_output_that_is_its_checkpoint_is_refused_naming_both(tmp_path, capsys, no_evaluation, ckpt, flag):
    before = Path(ckpt).read_bytes()
    same = str(Path(ckpt).parent / '.' / Path(ckpt).name)
    args = ['eval', '--ckpt', ckpt, '--arch', 'wrn-10-1', '--suite', 'clean,aa', flag, same, '--device', 'cpu']
    code, _, err = _cli(args, capsys)
    assert code == 2 and f'{flag} {same} is the same file as --ckpt {ckpt}' in err and 'Traceback' not in err, err
    assert Path(ckpt).read_bytes() == before


def _table_folder(folder, preset='quick', dry_run=False, rows=()):
    "A results folder holding a results.json of `preset` (with `rows`), as adaad table writes it."
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'results.json').write_text(json.dumps(dict(preset=preset, dry_run=dry_run, rows=list(rows))))
    return folder


def test_compare_refuses_to_write_over_a_file_it_reads(tmp_path, capsys):
    row = dict(student='RN-18', arch='resnet18', method='adaad', seed=0, eval='evals/a.json')
    f = _table_folder(tmp_path / 'F', rows=[row])
    before = (f / 'results.json').read_text()
    for out, what in [(f / 'results.json', 'FOLDER'), (f / 'evals' / 'a.json', 'the evaluation file of row RN-18/adaad in FOLDER')]:
        code, _, err = _cli(['compare', str(f), 'adaad:pgd-at', '--out', str(out)], capsys)
        assert code == 2 and f'--out {out} is the same file as {what}' in err and 'Traceback' not in err, err
    assert (f / 'results.json').read_text() == before


@pytest.mark.parametrize('text, msg', [('{"rows": [', 'is not JSON'), ('{"preset": "quick"}', "has no list of table rows ('rows'"),
                                       ('[1, 2]', "has no list of table rows")])
def test_compare_names_a_malformed_results_file(tmp_path, capsys, text, msg):
    (tmp_path / 'F').mkdir(); (tmp_path / 'F' / 'results.json').write_text(text)
    code, _, err = _cli(['compare', str(tmp_path / 'F'), 'adaad:pgd-at'], capsys)
    assert code == 2 and f"FOLDER: {tmp_path / 'F' / 'results.json'} " in err and msg in err, err
    assert 'Traceback' not in err


@pytest.mark.parametrize('preset, dry_run', [('quick', False), ('smoke', True)])
def test_table_refuses_a_results_folder_of_another_table(tmp_path, capsys, preset, dry_run):
    f = _table_folder(tmp_path / 'res', preset=preset, dry_run=dry_run)
    code, _, err = _cli(['table', '--preset', 'quick', '--dry-run', '--out', str(f), '--runs', str(tmp_path / 'runs')],
                        capsys)
    held = f"preset {preset!r}{' (a dry run)' if dry_run else ''}"
    assert code == 2 and f"{f} holds the table of {held}; this is preset 'quick' (a dry run)" in err, err
    assert sorted(p.name for p in f.iterdir()) == ['results.json'] and not (tmp_path / 'runs').exists()


def test_table_refuses_the_committed_results_folder_without_commit(tmp_path, capsys, monkeypatch):
    "Only `--commit` (never with `--dry-run`) writes into the repository's results/; the other checks still apply then."
    import adaad.repro
    monkeypatch.setattr(adaad.repro, 'repo_root', lambda: tmp_path)
    f = _table_folder(tmp_path / 'results' / 'smoke', preset='quick')
    args = ['table', '--preset', 'smoke', '--out', str(f), '--runs', str(tmp_path / 'runs')]
    code, _, err = _cli(args, capsys)
    assert code == 2 and f"--out {f} lies in {tmp_path / 'results'}, the committed results: give --commit" in err, err
    code, _, err = _cli(args + ['--commit', '--dry-run'], capsys)
    assert code == 2 and 'drop --commit' in err, err
    code, _, err = _cli(args + ['--commit'], capsys)
    assert code == 2 and f"{f} holds the table of preset 'quick'; this is preset 'smoke'" in err, err
    assert sorted(p.name for p in f.iterdir()) == ['results.json'] and not (tmp_path / 'runs').exists()


def test_table_folders_default_to_runs_in_the_working_folder_and_the_same_table_resumes(tmp_path, monkeypatch):
    from adaad.repro import _table_plan
    monkeypatch.chdir(tmp_path)
    here = Path.cwd() / 'runs'
    assert _table_plan('smoke', None, None, False)[1:3] == (here / 'results' / 'smoke', here / 'repro' / 'smoke')
    _table_folder(here / 'results' / 'smoke', preset='smoke')
    assert _table_plan('smoke', None, None, False)[1] == here / 'results' / 'smoke'   # the same table into its folder
    dry = _table_plan('quick', None, None, True)[1:3]
    assert dry == (here / 'results' / 'quick-dry-run', here / 'repro' / 'quick-dry-run')


# ---- Ctrl-C, failing imports, full disks: one message ---------------------------------------------------------------
def _interrupt(args, started, cwd):
    "Run `adaad ARGS` in a fresh process, send it SIGINT once `started()` holds: (exit code, stdout, stderr)."
    import signal
    path = os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)   # a shell's background job ignores SIGINT
    p = subprocess.Popen([sys.executable, '-m', 'adaad.cli', *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=path),
                         preexec_fn=default_sigint)
    t0 = time.time()
    while not started() and p.poll() is None and time.time() - t0 < 300: time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    return p.returncode, out, err


@pytest.mark.skipif(sys.platform == 'win32', reason='SIGINT to a child process')
def test_ctrl_c_during_training_pauses_and_names_the_command_that_resumes(tmp_path, data_root):
    run = tmp_path / 'run'
    args = ['teacher', '--method', 'natural', '--arch', 'wrn-10-1', '--epochs', '50', '--train-n', '100', '--val-n',
            '10', '--batch-size', '10', '--data-root', str(data_root), '--device', 'cpu', '--no-progress',
            '--out', str(run)]
    code, out, err = _interrupt(args, lambda: (run / 'metrics.jsonl').exists(), tmp_path)
    assert code == 130 and 'Traceback' not in err + out, err
    assert f'paused: its last checkpoint (last.pt) is kept in {run}' in err and (run / 'last.pt').exists(), err
    again = err.strip().splitlines()[-1].strip()
    assert again.startswith(f'cd {tmp_path} && adaad ') and again.split('&& adaad ')[1].split() == args, again


@pytest.mark.skipif(sys.platform == 'win32', reason='SIGINT to a child process')
def test_ctrl_c_during_an_evaluation_pauses_and_names_the_command_that_resumes(tmp_path, data_root, ckpt):
    pieces = tmp_path / 'pieces'
    args = ['eval', '--ckpt', ckpt, '--arch', 'wrn-10-1', '--suite', 'clean,pgd10', '--n', '1000', '--batch-size', '10',
            '--shard-size', '10', '--pieces', str(pieces), '--data-root', str(data_root), '--device', 'cpu',
            '--no-progress']
    code, out, err = _interrupt(args, lambda: any(pieces.glob('pgd10-*.json')), tmp_path)
    assert code == 130 and 'Traceback' not in err + out, err
    assert f'paused: its finished pieces are kept in {pieces}; this command resumes it' in err, err
    assert f"cd {tmp_path} && adaad {' '.join(args)}" in err, err


@pytest.mark.parametrize('kind, source, last', [
    ('raises', 'raise RuntimeError("first line\\nthe last line")', 'RuntimeError: the last line'),
    ('syntax', 'def broken(:\n', 'SyntaxError: '),
    ('taken', 'from adaad.methods import Method, register\n@register\nclass Mine(Method): name = "adaad"\n',
     "ValueError: method name 'adaad' is already registered by adaad.methods.")])
def test_a_failing_import_names_the_module_and_the_error(tmp_path, capsys, monkeypatch, kind, source, last):
    mod = f'user_mod_{kind}'
    (tmp_path / f'{mod}.py').write_text(source); monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = _cli(['--import', mod, 'train', '--method', 'natural'], capsys)
    assert code == 2 and f'--import {mod}: {last}' in err and '--debug' in err and 'Traceback' not in err, err
    code, _, err = _cli(['train', '--import', mod, '--debug'], capsys)
    assert code == 2 and 'Traceback' in err and f'--import {mod}: {last}' in err, err


def _tiny_teacher(data_root, out):
    "The arguments of a one-epoch natural training of a tiny network into `out`."
    return ['teacher', '--method', 'natural', '--arch', 'wrn-10-1', '--epochs', '1', '--train-n', '20', '--val-n', '10',
            '--batch-size', '10', '--data-root', str(data_root), '--device', 'cpu', '--no-progress', '--out', str(out)]


def test_a_full_disk_named_by_torch_only_is_named_as_such(tmp_path, capsys, data_root, monkeypatch):
    "torch's own message for a save that ran out of space ('unexpected pos') says the disk may be full, naming the file."
    def full(obj, f, *a, **k): raise RuntimeError('[enforce fail at inline_container.cc:603] . unexpected pos 8832 vs 8720')
    monkeypatch.setattr(torch, 'save', full)
    code, _, err = _cli(_tiny_teacher(data_root, tmp_path / 'r'), capsys)
    assert code == 1 and 'the disk may be full' in err and str(tmp_path / 'r') in err and 'Traceback' not in err, err


def test_a_full_disk_while_logging_names_the_run_folder(tmp_path, capsys, data_root, monkeypatch):
    import adaad.train
    def full(path, row): raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(adaad.train, '_log', full)
    code, _, err = _cli(_tiny_teacher(data_root, tmp_path / 'r'), capsys)
    assert code == 1 and f"No space left on device: {tmp_path / 'r'} (the run folder); free some disk space" in err, err
    assert 'Traceback' not in err


# ---- file modes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('mask, mode', [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, mask, mode):
    from adaad.checkpoint import atomic_save
    from adaad.core import write_json
    old = os.umask(mask)
    try: files = [atomic_save({'w': torch.ones(2)}, tmp_path / 'c.pt', checksum=True), write_json(tmp_path / 'r.json', {'a': 1})]
    finally: os.umask(old)
    assert [oct(f.stat().st_mode & 0o777) for f in files] == [oct(mode)] * 2



# ---- every attack's output is checked before it is scored ---------------------------------------------------------------
def _blank(model, x, y, eps=8/255): return torch.zeros_like(x)
def _nan(model, x, y, eps=8/255): return torch.full_like(x, float('nan'))
def _beyond(model, x, y, eps=8/255): return (x + 2 * eps * torch.randn_like(x).sign()).clamp(0, 1)
def _l2_far(model, x, y, eps=0.5): return (x + 0.2).clamp(0, 1)
def _whole_blank(model, x, y, eps=8/255, seed=0, batch_size=500, device=None): return torch.zeros_like(x)
def _corner(model, x, y, eps=8/255):
    from adaad.attacks import project_linf
    return project_linf(x + eps * torch.randn_like(x).sign(), x, eps)


@pytest.mark.parametrize('fn, norm, whole, msg', [
    (_blank, 'linf', False, r"attack 'user-attack' exceeds its declared budget \(linf eps=0.0313725 = 8/255\): example \d+ moved"),
    (_nan, 'linf', False, r"attack 'user-attack' returned \d+ NaN/inf pixel values"),
    (_beyond, 'linf', False, r"attack 'user-attack' exceeds its declared budget .* moved 0.0627\d* = 16/255 in linf norm"),
    (_l2_far, 'l2', False, r"attack 'user-attack' exceeds its declared budget \(l2 eps=0.5 = 127.5/255\)"),
    (_whole_blank, 'linf', True, r"attack 'user-attack' exceeds its declared budget")])
def test_a_registered_attack_that_leaves_its_budget_or_returns_nan_is_refused(fn, norm, whole, msg):
    "A user's attack returning blank or NaN images, or points outside its declared ball, is refused, not scored."
    from adaad.attacks import ATTACKS, register_attack
    from adaad.evaluate import evaluate
    model, x, y = brightest_channel(16)
    register_attack('user-attack', fn, white_box=False, multi_step=False, norm=norm, budget='eps', whole=whole)
    try:
        with pytest.raises(ValueError, match=msg): evaluate(model, x, y, suite=['clean', 'user-attack'], batch_size=8, progress=False)
    finally: ATTACKS.pop('user-attack')


def test_an_attack_within_its_budget_is_scored():
    from adaad.attacks import ATTACKS, register_attack
    from adaad.evaluate import evaluate
    model, x, y = brightest_channel(16)
    register_attack('user-corner', _corner, white_box=False, multi_step=False, norm='linf', budget='eps')
    try: r = evaluate(model, x, y, suite=['clean', 'user-corner', 'pgd10'], batch_size=8, progress=False)
    finally: ATTACKS.pop('user-corner')
    assert r.accuracy['clean'] == 100 and 0 <= r.accuracy['user-corner'] <= 100


# ---- stored results carry a digest, checked by every reader ------------------------------------------------------------
def _sealed_folder(folder, accs):
    "A results folder written as the table writes it: sealed `evals/<m>.json` and `results.json` for rows {method: correct}."
    from adaad.core import write_sealed
    from adaad.evaluate import EvalResult
    rows = []
    for m, c in accs.items():
        r = EvalResult.from_correct({'clean': c, 'aa': c}, labels=torch.zeros(len(c), dtype=torch.long))
        write_sealed(folder / 'evals' / f'{m}.json', dict(key=dict(n=len(c)), wall_s=0, result=r.to_dict()), indent=None)
        rows.append(dict(student='S', arch='x', method=m, seed=0, n=len(c), eval=f'evals/{m}.json', cells={}))
    write_sealed(folder / 'results.json', dict(rows=rows, git=None, config=dict(suite=['clean', 'aa'])))
    return folder


def test_an_edited_or_truncated_evaluation_file_is_refused_by_name(tmp_path, capsys):
    from adaad.report import compare_pairs
    a, b = torch.arange(200) < 120, torch.arange(200) < 100
    _sealed_folder(tmp_path, dict(x=a, y=b))
    assert compare_pairs(tmp_path, ['x:y'], student='S', n_boot=100)['pairs']['x:y']['aa']['diff'] == pytest.approx(10)
    f = tmp_path / 'evals' / 'y.json'
    good = f.read_text()
    f.write_text(good.replace('"aa": [true', '"aa": [false', 1))                       # one image's result edited
    with pytest.raises(ValueError, match=rf'{re.escape(str(f))} does not match its sha256 digest'):
        compare_pairs(tmp_path, ['x:y'], student='S', n_boot=100)
    code, _, err = _cli(['compare', str(tmp_path), 'x:y', '--student', 'S'], capsys)
    assert code == 2 and str(f) in err and 'edited or damaged' in err, err
    f.write_text(good[:len(good) // 2])                                                 # truncated
    with pytest.raises(ValueError, match=rf'{re.escape(str(f))} is damaged \(not valid JSON'):
        compare_pairs(tmp_path, ['x:y'], student='S', n_boot=100)


def test_an_edited_results_file_is_refused_and_an_old_one_without_digest_is_read_with_a_warning(tmp_path):
    from adaad.report import load_results
    _sealed_folder(tmp_path, dict(x=torch.ones(10, dtype=torch.bool)))
    f = tmp_path / 'results.json'
    d = json.loads(f.read_text())
    f.write_text(json.dumps(dict(d, git='edited')))
    with pytest.raises(ValueError, match=rf'results file {re.escape(str(f))} does not match its sha256 digest'): load_results(tmp_path)
    f.write_text(json.dumps({k: v for k, v in d.items() if k != 'sha256'}))
    with pytest.warns(UserWarning, match=rf'{re.escape(str(f))} carries no sha256 digest'): assert load_results(tmp_path)['git'] is None


def test_the_tables_evaluation_cache_refuses_an_edited_file_and_reuses_an_intact_one(tmp_path):
    from adaad.models import create_model
    from adaad.repro import cached_eval
    tr, _ = tiny_data(n=8)
    torch.manual_seed(0); model = create_model('wrn-10-1').eval()
    ck = tmp_path / 'w.pt'; ck.write_bytes(b'weights')
    path = tmp_path / 'evals' / 'm.json'
    r, c = cached_eval(model, tr, ck, path, ['clean'], {}, batch_size=8, device='cpu')
    assert not c['cached'] and cached_eval(model, tr, ck, path, ['clean'], {}, batch_size=8, device='cpu')[1]['cached']
    d = json.loads(path.read_text()); d['result']['accuracy']['clean'] += 50
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=rf'evaluation file {re.escape(str(path))} does not match its sha256 digest'):
        cached_eval(model, tr, ck, path, ['clean'], {}, batch_size=8, device='cpu')


# ---- every record says what ran ---------------------------------------------------------------------------------------
def test_model_info_records_the_evaluated_eps(tmp_path, capsys, data_root, ckpt, monkeypatch):
    import adaad.evaluate
    from adaad.evaluate import EvalResult, resolve_suite
    seen = {}
    def fake(model, data, suite, eps=None, **kw):
        seen['eps'] = eps
        c = torch.ones(len(data), dtype=torch.bool)
        return EvalResult.from_correct({'clean': c, 'aa': c}, config=dict(suite=[s.config() for s in resolve_suite(suite, eps=eps)]))
    monkeypatch.setattr(adaad.evaluate, 'evaluate', fake)
    from adaad.cli import main
    main(['eval', '--ckpt', ckpt, '--arch', 'wrn-10-1', '--suite', 'clean,aa', '--eps', '4/255', '--n', '10', '--data-root', str(data_root),
          '--device', 'cpu', '--no-progress', '--model-info', str(tmp_path / 'mi.json')])
    info = json.loads((tmp_path / 'mi.json').read_text())
    assert seen['eps'] == 4 / 255 and info['eps'] == '4/255' and info['adaad']['eps'] == 4 / 255


def test_a_combined_run_records_the_start_its_inner_maximisation_ran_from():
    from adaad.methods import get_method
    from adaad.train import TrainConfig, build_method, resolve_run
    cfg, m = resolve_run(TrainConfig(method='pgd-at', inner='adaad', epochs=2))
    assert m.budget.init == 'gaussian' and cfg.method_kwargs['init'] == 'gaussian'      # pgd-at's own start is gaussian_clipped
    assert build_method(cfg).budget == m.budget                                           # the run rebuilt from its record
    assert get_method('pgd-at').hparams()['init'] == 'gaussian_clipped'


def test_a_resumed_epoch_logs_the_loss_of_the_uninterrupted_run(tmp_path):
    "A run paused mid-epoch (time limit, with the checkpoints of save_every) and resumed logs the losses and weights of one never stopped."
    from adaad.train import read_log, train
    cfg = tiny_config(epochs=2, save_every=2)
    whole = train(cfg, out_dir=tmp_path / 'whole', device='cpu', progress=False, data=tiny_data())
    assert train(cfg, out_dir=tmp_path / 'cut', device='cpu', progress=False, data=tiny_data(), time_limit=1e-9)['status'] == 'paused'
    st = torch.load(tmp_path / 'cut' / 'last.pt', weights_only=True)
    assert st['epoch'] == 0 and st['step'] == 1 and len(st['losses']) == 1
    cut = train(cfg, out_dir=tmp_path / 'cut', device='cpu', progress=False, data=tiny_data())
    rows = [[r for _, r in read_log(tmp_path / k / 'metrics.jsonl')] for k in ('whole', 'cut')]
    assert [r['loss'] for r in rows[1]] == [r['loss'] for r in rows[0]] and len(rows[0]) == 2
    assert all(torch.equal(a, b) for a, b in zip(whole['model'].state_dict().values(), cut['model'].state_dict().values()))


def test_validation_attacks_at_the_runs_eps(tmp_path, monkeypatch):
    import adaad.train
    seen, validate = [], adaad.train.validate
    def spy(model, val, eps=None, **kw):
        seen.append(eps); return validate(model, val, eps=eps, **kw)
    monkeypatch.setattr(adaad.train, 'validate', spy)
    adaad.train.train(tiny_config(epochs=1, milestones=(), eps=16/255, step_size=4/255), out_dir=tmp_path / 'a', device='cpu',
                      progress=False, data=tiny_data())
    adaad.train.train(tiny_config(method='natural', epochs=1, milestones=(), steps=None), out_dir=tmp_path / 'b', device='cpu',
                      progress=False, data=tiny_data())
    assert seen == [16 / 255, 8 / 255]

if __name__ == '__main__':
    _worker(sys.argv[1])
