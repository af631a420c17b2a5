#!/usr/bin/env python3
"""Add the `sha256` digest (adaad.core.sealed) to result files written before adaad recorded one: `results.json`,
`eps_sweep.json` and `evals/*.json` under the given folders. A file is rewritten only when its new text is its old text
with the digest added and nothing else: same content once parsed, same layout (one line, or indented by one space).

    python tools/seal_results.py results/cpu-strong-5            # seal the files of one results folder
    python tools/seal_results.py --check results/*/              # say what would be sealed, write nothing
"""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from adaad.core import DIGEST, atomic_write, sealed   # noqa: E402


def files(folder):
    "The result files of results folder `folder`."
    folder = Path(folder)
    return [f for f in [folder / 'results.json', folder / 'eps_sweep.json', *sorted(folder.glob('evals/*.json'))] if f.exists()]


def sealed_text(f):
    "The text of result file `f` with its digest added, None if it has one; ValueError if more than the digest would change."
    old = f.read_text()
    d = json.loads(old)
    if DIGEST in d: return None
    indent = 1 if old.startswith('{\n') else None
    if json.dumps(d, indent=indent) + '\n' != old and json.dumps(d, indent=indent) != old:
        raise ValueError(f'{f}: its layout is not the one adaad writes; not rewritten')
    new = json.dumps(sealed(d), indent=indent) + ('\n' if old.endswith('\n') else '')
    back = json.loads(new); back.pop(DIGEST)
    if back != d or json.dumps(back, indent=indent) != json.dumps(d, indent=indent): raise ValueError(f'{f}: sealing would change its content')
    return new


def main(argv):
    check = '--check' in argv
    folders = [a for a in argv if a != '--check']
    if not folders: sys.exit(__doc__)
    done = 0
    for folder in folders:
        for f in files(folder):
            new = sealed_text(f)
            if new is None: continue
            if not check: atomic_write(f, new)
            done += 1; print(f"{'would seal' if check else 'sealed'} {f}")
    print(f'{done} file(s) {"to seal" if check else "sealed"}')


if __name__ == '__main__':
    main(sys.argv[1:])
