#!/usr/bin/env python3
"""Render the notebooks in `nbs/` to a static HTML site (`make docs`, default folder `_docs/`): one page per notebook,
`index.html` from `nbs/index.ipynb` (the README's source), the math as MathML (readable offline, without a script),
links between notebooks pointing at their pages and links to other repository files at those files.

    python tools/docs.py [--out _docs]

nbdev's own site generator needs quarto; this uses nbconvert (already a dependency) and latex2mathml.
"""
import argparse, os, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
FENCE = re.compile(r'(```.*?```)', re.S)
CODE = re.compile(r'(`[^`\n]*`)')
DISPLAY = re.compile(r'\$\$(.+?)\$\$', re.S)
INLINE = re.compile(r'(?<![\\$])\$(?!\$)([^$\n]+?)(?<!\\)\$')
LINK = re.compile(r'\]\(([^)\s]+)\)')


def to_mathml(tex, display):
    "MathML for `tex`, or the TeX itself in a code span where latex2mathml cannot read it."
    from latex2mathml.converter import convert
    try: return convert(tex.strip(), display='block' if display else 'inline')
    except Exception: return f'<code class="tex">{tex}</code>'


def math_to_mathml(text):
    "Markdown `text` with $...$ and $$...$$ outside code replaced by MathML."
    out = []
    for block in FENCE.split(text):
        if block.startswith('```'): out.append(block); continue
        parts = CODE.split(block)
        for i, p in enumerate(parts):
            if i % 2 == 0:
                p = DISPLAY.sub(lambda m: to_mathml(m[1], True), p)
                parts[i] = INLINE.sub(lambda m: to_mathml(m[1], False), p)
        out.append(''.join(parts))
    return ''.join(out)


def fix_link(target, nb, out):
    "A link of notebook `nb` as the page in `out` must write it: notebooks to pages, other files relative to `out`."
    if re.match(r'^[a-z]+:', target) or target.startswith('#'): return target
    path, _, frag = target.partition('#')
    base = ROOT if nb.name == 'index.ipynb' else nb.parent          # index.ipynb is written for README.md at the root
    dest = (base / path).resolve()
    if dest.suffix == '.ipynb' and dest.parent == NBS: new = dest.stem + '.html'
    else: new = os.path.relpath(dest, out)
    return new + (f'#{frag}' if frag else '')


def render(nb_path, out):
    "Write the page of notebook `nb_path` into `out`; its file name."
    import nbformat
    from nbconvert import HTMLExporter
    nb = nbformat.read(nb_path, as_version=4)
    for c in nb.cells:
        if c.cell_type == 'markdown':
            c.source = LINK.sub(lambda m: f'](<{fix_link(m[1], nb_path, out)}>)', math_to_mathml(c.source))
    exp = HTMLExporter(template_name='lab')
    exp.mathjax_url = ''
    html, _ = exp.from_notebook_node(nb, resources=dict(metadata=dict(name=nb_path.stem)))
    html = re.sub(r'<script[^>]*mathjax[^>]*>\s*</script>', '', html, flags=re.I)
    name = nb_path.stem + '.html'
    (out / name).write_text(html, encoding='utf-8')
    return name


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default=str(ROOT / '_docs'), help='site folder (default: _docs/)')
    a = ap.parse_args(argv)
    out = Path(a.out).resolve(); out.mkdir(parents=True, exist_ok=True)
    pages = [render(p, out) for p in sorted(NBS.glob('*.ipynb'))]
    print(f'{len(pages)} pages in {out} (open {out / "index.html"})')


if __name__ == '__main__':
    sys.exit(main())
