"""Does bf16 weaken the attacks? `adaad.fast.amp_check` on trained checkpoints, stored with provenance.

    python bench/amp_check.py --ckpt runs/repro/cpu-small/teacher-wrn-10-2-pgd-at/final.pt --arch wrn-10-2

For each checkpoint: PGD-10 accuracy (8/255) on the first `--n` test images with the attack run in fp32 and under bf16
autocast (both scored by the fp32 model), and the share of pixels where the input gradient's sign agrees. The target:
within 0.5 points, agreement on most pixels. Writes `bench/results/<date>-<device>-amp-check.json`.
"""
import argparse, datetime, json, os, sys, time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import provenance  # noqa: E402
from adaad.core import atomic_write  # noqa: E402
from adaad.data import first_n, load_cifar  # noqa: E402
from adaad.fast import amp_check  # noqa: E402
from adaad.checkpoint import load_model  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--ckpt', nargs='+', required=True, help='checkpoint files (adaad or plain state dicts)')
    ap.add_argument('--arch', nargs='+', required=True, help='registry architecture of each checkpoint (one, or one per file)')
    ap.add_argument('--n', type=int, default=1000)
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--data-root', default=os.environ.get('ADAAD_DATA', str(HERE.parent / 'data')))
    ap.add_argument('--out', default=str(HERE / 'results'))
    a = ap.parse_args(argv)
    if len(a.arch) not in (1, len(a.ckpt)): raise SystemExit(f'--arch takes one name or one per --ckpt ({len(a.ckpt)}), got {len(a.arch)}')
    archs = a.arch * len(a.ckpt) if len(a.arch) == 1 else a.arch
    device = torch.device(a.device)
    test = first_n(load_cifar('cifar10', 'test', root=a.data_root, device='cpu'), a.n)
    x, y = test.x.float().div(255).to(device), test.y.to(device)
    res = dict(provenance=provenance(device, 'n/a'), data=dict(test=test.source, n=len(test)), rows=[])
    for ck, arch in zip(a.ckpt, archs):
        t = time.time()
        r = amp_check(load_model(arch, ck).to(device).eval(), x, y, steps=10, batch_size=250)
        res['rows'].append(dict(ckpt=ck, arch=arch, **r, seconds=round(time.time() - t, 1)))
        print(json.dumps(res['rows'][-1]), flush=True)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{res['provenance']['date'][:10]}-{device.type}-amp-check.json", json.dumps(res, indent=1, default=str) + '\n')
    return res


if __name__ == '__main__':
    main()
