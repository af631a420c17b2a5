"""One table from several `bench.py` result files (`make bench-gpu` writes one file per step).

    python bench/report.py bench/results/2026-11-30-cuda-*.json --out bench/results/2026-11-30-cuda.md

Each source keeps its own provenance line (commit, hardware, measured peak); the rows, the speed-target checks and the
projections of every file follow in one table each. The measurements are the files' own; only the target checks are
derived again from the rows (`bench.check_targets`), so every file is checked against the current `bench.TARGETS`.
"""
import argparse, json, sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402
from adaad.core import atomic_write  # noqa: E402


def load(paths):
    "The result dicts of `paths`, each checked to be a bench.py result (rows and provenance)."
    out = []
    for p in map(Path, paths):
        try: res = json.loads(p.read_text())
        except (OSError, ValueError) as e: raise SystemExit(f'report: {p} is not a readable JSON file ({e})')
        if not isinstance(res, dict) or not {'rows', 'provenance', 'args'} <= res.keys():
            raise SystemExit(f'report: {p} is not a bench.py result (needs rows, provenance and args)')
        out.append((p, res))
    if not out: raise SystemExit('report: give at least one result file')
    return out


def torch_device_type(res):
    "'cuda' or 'cpu': the device type the file's run measured on."
    return str(res['args'].get('device', 'cpu')).split(':')[0]


def merge(results):
    "Markdown: one provenance line per source, then the train-step, target, projection and evaluation tables of all."
    lines = ['Sources:', '']
    for p, res in results:
        head = bench.markdown(dict(res, rows=[], projections=[], targets=[])).splitlines()[0]
        lines.append(f"- `{p.name}`: {head} Wall time {res.get('wall_s', '?')} s.")
    merged = dict(results[0][1])
    merged['rows'] = [r for _, res in results for r in res['rows']]
    merged['projections'] = [q for _, res in results for q in res.get('projections') or []]
    merged['targets'] = [t for _, res in results
                         for t in bench.check_targets(res['rows'], torch_device_type(res))]
    body = bench.markdown(merged).split('\n', 1)[1].lstrip('\n')   # the tables, without the first file's provenance line
    return '\n'.join(lines) + '\n\n' + body


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('files', nargs='+', help='bench.py result JSON files')
    ap.add_argument('--out', help='write the markdown here (atomically) as well as to stdout')
    args = ap.parse_args(argv)
    md = merge(load(args.files))
    if args.out: atomic_write(Path(args.out), md)
    print(md)
    return md


if __name__ == '__main__':
    main()
