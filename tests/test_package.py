"The package: importable without the notebook tooling, buildable as a wheel, every module exported from a notebook."
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = '''
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {"nbdev", "jupyter", "jupyter_client", "ipykernel", "IPython", "papermill", "execnb", "matplotlib", "seaborn"}:
            raise ImportError("blocked for this test: " + name)
sys.meta_path.insert(0, Block())
import adaad, adaad.core, adaad.data, adaad.models, adaad.checkpoint, adaad.attacks, adaad.evaluate, adaad.inner, adaad.losses, adaad.methods, adaad.diagnostics, adaad.fast, adaad.train, adaad.cli, adaad.presets, adaad.repro, adaad.jobs
print(adaad.__version__)
'''


def test_import_needs_no_notebook_tooling():
    out = subprocess.run([sys.executable, '-c', BLOCK], capture_output=True, text=True, cwd='/')
    assert out.returncode == 0, out.stderr


def test_every_module_comes_from_a_notebook():
    for f in (ROOT / 'adaad').glob('*.py'):
        if f.name in ('__init__.py', '_modidx.py'): continue
        head = f.read_text().splitlines()[:4]
        src = next((l.split('File to edit: ')[1].rstrip('.') for l in head if 'File to edit:' in l), None)
        assert src and (ROOT / 'adaad' / src).resolve().is_file(), f'{f.name} is not exported from a notebook'


def long_lines(text, limit=120):
    """Line numbers longer than `limit` characters, but for the first line of the `__all__` nbdev writes itself (it
    wraps the names at 120 without counting `__all__ = `, so that line can run to 130)."""
    return [i for i, line in enumerate(text.splitlines(), 1) if len(line) > limit and not line.startswith('__all__ = [')]


def test_library_lines_fit_in_120_characters():
    "Every line of the library is at most 120 characters, but nbdev's own first line of `__all__` (fix the notebook)."
    assert long_lines("__all__ = ['" + 'a' * 120 + "',\n" + 'y' * 120 + '\n' + 'y' * 121) == [3]
    bad = {f.name: n for f in sorted((ROOT / 'adaad').glob('*.py')) if f.name != '_modidx.py'
           if (n := long_lines(f.read_text()))}
    assert not bad, f'lines over 120 characters (module: line numbers): {bad}'


def test_wheel_builds(tmp_path):
    out = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(tmp_path), str(ROOT)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    whl = next(tmp_path.glob('adaad-*.whl'))
    names = zipfile.ZipFile(whl).namelist()
    assert {'adaad/train.py', 'adaad/attacks.py'} <= set(names)
    meta = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith('METADATA'))).decode()
    reqs = [l for l in meta.splitlines() if l.startswith('Requires-Dist:')]
    assert any('pyautoattack' in r and 'extra' not in r for r in reqs)
    assert all('extra == "dev"' in r for r in reqs if any(t in r for t in ('nbdev', 'papermill', 'jupyter', 'matplotlib')))
    ep = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith('entry_points.txt'))).decode()
    assert 'adaad = adaad.cli:main' in ep


def test_missing_data_fails_under_make_test(tmp_path):
    "With ADAAD_REQUIRE_DATA=1 (what `make test` sets) a data test fails when CIFAR-10 is absent, instead of skipping."
    import os
    env = dict(os.environ, ADAAD_DATA=str(tmp_path / 'nowhere'), ADAAD_REQUIRE_DATA='1')
    args = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'tests/test_data.py', '-k', 'first_test_images_are_exact or balanced_subset']
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode != 0 and 'no CIFAR-10 under' in out.stdout, out.stdout[-2000:]
    env['ADAAD_REQUIRE_DATA'] = '0'
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env)
    assert 'skipped' in out.stdout and 'failed' not in out.stdout, out.stdout[-2000:]
