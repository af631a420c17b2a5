"""Projected cost of a preset: the FLOPs of every training and evaluation it runs (bench.py's accounting), and the wall
time they imply at the official code's measured rate and on one and eight GPUs at a stated utilisation of the peak of the
precision the preset trains in. A projection, not a measurement.

    python bench/project.py paper paper-cifar100 gpu-small      # markdown table on stdout
    python bench/project.py paper --json bench/results/projection.json

What is counted: every training step of every training the preset runs (students of every row and seed, and the teachers
it trains itself), with the preset's epochs, training images and inner steps, `bench.step_flops` per image (ours, IAD and
AdaIAD with their introspection term on throughout: an upper bound); and the final evaluation of the teacher and of every
student under the preset's suite on its test images (`eval_flops`: AutoAttack's later attacks on the points still robust,
the teacher's RobustBench AutoAttack accuracy, `STUDENT_ROBUST` for a student; CW2 without its early stop). Not counted:
the per-epoch validation (1,000 images, PGD-10 and the diagnostics: a few percent).

Precision: fp32 presets (the paper's) run their convolutions as TF32 (PyTorch's default for cuDNN), so their GPU time is
priced at the TF32 peak; presets that train in bf16 at the bf16 peak. Schedule on eight GPUs as `run_table_parallel` runs a
preset: the teachers it trains first (each on one GPU), then the students' cells (training and evaluation) assigned by
`adaad.jobs.schedule_cells` (longest first by FLOPs), then the teacher's evaluation on one GPU.
"""
import argparse, json, sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402
from adaad.models import ROBUSTBENCH, create_model, create_robustbench  # noqa: E402
from adaad.attacks import ATTACKS  # noqa: E402
from adaad.jobs import schedule_cells  # noqa: E402
from adaad.presets import dataset_of, preset_config, train_config  # noqa: E402
from adaad.train import TrainConfig, resolve  # noqa: E402

TRAIN_IMAGES = 50_000                 # CIFAR-10 and CIFAR-100 training sets
OFFICIAL_EPOCH_S = 45 * 60 + 53       # boyellow/AdaAD issue #2: the author's log, epochs 0 -> 1 at 15:41:04 -> 16:26:57
OFFICIAL_PAIR = ('resnet18', 'wrn-34-20')   # that log's run: AdaAD, ResNet-18 <- WRN-34-20, on the README's RTX 3090
H200_BF16_DENSE = 989.5e12            # NVIDIA's H200 datasheet: 1,979 TFLOP/s BF16 with sparsity, half of it dense
H200_TF32_DENSE = 494.7e12            # the same datasheet: 989 TFLOP/s TF32 with sparsity, half of it dense
PEAKS = {'bf16': H200_BF16_DENSE, 'tf32': H200_TF32_DENSE}
UTILISATION = 0.35                    # the benchmark's GPU target (bench.TARGETS): 35% of the peak
STUDENT_ROBUST = 0.5                  # fraction of a student's test images AutoAttack's later attacks still run on (paper: ~50% AA)
AA_TARGETS = 9                        # AutoAttack standard: APGD-T and FAB-T each over 9 target classes, 100 iterations, Square 5,000 queries


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
    "Wall time of independent cells on `gpus` devices, each on one, as `adaad.jobs.schedule_cells` assigns them."
    return max((sum(durations[i] for i in w) for w in schedule_cells([(i, d) for i, d in enumerate(durations)], gpus)), default=0.)


def attack_flops(name, f, robust, cw_steps=None):
    "FLOPs of attack `name` on one image of a network of forward FLOPs `f` (2f a forward with input gradient, f one without)."
    if name == 'clean': return f
    if name == 'fgsm': return 3 * f
    if name == 'aa': return 2 * f * 100 + robust * (2 * 2 * f * 100 * AA_TARGETS + f * 5000) + f
    spec = ATTACKS[name]
    steps = cw_steps or spec.kwargs.get('steps') or spec.kwargs.get('n_queries') or 1
    return 2 * f * steps + f


def eval_flops(cfg, f, robust):
    "FLOPs of one network's final evaluation under preset dict `cfg`'s suite on its test images (reduced AutoAttack: APGD-CE)."
    over = cfg.get('attack_overrides') or {}
    per = 0
    for a in cfg['suite']:
        if a == 'aa' and cfg.get('aa'):   # a reduced AutoAttack: its APGD attacks with their iterations, restarts and targets
            aa = cfg['aa']; it, r = aa.get('n_iter', 20), aa.get('n_restarts', 1)
            per += sum(2 * f * it * r * (aa.get('n_target_classes', 3) if k == 'apgd-t' else 1) for k in aa.get('attacks', ('apgd-ce',)))
        else: per += attack_flops(a, f, robust, over.get(a, {}).get('steps'))
    return cfg['n_test'] * per


def evaluations(preset):
    "The final evaluations of `preset`: dict(what, arch, images, flops), the teacher's first, then each student cell's."
    cfg = preset_config(preset); ds = dataset_of(cfg)
    arch, ft = teacher_arch_flops(cfg['teacher'], ds)
    spec = cfg['teacher']
    robust = ROBUSTBENCH[(ds, spec['name'])]['aa'] / 100 if spec['source'] == 'robustbench' else STUDENT_ROBUST
    out = [dict(what='teacher-eval', arch=arch, images=cfg['n_test'], flops=eval_flops(cfg, ft, robust))]
    for label, a in cfg['students'].items():
        fs = bench.forward_flops(create_model(a, _classes(ds)))
        out += [dict(what=f'{label}/{row}/s{seed}-eval', arch=a, images=cfg['n_test'], flops=eval_flops(cfg, fs, STUDENT_ROBUST))
                for row in cfg['methods'] for seed in cfg['seeds']]
    return out


def precision(preset):
    "'bf16' where the preset trains under bf16 autocast, else 'tf32' (fp32 with TF32 convolutions, PyTorch's default on CUDA)."
    return 'bf16' if preset_config(preset)['train'].get('amp') in (True, 'auto') else 'tf32'


def official_rate():
    "FLOP/s the official AdaAD code reached in its author's log: the official step's FLOPs x 50,000 images per epoch time."
    fs, ft = (bench.forward_flops(create_model(a)) for a in OFFICIAL_PAIR)
    return bench.step_flops('adaad', fs, ft, 'naive') * TRAIN_IMAGES / OFFICIAL_EPOCH_S


def wall_flops(rows, evals, gpus):
    "FLOPs on the slowest of `gpus` GPUs: teachers' trainings one after the other, the students' cells by `schedule_cells`, the teacher's evaluation."
    teachers = sum(r['flops'] for r in rows if r['what'] in ('teacher', 'standard_teacher'))
    ev = {e['what'][:-len('-eval')]: e['flops'] for e in evals[1:]}
    cells = [(r['what'], r['flops'] + ev[r['what']]) for r in rows if r['what'] not in ('teacher', 'standard_teacher')]
    cost = dict(cells)
    return teachers + max(sum(cost[c] for c in w) for w in schedule_cells(cells, gpus)) + evals[0]['flops']


def project(preset, rate_official=None, peak=None, utilisation=UTILISATION):
    """The projection of `preset`: its trainings and evaluations and their total FLOPs, days at the official rate, hours on 1
    and 8 GPUs at `utilisation` of `peak` (default: the H200's dense peak of the precision the preset trains in)."""
    rows, evals, rate, prec = trainings(preset), evaluations(preset), rate_official or official_rate(), precision(preset)
    peak = peak or PEAKS[prec]
    train_total, eval_total, gpu_rate = sum(r['flops'] for r in rows), sum(e['flops'] for e in evals), peak * utilisation
    total = train_total + eval_total
    big = max(rows, key=lambda r: r['flops'])
    return dict(preset=preset, trainings=rows, evaluations=evals, n=len(rows), precision=prec, eflop=total / 1e18,
                train_eflop=train_total / 1e18, eval_eflop=eval_total / 1e18, teacher_eval_eflop=evals[0]['flops'] / 1e18,
                largest=big['what'], largest_eflop=big['flops'] / 1e18,
                official_rate_tflops=rate / 1e12, days_official_1=total / rate / 86400,
                gpu_peak_tflops=peak / 1e12, utilisation=utilisation, hours_gpu_1=total / gpu_rate / 3600,
                hours_gpu_8=wall_flops(rows, evals, 8) / gpu_rate / 3600)


def duration(seconds):
    "`seconds` in the unit a reader plans with: minutes, hours or days."
    if seconds < 3600: return f'{seconds / 60:.0f} min'
    if seconds < 48 * 3600: return f'{seconds / 3600:.1f} h' if seconds < 10 * 3600 else f'{seconds / 3600:.0f} h'
    return f'{seconds / 86400:.1f} days' if seconds < 10 * 86400 else f'{seconds / 86400:.0f} days'


def markdown(projections):
    "The projections as a markdown table."
    p0 = projections[0]
    lines = ['| preset | precision | trainings | FLOPs: training + evaluation (the teacher\'s) | largest training | '
             f'at the official code\'s rate (one RTX 3090) | one H200 at {100 * p0["utilisation"]:.0f}% of that precision\'s peak | '
             'eight H200 (teachers first, cells longest first, then the teacher\'s evaluation) |',
             '|---|---|---|---|---|---|---|---|']
    for p in projections:
        lines.append(f"| `{p['preset']}` | {p['precision']} ({p['gpu_peak_tflops']:.0f} TFLOP/s peak) | {p['n']} | "
                     f"{p['train_eflop']:.2f} + {p['eval_eflop']:.2f} ({p['teacher_eval_eflop']:.2f}) EFLOP | "
                     f"{p['largest']} ({p['largest_eflop']:.2f} EFLOP) | "
                     f"{duration(p['days_official_1'] * 86400)} | {duration(p['hours_gpu_1'] * 3600)} | {duration(p['hours_gpu_8'] * 3600)} |")
    return '\n'.join(lines) + '\n'


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('presets', nargs='+')
    ap.add_argument('--utilisation', type=float, default=UTILISATION, help="fraction of the GPU's peak (of the preset's precision) assumed")
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
