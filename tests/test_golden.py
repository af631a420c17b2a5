"""Refactoring guard: a short seeded CPU run of every method (and of the combinations and options the library offers)
ends with the weights recorded in `golden_weights.json`. A refactor that changes any computation of any method (a
pass order, a reduction, a random draw, a BatchNorm update) fails it. Re-record only for a change that is meant to
change results, and say so in the commit.

What it guarantees where:

- **On the CPU kind and torch version that made the float32 recording** (named in the file's `environment`): every
  case's float32 weights equal the recording bit for bit (`test_float32_bit_identical_on_the_recording_kind`). On any
  other kind that test is skipped, saying why: oneDNN and MKL pick other kernels there, their float32 rounding differs,
  and adversarial training amplifies it (one flipped sign in an inner step moves x~ by two steps), so no tolerance on
  float32 weights after training can both hold there and still catch a change.
- **On a wider CPU of the recording's model** (the recording is AVX2, this machine AVX512, same processor and torch):
  the float32 cases run in one subprocess whose ATen, MKL and oneDNN are held to the recording's instruction set
  (`NARROWED`), and must equal the recording bit for bit (`test_float32_bit_identical_under_the_recording_kernels`).
  The same variables let a user rerun a committed AVX2 table's kernels on such a machine
  (`make repro CPU_KERNELS=avx2`).
- **On every CPU kind**: the same cases, run in float64 with deterministic algorithms, end with weights whose every
  tensor's sum and signed random projection lie within `RTOL` (1e-9) of the float64 recording, relative to the tensor's
  L1 norm (`test_float64_matches_the_recording`). Kernels differ in float64 too, but at ~1e-16 per operation: under
  emulated foreign kernels the weights after the run moved by ~1e-15, six orders below the tolerance, while a changed
  reduction or pass order moves them by 1e-4 or more.
- `test_the_float64_check_holds_on_foreign_kernels_and_catches_changes` runs in a subprocess whose ATen, MKL and oneDNN
  are held to other instruction sets (`FOREIGN`: ATen's portable kernels, MKL's SSE4.2 and oneDNN's SSE4.1 paths):
  there the float32 weights differ from the recording, the float64 check passes, and it fails when TRADES' KL
  reduction or its order of student passes (hence the BatchNorm statistics) is changed.

Record with `python tests/test_golden.py --record float32` (on the kind that should hold bit-identity, or with the
`NARROWED` variables set on a wider CPU of its model, which gives the same bits) or `--record float64` (on any kind).
"""
import hashlib, json, os, platform, subprocess, sys, zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name('golden_weights.json')
RTOL = 1e-9
FOREIGN = dict(ATEN_CPU_CAPABILITY='default', MKL_ENABLE_INSTRUCTIONS='SSE4_2', ONEDNN_MAX_CPU_ISA='SSE41')
# The variables that hold ATen, MKL and oneDNN to a recorded instruction set on a CPU that has a wider one.
NARROWED = {'AVX2': dict(ATEN_CPU_CAPABILITY='avx2', MKL_ENABLE_INSTRUCTIONS='AVX2', ONEDNN_MAX_CPU_ISA='AVX2')}

# name -> (TrainConfig keyword arguments beyond BASE, needs a teacher)
CASES = {
    'natural': (dict(method='natural'), False),
    'pgd-at': (dict(method='pgd-at'), False),
    'trades': (dict(method='trades'), False),
    'ard': (dict(method='ard'), True),
    'iad': (dict(method='iad', method_kwargs=dict(begin=1)), True),
    'rslad': (dict(method='rslad'), True),
    'akd': (dict(method='akd', method_kwargs=dict(robust_as_standard=True)), True),
    'akd-maroto': (dict(method='akd-maroto'), True),
    'adaad': (dict(method='adaad'), True),
    'adaiad': (dict(method='adaiad', method_kwargs=dict(begin=1)), True),
    'mmard': (dict(method='mmard'), True),
    'adaad-alpha0.5': (dict(method='adaad', method_kwargs=dict(adv_share=0.5)), True),   # named for the official --AdaAD_alpha
    'rslad-inner-adaad': (dict(method='rslad', inner='adaad'), True),
    'mmard-base-rslad': (dict(method='mmard', method_kwargs=dict(base='rslad')), True),
    'adaad-faithful': (dict(method='adaad', faithful=True), True),
    'adaiad-faithful': (dict(method='adaiad', faithful=True, method_kwargs=dict(begin=1)), True),
    'trades-faithful': (dict(method='trades', faithful=True), False),
    'adaad-amp-cl': (dict(method='adaad', amp=True, channels_last=True), True),
    'ard-single-decay': (dict(method='ard', milestones=(1,), lr=0.05), True),
}
FLOAT64_CASES = [c for c in CASES if c != 'adaad-amp-cl']   # bf16 autocast has no float64 reading
BASE = dict(student='wrn-10-1', epochs=2, batch_size=32, lr=0.1, milestones=(1,), steps=2, step_size=2/255, eps=8/255,
            val_n=32, val_steps=2, seed=3)


def synthetic_data():
    "A fixed 96-image training split and 32-image validation split of random CIFAR-shaped uint8 images."
    from adaad.data import CifarSplit
    g = torch.Generator().manual_seed(1234)
    x = torch.randint(0, 256, (128, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (128,), generator=g)
    return (CifarSplit(x[:96], y[:96], 10, split='train', source=dict(synthetic=True)),
            CifarSplit(x[96:], y[96:], 10, split='test', source=dict(synthetic=True)))


def teacher_model():
    "A fixed randomly initialised wrn-10-2 teacher (the computation, not its quality, is what is checked)."
    from adaad.models import create_model
    torch.manual_seed(99)
    return create_model('wrn-10-2', 10).eval()


def _config(kw):
    "The TrainConfig of one case (the cases are written against TrainConfig's arguments)."
    from adaad.train import TrainConfig
    kw = {**BASE, **kw}
    if kw['method'] == 'natural': kw = {k: v for k, v in kw.items() if k not in ('steps', 'step_size', 'eps')}
    return TrainConfig(**kw)


@contextmanager
def precision(dtype):
    "Networks, images and every float the library makes in `dtype`, with deterministic algorithms for float64."
    old, det = torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled()
    torch.set_default_dtype(dtype); torch.use_deterministic_algorithms(dtype == torch.float64 or det)
    try: yield
    finally: torch.set_default_dtype(old); torch.use_deterministic_algorithms(det)


def _projection(name, n):
    "A fixed +-1 vector of length `n` for tensor `name` (the same on every machine)."
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1


def fingerprint(sd):
    "The SHA-256 of a state dict, and per float tensor its sum, signed random projection and L1 norm (in float64)."
    digest = hashlib.sha256()
    for k in sorted(sd):
        digest.update(k.encode()); digest.update(sd[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    stats = {}
    for k, v in sd.items():
        if not v.is_floating_point(): continue
        v = v.detach().double().reshape(-1)
        stats[k] = [float(v.sum()), float(v @ _projection(k, v.numel())), float(v.abs().sum())]
    return dict(sha256=digest.hexdigest(), tensors=stats)


def run_case(name, out_dir, dtype=torch.float32):
    "Train case `name` into `out_dir` on one thread in `dtype`; the `fingerprint` of the final weights."
    from adaad.train import train
    kw, needs_teacher = CASES[name]
    n = torch.get_num_threads(); torch.set_num_threads(1)
    try:
        with precision(dtype):
            r = train(_config(kw), teacher=teacher_model() if needs_teacher else None, out_dir=out_dir, device='cpu',
                      progress=False, data=synthetic_data())
    finally: torch.set_num_threads(n)
    return fingerprint(r['model'].state_dict())


def mismatches(got, want, rtol=RTOL):
    "The tensors whose sum or projection differs from the recording by more than `rtol` times its L1 norm."
    bad = [k for k in want if k not in got['tensors']]
    for k, (s, p, l1) in want.items():
        if k in got['tensors'] and any(abs(g - w) > rtol * max(l1, 1e-12) for g, w in zip(got['tensors'][k][:2], (s, p))):
            bad.append(k)
    return bad


def environment():
    "What bit-identity depends on: torch version, CPU capability and model."
    return dict(torch=torch.__version__, cpu_capability=torch.backends.cpu.get_cpu_capability(),
                processor=_cpu_model(), python=platform.python_version())


def _cpu_model():
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()


def _golden():
    return json.loads(GOLDEN.read_text())


def _same_kind(recorded):
    keys = ('torch', 'cpu_capability', 'processor')
    return {k: recorded[k] for k in keys} == {k: environment()[k] for k in keys}


def test_the_recording_lists_every_case():
    g = _golden()
    assert set(g['float32']['cases']) == set(CASES), 'golden_weights.json and CASES list different cases: re-record'
    assert set(g['float64']['cases']) == set(FLOAT64_CASES), 'the float64 recording lacks cases: re-record float64'


def _narrowable(recorded):
    "Whether this machine can run the recording's float32 kernels: same processor and torch, a wider instruction set."
    here = environment()
    return (not _same_kind(recorded) and recorded['cpu_capability'] in NARROWED and here['cpu_capability'] == 'AVX512'
            and all(recorded[k] == here[k] for k in ('torch', 'processor')))


@pytest.mark.parametrize('name', list(CASES))
def test_float32_bit_identical_on_the_recording_kind(name, tmp_path):
    "Each case's float32 weights equal the recording bit for bit, on the recording's CPU kind and torch."
    rec = _golden()['float32']
    if not _same_kind(rec['environment']):
        pytest.skip(f"float32 bit-identity is recorded for {rec['environment']}; this machine is {environment()} "
                    '(its kernels round differently): the float64 test guards this kind'
                    + (", and the recording's kernels are checked in a subprocess"
                       if _narrowable(rec['environment']) else ''))
    got = run_case(name, tmp_path / name)
    assert got['sha256'] == rec['cases'][name]['sha256'], f'{name}: the weights differ from the recording (a computation changed)'


def float32_shas(out_dir):
    "What the subprocess of the narrowed-kernel test reports: the capability and every case's float32 SHA-256."
    return dict(capability=torch.backends.cpu.get_cpu_capability(),
                shas={n: run_case(n, out_dir / n)['sha256'] for n in CASES})


def test_float32_bit_identical_under_the_recording_kernels(tmp_path):
    "On a wider CPU of the recording's model, every case run with the recording's kernels equals it bit for bit."
    rec = _golden()['float32']
    if not _narrowable(rec['environment']):
        pytest.skip(f"only where the recording's kernels can be selected on a wider CPU of its model: recorded on "
                    f"{rec['environment']}, this machine is {environment()}")
    env = {**os.environ, **NARROWED[rec['environment']['cpu_capability']], 'OMP_NUM_THREADS': '1',
           'PYTHONPATH': str(ROOT)}
    p = subprocess.run([sys.executable, __file__, '--float32-shas', str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res['capability'] == rec['environment']['cpu_capability'], res['capability']
    bad = [n for n in CASES if res['shas'][n] != rec['cases'][n]['sha256']]
    assert not bad, f'{len(bad)} of {len(CASES)} cases differ from the recording under its kernels, e.g. {bad[:5]}'


@pytest.mark.parametrize('name', FLOAT64_CASES)
def test_float64_matches_the_recording(name, tmp_path):
    "Each case run in float64 ends within RTOL of the float64 recording, on any CPU kind."
    got = run_case(name, tmp_path / name, torch.float64)
    bad = mismatches(got, _golden()['float64']['cases'][name]['tensors'])
    assert not bad, f'{name}: {len(bad)} tensors differ from the float64 recording beyond {RTOL} (a computation changed), e.g. {bad[:3]}'


def _changed_reduction(monkeypatch):
    "TRADES' KL term averaged over batch and classes instead of over the batch."
    import adaad.losses as L
    kl = L.kl
    monkeypatch.setattr(L, 'kl', lambda p, q, tau=1., reduction='sum', **kw: kl(p, q, tau, 'mean_all' if reduction == 'batchmean' else reduction, **kw))


def _changed_pass_order(monkeypatch):
    "TRADES declaring its student passes on x~ before x (the BatchNorm statistics see the batches in the other order)."
    from adaad import methods as M
    monkeypatch.setattr(M.TRADES, 'passes', lambda self, epoch: ('adv', 'nat', 'adv'))


def foreign_check(out_dir):
    "What the subprocess of the foreign-kernel test reports: the capability, the float32 identity, three float64 checks."
    rec = _golden()
    res = dict(capability=torch.backends.cpu.get_cpu_capability(),
               float32_identical=run_case('trades', out_dir / 'f32')['sha256'] == rec['float32']['cases']['trades']['sha256'])
    want = rec['float64']['cases']['trades']['tensors']
    res['float64_passes'] = not mismatches(run_case('trades', out_dir / 'f64', torch.float64), want)
    for name, change in (('reduction', _changed_reduction), ('pass_order', _changed_pass_order)):
        with pytest.MonkeyPatch.context() as mp:
            change(mp)
            res[f'float64_passes_with_changed_{name}'] = not mismatches(run_case('trades', out_dir / name, torch.float64), want)
    return res


def test_the_float64_check_holds_on_foreign_kernels_and_catches_changes(tmp_path):
    "Under other ATen/MKL/oneDNN kernels: float32 differs, float64 holds, and a changed reduction or pass order fails it."
    env = {**os.environ, **FOREIGN, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
    p = subprocess.run([sys.executable, __file__, '--foreign-check', str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res['capability'] == 'DEFAULT', res
    assert not res['float32_identical'], 'the emulated kernels gave the recording kind\'s float32 weights: no foreign kind emulated'
    assert res['float64_passes'], res
    assert not res['float64_passes_with_changed_reduction'], 'the float64 check missed a changed KL reduction'
    assert not res['float64_passes_with_changed_pass_order'], 'the float64 check missed a changed pass order'


def _record(which):
    import tempfile
    g = _golden() if GOLDEN.exists() else {}
    dtype, names = (torch.float32, list(CASES)) if which == 'float32' else (torch.float64, FLOAT64_CASES)
    with tempfile.TemporaryDirectory() as d:
        cases = {n: run_case(n, Path(d) / n, dtype) for n in names}
    if which == 'float32': cases = {n: dict(sha256=c['sha256']) for n, c in cases.items()}
    g[which] = dict(environment=environment(), base=BASE, cases=cases)
    GOLDEN.write_text(json.dumps(g, indent=1) + '\n')
    print(f'recorded {len(cases)} {which} cases in {GOLDEN}')


if __name__ == '__main__':
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:2] == ['--foreign-check'] and len(sys.argv) == 3:
        print(json.dumps(foreign_check(Path(sys.argv[2]))))
    elif sys.argv[1:2] == ['--float32-shas'] and len(sys.argv) == 3: print(json.dumps(float32_shas(Path(sys.argv[2]))))
    elif sys.argv[1:2] == ['--record'] and sys.argv[2:] in (['float32'], ['float64']): _record(sys.argv[2])
    else: sys.exit('usage: python tests/test_golden.py --record {float32,float64} | --foreign-check DIR | --float32-shas DIR')
