"""Projected cost of a preset: the FLOPs of every training it runs (bench.py's accounting), and the wall time they imply at
the official code's measured rate and on one and eight GPUs at a stated utilisation. A projection, not a measurement.

    python bench/project.py paper paper-cifar100 gpu-small      # markdown table on stdout
    python bench/project.py paper --json bench/results/projection.json

What is counted: every training step of every training the preset runs (students of every row and seed, and the teachers
it trains itself), with the preset's epochs, training images and inner steps, `bench.step_flops` per image (ours, IAD and
AdaIAD with their introspection term on throughout: an upper bound). Not counted: the per-epoch validation (1,000 images,
PGD-10 and the diagnostics: a few percent) and the final evaluation (standard AutoAttack on 10,000 images).
"""
import argparse, json, sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402
from adaad.models import ROBUSTBENCH, create_model, create_robustbench  # noqa: E402
from adaad.repro import dataset_of, preset_config, train_config  # noqa: E402
from adaad.train import TrainConfig, resolve  # noqa: E402

TRAIN_IMAGES = 50_000                 # CIFAR-10 and CIFAR-100 training sets
OFFICIAL_EPOCH_S = 45 * 60 + 53       # boyellow/AdaAD issue #2: the author's log, epochs 0 -> 1 at 15:41:04 -> 16:26:57
OFFICIAL_PAIR = ('resnet18', 'wrn-34-20')   # that log's run: AdaAD, ResNet-18 <- WRN-34-20, on the README's RTX 3090
H200_BF16_DENSE = 989.5e12            # NVIDIA's H200 datasheet: 1,979 TFLOP/s BF16 with sparsity, half of it dense
UTILISATION = 0.35                    # the benchmark's GPU target (bench.TARGETS): 35% of the bf16 peak


def _classes(dataset): return 10 if dataset == 'cifar10' else 100


def teacher_arch_flops(spec, dataset):
    "(architecture, forward FLOPs of one image) of a teacher spec (None: (None, 0))."
    if spec is None: return None, 0
    if spec['source'] == 'robustbench':
        return ROBUSTBENCH[(dataset, spec['name'])]['arch'], bench.forward_flops(create_robustbench(spec['name'], dataset))
    arch = spec['arch'] if spec['source'] == 'checkpoint' else spec['train']['student']
    return arch, bench.forward_flops(create_model(arch, _classes(dataset)))


def _images(tc):
    "Training images per epoch of a resolved config: the set minus the held-out validation images, or `train_n`."
    return tc.train_n or TRAIN_IMAGES - (tc.val_n if tc.val_source == 'holdout' else 0)


def trainings(preset):
    "Every training of `preset`: dict(what, method, arch, epochs, images, steps, flops), teachers it trains first."
    cfg = preset_config(preset); ds = dataset_of(cfg)
    _, ft = teacher_arch_flops(cfg['teacher'], ds)
    _, ft_st = teacher_arch_flops(cfg.get('standard_teacher'), ds)
    fwd = {}
    def f(arch):
        if arch not in fwd: fwd[arch] = bench.forward_flops(create_model(arch, _classes(ds)))
        return fwd[arch]
    def one(what, tc, ft=0, ft_st=0):
        tc = resolve(tc)
        per_image = bench.step_flops(tc.method, f(tc.student), ft, 'ours', k=tc.steps or 0, ft_st=ft_st)
        return dict(what=what, method=tc.method, arch=tc.student, epochs=tc.epochs, images=_images(tc), steps=tc.steps or 0,
                    gflop_per_image=round(per_image / 1e9, 3), flops=tc.epochs * _images(tc) * per_image)
    out = []
    for role in ('teacher', 'standard_teacher'):
        spec = cfg.get(role)
        if spec and spec['source'] == 'train': out.append(one(role, TrainConfig(**{'dataset': ds, **spec['train']})))
    for label, arch in cfg['students'].items():
        for row in cfg['methods']:
            for seed in cfg['seeds']:
                out.append(one(f'{label}/{row}/s{seed}', train_config(cfg, row, arch, seed=seed), ft, ft_st))
    return out


def longest_first(durations, gpus):
    "Wall time of independent trainings on `gpus` devices, each training on one, longest first onto the least loaded."
    load = [0.] * gpus
    for d in sorted(durations, reverse=True): load[load.index(min(load))] += d
    return max(load)


def official_rate():
    "FLOP/s the official AdaAD code reached in its author's log: the official step's FLOPs x 50,000 images per epoch time."
    fs, ft = (bench.forward_flops(create_model(a)) for a in OFFICIAL_PAIR)
    return bench.step_flops('adaad', fs, ft, 'naive') * TRAIN_IMAGES / OFFICIAL_EPOCH_S


def project(preset, rate_official=None, peak=H200_BF16_DENSE, utilisation=UTILISATION):
    "The projection of `preset`: its trainings and their total FLOPs, days at the official rate, hours on 1 and 8 GPUs."
    rows, rate = trainings(preset), rate_official or official_rate()
    total, gpu_rate = sum(r['flops'] for r in rows), peak * utilisation
    big = max(rows, key=lambda r: r['flops'])
    return dict(preset=preset, trainings=rows, n=len(rows), eflop=total / 1e18, largest=big['what'], largest_eflop=big['flops'] / 1e18,
                official_rate_tflops=rate / 1e12, days_official_1=total / rate / 86400,
                gpu_peak_tflops=peak / 1e12, utilisation=utilisation, hours_gpu_1=total / gpu_rate / 3600,
                hours_gpu_8=longest_first([r['flops'] / gpu_rate / 3600 for r in rows], 8))


def duration(seconds):
    "`seconds` in the unit a reader plans with: minutes, hours or days."
    if seconds < 3600: return f'{seconds / 60:.0f} min'
    if seconds < 48 * 3600: return f'{seconds / 3600:.1f} h' if seconds < 10 * 3600 else f'{seconds / 3600:.0f} h'
    return f'{seconds / 86400:.1f} days' if seconds < 10 * 86400 else f'{seconds / 86400:.0f} days'


def markdown(projections):
    "The projections as a markdown table."
    p0 = projections[0]
    lines = ['| preset | trainings | training FLOPs | largest training | at the official code\'s rate (one RTX 3090) | '
             f'one H200 at {100 * p0["utilisation"]:.0f}% of bf16 peak | eight H200 (one training each, longest first) |',
             '|---|---|---|---|---|---|---|']
    for p in projections:
        lines.append(f"| `{p['preset']}` | {p['n']} | {p['eflop']:.2f} EFLOP | {p['largest']} ({p['largest_eflop']:.2f} EFLOP) | "
                     f"{duration(p['days_official_1'] * 86400)} | {duration(p['hours_gpu_1'] * 3600)} | {duration(p['hours_gpu_8'] * 3600)} |")
    return '\n'.join(lines) + '\n'


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('presets', nargs='+')
    ap.add_argument('--utilisation', type=float, default=UTILISATION, help='fraction of the GPU bf16 peak assumed')
    ap.add_argument('--json', default=None, help='also write the projections (every training) to this file')
    args = ap.parse_args(argv)
    if not 0 < args.utilisation <= 1: ap.error(f'--utilisation must be in (0, 1], got {args.utilisation}')
    rate = official_rate()
    ps = [project(p, rate, utilisation=args.utilisation) for p in args.presets]
    if args.json: Path(args.json).write_text(json.dumps(ps, indent=1) + '\n')
    print(f'official rate: {rate / 1e12:.1f} TFLOP/s (AdaAD, ResNet-18 <- WRN-34-20, {OFFICIAL_EPOCH_S / 60:.1f} min an epoch)')
    print(markdown(ps))
    return ps


if __name__ == '__main__':
    main()
