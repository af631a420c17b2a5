#!/usr/bin/env python3
"""Run a preset's table as several one-thread processes (on small networks two one-thread processes beat one two-thread
process on a 2-core machine), then assemble the table in one last call that reuses every finished training and
evaluation.

    python tools/repro_parallel.py cpu-strong --workers 2 --out results/cpu-strong
    python tools/repro_parallel.py cpu-strong --seeds 0,1,2,3,4 --methods pgd-at,ard,rslad,adaad,adaiad,adaad-batchmean,adaad-ramp16

`--seeds` and `--methods` replace the preset's (the rows must be rows of the preset; the preset's declared family of
comparisons must only name rows that are run, or the table makes no comparisons and says so).

1. the teachers, in this process with all threads (every worker needs them; training them twice in one folder is refused);
2. `--workers` processes, each `run_table` with one thread over every `--workers`-th (row, seed) cell, all rows of the
   first seed before the next seed (so a run stopped half-way has complete seeds);
3. `run_table` over everything: trainings and evaluations are found in the shared runs and evals folders, and
   results.json, the tables and the figures are written with the provenance of this call.
Each step is resumable: run the same command again after a kill.
"""
import argparse, json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORKER = '''
import json, sys, torch
torch.set_num_threads(1)
from adaad.repro import run_table
a = json.loads(sys.argv[1])
for row, seed in a["cells"]:
    r = run_table(a["preset"], methods=[row], seeds=[seed], out_dir=a["out"], runs_dir=a["runs"],
                  time_limit=a["time_limit"])
    print(row, seed, r["status"], flush=True)
'''


def main(argv=None):
    from adaad.repro import preset_config, run_table
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('preset'); ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--out', default=None, help='results folder (default: runs/results/<preset>)')
    ap.add_argument('--runs', default=None, help='runs folder (default: runs/repro/<preset>)')
    ap.add_argument('--time-limit', type=float, default=None, help='seconds per worker call (default: none)')
    ap.add_argument('--curves', default=None, help='prefix of the training-curve figure (default: <out>/training_curves)')
    ap.add_argument('--seeds', default=None, help="comma-separated seeds (default: the preset's)")
    ap.add_argument('--methods', default=None, help="comma-separated rows of the preset (default: all of the preset's)")
    a = ap.parse_args(argv)
    cfg = preset_config(a.preset)
    try: seeds = list(cfg['seeds']) if a.seeds is None else [int(s) for s in a.seeds.split(',')]
    except ValueError: sys.exit(f'--seeds must be comma-separated integers such as 0,1,2,3,4, got {a.seeds!r}')
    methods = list(cfg['methods']) if a.methods is None else a.methods.split(',')
    unknown = [m for m in methods if m not in cfg['methods']]
    if unknown: sys.exit(f"--methods: {unknown} are not rows of preset {a.preset!r}; accepted: {list(cfg['methods'])}")
    out = str(Path(a.out or ROOT / 'runs' / 'results' / a.preset).resolve())
    runs = str(Path(a.runs or ROOT / 'runs' / 'repro' / a.preset).resolve())
    t = run_table(a.preset, methods=[methods[0]], seeds=[seeds[0]], out_dir=out, runs_dir=runs)  # teachers first
    if t['status'] != 'done': sys.exit('the teachers did not finish; run again')
    cells = [(row, seed) for seed in seeds for row in methods]   # seed-major: a partial run has whole seeds
    procs = []
    for w in range(a.workers):
        arg = json.dumps(dict(preset=a.preset, cells=cells[w::a.workers], out=out, runs=runs, time_limit=a.time_limit))
        log = open(Path(out) / f'worker{w}.log', 'a')
        procs.append(subprocess.Popen([sys.executable, '-c', WORKER, arg], stdout=log, stderr=subprocess.STDOUT,
                                      env=dict(os.environ, OMP_NUM_THREADS='1'), cwd=str(ROOT)))
    codes = [p.wait() for p in procs]
    if any(codes): sys.exit(f'a worker failed ({codes}); see {out}/worker*.log')
    res = run_table(a.preset, out_dir=out, runs_dir=runs, seeds=seeds, methods=methods)   # assemble: everything is cached
    from adaad.report import plot_training_curves
    plot_training_curves(res, a.curves or str(Path(out) / 'training_curves'))
    print(res['status'], f"{len(res['rows'])} rows in {out}")


if __name__ == '__main__':
    main()
