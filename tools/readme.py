#!/usr/bin/env python3
"""Render nbs/index.ipynb (settings.ini's `readme_nb`) into README.md: nbdev's convention, README comes from the index
notebook. `nbdev_readme` does this through Quarto, a separate install outside pip, so this renders the
same content itself: markdown cells as they are, code cells as python blocks (cells marked `#| hide` are left out).

    python tools/readme.py            # write README.md
    python tools/readme.py --check    # exit 1 if README.md differs from what index.ipynb renders to
"""
import json, sys
from configparser import ConfigParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def render(nb_path):
    "The README text of notebook `nb_path`."
    parts = []
    for c in json.loads(Path(nb_path).read_text())['cells']:
        src = ''.join(c['source']).strip('\n')
        if not src: continue
        if c['cell_type'] == 'markdown': parts.append(src)
        elif c['cell_type'] == 'code' and not any(l.strip() in ('#| hide', '#|hide') for l in src.splitlines()):
            code = '\n'.join(l for l in src.splitlines() if not l.startswith('#|'))
            parts.append(f'```python\n{code}\n```')
    return '\n\n'.join(parts) + '\n'


def main(argv):
    cfg = ConfigParser(); cfg.read(ROOT / 'settings.ini')
    nb = ROOT / cfg['DEFAULT']['nbs_path'] / cfg['DEFAULT'].get('readme_nb', 'index.ipynb')
    text, readme = render(nb), ROOT / 'README.md'
    if argv == ['--check']:
        if not readme.exists() or readme.read_text() != text:
            print(f'README.md differs from what {nb.relative_to(ROOT)} renders to: edit the notebook, then run python tools/readme.py')
            return 1
        return 0
    if argv: sys.exit(__doc__)
    readme.write_text(text)
    return 0


if __name__ == '__main__': sys.exit(main(sys.argv[1:]))
