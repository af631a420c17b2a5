"""`nbdev_export` (same options), with each module's `__all__` kept within 120 characters: nbdev wraps the list of
names at 120 without counting the `__all__ = ` in front of its first line, which then runs to 130."""
import textwrap

import nbdev.maker
from nbdev.doclinks import nbdev_export

PREFIX = '__all__ = '


class AllWrapper(textwrap.TextWrapper):
    "The wrapper nbdev builds for `__all__` (its only use in nbdev.maker), narrowed by the prefix of the first line."
    def __init__(self, width=120, **kw): super().__init__(width=width - len(PREFIX), **kw)


nbdev.maker.TextWrapper = AllWrapper

if __name__ == '__main__': nbdev_export()
