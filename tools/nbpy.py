#!/usr/bin/env python3
"""Round-trip notebooks and percent-format scripts, an editing aid (the notebook stays the source of truth).

    python tools/nbpy.py to-py nbs/04_attacks.ipynb /tmp/04_attacks.py   # edit the script ...
    python tools/nbpy.py to-nb /tmp/04_attacks.py nbs/04_attacks.ipynb   # ... and write the notebook back

Cells are separated by lines `# %%` (code) or `# %% [markdown]`; `tags=["parameters"]` after the marker sets
the cell's tags. Markdown lines carry a leading `# `. Outputs are dropped: run the notebook to make them.
"""
import hashlib, json, re, sys
from pathlib import Path

_MARK = re.compile(r'^# %%(?P<md> \[markdown\])?(?: tags=(?P<tags>\[.*\]))?\s*$')

def to_nb(src, dst):
    "Write the notebook `dst` from the percent script `src`."
    cells, cur = [], None
    for line in Path(src).read_text().splitlines():
        m = _MARK.match(line)
        if m:
            cur = dict(md=bool(m['md']), tags=json.loads(m['tags']) if m['tags'] else [], lines=[])
            cells.append(cur)
        elif cur is not None: cur['lines'].append(line)
    nb_cells, seen, old = [], set(), _old_ids(dst, cells)
    for i, c in enumerate(cells):
        lines = c['lines']
        while lines and not lines[-1].strip(): lines.pop()
        if c['md']: lines = [l[2:] if l.startswith('# ') else l.lstrip('#') for l in lines]
        text = '\n'.join(lines)
        meta = {'tags': c['tags']} if c['tags'] else {}
        cid = old.get(i) or hashlib.sha1(text.encode()).hexdigest()[:8]  # kept ids keep exports and diffs small
        while cid in seen: cid = hashlib.sha1(cid.encode()).hexdigest()[:8]
        seen.add(cid)
        cell = dict(cell_type='markdown' if c['md'] else 'code', id=cid, metadata=meta, source=text.splitlines(keepends=True))
        if not c['md']: cell.update(execution_count=None, outputs=[])
        nb_cells.append(cell)
    nb = dict(cells=nb_cells, nbformat=4, nbformat_minor=5,
              metadata=dict(kernelspec=dict(display_name='python3', language='python', name='python3')))
    Path(dst).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')

def _text(c):
    "A parsed cell's text as the notebook stores it."
    lines = list(c['lines'])
    while lines and not lines[-1].strip(): lines.pop()
    if c['md']: lines = [l[2:] if l.startswith('# ') else l.lstrip('#') for l in lines]
    return '\n'.join(lines)

def _old_ids(dst, cells):
    """{index of a new cell: id of the existing notebook's cell it continues}: unchanged cells and cells edited in place
    (aligned by difflib) keep their ids, so a round trip changes only the cells that were edited, added or removed."""
    import difflib
    if not Path(dst).exists(): return {}
    prev = json.loads(Path(dst).read_text())['cells']
    a, b = [''.join(c['source']) for c in prev], [_text(c) for c in cells]
    ids = {}
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == 'equal' or (tag == 'replace' and i2 - i1 == j2 - j1):
            ids.update({j1 + k: prev[i1 + k].get('id') for k in range(j2 - j1)})
    return {k: v for k, v in ids.items() if v}

def to_py(src, dst):
    "Write the percent script `dst` from the notebook `src`."
    out = []
    for c in json.loads(Path(src).read_text())['cells']:
        tags = c.get('metadata', {}).get('tags', [])
        mark = '# %%' + (' [markdown]' if c['cell_type'] == 'markdown' else '') + (f' tags={json.dumps(tags)}' if tags else '')
        text = ''.join(c['source'])
        if c['cell_type'] == 'markdown': text = '\n'.join(('# ' + l) if l else '#' for l in text.splitlines())
        out += [mark, text, '']
    Path(dst).write_text('\n'.join(out))

if __name__ == '__main__':
    if len(sys.argv) != 4 or sys.argv[1] not in ('to-nb', 'to-py'): sys.exit(__doc__)
    (to_nb if sys.argv[1] == 'to-nb' else to_py)(sys.argv[2], sys.argv[3])
