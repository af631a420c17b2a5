"""`make docs`: the notebooks as a static site, opened in headless Chromium: every page renders (its title, its
cells, its math as MathML rather than raw TeX) and every internal link resolves (a page, a repository file, an anchor)."""
import os, re, shutil, subprocess, sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--virtual-time-budget=2000']


class Page(HTMLParser):
    "The links, ids, headings and math elements of a rendered page."
    def __init__(self):
        super().__init__(); self.links, self.ids, self.h1, self.math, self._in_h1 = [], set(), [], 0, False
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get('id'): self.ids.add(a['id'])
        if tag == 'a' and a.get('href'): self.links.append(a['href'])
        if tag == 'math': self.math += 1
        if tag == 'h1': self._in_h1 = True; self.h1.append('')
    def handle_endtag(self, tag):
        if tag == 'h1': self._in_h1 = False
    def handle_data(self, data):
        if self._in_h1: self.h1[-1] += data


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    if CHROMIUM is None:
        msg = 'no Chromium: install Debian\'s chromium package (apt-get install chromium) to check the documentation site'
        if os.environ.get('CI'): pytest.fail(msg)
        pytest.skip(msg)
    from conftest import built_once
    def build(out):
        "The site, and each page's DOM as Chromium renders it (`<page>.dom`)."
        subprocess.run([sys.executable, str(ROOT / 'tools' / 'docs.py'), '--out', str(out)], check=True, capture_output=True,
                       timeout=600)
        profile = tmp_path_factory.mktemp('chromium-profile')
        for f in sorted(out.glob('*.html')):
            p = subprocess.run([CHROMIUM, *FLAGS, f'--user-data-dir={profile}', '--dump-dom', f.as_uri()], capture_output=True,
                               text=True, timeout=120)
            assert p.returncode == 0 and '<html' in p.stdout, (f.name, p.stderr[-2000:])
            f.with_suffix('.dom').write_text(p.stdout)
    out, pages = built_once(tmp_path_factory, 'docs-site', build), {}
    for f in sorted(out.glob('*.html')):
        page = Page(); page.dom = f.with_suffix('.dom').read_text(); page.feed(page.dom)
        pages[f.name] = page
    return out, pages


def test_every_notebook_has_a_page_and_the_index_is_the_readme(site):
    out, pages = site
    assert {n.replace('.html', '.ipynb') for n in pages} == {p.name for p in (ROOT / 'nbs').glob('*.ipynb')}
    assert pages['index.html'].h1 and pages['index.html'].h1[0].strip().startswith('adaad')
    for name, page in pages.items(): assert page.h1, f'{name}: no heading rendered'


def test_math_is_rendered_not_left_as_tex(site):
    "Pages whose notebooks hold math show MathML, and no $...$ TeX is left in their text."
    _, pages = site
    assert pages['08_losses.html'].math > 10 and pages['07_inner.html'].math > 5
    for name, page in pages.items():
        text = re.sub(r'<(pre|code)[^>]*>.*?</\1>', '', page.dom, flags=re.S)
        assert not re.search(r'\$\\(frac|mathrm|tilde|sum|max)', text), f'{name}: raw TeX left'


def test_every_internal_link_resolves(site):
    out, pages = site
    bad = []
    for name, page in pages.items():
        for href in page.links:
            if re.match(r'^[a-z]+:', href) and not href.startswith('file:'): continue
            path, _, frag = href.replace('file://', '').partition('#')
            target = (out / name).parent / unquote(path) if path else out / name
            if not target.exists(): bad.append(f'{name} -> {href} (no file)')
            elif frag and target.suffix == '.html' and target.name in pages and not {frag, unquote(frag)} & pages[target.name].ids:
                # a browser looks for the fragment as written, then percent-decoded (HTML's "indicated part")
                bad.append(f'{name} -> {href} (no anchor)')
    assert not bad, bad[:20]
