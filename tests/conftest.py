"""Shared fixtures: the CIFAR-10 folder (skipped with a reason where absent), a small naturally trained model and the
robust zoo. The trained networks are built once per test run: with pytest-xdist the first worker builds and saves them,
the others wait and load the same weights."""
import os
try: import fcntl
except ImportError: fcntl = None   # Windows: each worker builds its own copy
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get('PYTEST_XDIST_WORKER'):
    # Each worker has one core: a second OpenMP thread waiting for a core the other worker holds costs several times the
    # work it shares (seen: a notebook's dry run 8 times slower). Subprocesses (kernels, workers) inherit the setting.
    os.environ['OMP_NUM_THREADS'] = '1'
    torch.set_num_threads(1)


def pytest_sessionfinish(session, exitstatus):
    "A run in which no test passed is a failure, not a success (e.g. everything skipped)."
    rep = session.config.pluginmanager.get_plugin('terminalreporter')
    if rep is not None and exitstatus == 0 and not rep.stats.get('passed'):
        session.exitstatus = 5


@pytest.fixture(scope='module')
def one_thread():
    "Tiny models gain nothing from intra-op threads, and lose a lot when another process holds a core."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def built_once(tmp_path_factory, name, build):
    """The folder `name` filled by `build(folder)` once per test run: under pytest-xdist the first worker to ask builds it
    in the run's shared temporary folder while holding a file lock, and the others wait for the lock and reuse it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'): root = root.parent     # the workers' basetemps share this parent
    folder = root / name if fcntl is not None else tmp_path_factory.mktemp(name)   # no file locks: each worker its own
    with open(root / f'{name}.lock', 'w') as lock:
        if fcntl is not None: fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / '.done').exists():
            if folder.exists():
                import shutil; shutil.rmtree(folder)            # a build that failed half way
            folder.mkdir(); build(folder); (folder / '.done').touch()
    return folder


def load_models(folder, arch):
    "The networks saved as `<name>.pt` state dicts in `folder`, each a `create_model(arch)` in eval mode, by name."
    from adaad.models import create_model
    out = {}
    for f in sorted(folder.glob('*.pt')):
        m = create_model(arch, num_classes=10); m.load_state_dict(torch.load(f, map_location='cpu', weights_only=True))
        out[f.stem] = m.eval()
    return out


@pytest.fixture(scope='session')
def data_root():
    """The folder that holds `cifar-10-batches-py` ($ADAAD_DATA, else ./data). Where it is absent the data tests fail when
    $ADAAD_REQUIRE_DATA is 1 (`make test`, and so CI, sets it), and are skipped otherwise (a plain `pytest` on a laptop)."""
    root = Path(os.environ.get('ADAAD_DATA', ROOT / 'data'))
    if not (root / 'cifar-10-batches-py').is_dir():
        msg = f'no CIFAR-10 under {root}: run `make data` (downloads it, or rebuilds it from the offline copy)'
        if os.environ.get('ADAAD_REQUIRE_DATA') == '1': pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope='session')
def cifar_test(data_root):
    "The first 1,000 CIFAR-10 test images (byte-exact in the shared rebuild), on the CPU."
    from adaad.data import load_cifar, first_n
    return first_n(load_cifar('cifar10', 'test', root=data_root, device='cpu'), 1000)


@pytest.fixture(scope='session')
def cifar_train(data_root):
    from adaad.data import load_cifar
    return load_cifar('cifar10', 'train', root=data_root, device='cpu')


@pytest.fixture(scope='session')
def natural_model(cifar_train, tmp_path_factory):
    "A small WideResNet (wrn-10-2) trained naturally for a minute or two on 2,000 training images (about 40% clean)."
    def build(folder):
        from adaad.data import balanced_subset, batches
        from adaad.models import create_model
        torch.manual_seed(0)
        model = create_model('wrn-10-2', num_classes=10)
        sub = balanced_subset(cifar_train, 2000, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
        model.train()
        for epoch in range(5):
            for g in opt.param_groups: g['lr'] = 0.05 if epoch < 4 else 0.005
            for xb, yb in batches(sub, 64, shuffle=True, augment=epoch > 0, seed=0, epoch=epoch):
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        torch.save(model.state_dict(), folder / 'natural.pt')
    return load_models(built_once(tmp_path_factory, 'natural-model', build), 'wrn-10-2')['natural']


ZOO = dict(train_n=2000, batch_size=64, lr=0.1, steps=2, step_size=4 / 255, val_n=200, val_steps=2)


@pytest.fixture(scope='session')
def robust_zoo(cifar_train, tmp_path_factory):
    """Small networks trained once per test run by the project's own trainer on 2,000 training images (2 inner steps):
    a wrn-10-1 PGD-AT teacher and a naturally trained wrn-10-1 (4 epochs each), and wrn-10-1 students distilled from the
    teacher with AdaAD and RSLAD (8 epochs: their official loss scales are small). A few minutes on one core."""
    from adaad.train import TrainConfig, split_run_data, train
    def build(folder):
        n = torch.get_num_threads(); torch.set_num_threads(1)
        models = {}
        try:
            for name, method, teacher, epochs in (('teacher', 'pgd-at', None, 4), ('natural', 'natural', None, 4),
                                                  ('adaad', 'adaad', 'teacher', 8), ('rslad', 'rslad', 'teacher', 8)):
                cfg = TrainConfig(method=method, student='wrn-10-1', epochs=epochs, milestones=(epochs - 1,), **ZOO)
                r = train(cfg, teacher=models.get(teacher), out_dir=folder / 'runs' / name, device='cpu', progress=False,
                          data=split_run_data(cfg, cifar_train))
                models[name] = r['model'].eval()
                torch.save(models[name].state_dict(), folder / f'{name}.pt')
        finally: torch.set_num_threads(n)
    return load_models(built_once(tmp_path_factory, 'robust-zoo', build), 'wrn-10-1')
