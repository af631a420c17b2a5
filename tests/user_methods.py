"""A user's own module, as a researcher writes it: two methods, an attack and an architecture registered by name, and
nothing in the library edited. The tests import it with `adaad --import user_methods`, `run_table_parallel(imports=...)`
and the reproduction notebook's `imports`, and check that every path finds them (a module, not a test file, so other
processes import it)."""
from dataclasses import dataclass

import torch.nn as nn

from adaad.attacks import pgd, register_attack
from adaad.methods import PGDAT, RSLAD, register
from adaad.models import register_model


@register
@dataclass(frozen=True)
class UserRSLAD(RSLAD):
    "RSLAD under the user's name: a distillation method, which reads the teacher."
    name = 'user-rslad'
    source = 'tests/user_methods.py'


@register
@dataclass(frozen=True)
class UserPGD(PGDAT):
    "PGD-AT under the user's name: a method without a teacher, so `adaad teacher` can train with it."
    name = 'user-pgd'
    source = 'tests/user_methods.py'


@register_attack('user-pgd2', white_box=True, multi_step=True, norm='linf', budget='eps')
def user_pgd2(model, x, y, eps=8 / 255, steps=2, seed=None):
    "`steps` signed-gradient steps of eps/2 from the clean point: an evaluation column under the user's name."
    return pgd(model, x, y, eps=eps, step_size=eps / 2, steps=steps, random_start=False)


@register_model('user-cnn')
class UserCNN(nn.Module):
    "A small CNN under the user's name: a student architecture."
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, num_classes)
    def forward(self, x): return self.fc(self.body(x))
