"Shared fixtures: the CIFAR-10 folder (skipped with a reason where absent) and a small naturally trained model."
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


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
def natural_model(cifar_train):
    "A small WideResNet (wrn-10-2) trained naturally for a minute or two on 2,000 training images (about 40% clean)."
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
    return model.eval()


ZOO = dict(train_n=2000, batch_size=64, lr=0.1, steps=2, step_size=4 / 255, val_n=200, val_steps=2)


@pytest.fixture(scope='session')
def robust_zoo(cifar_train, tmp_path_factory):
    """Small networks trained once per test session by the project's own trainer on 2,000 training images (2 inner steps):
    a wrn-10-1 PGD-AT teacher and a naturally trained wrn-10-1 (4 epochs each), and wrn-10-1 students distilled from the
    teacher with AdaAD and RSLAD (8 epochs: their official loss scales are small). About three minutes on one core."""
    from adaad.train import TrainConfig, split_run_data, train
    n = torch.get_num_threads(); torch.set_num_threads(1)
    root, models = tmp_path_factory.mktemp('zoo'), {}
    try:
        for name, method, teacher, epochs in (('teacher', 'pgd-at', None, 4), ('natural', 'natural', None, 4),
                                              ('adaad', 'adaad', 'teacher', 8), ('rslad', 'rslad', 'teacher', 8)):
            cfg = TrainConfig(method=method, student='wrn-10-1', epochs=epochs, milestones=(epochs - 1,), **ZOO)
            r = train(cfg, teacher=models.get(teacher), out_dir=root / name, device='cpu', progress=False,
                      data=split_run_data(cfg, cifar_train))
            models[name] = r['model'].eval()
    finally: torch.set_num_threads(n)
    return models
