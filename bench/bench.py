"""Training-step and evaluation throughput of adaad against the official-style reference in `naive.py`, in one process.

    python bench/bench.py --device cpu --pairs small                       # the CPU benchmark (a few minutes on 2 cores)
    python bench/bench.py --device cuda --pairs r18-wrn34-10 r18-wrn34-20 mnv2-wrn34-10 small

Each row: method, pair, variant, device, images/s, speedup over `naive` (same pair, method and batch size, measured in
the same process), the FLOPs of one image's step (2F per forward+input-gradient, 3F per forward+full backward, F the
forward's 2 x multiply-adds), the achieved TFLOP/s and its fraction of the peak measured here (a bf16 matrix product on a
GPU; on a CPU an fp32 one for the fp32 rows and a bf16 one for the bf16 rows). Variants:
- `naive`: `naive.py`, the official scripts' way (eager fp32 NCHW, every official pass, PIL per-image augmentation).
- `ours`: `adaad.methods.training_loss` as the trainer runs it by default (frozen BN-folded teacher, dead branches
  skipped, batched augmentation on the device), fp32.
- `fast`: `ours` + channels_last + bf16 autocast of the networks (+ `torch.compile` with `--compile`; CUDA graphs with
  `--compile-mode reduce-overhead`).
Every row also counts the host synchronisations of one step (`host_syncs`: tensor calls that copy a value to the host,
seen by `adaad.fast.SyncWatch`; on a GPU `cuda_syncs`: what `torch.cuda.set_sync_debug_mode('warn')` reports), and
each run checks the speed targets (`TARGETS`: the `fast` variant's speedup over `naive`, and on a GPU its fraction of
the measured peak).
Writes `bench/results/<date>-<device>.json` (rows + provenance) and `.md` (the table), atomically.
"""
import argparse, contextlib, datetime, json, os, sys, time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import naive  # noqa: E402
from adaad.data import batches, balanced_subset, load_cifar, first_n  # noqa: E402
from adaad.fast import SyncWatch, prepare_teacher  # noqa: E402
from adaad.methods import get_method, training_loss  # noqa: E402
from adaad.models import create_model  # noqa: E402
from adaad.core import atomic_write, file_sha256  # noqa: E402
from adaad.repro import git_info, hardware_info  # noqa: E402

PAIRS = {'r18-wrn34-10': ('resnet18', 'wrn-34-10'), 'r18-wrn34-20': ('resnet18', 'wrn-34-20'),
         'mnv2-wrn34-10': ('mobilenetv2', 'wrn-34-10'), 'small': ('wrn-16-1', 'wrn-10-2')}
METHODS = ('adaad', 'adaiad', 'rslad', 'ard', 'pgd-at')
K = naive.STEPS
# The speed targets: the `fast` variant's speedup over `naive` and its fraction of the measured peak
TARGETS = (dict(device='cuda', method='adaad', pair='r18-wrn34-20', variant='fast', speedup=3.0, peak_fraction=0.35),
           dict(device='cpu', method=None, pair='small', variant='fast', speedup=1.5, peak_fraction=None))


# ---------------------------------------------------------------- FLOPs
def forward_flops(model):
    "Forward FLOPs of one 32x32 image: 2 x the multiply-accumulates of every Conv2d and Linear (the thop convention)."
    macs = []
    def hook(m, inp, out):
        if isinstance(m, torch.nn.Conv2d):
            macs.append(out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])
        elif isinstance(m, torch.nn.Linear): macs.append(out.numel() * m.in_features)
    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad(): model.eval()(torch.zeros(1, 3, 32, 32, device=next(model.parameters()).device))
    for h in hs: h.remove()
    return 2 * sum(macs)


def step_flops(method, fs, ft, impl, k=K, ft_st=0):
    """FLOPs of one image's training step: `impl` 'naive' = the official passes (the benchmark's five methods), else ours;
    `k` inner steps, 2F per forward + input gradient, 3F per forward + full backward, F per forward without a graph; `ft_st`
    the forward FLOPs of AKD's standard teacher. IAD and AdaIAD are counted with their introspection term on (after warm-up)."""
    inner = {'adaad': 2 * k * (fs + ft), 'adaiad': 2 * k * (fs + ft), 'rslad': 2 * k * fs + ft, 'ard': 2 * k * fs,
             'pgd-at': 2 * k * fs, 'natural': 0, 'trades': fs + 2 * k * fs, 'iad': 2 * k * fs, 'akd': 2 * k * fs}[method]
    if impl == 'naive':
        outer = {'adaad': 6 * fs + 2 * ft, 'adaiad': 6 * fs + ft, 'rslad': 6 * fs, 'ard': 6 * fs + ft, 'pgd-at': 4 * fs}[method]
    else:   # alpha = 1: no clean student pass where its weight is 0; AdaIAD after the warm-up needs S(x)
        outer = {'adaad': 3 * fs + ft, 'adaiad': 6 * fs + ft, 'rslad': 6 * fs, 'ard': 3 * fs + ft, 'pgd-at': 3 * fs,
                 'natural': 3 * fs, 'trades': 6 * fs, 'iad': 6 * fs + 2 * ft, 'akd': 3 * fs + ft + ft_st}[method]
    return inner + outer


# ---------------------------------------------------------------- timing
def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def measure_peak(device, dtype, n=None, reps=10):
    "Achieved TFLOP/s of an n x n x n matrix product (the machine's measured peak for `dtype`)."
    n = n or (8192 if device.type == 'cuda' else 2048)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2): a @ b
    sync(device); t = time.perf_counter()
    for _ in range(reps): a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def host_syncs(step, device, watch=True):
    """One call of `step`, counting its host synchronisations: tensor calls in the training computation (the batch
    already fetched) that copy a value to the host (`SyncWatch`; `watch=False` for compiled code, which a
    TorchFunctionMode would recompile) and, on a GPU, every synchronising CUDA call of the whole step, data included,
    that `torch.cuda.set_sync_debug_mode('warn')` reports. Returns (count or None, CUDA count or None, examples)."""
    import warnings
    cuda = device.type == 'cuda'
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        if cuda: sync(device); torch.cuda.set_sync_debug_mode('warn')
        try:
            w = SyncWatch() if watch else None
            step(w)
        finally:
            if cuda: torch.cuda.set_sync_debug_mode('default')
    cuda_msgs = [str(c.message) for c in caught if 'synchroniz' in str(c.message)]
    names = w.calls if watch else []
    examples = sorted(set(names) | {m.splitlines()[0][:120] for m in cuda_msgs})[:5]
    return (len(names) if watch else None), (len(cuda_msgs) if cuda else None), examples


def timed(step, n_iter, warmup, device):
    "Seconds per call of `step()` after `warmup` calls."
    for _ in range(warmup): step()
    sync(device); t = time.perf_counter()
    for _ in range(n_iter): step()
    sync(device)
    return (time.perf_counter() - t) / n_iter


# ---------------------------------------------------------------- the variants
def naive_runner(method, student, teacher, train, bs, device, workers):
    "One official-style step per call, batches from the PIL DataLoader (moved to the device as the official code does)."
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loader = naive.naive_loader(train.x.cpu(), train.y.cpu(), bs, workers)
    state = {'it': iter(loader)}
    step_fn = naive.STEPS_BY_METHOD[method]
    def step(watch=None):
        try: x, y = next(state['it'])
        except StopIteration: state['it'] = iter(loader); x, y = next(state['it'])
        x, y = x.to(device), y.to(device)
        with watch or contextlib.nullcontext(): step_fn(student, teacher, opt, x, y)
    return step


def ours_runner(method, student, teacher, train, bs, device, amp=False, channels_last=False):
    "One `training_loss` step per call as `adaad.train.train` runs it, batches from `adaad.data.batches` on the device."
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    m = get_method(method, **(dict(begin=0) if method == 'adaiad' else {}))   # AdaIAD after its warm-up, like the naive step
    state = {'epoch': 0, 'it': batches(train, bs, shuffle=True, augment=True, drop_last=True)}
    def step(watch=None):
        try: x, y = next(state['it'])
        except StopIteration:
            state['epoch'] += 1
            state['it'] = batches(train, bs, shuffle=True, augment=True, drop_last=True, epoch=state['epoch'])
            x, y = next(state['it'])
        if channels_last: x = x.contiguous(memory_format=torch.channels_last)
        with watch or contextlib.nullcontext():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, _ = training_loss(m, student, teacher, x, y, num_classes=10)
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    return step


def bench_pair(pair, methods, args, device, peaks, train):
    "Rows for every method and variant of `pair`; each row's peak fraction is against the peak of the precision it runs in."
    s_arch, t_arch = PAIRS[pair]
    peak_of = lambda variant: peaks['bf16'] if device.type == 'cuda' or (variant == 'fast' and args.amp) else peaks['fp32']
    torch.manual_seed(0)
    t_base = create_model(t_arch).to(device).eval()
    fs, ft = forward_flops(create_model(s_arch).to(device)), forward_flops(t_base)
    rows = []
    for method in methods:
        res = {}
        for variant in args.variants:
            torch.manual_seed(0)
            student = create_model(s_arch).to(device)
            if variant == 'naive':
                step = naive_runner(method, student, t_base, train, args.batch_size, device, args.workers)
            else:
                fast = variant == 'fast'
                if fast: student = student.to(memory_format=torch.channels_last)
                teacher = prepare_teacher(t_base, channels_last=fast)
                if fast and args.compile:
                    teacher, student = (torch.compile(m, mode=args.compile_mode) for m in (teacher, student))
                step = ours_runner(method, student, teacher, train, args.batch_size, device, amp=fast and args.amp,
                                   channels_last=fast)
            sec = timed(step, args.iters, args.warmup, device)
            compiled = variant == 'fast' and args.compile
            syncs, cuda_syncs, sync_examples = host_syncs(step, device, watch=not compiled)
            ips = args.batch_size / sec
            fl = step_flops(method, fs, ft, 'naive' if variant == 'naive' else 'ours')
            res[variant] = ips
            rows.append(dict(kind='train_step', method=method, pair=pair, student=s_arch, teacher=t_arch, variant=variant,
                             device=str(device), batch_size=args.batch_size, images_per_s=round(ips, 2),
                             speedup=round(ips / res['naive'], 3) if 'naive' in res else None,
                             gflop_per_image=round(fl / 1e9, 3), tflops=round(fl * ips / 1e12, 4),
                             peak_fraction=round(fl * ips / 1e12 / peak_of(variant), 4),
                             amp=variant == 'fast' and args.amp, channels_last=variant == 'fast',
                             compile=args.compile_mode if compiled else False, host_syncs=syncs, cuda_syncs=cuda_syncs,
                             sync_examples=sync_examples))
            print(json.dumps(rows[-1]), flush=True)
            del step, student
    return rows


def bench_eval(args, device, test):
    """Images/s of PGD-10, CW2 (the paper suite's settings, `--cw-steps` iterations) and AutoAttack on the pair's student:
    untrained, or the weights of `--eval-checkpoint` (AutoAttack's time depends on how many points stay robust)."""
    from adaad.attacks import autoattack, cw_l2, pgd
    from adaad.checkpoint import load_checkpoint
    s_arch = PAIRS[args.eval_pair][0]
    torch.manual_seed(0)
    model = create_model(s_arch)
    if args.eval_checkpoint: load_checkpoint(model, args.eval_checkpoint)
    model = model.to(device).eval()
    digest = file_sha256(args.eval_checkpoint) if args.eval_checkpoint else None
    note = (f'checkpoint {args.eval_checkpoint}' if args.eval_checkpoint else
            'untrained network: AA time depends on how many points stay robust')
    x, y = test.x[:args.eval_n].float().div(255).to(device), test.y[:args.eval_n].to(device)
    aa = dict(version='standard') if args.aa == 'standard' else dict(version='custom', attacks=['apgd-ce', 'apgd-t'])
    jobs = {'pgd10': lambda: pgd(model, x, y, steps=10, seed=0),
            f'cw2-{args.cw_steps}': lambda: cw_l2(model, x, y, steps=args.cw_steps),
            f'aa-{args.aa}': lambda: autoattack(model, x, y, batch_size=args.eval_batch, **aa)}
    rows = []
    for name, job in jobs.items():
        if name.split('-')[0] not in args.eval_attacks: continue
        sync(device); t = time.perf_counter(); job(); sync(device)
        sec = time.perf_counter() - t
        rows.append(dict(kind='eval', attack=name, student=s_arch, device=str(device), n=len(x),
                         images_per_s=round(len(x) / sec, 2), seconds=round(sec, 2), note=note, checkpoint_sha256=digest))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def provenance(device, peak_kind):
    "Commit (changed tracked files named, this script's results left out), date, hardware: as `adaad.repro` records them."
    return dict(**git_info(outputs=[HERE / 'results']), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                hardware=hardware_info(device), peaks_tflops={}, peak_kind=peak_kind)


def markdown(res):
    "The rows as markdown tables."
    p = res['provenance']
    hw = p['hardware']          # older result files name the processor `cpu`
    out = [f"Benchmark on {hw.get('gpu') or hw.get('processor') or hw.get('cpu')} ({hw['torch_threads']} threads), "
           f"commit {(p['commit'] or 'unknown')[:10]}{' (dirty)' if p['dirty'] else ''}, {p['date']}; measured peak "
           f"{', '.join(f'{k} {v}' for k, v in p['peaks_tflops'].items())} TFLOP/s ({p['peak_kind']}); "
           f"batch {res['args']['batch_size']}."]
    train = [r for r in res['rows'] if r['kind'] == 'train_step']
    if train:
        out += ['', '| method | pair | variant | images/s | speedup vs naive | GFLOP/image | TFLOP/s | fraction of peak | host syncs/step |',
                '|---|---|---|---|---|---|---|---|---|']
    for r in train:
        speedup = '' if r['speedup'] is None else f"{r['speedup']:.2f}x"
        variant = r['variant'] + (f" (compile {r['compile']})" if r.get('compile') else '')
        out.append(f"| {r['method']} | {r['pair']} ({r['student']} <- {r['teacher']}) | {variant} | {r['images_per_s']} | "
                   f"{speedup} | {r['gflop_per_image']} | {r['tflops']} | {100 * r['peak_fraction']:.1f}% | {syncs_cell(r)} |")
    checks = res.get('targets') or []
    if checks:
        out += ['', "Speed targets (the `fast` row against `naive` in the same process):", '',
                '| target | row | measured | met |', '|---|---|---|---|']
        out += [f"| {c['target']} | {c['row']} | {c['measured']} | {'yes' if c['met'] else 'no'} |" for c in checks]
    proj = res.get('projections') or []
    if proj:
        out += ['', 'Projected training time of one run at the official schedule (50,000 images per epoch, validation not '
                'counted; 8 GPUs assumes linear DDP scaling, not measured):', '',
                '| method | pair | variant | epochs | hours, 1 device | hours, 8 GPUs |', '|---|---|---|---|---|---|']
        out += [f"| {p['method']} | {p['pair']} | {p['variant']} | {p['epochs']} | {p['hours_1']:.1f} | {p['hours_8']:.1f} |"
                for p in proj]
    ev = [r for r in res['rows'] if r['kind'] == 'eval']
    if ev:
        out += ['', '| attack | student | weights | images | images/s | seconds |', '|---|---|---|---|---|---|']
        out += [f"| {r['attack']} | {r['student']} | {weights_cell(r)} | {r['n']} | {r['images_per_s']} | {r['seconds']} |"
                for r in ev]
    return '\n'.join(out) + '\n'


def weights_cell(r):
    "'untrained' or the checkpoint the eval row attacked."
    note = r.get('note', '')
    return note[len('checkpoint '):] if note.startswith('checkpoint ') else 'untrained'


def syncs_cell(r):
    "'n' host syncs of one step (SyncWatch), '+ m CUDA' where the GPU's sync debug mode counted; '' when not counted."
    parts = [str(r['host_syncs'])] if r.get('host_syncs') is not None else []
    if r.get('cuda_syncs') is not None: parts.append(f"{r['cuda_syncs']} CUDA")
    return ' / '.join(parts)


def check_targets(rows, device_type):
    """The speed targets on this run's rows: for each target of `device_type`, every matching `fast` row with its
    measured speedup (and fraction of peak) and whether it meets the target. A target with no matching row is left out."""
    out = []
    for t in (t for t in TARGETS if t['device'] == device_type):
        for r in rows:
            if r['kind'] != 'train_step' or r['variant'] != t['variant'] or r['pair'] != t['pair'] or r['speedup'] is None: continue
            if t['method'] and r['method'] != t['method']: continue
            want = f"speedup >= {t['speedup']}x" + (f", peak >= {100 * t['peak_fraction']:.0f}%" if t['peak_fraction'] else '')
            got = f"{r['speedup']:.2f}x" + (f", {100 * r['peak_fraction']:.1f}%" if t['peak_fraction'] else '')
            met = r['speedup'] >= t['speedup'] and (t['peak_fraction'] is None or r['peak_fraction'] >= t['peak_fraction'])
            out.append(dict(target=want, row=f"{r['method']} {r['pair']} {r['variant']}", measured=got, met=met))
    return out


def projections(rows):
    "Hours of one official-schedule run per (method, pair, variant) from the measured images/s."
    from adaad.methods import get_method
    out = []
    for r in rows:
        if r['kind'] != 'train_step' or r['variant'] == 'naive': continue
        epochs = get_method(r['method']).epochs
        h = epochs * 50_000 / r['images_per_s'] / 3600
        out.append(dict(method=r['method'], pair=r['pair'], variant=r['variant'], epochs=epochs, hours_1=h, hours_8=h / 8))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--pairs', nargs='*', default=['small'], choices=sorted(PAIRS),
                    help='pairs to time (none with --eval: evaluation throughput only)')
    ap.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS)
    ap.add_argument('--variants', nargs='+', default=['naive', 'ours', 'fast'], choices=['naive', 'ours', 'fast'])
    ap.add_argument('--batch-size', type=int, default=128)
    ap.add_argument('--iters', type=int, default=None, help='timed steps per row (default: 20 on a GPU, 4 on a CPU)')
    ap.add_argument('--warmup', type=int, default=None, help='untimed steps first (default: 5 on a GPU, 2 on a CPU: '
                    'oneDNN builds its bf16 kernels during the first steps)')
    ap.add_argument('--workers', type=int, default=None, help='naive DataLoader workers (default: 4 on a GPU, 0 on a CPU)')
    ap.add_argument('--no-amp', dest='amp', action='store_false', help='fast variant without bf16')
    ap.add_argument('--compile', action='store_true', help='fast variant with torch.compile')
    ap.add_argument('--compile-mode', default='default', choices=['default', 'reduce-overhead', 'max-autotune'],
                    help="torch.compile's mode with --compile ('reduce-overhead' replays CUDA graphs)")
    ap.add_argument('--train-n', type=int, default=5000, help='training images the loaders draw from')
    ap.add_argument('--eval', action='store_true', help='also time PGD-10, CW2 and AutoAttack')
    ap.add_argument('--peak-n', type=int, default=None, help='size of the matrix product that measures the peak '
                    '(default: 8192 on a GPU, 2048 on a CPU; smaller only for a quick check, where it understates the peak)')
    ap.add_argument('--eval-pair', default='small', choices=sorted(PAIRS))
    ap.add_argument('--eval-n', type=int, default=1000)
    ap.add_argument('--eval-attacks', nargs='+', default=['pgd10', 'cw2', 'aa'], choices=['pgd10', 'cw2', 'aa'])
    ap.add_argument('--eval-checkpoint', default=None, help="weights for the eval student (the eval pair's student "
                    'architecture), e.g. a trained run\'s best_pgd.pt; untrained when not given')
    ap.add_argument('--eval-batch', type=int, default=500)
    ap.add_argument('--cw-steps', type=int, default=1000)
    ap.add_argument('--aa', default='standard', choices=['standard', 'reduced'])
    ap.add_argument('--data-root', default=os.environ.get('ADAAD_DATA', str(HERE.parent / 'data')))
    ap.add_argument('--out', default=str(HERE / 'results'))
    ap.add_argument('--tag', default='')
    args = ap.parse_args(argv)
    if not args.pairs and not args.eval: ap.error('--pairs: give at least one of %s, or --eval' % ', '.join(sorted(PAIRS)))
    if args.peak_n is not None and args.peak_n < 1: ap.error(f'--peak-n: a positive matrix size, got {args.peak_n}')
    if args.eval_checkpoint and not Path(args.eval_checkpoint).is_file():
        ap.error(f'--eval-checkpoint: no file {args.eval_checkpoint!r}')
    device = torch.device(args.device)
    gpu = device.type == 'cuda'
    args.iters = args.iters or (20 if gpu else 4); args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    args.workers = args.workers if args.workers is not None else (4 if gpu else 0)
    # cudnn.benchmark as the official AdaAD/ARD scripts set it; TF32 left at PyTorch's defaults (cuDNN convolutions in
    # TF32, matrix products not), which is what the official "fp32" code gets on this GPU
    if gpu: torch.backends.cudnn.benchmark = True
    # on a CPU the bf16 peak only where a bf16 row needs it: without bf16 instructions it is emulated and takes minutes
    n = args.peak_n or (8192 if gpu else 2048)
    peaks = {'bf16': measure_peak(device, torch.bfloat16, n)} if gpu or (args.pairs and args.amp and 'fast' in args.variants) else {}
    if not gpu: peaks['fp32'] = measure_peak(device, torch.float32, n)
    peak_kind = f'bf16 matmul {n}^3' if gpu else f'matmul {n}^3: fp32 for the fp32 rows, bf16 for the bf16 rows'
    train = (balanced_subset(load_cifar('cifar10', 'train', root=args.data_root, device='cpu'), args.train_n, seed=0).to(device)
             if args.pairs else None)      # an evaluation-only run needs no training images
    res = dict(args=vars(args), provenance=provenance(device, peak_kind), rows=[])
    res['provenance']['peaks_tflops'] = {k: round(v, 3) for k, v in peaks.items()}
    res['provenance']['tf32'] = dict(cudnn=torch.backends.cudnn.allow_tf32, matmul=torch.backends.cuda.matmul.allow_tf32)
    print(json.dumps(res['provenance']), flush=True)
    t0 = time.time()
    for pair in args.pairs: res['rows'] += bench_pair(pair, args.methods, args, device, peaks, train)
    if args.eval:
        test = first_n(load_cifar('cifar10', 'test', root=args.data_root, device='cpu'), args.eval_n)
        res['rows'] += bench_eval(args, device, test)
    res['wall_s'] = round(time.time() - t0, 1)
    res['projections'] = projections(res['rows']) if gpu else []   # a CPU's hours say nothing about the paper scale
    res['targets'] = check_targets(res['rows'], device.type)
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    stem = f"{res['provenance']['date'][:10]}-{device.type}{'-' + args.tag if args.tag else ''}"
    atomic_write(out / f'{stem}.json', json.dumps(res, indent=1) + '\n')
    atomic_write(out / f'{stem}.md', markdown(res))
    print(markdown(res))
    return res


if __name__ == '__main__':
    main()
