"""Faults and security: runs killed with SIGKILL (mid-epoch, mid-checkpoint-write) resume to the weights of an
uninterrupted run; corrupt or truncated checkpoints are refused and resume falls back to the previous one; a NaN
loss stops the run naming the epoch and batch without overwriting the last good checkpoint; every `torch.load`
is `weights_only=True`; malicious pickles are refused on every load path; nothing in the package reaches a shell.

Run as a script (`python tests/test_faults.py OUT MODE`) this file is the worker the kill tests start."""
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / 'adaad'

pytestmark = pytest.mark.usefixtures('one_thread')


# ---- the worker: a tiny deterministic PGD-AT run that checkpoints after every step --------------------------------
def tiny_data(n=96, val=32, seed=0):
    "Synthetic CIFAR-shaped splits (uint8 images, 10 classes), identical in every process."
    from adaad.data import CifarSplit
    g = torch.Generator().manual_seed(seed)
    mk = lambda k, split: CifarSplit(torch.randint(0, 256, (k, 3, 32, 32), dtype=torch.uint8, generator=g),
                                     torch.arange(k) % 10, 10, 'cifar10', split)
    return mk(n, 'train'), mk(val, 'val')


def tiny_config(**kw):
    from adaad.train import TrainConfig
    return TrainConfig(**{**dict(method='pgd-at', student='wrn-10-1', epochs=2, batch_size=16, steps=1, val_n=32,
                                 val_steps=1, milestones=(1,), save_every=1), **kw})


def _die(): os.kill(os.getpid(), signal.SIGKILL)


def _arm(mode):
    "Make this process SIGKILL itself at the K-th `os.fsync`, `os.replace` or `torch.save` (half the bytes written)."
    if mode == 'none': return
    what, k = mode.split(':'); k = int(k); calls = [0]
    def hit():
        calls[0] += 1
        return calls[0] == k
    if what == 'fsync':
        real = os.fsync
        def fsync(fd):
            if hit(): _die()
            return real(fd)
        os.fsync = fsync
    elif what == 'replace':
        real = os.replace
        def replace(a, b):
            if hit(): _die()
            return real(a, b)
        os.replace = replace
    elif what == 'save':
        import io
        real = torch.save
        def save(obj, f, *a, **kw):
            if not hit(): return real(obj, f, *a, **kw)
            buf = io.BytesIO(); real(obj, buf, *a, **kw); b = buf.getvalue()
            f.write(b[:len(b) // 2]); f.flush(); _die()
        torch.save = save
    elif what != 'none': raise ValueError(mode)


def worker(out, mode='none', save_every=1):
    "The tiny run; counts the training steps this process executes and prints them (a resume runs fewer than a restart)."
    torch.set_num_threads(1)
    _arm(mode)
    import adaad.methods as M
    from adaad.train import train
    steps, real = [0], M.training_loss
    def counted(*a, **k):
        steps[0] += 1; return real(*a, **k)
    M.training_loss = counted
    train(tiny_config(save_every=save_every), out_dir=out, device='cpu', progress=False, data=tiny_data())
    print(f'FINISHED STEPS {steps[0]}', file=sys.stderr, flush=True)

TOTAL_STEPS = 12          # 96 images / 16 per batch x 2 epochs


def steps_run(err):
    "The training steps the worker process executed, from its output."
    m = re.search(r'FINISHED STEPS (\d+)', err)
    assert m, err[-2000:]
    return int(m[1])


def run_worker(out, mode='none', timeout=300, save_every=1):
    "Run the worker in a fresh process; (returncode, stderr)."
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, __file__, str(out), mode, str(save_every)], capture_output=True, text=True, timeout=timeout, env=env)
    return p.returncode, p.stderr


def start_worker(out, save_every=1):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, __file__, str(out), 'none', str(save_every)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)


def final_state(out):
    from adaad.checkpoint import read_checkpoint
    return read_checkpoint(Path(out) / 'final.pt')['state_dict']


def assert_same(a, b):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f'{len(bad)} tensors differ, e.g. {bad[:3]}'


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    "Final weights of the uninterrupted worker run."
    out = tmp_path_factory.mktemp('ref')
    rc, err = run_worker(out)
    assert rc == 0, err[-2000:]
    return final_state(out)


def _kill_at_random(out, rng, max_wait=0.5, save_every=1, after='last.pt'):
    "Start the worker, wait until file `after` exists, SIGKILL it after a random delay; the return code (-9 if killed)."
    p = start_worker(out, save_every)
    t0 = time.time()
    while not (Path(out) / after).exists() and p.poll() is None and time.time() - t0 < 120: time.sleep(0.01)
    time.sleep(rng.uniform(0, max_wait))
    if p.poll() is None: p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    return p.returncode


def _resume_to_end(out, save_every=1):
    rc, err = run_worker(out, save_every=save_every)
    assert rc == 0, err[-2000:]
    assert (Path(out) / 'DONE').exists() and not list(Path(out).glob('.*.tmp'))
    return err


def test_killed_mid_write_and_mid_epoch_resumes_to_same_weights(tmp_path, reference):
    """One run SIGKILLed three times (inside a checkpoint's torch.save, before a checkpoint's fsync, at a random moment),
    then resumed: it ends with the uninterrupted run's weights, and the last process ran only the steps left (a resume
    that restarted from scratch would run all of them, one that skipped work would not match the weights)."""
    out = tmp_path / 'run'
    for mode in ('save:3', 'fsync:4'):
        rc, err = run_worker(out, mode)
        assert rc == -signal.SIGKILL, (mode, rc, err[-2000:])
    assert _kill_at_random(out, random.Random(0)) == -signal.SIGKILL
    from adaad.checkpoint import read_checkpoint
    st = read_checkpoint(out / 'last.pt'); done = st['epoch'] * TOTAL_STEPS // 2 + st['step']
    assert 0 < done < TOTAL_STEPS
    assert steps_run(_resume_to_end(out)) == TOTAL_STEPS - done
    assert_same(final_state(out), reference)


def test_default_checkpoints_lose_at_most_the_current_epoch(tmp_path, reference):
    """With save_every=0 (the default) a run killed inside its second epoch resumes from the end of the first: it redoes
    that epoch's steps (the work lost) and still ends with the uninterrupted run's weights."""
    out = tmp_path / 'run'
    assert _kill_at_random(out, random.Random(1), max_wait=0.3, save_every=0, after='last.pt') == -signal.SIGKILL
    from adaad.checkpoint import read_checkpoint
    st = read_checkpoint(out / 'last.pt')
    assert (st['epoch'], st['step']) == (1, 0)
    assert steps_run(_resume_to_end(out, save_every=0)) == TOTAL_STEPS // 2
    assert_same(final_state(out), reference)


@pytest.mark.slow
@pytest.mark.parametrize('seed', [1, 2, 3])
def test_many_random_kills_resume_to_same_weights(tmp_path, reference, seed):
    "Four rounds of (a kill at a random fsync/rename/save, a kill at a random moment), then resume."
    out, rng = tmp_path / 'run', random.Random(seed)
    for i in range(4):
        mode = rng.choice(['save', 'fsync', 'replace']) + f':{rng.randint(1, 12)}'
        run_worker(out, mode)
        _kill_at_random(out, rng, max_wait=2.0)
    _resume_to_end(out)
    assert_same(final_state(out), reference)


def test_truncated_last_checkpoint_falls_back_to_previous(tmp_path, reference):
    "A run killed before a rename, whose last.pt is then truncated, resumes from last.prev.pt, with a warning, to the same weights."
    out = tmp_path / 'run'
    rc, _ = run_worker(out, 'replace:10')  # os.replace calls: 1 log trim, 2 first save, then (rotate, save) pairs
    assert rc == -signal.SIGKILL and (out / 'last.prev.pt').exists()
    data = (out / 'last.pt').read_bytes(); (out / 'last.pt').write_bytes(data[:len(data) // 3])
    err = _resume_to_end(out)
    assert 'resuming from the previous checkpoint' in err and (out / 'last.corrupt.pt').exists()
    assert_same(final_state(out), reference)


# ---- corrupt files, in process ---------------------------------------------------------------------------------------
def _saved(tmp_path, steps=(1, 2)):
    from adaad.models import create_model
    from adaad.checkpoint import save_rotating
    from adaad.train import config_dict
    m = create_model('wrn-10-1'); o = torch.optim.SGD(m.parameters(), lr=0.1); c = config_dict(tiny_config())
    for s in steps: save_rotating(tmp_path / 'last.pt', m, o, 0, s, {}, c)
    return tmp_path / 'last.pt'


def test_corrupt_and_truncated_checkpoints_are_refused(tmp_path):
    from adaad.checkpoint import read_checkpoint
    path = _saved(tmp_path)
    assert read_checkpoint(path)['step'] == 2 and 'sha256' not in read_checkpoint(path)
    obj = torch.load(path, weights_only=True)               # a changed weight that still unpickles
    obj['state_dict']['fc.weight'].view(-1)[7] += 1e-3
    torch.save(obj, tmp_path / 'flipped.pt')
    with pytest.raises(ValueError, match=r'flipped\.pt: checkpoint is corrupt.*sha256'): read_checkpoint(tmp_path / 'flipped.pt')
    raw = path.read_bytes()
    (tmp_path / 'trunc.pt').write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match=r'refusing to load .*trunc\.pt.*corrupt or truncated'): read_checkpoint(tmp_path / 'trunc.pt')
    (tmp_path / 'empty.pt').write_bytes(b'')
    with pytest.raises(ValueError, match='refusing to load'): read_checkpoint(tmp_path / 'empty.pt')


def test_byte_flips_anywhere_are_refused_or_harmless(tmp_path):
    "Flipping one byte at many offsets never yields a silently different checkpoint."
    from adaad.checkpoint import read_checkpoint
    path = _saved(tmp_path, steps=(1,))
    raw, good = path.read_bytes(), read_checkpoint(path)
    rng = random.Random(0)
    for off in rng.sample(range(len(raw)), 40):
        bad = bytearray(raw); bad[off] ^= 0x5A; (tmp_path / 'x.pt').write_bytes(bytes(bad))
        try: got = read_checkpoint(tmp_path / 'x.pt')
        except ValueError as e: assert 'refusing to load' in str(e); continue
        assert_same(got['state_dict'], good['state_dict'])  # e.g. a flip in zip padding or a record name torch ignores
        assert got['step'] == good['step']


def test_resume_fails_clearly_when_every_checkpoint_is_bad(tmp_path):
    from adaad.checkpoint import load_resume
    path = _saved(tmp_path)
    for p in (path, tmp_path / 'last.prev.pt'): p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ValueError, match=r'cannot resume from .*last\.pt: it and .*last\.prev\.pt are unreadable'): load_resume(path)
    assert load_resume(tmp_path / 'nothing.pt') == (None, None)


# ---- a NaN loss stops the run ---------------------------------------------------------------------------------------
class _Poisoned(torch.nn.Module):
    "A small CNN whose logits become NaN from its `at`-th training-mode forward on."
    def __init__(self, num_classes=10, at=5):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, 4, 1); self.fc = torch.nn.Linear(4 * 8 * 8, num_classes); self.at, self.calls = at, 0
    def forward(self, x):
        z = self.fc(torch.relu(self.conv(x)).flatten(1))
        if self.training:
            self.calls += 1
            if self.calls >= self.at: z = z * float('nan')
        return z


@pytest.mark.parametrize('save_every', [1, 0])
def test_nan_loss_stops_naming_epoch_and_batch_and_keeps_last_good(tmp_path, save_every):
    from adaad.checkpoint import read_checkpoint
    from adaad.models import MODELS
    from adaad.train import train
    MODELS['_poisoned'] = lambda num_classes, **kw: _Poisoned(num_classes, at=5 + 6)  # 'natural': 1 forward per step
    try:
        cfg = tiny_config(method='natural', student='_poisoned', epochs=2, save_every=save_every)  # 6 batches per epoch
        with pytest.raises(FloatingPointError, match=r'non-finite loss nan at epoch 1, batch 4; stopping\. Last good checkpoint: .*last\.pt'):
            train(cfg, out_dir=tmp_path, device='cpu', progress=False, data=tiny_data())
    finally: del MODELS['_poisoned']
    st = read_checkpoint(tmp_path / 'last.pt')
    assert (st['epoch'], st['step']) == ((1, 4) if save_every else (1, 0))
    assert all(torch.isfinite(v).all() for v in st['state_dict'].values() if v.is_floating_point())
    assert not (tmp_path / 'final.pt').exists()


class _SpareGoesInf(torch.nn.Module):
    "A small CNN with a parameter the loss never reads, which turns inf at the `at`-th training forward (the loss stays finite)."
    def __init__(self, num_classes=10, at=8):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, 4, 1); self.fc = torch.nn.Linear(4 * 8 * 8, num_classes)
        self.spare = torch.nn.Parameter(torch.zeros(3)); self.at, self.calls = at, 0
    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                with torch.no_grad(): self.spare.fill_(float('inf'))
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize('save_every', [1, 0])
def test_non_finite_weights_are_never_written(tmp_path, save_every):
    """`train` refuses to write a checkpoint whose weights are not finite even when the loss is finite: it stops naming
    where, and last.pt keeps the last finite weights (without the check the inf weights would be saved)."""
    from adaad.checkpoint import read_checkpoint
    from adaad.models import MODELS
    from adaad.train import train
    MODELS['_spare'] = lambda num_classes, **kw: _SpareGoesInf(num_classes, at=8)    # natural: one forward per step
    try:
        cfg = tiny_config(method='natural', student='_spare', epochs=2, save_every=save_every)
        with pytest.raises(FloatingPointError, match=r'non-finite weights .*spare.* not writing a checkpoint'):
            train(cfg, out_dir=tmp_path, device='cpu', progress=False, data=tiny_data())
    finally: del MODELS['_spare']
    st = read_checkpoint(tmp_path / 'last.pt')
    assert (st['epoch'], st['step']) == ((1, 1) if save_every else (1, 0))
    assert all(torch.isfinite(v).all() for v in st['state_dict'].values() if v.is_floating_point())
    assert not (tmp_path / 'final.pt').exists()


# ---- security ---------------------------------------------------------------------------------------------------------
def _sources(): return sorted(PKG.glob('*.py'))


def test_every_torch_load_is_weights_only():
    """Each `torch.load(` call in the package passes weights_only=True inside its parentheses, except the one in
    `convert_checkpoint`, the explicit one-off conversion of a file the user trusts, whose docstring says so."""
    calls = unsafe = 0
    for f in _sources():
        text = f.read_text()
        for m in re.finditer(r'torch\.load\(', text):
            depth, i = 1, m.end()
            while depth and i < len(text): depth += {'(': 1, ')': -1}.get(text[i], 0); i += 1
            args = text[m.end():i]
            fn = text[text.rfind('\ndef ', 0, m.start()):m.start()]
            if f.name == 'checkpoint.py' and fn.startswith('\ndef convert_checkpoint(') and 'only for a file you trust' in fn:
                unsafe += 1; continue
            assert re.search(r'weights_only\s*=\s*True', args), f'{f.name}: torch.load({args}'
            calls += 1
        # the one pickle read outside data.py: a table worker reading the job its own parent wrote into its stdin pipe
        text = text.replace('job = pickle.load(sys.stdin.buffer)', '') if f.name == 'jobs.py' else text
        assert not re.search(r'\bpickle\.loads?\(|\bdill\b|\bjoblib\.load', text) or f.name == 'data.py', f.name
    assert calls >= 1 and unsafe <= 1


def test_no_shell_in_the_package():
    """No path or parameter can reach a shell: no os.system/popen/exec/spawn, shell=True or eval/exec in adaad/, and a
    subprocess only as a fixed argv list starting with a literal program name (e.g. `['git', 'rev-parse', 'HEAD']`), or
    the parallel table's worker: the running interpreter with one fixed line of code."""
    pat = re.compile(r'\bos\.(system|popen|exec\w*|spawn\w*)\b|shell\s*=\s*True|(?<![.\w])(eval|exec)\(|\bcommands\.')
    sub = re.compile(r'''\bsubprocess\.(run|call|check_call|check_output|Popen|getoutput|getstatusoutput)\((?!\s*\[\s*['"])''')
    worker = "subprocess.Popen([sys.executable, '-c', 'from adaad.jobs import _worker_main; _worker_main()']"   # the running interpreter, a fixed line
    hits = [f'{f.name}:{i}: {l.strip()}' for f in _sources() for i, l in enumerate(f.read_text().splitlines(), 1)
            if (pat.search(l) or sub.search(l)) and not l.lstrip().startswith('#') and not (f.name == 'jobs.py' and worker in l)]
    assert not hits, hits


def test_a_malicious_cifar_batch_is_refused_without_running(tmp_path):
    """A CIFAR folder whose batch file carries a pickled shell command: `load_cifar` refuses it and the command never runs
    (a plain `pickle.load` would have created the marker file)."""
    import pickle
    import numpy as np
    from adaad.data import load_cifar
    marker, folder = tmp_path / 'pwned', tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    good = {b'data': np.zeros((10, 3072), np.uint8), b'labels': list(range(10))}
    for name in [f'data_batch_{i}' for i in range(1, 6)]: pickle.dump(good, open(folder / name, 'wb'), protocol=2)
    pickle.dump({b'data': _Payload(marker), b'labels': [0]}, open(folder / 'test_batch', 'wb'), protocol=2)
    with pytest.raises(ValueError, match=r'corrupt CIFAR file .*test_batch: UnpicklingError: refusing to load posix\.system'):
        load_cifar('cifar10', 'test', root=tmp_path)
    assert not marker.exists() and len(load_cifar('cifar10', 'train', root=tmp_path)) == 50


class _Payload:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f'touch {self.marker}',))


def test_malicious_checkpoint_refused_on_the_resume_path(tmp_path):
    "An evil last.pt is refused without running it; with a good last.prev.pt the run falls back to it."
    from adaad.models import create_model
    from adaad.checkpoint import load_resume, load_teacher
    from adaad.train import train
    marker = tmp_path / 'pwned'
    evil = {'state_dict': create_model('wrn-10-1').state_dict(), 'x': _Payload(marker)}
    run = tmp_path / 'run'; run.mkdir()
    from adaad.train import check_identity, run_identity
    check_identity(run, run_identity(tiny_config(), data=tiny_data()))   # the folder holds this run ...
    torch.save(evil, run / 'last.pt')                                      # ... and an evil last.pt
    with pytest.raises(ValueError, match=r'cannot resume .*weights_only=True'):
        train(tiny_config(), out_dir=run, device='cpu', progress=False, data=tiny_data())
    torch.save(evil, tmp_path / 'teacher.pt')
    with pytest.raises(ValueError, match='weights_only=True'): load_teacher(tmp_path / 'teacher.pt', arch='wrn-10-1')
    good = _saved(tmp_path / 'g' if (tmp_path / 'g').mkdir() is None else None)
    torch.save(evil, good)                                   # last.pt evil, last.prev.pt good
    with pytest.warns(UserWarning, match='resuming from the previous checkpoint'):
        st, p = load_resume(good)
    assert p.name == 'last.prev.pt' and st['step'] == 1
    assert not marker.exists()


if __name__ == '__main__':
    worker(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else 'none', int(sys.argv[3]) if len(sys.argv) > 3 else 1)
