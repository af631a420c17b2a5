"""A user's own module, as a researcher writes it: two methods registered by name and nothing in the library edited.
The tests import it with `adaad --import user_methods`, `run_table_parallel(imports=...)` and the reproduction
notebook's `imports`, and check that every path trains them (a module, not a test file, so other processes import it)."""
from dataclasses import dataclass

from adaad.methods import PGDAT, RSLAD, register


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
