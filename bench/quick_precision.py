"""The `quick` preset's training speed in fp32 and bf16, with one and two torch threads, in one process.

    python bench/quick_precision.py [--methods pgd-at adaad] [--train-n 1024] [--reps 2] [--out bench/results]

Each measurement trains one epoch of a `quick` cell (its student, shipped teacher, batch, inner steps, validation) from
scratch into a temporary folder and reports images per second of training; the four settings are interleaved and
repeated so that a drift of the machine's speed falls on all of them alike. Numbers from a machine with other work
running are not comparable: run it alone. bf16 is fast only where the CPU computes it natively (AVX512-BF16, AMX).
"""
import argparse, datetime, json, statistics, sys, tempfile, time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from adaad.checkpoint import load_teacher  # noqa: E402
from adaad.core import atomic_write  # noqa: E402
from adaad.presets import PRESETS, preset_config, train_config  # noqa: E402
from adaad.repro import default_data_root, git_info, hardware_info, shipped_teacher_file  # noqa: E402
from adaad.train import train  # noqa: E402

SETTINGS = [(amp, threads) for threads in (1, 2) for amp in (False, True)]


def one_epoch(method, amp, threads, train_n, data_root, teacher):
    "Seconds of one training epoch (with its validation) of `quick`'s `method` cell in precision `amp` on `threads` threads."
    cfg = preset_config('quick')
    tc = train_config(cfg, method, cfg['students']['RN-18'], seed=0, data_root=data_root, device='cpu', amp=amp,
                      epochs=1, train_n=train_n, milestones=())
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        from adaad.methods import get_method
        train(tc, teacher=teacher if get_method(method).uses_teacher else None, out_dir=d, device='cpu', progress=False)
        return time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--methods', nargs='+', default=['pgd-at', 'adaad'])
    p.add_argument('--train-n', type=int, default=1024)
    p.add_argument('--reps', type=int, default=2)
    p.add_argument('--data-root', default=None)
    p.add_argument('--out', default=str(HERE / 'results'))
    a = p.parse_args(argv)
    root = default_data_root(a.data_root)
    spec = PRESETS['quick']['teacher']
    teacher = load_teacher(shipped_teacher_file(spec), arch=spec['arch'])
    rows = []
    for method in a.methods:
        times = {s: [] for s in SETTINGS}
        for _ in range(a.reps):
            for amp, threads in SETTINGS: times[(amp, threads)].append(one_epoch(method, amp, threads, a.train_n, root, teacher))
        base = statistics.median(times[(False, 2)])
        for (amp, threads), ts in times.items():
            med = statistics.median(ts)
            rows.append(dict(method=method, precision='bf16' if amp else 'fp32', threads=threads, seconds=[round(t, 2) for t in ts],
                             median_s=round(med, 2), images_per_s=round(a.train_n / med, 1),
                             speed_vs_fp32_2_threads=round(base / med, 3)))
            print(f"{method:8s} {rows[-1]['precision']} {threads} thread(s): {med:6.1f} s an epoch of {a.train_n} images "
                  f"({rows[-1]['speed_vs_fp32_2_threads']:.2f}x fp32 on 2 threads)", flush=True)
    res = dict(git_info(outputs=[Path(a.out)]), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
               hardware=hardware_info('cpu'), train_n=a.train_n, reps=a.reps, rows=rows)
    out = Path(a.out) / f"{res['date'][:10]}-quick-precision-{res['hardware']['cpu_capability']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(res, indent=1) + '\n')
    print('written:', out)


if __name__ == '__main__':
    main()
