"""Refactoring guard: a short seeded CPU run of every method (and the combinations and options the library offers)
ends with exactly the weights recorded in `golden_weights.json`.

The file was recorded with `python tests/test_golden.py --record`;
a refactor that changes any computation of any method (a pass order, a reduction, a random draw, a BatchNorm
update) changes a SHA-256 here. Re-record only for a change that is meant to change results, and say so in the
commit. Bit-identity holds on the recording's CPU kind and torch version (the JSON names both): on another machine
oneDNN may pick other kernels, so there the test compares per-tensor sums at a tolerance instead, and says so.
"""
import hashlib, json, platform, sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name('golden_weights.json')

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
    'adaad-alpha0.5': (dict(method='adaad', method_kwargs=dict(alpha=0.5)), True),
    'rslad-inner-adaad': (dict(method='rslad', inner='adaad'), True),
    'mmard-base-rslad': (dict(method='mmard', method_kwargs=dict(base='rslad')), True),
    'adaad-faithful': (dict(method='adaad', faithful=True), True),
    'adaiad-faithful': (dict(method='adaiad', faithful=True, method_kwargs=dict(begin=1)), True),
    'trades-faithful': (dict(method='trades', faithful=True), False),
    'adaad-amp-cl': (dict(method='adaad', amp=True, channels_last=True), True),
    'ard-single-decay': (dict(method='ard', milestones=(1,), lr=0.05), True),
}
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


def run_case(name, out_dir):
    "Train case `name` into `out_dir` on one thread; return {tensor name: sha256} of the final weights and their sums."
    from adaad.train import train
    kw, needs_teacher = CASES[name]
    n = torch.get_num_threads(); torch.set_num_threads(1)
    try:
        r = train(_config(kw), teacher=teacher_model() if needs_teacher else None, out_dir=out_dir, device='cpu',
                  progress=False, data=synthetic_data())
    finally: torch.set_num_threads(n)
    sd = r['model'].state_dict()
    digest = hashlib.sha256()
    for k in sorted(sd):
        digest.update(k.encode()); digest.update(sd[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    sums = {k: float(v.double().sum()) for k, v in sd.items() if v.is_floating_point()}
    return dict(sha256=digest.hexdigest(), sums=sums)


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


@pytest.mark.parametrize('name', list(CASES))
def test_weights_match_the_recording(name, tmp_path):
    "Each case's final weights equal the recorded ones bit for bit (on the recording's CPU kind and torch)."
    g = _golden()
    assert set(g['cases']) == set(CASES), 'golden_weights.json and CASES list different cases: re-record'
    got, want = run_case(name, tmp_path / name), g['cases'][name]
    same_env = {k: g['environment'][k] for k in ('torch', 'cpu_capability', 'processor')} == \
               {k: environment()[k] for k in ('torch', 'cpu_capability', 'processor')}
    if same_env:
        assert got['sha256'] == want['sha256'], f'{name}: the weights differ from the recording (a computation changed)'
    else:  # another CPU kind or torch: kernels may round differently, so compare every tensor's sum closely
        for k, v in want['sums'].items():
            assert got['sums'][k] == pytest.approx(v, rel=1e-3, abs=1e-3), f'{name}: {k} differs from the recording'


if __name__ == '__main__':
    if sys.argv[1:] != ['--record']: sys.exit('usage: python tests/test_golden.py --record')
    import tempfile
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as d:
        cases = {name: run_case(name, Path(d) / name) for name in CASES}
    GOLDEN.write_text(json.dumps(dict(environment=environment(), base=BASE, cases=cases), indent=1) + '\n')
    print(f'recorded {len(cases)} cases in {GOLDEN}')
