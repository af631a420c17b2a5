"The CIFAR reader, subsets, augmentation and batching."
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from adaad.data import (CifarSplit, random_crop_flip, balanced_subset, batches, first_n, load_cifar,
                        read_batch)

SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'cifar10'


def _write_cifar10(root, n=20, keys='str'):
    "A small folder in the official layout, pickled with str or bytes keys."
    folder = root / 'cifar-10-batches-py'; folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    k = (lambda s: s) if keys == 'str' else (lambda s: s.encode())
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        d = {k('data'): rng.integers(0, 256, (n, 3072), dtype=np.uint8), k('labels'): [int(v) for v in rng.integers(0, 10, n)]}
        with open(folder / name, 'wb') as f: pickle.dump(d, f, protocol=2)
    return folder


@pytest.mark.parametrize('keys', ['str', 'bytes'])
def test_reads_both_pickle_dialects(tmp_path, keys):
    folder = _write_cifar10(tmp_path, keys=keys)
    s = load_cifar('cifar10', 'test', root=tmp_path, device='cpu')
    raw = read_batch(folder / 'test_batch')
    assert s.x.dtype == torch.uint8 and s.x.shape == (20, 3, 32, 32) and s.y.dtype == torch.int64
    assert torch.equal(s.x.reshape(20, -1), torch.from_numpy(raw['data']))  # CHW order kept
    assert len(load_cifar('cifar10', 'train', root=tmp_path, device='cpu')) == 100
    assert s.source['official'] is False


def test_cifar100_layout(tmp_path):
    folder = tmp_path / 'cifar-100-python'; folder.mkdir()
    for name, n in [('train', 30), ('test', 10)]:
        d = {b'data': np.zeros((n, 3072), np.uint8), b'fine_labels': list(range(n)), b'coarse_labels': [0] * n}
        pickle.dump(d, open(folder / name, 'wb'), protocol=2)
    s = load_cifar('cifar100', 'train', root=tmp_path, device='cpu')
    assert s.num_classes == 100 and len(s) == 30


def test_root_from_environment(tmp_path, monkeypatch):
    _write_cifar10(tmp_path)
    monkeypatch.setenv('ADAAD_DATA', str(tmp_path))
    assert len(load_cifar('cifar10', 'test', device='cpu')) == 20


def test_missing_folder_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'cifar-10-batches-py.*download=True'):
        load_cifar('cifar10', 'test', root=tmp_path / 'nowhere')


def test_incomplete_and_corrupt_folders(tmp_path):
    folder = _write_cifar10(tmp_path)
    (folder / 'data_batch_3').unlink()
    with pytest.raises(FileNotFoundError, match='data_batch_3'): load_cifar('cifar10', 'train', root=tmp_path)
    (folder / 'test_batch').write_bytes(b'\x80\x02}q\x00(X\x04\x00')  # truncated pickle
    with pytest.raises(ValueError, match='corrupt CIFAR file .*test_batch'): load_cifar('cifar10', 'test', root=tmp_path)
    pickle.dump({'data': np.zeros((3, 100), np.uint8), 'labels': [0, 1, 2]}, open(folder / 'test_batch', 'wb'))
    with pytest.raises(ValueError, match='expected uint8'): load_cifar('cifar10', 'test', root=tmp_path)


def test_pickle_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self): return (Path.touch, (tmp_path / 'pwned',))
    folder = _write_cifar10(tmp_path)
    pickle.dump({'data': Evil(), 'labels': []}, open(folder / 'test_batch', 'wb'))
    with pytest.raises(ValueError, match='refusing'): load_cifar('cifar10', 'test', root=tmp_path)
    assert not (tmp_path / 'pwned').exists()


def test_bad_names():
    with pytest.raises(ValueError, match="dataset must be one of"): load_cifar('svhn')
    with pytest.raises(ValueError, match="split must be"): load_cifar('cifar10', 'val')


def test_first_test_images_are_exact(cifar_test):
    "The first 1,000 test images of the shared rebuild equal the exact images shipped beside it, in order."
    if not (SHARED / 'cifar10_exact.npz').is_file(): pytest.skip(f'no {SHARED}/cifar10_exact.npz')
    z = np.load(SHARED / 'cifar10_exact.npz')
    idx, xs = z['test_index'], z['test_x']
    keep = idx < 1000
    ours = cifar_test.x.permute(0, 2, 3, 1).numpy()[idx[keep]]
    assert keep.sum() == 1000 and np.array_equal(ours, xs[keep])
    assert len(cifar_test) == 1000 and cifar_test.source['subset'] == 'first 1000'


def test_balanced_subset(cifar_train):
    a, b = balanced_subset(cifar_train, 1003, seed=5), balanced_subset(cifar_train, 1003, seed=5)
    assert torch.equal(a.y, b.y) and torch.equal(a.x, b.x)
    counts = torch.bincount(a.y, minlength=10).tolist()
    assert sorted(counts) == [100] * 7 + [101] * 3
    assert not torch.equal(balanced_subset(cifar_train, 1003, seed=6).y, a.y)
    with pytest.raises(ValueError, match='n must be'): balanced_subset(cifar_train, 5)
    with pytest.raises(ValueError, match='n must be'): first_n(cifar_train, 0)


def test_augmentation_is_crop_with_zero_padding_and_flip():
    x = torch.randint(1, 256, (512, 3, 32, 32), dtype=torch.uint8)  # no zero pixels, so padding is visible
    a = random_crop_flip(x, torch.Generator().manual_seed(0))
    zero_rows = (a == 0).all(dim=(1, 3))  # [B, H]: rows that are padding
    assert zero_rows.any(), 'some crops must reach into the zero padding'
    assert zero_rows.sum(1).max() <= 4 and (a == 0).all(dim=(1, 2)).sum(1).max() <= 4
    unchanged = (a == x).flatten(1).all(1).float().mean()
    assert 0 < unchanged < 0.1  # the centred, unflipped crop happens with probability 1/81 * 1/2
    flipped = (a == x.flip(-1)).flatten(1).all(1).float().mean()
    assert 0 < flipped < 0.1


def test_batches_deterministic_and_sharded():
    s = CifarSplit(torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8), torch.arange(50) % 10, 10)
    run = lambda **kw: [(x, y) for x, y in batches(s, 8, shuffle=True, augment=True, seed=1, epoch=4, **kw)]
    a, b = run(), run()
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    r0, r1 = run(rank=0, world=2), run(rank=1, world=2)
    for (x, y), (x0, y0), (x1, y1) in zip(a, r0, r1):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert not torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in batches(s, 8, shuffle=True, seed=1, epoch=5)]))
    with pytest.raises(ValueError, match='batch_size'): next(batches(s, 0))


def test_cifar100_splits_from_a_written_folder(tmp_path):
    "CIFAR-100 cannot be downloaded on the build machines: a small folder in its official layout, written here, is read exactly."
    folder = tmp_path / 'cifar-100-python'; folder.mkdir()
    rng = np.random.default_rng(1)
    raw = {}
    for name, n in [('train', 12), ('test', 5)]:
        raw[name] = {b'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8), b'fine_labels': [int(v) for v in rng.integers(0, 100, n)],
                     b'coarse_labels': [int(v) for v in rng.integers(0, 20, n)]}
        with open(folder / name, 'wb') as f: pickle.dump(raw[name], f, protocol=2)
    for split in ('train', 'test'):
        s = load_cifar('cifar100', split, root=tmp_path, device='cpu')
        assert s.num_classes == 100 and s.name == 'cifar100' and s.source['official'] is False
        assert torch.equal(s.x.reshape(len(s), -1), torch.from_numpy(raw[split][b'data']))
        assert s.y.tolist() == raw[split][b'fine_labels']   # the fine labels, not the 20 coarse ones


def test_cifar100_asked_of_a_cifar10_folder_says_so(tmp_path):
    "A CIFAR-100 run pointed at CIFAR-10 data is told which dataset it found, wherever the folder is."
    _write_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no cifar100 found.*'cifar-100-python'.* holds cifar10 \('cifar-10-batches-py'\) but no cifar100"):
        load_cifar('cifar100', 'train', root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"is itself the cifar10 folder 'cifar-10-batches-py'"):
        load_cifar('cifar100', 'train', root=tmp_path / 'cifar-10-batches-py')
    (tmp_path / 'cifar-10-batches-py').rename(tmp_path / 'cifar-100-python')   # CIFAR-10 files under the CIFAR-100 name
    with pytest.raises(FileNotFoundError, match=r"incomplete: missing \['train'\].*holds cifar10 files"):
        load_cifar('cifar100', 'train', root=tmp_path)
    with pytest.raises(ValueError, match=r'labels outside \[0, 10\)'):   # and the other way round: CIFAR-100 labels read as CIFAR-10
        d = {'data': np.zeros((3, 3072), np.uint8), 'labels': [0, 50, 99]}
        (tmp_path / 'c10' / 'cifar-10-batches-py').mkdir(parents=True)
        for n in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']: pickle.dump(d, open(tmp_path / 'c10' / 'cifar-10-batches-py' / n, 'wb'))
        load_cifar('cifar10', 'test', root=tmp_path / 'c10')
