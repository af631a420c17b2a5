"""A new method is one definition plus its test: defined here, in a test file, with nothing in the library edited, it
trains with `train()` and with the `adaad` command (which imports this file's module with `--import`)."""
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adaad.core import kl
from adaad.inner import Budget, ce_objective
from adaad.methods import METHODS, Method, get_method, register, training_loss
from adaad.train import TrainConfig, resolve, train

pytestmark = pytest.mark.usefixtures('one_thread')


@register
@dataclass(frozen=True)
class CleanKD(Method):
    "Test method: the student's own CE attack (uniform start) and KL_tau(T(x~) || S(x~)) * tau^2, batch mean."
    name = 'test-clean-kd'
    source = 'tests/test_custom_method.py'
    weight_decay, epochs, milestones = 1e-4, 3, (2,)
    positive = ('tau',)
    budget: Budget | None = Budget(init='uniform', steps=2)
    tau: float = 2.
    def objective(self, lg, y): return ce_objective(lg.student, y, 'sum')
    def loss(self, lg, y, epoch): return self.tau ** 2 * kl(lg.t_adv, lg.s_adv, self.tau, 'batchmean')


def _data():
    from adaad.data import CifarSplit
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (48, 3, 32, 32), generator=g, dtype=torch.uint8), torch.randint(0, 10, (48,), generator=g)
    return CifarSplit(x[:32], y[:32], 10, split='train'), CifarSplit(x[32:], y[32:], 10, split='test')


def test_the_registry_and_config_know_the_new_method():
    assert METHODS['test-clean-kd'] is CleanKD and get_method('test-clean-kd', tau=3.).tau == 3.
    c = resolve(TrainConfig(method='test-clean-kd'))
    assert (c.epochs, c.milestones, c.weight_decay, c.steps, c.method_kwargs) == (3, (2,), 1e-4, 2, dict(tau=2., init='uniform', attack_bn='eval'))
    with pytest.raises(ValueError, match='tau must be > 0'): get_method('test-clean-kd', tau=0.)


def test_its_loss_is_its_formula():
    torch.manual_seed(0)
    S = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    T = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).eval()
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
    torch.manual_seed(1); loss, logs = training_loss('test-clean-kd', S, T, x, y)
    assert torch.isfinite(loss) and set(logs) == {'loss', 'acc_adv'}


def test_it_trains_with_train(tmp_path):
    from adaad.models import create_model
    torch.manual_seed(0)
    r = train(TrainConfig(method='test-clean-kd', student='wrn-10-1', epochs=2, batch_size=16, val_n=8, val_steps=1),
              teacher=create_model('wrn-10-1').eval(), out_dir=tmp_path, data=_data(), progress=False)
    assert r['status'] == 'done' and len((tmp_path / 'metrics.jsonl').read_text().splitlines()) == 2


def test_it_trains_with_the_command_line(tmp_path, data_root):
    "`adaad --import test_custom_method train --method test-clean-kd`, in a fresh process."
    from adaad.checkpoint import atomic_save
    from adaad.models import create_model
    atomic_save(create_model('wrn-10-1').state_dict(), tmp_path / 't.pt')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get('PYTHONPATH', '')]),
               OMP_NUM_THREADS='1')
    out = subprocess.run([str(Path(sys.executable).with_name('adaad')), '--import', 'test_custom_method', 'train', '--method', 'test-clean-kd',
                          '--set', 'tau=3', '--student', 'wrn-10-1', '--teacher', str(tmp_path / 't.pt'), '--teacher-arch', 'wrn-10-1',
                          '--epochs', '1', '--train-n', '20', '--val-n', '10', '--batch-size', '10', '--data-root', str(data_root),
                          '--device', 'cpu', '--no-progress', '--out', str(tmp_path / 'run')], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])['status'] == 'done'
    assert json.loads((tmp_path / 'run' / 'config.json').read_text())['method_kwargs']['tau'] == 3
