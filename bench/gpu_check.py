"""The first check on a machine with a GPU (`make gpu-check`, a few minutes on one H100/H200, at most 8): before days of
the `paper` preset, does it run here, and how fast?

1. `rate`: the step rate of the `paper` preset's AdaAD training (ResNet-18 student, WRN-34-20 teacher of random weights,
   batch 128, the preset's precision: fp32 with TF32 convolutions, channels_last, cuDNN autotuning), and the same step
   under bf16 autocast (the `amp=True` option); images/s, the epoch and the 200-epoch run they imply, peak GPU memory.
2. `end-to-end`: the `paper` preset's first batches through the pipeline (`run_table`'s dry run with its AdaAD row on
   ResNet-18: the teachers in their file layouts, training, checkpoints written, the evaluation, results.json and the
   tables), then the saved student read back and evaluated on 32 test images with every attack of the paper suite at
   full strength (AutoAttack standard, CW2 of 1,000 steps).

    python bench/gpu_check.py                    # on CUDA: runs/gpu-check/gpu_check.json
    python bench/gpu_check.py --dry-run          # the same steps on the CPU at tiny sizes (a small pair, batch 4, fp32 only):
                                                 # checks the script, its numbers mean nothing

Writes one JSON report (device, precision, versions, each step's result or error) and prints a line per step. Exit
status 0 when every step passed, 1 when one failed (the others still run), 2 when CUDA is asked for and not visible.
"""
import argparse, json, sys, time, traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402
from adaad.core import check_device, write_json  # noqa: E402
from adaad.data import balanced_subset, load_cifar  # noqa: E402
from adaad.fast import prepare_teacher  # noqa: E402
from adaad.models import create_model  # noqa: E402
from adaad.presets import preset_config, train_config  # noqa: E402
from adaad.repro import (DRY_RUN, default_data_root, describe_device, git_info, hardware_info, precision_of,  # noqa: E402
                         run_table)
from adaad.train import gpu_defaults, resolve  # noqa: E402

TRAIN_IMAGES = 49_000   # the paper preset's training images an epoch (50,000 less its 1,000 held-out validation images)


def rate(device, pair, batch_size, iters, warmup, train, bf16=True):
    "Images/s of the paper preset's AdaAD step on `pair`, in its own precision (and under bf16); peak memory; epoch times."
    tc = resolve(train_config(preset_config('paper'), 'adaad', 'resnet18', device=device))
    s_arch, t_arch = bench.PAIRS[pair]
    torch.manual_seed(0)
    teacher = prepare_teacher(create_model(t_arch).to(device).eval(), fold_bn=tc.fold_teacher, channels_last=tc.channels_last)
    fs, ft = bench.forward_flops(create_model(s_arch).to(device)), bench.forward_flops(create_model(t_arch).to(device))
    rows = []
    for amp in (tc.amp, True) if bf16 else (tc.amp,):
        if device.type == 'cuda': torch.cuda.reset_peak_memory_stats(device)
        student = create_model(s_arch).to(device)
        if tc.channels_last: student = student.to(memory_format=torch.channels_last)
        step = bench.ours_runner('adaad', student, teacher, train, batch_size, device, amp=amp, channels_last=tc.channels_last)
        sec = bench.timed(step, iters, warmup, device)
        ips = batch_size / sec
        rows.append(dict(pair=pair, student=s_arch, teacher=t_arch, batch_size=batch_size, precision=precision_of(amp, device),
                         channels_last=tc.channels_last, images_per_s=round(ips, 2), steps_per_s=round(1 / sec, 3),
                         tflops=round(bench.step_flops('adaad', fs, ft, 'ours', k=tc.steps) * ips / 1e12, 3),
                         epoch_min=round(TRAIN_IMAGES / ips / 60, 1), run_h=round(tc.epochs * TRAIN_IMAGES / ips / 3600, 1),
                         epochs=tc.epochs, peak_memory_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                         if device.type == 'cuda' else None))
        print(f"rate ({rows[-1]['precision']}): {ips:.1f} images/s, {rows[-1]['epoch_min']} min an epoch, "
              f"{rows[-1]['run_h']} h for AdaAD's {tc.epochs} epochs on one GPU", flush=True)
        del step, student
    return dict(rows=rows, note='random weights; the step of adaad.train.train (training_loss), timed after warm-up')


def end_to_end(device, out, data_root, n_eval, small=False):
    """The paper preset's AdaAD row through run_table's dry run (every code path at toy size), then its saved student read
    back and evaluated on `n_eval` test images under the paper suite at full strength (AutoAttack standard, CW2 1,000
    steps); `small`: a small teacher and student in place of WRN-34-20 and ResNet-18 (the CPU check)."""
    from adaad.checkpoint import load_teacher
    from adaad.data import first_n
    from adaad.evaluate import evaluate
    lines, arch = [], 'wrn-10-1' if small else 'resnet18'
    res = run_table('paper', dry_run=True, methods=['adaad'], students={'RN-18': arch}, device=str(device), data_root=data_root,
                    teacher=dict(source='train', train=dict(method='pgd-at', student='wrn-10-1')) if small else None,
                    out_dir=str(out / 'results'), runs_dir=str(out / 'runs'), log=lambda line: (lines.append(line), print(line, flush=True)))
    if res['status'] != 'done': raise RuntimeError(f"run_table ended with status {res['status']!r}")
    ckpt = Path(res['runs']['RN-18/adaad/0']) / 'final.pt'
    model = load_teacher(str(ckpt), arch=arch, device=device)
    cfg = preset_config('paper')
    test = first_n(load_cifar('cifar10', 'test', root=default_data_root(data_root), device='cpu'), n_eval)
    r = evaluate(model, test, suite=list(cfg['suite']), batch_size=n_eval, device=device, progress=False)
    print(f"evaluation of the saved student on {n_eval} images: " + ', '.join(f'{k} {v:.1f}% ({r.seconds.get(k, 0.):.0f} s)'
                                                                          for k, v in r.accuracy.items()), flush=True)
    return dict(status=res['status'], device=res['device'], precision=res['precision'], dry_run_sizes=DRY_RUN, log=lines,
                rows=[dict(student=x['student'], method=x['method'], accuracy={k: c['acc'] for k, c in x['cells'].items()})
                      for x in res['rows']],
                checkpoint=str(ckpt), full_suite=dict(n=n_eval, accuracy=r.accuracy, seconds=r.seconds))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--dry-run', action='store_true', help='the same steps on the CPU at tiny sizes (checks the script)')
    ap.add_argument('--device', default=None, help="(default: 'cuda'; 'cpu' with --dry-run)")
    ap.add_argument('--out', default=None, help='folder of the report and the runs (default: runs/gpu-check, runs/gpu-check-dry)')
    ap.add_argument('--data-root', default=None, help='(default: $ADAAD_DATA, else ./data)')
    a = ap.parse_args(argv)
    try: device = check_device(a.device or ('cpu' if a.dry_run else 'cuda'), '--device')
    except ValueError as e: print(f'gpu_check: {e}; --dry-run runs the same steps on the CPU', file=sys.stderr); return 2
    out = Path(a.out or HERE.parent / 'runs' / ('gpu-check-dry' if a.dry_run else 'gpu-check'))
    gpu_defaults(device)
    print(f'gpu_check on {describe_device(device)}' + (' (dry run: tiny sizes, numbers mean nothing)' if a.dry_run else ''), flush=True)
    pair, bs, iters, warmup, n, n_eval = ('small', 4, 1, 0, 40, 2) if a.dry_run else ('r18-wrn34-20', 128, 20, 5, 5000, 32)
    report = dict(dry_run=a.dry_run, device=describe_device(device), hardware=hardware_info(device), git=git_info(),
                  cuda=torch.version.cuda, tf32=dict(cudnn=torch.backends.cudnn.allow_tf32, matmul=torch.backends.cuda.matmul.allow_tf32),
                  cudnn_benchmark=torch.backends.cudnn.benchmark, steps={})
    t0 = time.time()
    for name, fn in (('rate', lambda: rate(device, pair, bs, iters, warmup, balanced_subset(
                         load_cifar('cifar10', 'train', root=default_data_root(a.data_root), device='cpu'), n, seed=0).to(device), bf16=not a.dry_run)),
                     ('end-to-end', lambda: end_to_end(device, out, a.data_root, n_eval, small=a.dry_run))):
        t = time.time()
        try: report['steps'][name] = dict(ok=True, **fn())
        except Exception as e:   # noqa: BLE001  the report names the failure; the next step still runs
            traceback.print_exc()
            report['steps'][name] = dict(ok=False, error=f'{type(e).__name__}: {e}')
        report['steps'][name]['seconds'] = round(time.time() - t, 1)
        print(f"== {name}: {'passed' if report['steps'][name]['ok'] else 'FAILED'} in {report['steps'][name]['seconds']} s", flush=True)
    report['wall_s'] = round(time.time() - t0, 1)
    write_json(out / 'gpu_check.json', report)
    failed = [k for k, v in report['steps'].items() if not v['ok']]
    print(f"gpu_check: {'every step passed' if not failed else 'FAILED: ' + ', '.join(failed)}; report {out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
