"The trainer: schedule, exact resume, DDP equivalence, teachers, bad configurations."
import dataclasses
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from adaad.data import CifarSplit, balanced_subset, first_n
from adaad.checkpoint import atomic_save, load_teacher
from adaad.models import MODELS, create_model
from adaad.train import TrainConfig, lr_at, resolve, train, validate


def _tiny_data(cifar_train, n=96, val=64):
    tr = balanced_subset(cifar_train, n, seed=0)
    va = balanced_subset(cifar_train, val, seed=1)
    return tr, va


def _same(a, b): return all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))


def test_schedules():
    assert [lr_at(e, 0.1, (100, 150)) for e in (99, 100, 150)] == [0.1, pytest.approx(0.01), pytest.approx(0.001)]
    assert lr_at(150, 0.1, (100, 150), single_decay=True) == pytest.approx(0.01)
    c = resolve(TrainConfig(method='adaad'))
    assert (c.epochs, c.milestones, c.weight_decay, c.eps, c.steps) == (200, (100, 150), 5e-4, 8 / 255, 10)
    assert resolve(TrainConfig(method='rslad')).epochs == 300 and resolve(TrainConfig(method='pgd-at')).epochs == 110


@pytest.mark.parametrize('field,value,msg', [('method', 'nope', 'method must be one of'), ('eps', -0.1, r'eps must be a number in \(0, 1\]'),
                                             ('eps', 2.0, r'eps must be a number in \(0, 1\]'), ('steps', -1, 'steps must be an int'),
                                             ('batch_size', 0, 'batch_size must be'), ('val_source', 'x', 'val_source'),
                                             ('dataset', 'mnist', 'dataset must be')])
def test_bad_config(field, value, msg):
    with pytest.raises(ValueError, match=msg): TrainConfig(**{field: value}).validate()


@pytest.mark.parametrize('method', ['pgd-at', 'adaad'])
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, cifar_train, method):
    "Pausing after every single step and resuming gives bit-identical weights on the CPU."
    data = _tiny_data(cifar_train)
    torch.manual_seed(123); teacher = create_model('wrn-10-1').eval() if method == 'adaad' else None
    cfg = TrainConfig(method=method, student='wrn-10-1', epochs=2, batch_size=32, steps=2, val_n=64, milestones=(1,))
    a = train(cfg, teacher=teacher, out_dir=tmp_path / 'a', device='cpu', progress=False, data=data)
    calls = 0
    while True:
        calls += 1
        b = train(cfg, teacher=teacher, out_dir=tmp_path / 'b', device='cpu', progress=False, data=data, time_limit=1e-9)
        if b['status'] == 'done': break
    assert calls >= 6 and _same(a['model'], b['model'])
    log = [json.loads(l) for l in (tmp_path / 'b' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in log] == [0, 1] and log[1]['lr'] == pytest.approx(0.01)
    assert {p.name for p in (tmp_path / 'b').iterdir()} >= {'last.pt', 'best_pgd.pt', 'best_clean.pt', 'final.pt', 'DONE', 'config.json', 'metrics.jsonl'}


def test_finished_run_is_reused(tmp_path, cifar_train):
    data = _tiny_data(cifar_train)
    cfg = TrainConfig(method='natural', student='wrn-10-1', epochs=1, batch_size=32, val_n=64)
    a = train(cfg, out_dir=tmp_path, device='cpu', progress=False, data=data)
    b = train(cfg, out_dir=tmp_path, device='cpu', progress=False, data=data)
    assert b['wall_s'] == 0. and _same(a['model'], b['model'])


def test_teacher_errors(tmp_path, cifar_train):
    data = _tiny_data(cifar_train)
    with pytest.raises(ValueError, match='needs a teacher'):
        train(TrainConfig(method='adaad', student='wrn-10-1', epochs=1), out_dir=tmp_path, device='cpu', data=data)
    with pytest.raises(ValueError, match='teacher has 100 classes'):
        train(TrainConfig(method='adaad', student='wrn-10-1', epochs=1), teacher=create_model('wrn-10-1', 100), out_dir=tmp_path, device='cpu', data=data)
    atomic_save(create_model('wrn-10-1').state_dict(), tmp_path / 't.pt')
    assert load_teacher(tmp_path / 't.pt', arch='wrn-10-1').training is False
    with pytest.raises(ValueError, match='exactly one of'): load_teacher(tmp_path / 't.pt')
    with pytest.raises(FileNotFoundError): load_teacher(tmp_path / 'missing.pt', arch='wrn-10-1')


# ---- DDP: two gloo processes on half batches give the update of one process on the whole batch ----------------
class _NoBN(torch.nn.Module):
    "A BN-free student (per-process BN statistics would differ from whole-batch ones by design)."
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, 2, 1); self.fc = torch.nn.Linear(8 * 16 * 16, num_classes)
    def forward(self, x): return self.fc(torch.relu(self.conv(x)).flatten(1))


def _marked_data(n=96, val=32):
    "Images whose pixel sum survives crop-with-padding and flip (a constant 24x24 centre, value i+1): a fingerprint per image."
    x = torch.zeros(n + val, 3, 32, 32, dtype=torch.uint8)
    for i in range(n + val): x[i, :, 4:28, 4:28] = i + 1
    y = torch.arange(n + val) % 10
    return CifarSplit(x[:n], y[:n], 10, split='train'), CifarSplit(x[n:], y[n:], 10, split='test')


def _ddp_cfg(method):
    return TrainConfig(method=method, student='_nobn', epochs=2, batch_size=32, val_n=32, lr=0.05, steps=2, milestones=(1,))


def _teacher():
    torch.manual_seed(7); return _NoBN().eval()


def _ddp_worker(rank, world, port, data, out, method):
    "One rank: train `method`, recording a fingerprint (pixel sum, label) of every image this rank trained on."
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    MODELS['_nobn'] = lambda num_classes, **kw: _NoBN(num_classes)
    torch.set_num_threads(1)
    import adaad.train as T
    seen, real = [], T.batches
    def recording(*a, **k):
        for x, y in real(*a, **k):
            seen.extend([round(float(s), 1), int(c)] for s, c in zip(x.flatten(1).sum(1), y)); yield x, y
    T.batches = recording
    train(_ddp_cfg(method), teacher=_teacher() if method == 'adaad' else None, out_dir=out, device='cpu', progress=False, data=data)
    (Path(out) / f'seen{rank}.json').write_text(json.dumps(seen))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize('method', ['pgd-at', 'adaad'])
def test_ddp_two_gloo_processes_match_one(tmp_path, method):
    """Two gloo ranks on half batches, with the method's inner attack: each rank trains on its own half of every batch
    (the two halves disjoint, together the whole epoch: a DDP that did not split would train both on everything), and the
    averaged update ends where one process on whole batches ends, up to the inner attack's random start, which the ranks
    draw on their own (a rank that did not all-reduce would end as far away as training on half the data)."""
    from adaad.checkpoint import read_checkpoint
    data = _marked_data()
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, data, str(tmp_path / 'ddp'), method), nprocs=2, join=True)
    seen = [json.loads((tmp_path / 'ddp' / f'seen{r}.json').read_text()) for r in (0, 1)]
    per_epoch = [[tuple(v) for v in s[i * 48:(i + 1) * 48]] for s in seen for i in range(2)]
    assert all(len(set(per_epoch[i]) & set(per_epoch[2 + i])) == 0 for i in range(2))       # ranks disjoint in each epoch
    whole = sorted((round(float(x.float().sum() / 255), 1), int(y)) for x, y in zip(data[0].x, data[0].y))
    assert sorted(per_epoch[0] + per_epoch[2]) == whole                                    # together, the epoch
    MODELS['_nobn'] = lambda num_classes, **kw: _NoBN(num_classes)
    try:
        one = train(_ddp_cfg(method), teacher=_teacher() if method == 'adaad' else None, out_dir=tmp_path / 'one', device='cpu',
                    progress=False, data=data)['model'].state_dict()
        torch.manual_seed(0); init = _NoBN().state_dict()
        half = train(dataclasses.replace(_ddp_cfg(method), batch_size=16), teacher=_teacher() if method == 'adaad' else None,
                     out_dir=tmp_path / 'half', device='cpu', progress=False, data=(data[0].subset(range(0, 96, 2)), data[1]))['model'].state_dict()
    finally: del MODELS['_nobn']
    ddp = read_checkpoint(tmp_path / 'ddp' / 'final.pt')['state_dict']
    dist = lambda a, b: sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
    assert dist(ddp, one) < 0.1 * dist(one, init) and dist(ddp, one) < 0.5 * dist(half, one), (dist(ddp, one), dist(one, init), dist(half, one))


@pytest.mark.slow
def test_pgd_at_teacher_is_more_robust_than_natural(tmp_path, cifar_train, cifar_test):
    "A few CPU minutes of PGD-AT give measurably higher PGD-10 accuracy than natural training of the same net."
    tr = balanced_subset(cifar_train, 2000, seed=0); va = first_n(cifar_test, 300)
    res = {}
    for m in ('natural', 'pgd-at'):
        cfg = TrainConfig(method=m, student='wrn-10-2', epochs=6, batch_size=64, lr=0.05, milestones=(5,), steps=2,
                          step_size=5 / 255, val_n=300, val_every=6)
        res[m] = validate(train(cfg, out_dir=tmp_path / m, device='cpu', progress=False, data=(tr, va))['model'], va)
    # measured once (2 shared CPU cores): natural 39.0% clean / 6.3% PGD-10, PGD-AT 33.3% / 24.3%
    assert res['pgd-at'][1] > res['natural'][1] + 10, res


# ---- a run folder knows what it holds ---------------------------------------------------------------------------
def _identity_data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (48, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(48) % 10
    return CifarSplit(x[:32], y[:32], 10, split='train'), CifarSplit(x[32:], y[32:], 10, split='test')


def _cfg(**kw):
    return TrainConfig(**{**dict(method='pgd-at', student='wrn-10-1', epochs=1, batch_size=16, steps=1, val_n=8, val_steps=1), **kw})


@pytest.mark.parametrize('change,field', [(dict(lr=0.05), 'config.lr'), (dict(method='trades'), 'config.method'),
                                          (dict(student='wrn-10-2'), 'config.student'), (dict(seed=1), 'config.seed')])
def test_a_finished_folder_is_not_returned_for_another_run(tmp_path, change, field):
    "A folder with a finished run refuses another lr, method, architecture or seed, naming the field (it used to return the old model)."
    train(_cfg(), out_dir=tmp_path, device='cpu', progress=False, data=_identity_data())
    with pytest.raises(ValueError, match=f'holds another run: .*{field}'):
        train(_cfg(**change), out_dir=tmp_path, device='cpu', progress=False, data=_identity_data())


def test_another_teacher_or_data_is_refused(tmp_path):
    "The teacher's weights and the data are part of a run's identity; save_every and data_root are not."
    torch.manual_seed(0); t1 = create_model('wrn-10-1').eval()
    torch.manual_seed(1); t2 = create_model('wrn-10-1').eval()
    cfg = _cfg(method='rslad')
    train(cfg, teacher=t1, out_dir=tmp_path, device='cpu', progress=False, data=_identity_data())
    with pytest.raises(ValueError, match='holds another run: teacher'):
        train(cfg, teacher=t2, out_dir=tmp_path, device='cpu', progress=False, data=_identity_data())
    tr, va = _identity_data()
    with pytest.raises(ValueError, match='holds another run: data'):
        train(cfg, teacher=t1, out_dir=tmp_path, device='cpu', progress=False, data=(tr.subset(range(16)), va))
    r = train(dataclasses.replace(cfg, save_every=3, data_root='/elsewhere'), teacher=t1, out_dir=tmp_path, device='cpu',
              progress=False, data=_identity_data())
    assert r['status'] == 'done' and r['wall_s'] == 0.


def test_cli_refuses_another_teacher_in_the_same_out(tmp_path, data_root, capsys):
    "`adaad train` with another --teacher and the same --out stops with the differing field, not a state_dict error."
    from adaad.cli import main
    for i in (0, 1):
        torch.manual_seed(i); atomic_save(create_model('wrn-10-1').state_dict(), tmp_path / f't{i}.pt')
    common = ['train', '--method', 'rslad', '--student', 'wrn-10-1', '--teacher-arch', 'wrn-10-1', '--epochs', '1', '--train-n', '20',
              '--val-n', '10', '--batch-size', '10', '--steps', '1', '--data-root', str(data_root), '--device', 'cpu', '--no-progress',
              '--out', str(tmp_path / 'run')]
    main(common + ['--teacher', str(tmp_path / 't0.pt')])
    with pytest.raises(SystemExit) as e: main(common + ['--teacher', str(tmp_path / 't1.pt')])
    assert e.value.code == 2 and 'holds another run: teacher' in capsys.readouterr().err


def test_new_fields_with_defaults_do_not_orphan_old_runs(tmp_path):
    "An identity written before a TrainConfig field existed is accepted when the field has its default now."
    import json as _json
    from adaad.train import check_identity, run_identity
    ident = run_identity(_cfg(), data=_identity_data())
    old = _json.loads(_json.dumps(ident)); del old['config']['eps_ramp_epochs']; del old['config']['diagnostics']
    (tmp_path / 'identity.json').write_text(_json.dumps(old)); (tmp_path / 'last.pt').touch()   # a checkpoint binds the folder
    check_identity(tmp_path, ident)                                       # accepted
    with pytest.raises(ValueError, match='eps_ramp_epochs'):
        check_identity(tmp_path, run_identity(_cfg(eps_start=1 / 255, eps_ramp_epochs=2), data=_identity_data()))


@pytest.mark.parametrize('method,kw,nesterov', [('fair-ard', {}, True), ('fair-ard', dict(method_kwargs=dict(base='iad')), True),
                                                ('ard', {}, False), ('fair-ard', dict(nesterov=False), False),
                                                ('ard', dict(nesterov=True), True), ('ard', dict(inner='fair-ard'), False),
                                                ('fair-ard', dict(inner='ard'), True)])
def test_nesterov_is_the_methods_official_choice_and_reaches_the_sgd(tmp_path, method, kw, nesterov):
    "None resolves to the method's fact (Fair-ARD's scripts use Nesterov; a combination the outer method's); the run's SGD takes it."
    from adaad.train import resolve, start_run
    cfg = _cfg(method=method, **kw)
    assert resolve(cfg).nesterov is nesterov
    teacher = create_model('wrn-10-1').eval() if method != 'pgd-at' else None
    run = start_run(cfg, teacher=teacher, out_dir=tmp_path, device='cpu', progress=False, data=_identity_data())
    assert run.opt.param_groups[0]['nesterov'] is nesterov and run.cfg.nesterov is nesterov
    run.close()


@pytest.mark.parametrize('kw,official', [(dict(method='fair-ard'), True), (dict(method='ard', nesterov=True), False)])
def test_nesterov_without_momentum_is_refused(kw, official):
    from adaad.train import resolve
    with pytest.raises(ValueError, match='nesterov=True needs momentum > 0' + ('.*official choice of fair-ard' if official else '')):
        resolve(_cfg(momentum=0., **kw))
    assert resolve(_cfg(momentum=0., **{**kw, 'nesterov': False})).nesterov is False


@pytest.mark.parametrize('method', ['pgd-at', 'fair-ard'])
def test_folders_from_before_nesterov_hold_runs_without_it(tmp_path, method):
    """An identity written before `nesterov` existed is a run without Nesterov's momentum: the same run as now for every
    method whose official SGD has none; for Fair-ARD the same run as nesterov=False, and not the official (Nesterov) one."""
    import json as _json
    from adaad.train import check_identity, run_identity
    t = create_model('wrn-10-1').eval()
    ident = lambda **kw: run_identity(_cfg(method=method, **kw), teacher=t, data=_identity_data())
    old = _json.loads(_json.dumps(ident(nesterov=False))); del old['config']['nesterov']
    (tmp_path / 'identity.json').write_text(_json.dumps(old)); (tmp_path / 'last.pt').touch()
    check_identity(tmp_path, ident(nesterov=False))                      # recognised as what it holds
    if method == 'pgd-at': check_identity(tmp_path, ident())           # the default run, as before
    else:
        with pytest.raises(ValueError, match=r'config\.nesterov: False \(folder\) != True \(now\)'):
            check_identity(tmp_path, ident())


def test_eps_ramp_reaches_the_inner_maximisation(tmp_path):
    "With a ramp the logged radius grows epoch by epoch to eps, and the method each epoch trains with has that radius."
    import json as _json
    import adaad.methods as M
    seen, real = [], M.training_loss
    def spy(method, *a, **k):
        seen.append(round(method.budget.eps * 255, 6)); return real(method, *a, **k)
    M.training_loss = spy
    try:
        train(_cfg(epochs=4, eps=8 / 255, step_size=2 / 255, eps_start=2 / 255, eps_ramp_epochs=3), out_dir=tmp_path, device='cpu',
              progress=False, data=_identity_data())
    finally: M.training_loss = real
    logged = [round(_json.loads(l)['eps'] * 255, 6) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert logged == [2, 4, 6, 8] and sorted(set(seen)) == [2, 4, 6, 8]


def test_weight_average_is_the_mean_of_the_epoch_ends_and_resumes_exactly(tmp_path, cifar_train):
    """SWA (`swa=True`): final.pt holds the mean of the student's weights at the ends of epochs swa_start.. (the same
    training as without averaging, whose last two epoch ends are last.prev.pt and last.pt), with BatchNorm statistics of
    its own; a run paused after every step and resumed ends bit-identical, average included."""
    from adaad.checkpoint import read_checkpoint
    data = _tiny_data(cifar_train)
    base = dict(method='pgd-at', student='wrn-10-1', epochs=3, batch_size=32, steps=1, val_n=64, milestones=(2,))
    plain = train(TrainConfig(**base), out_dir=tmp_path / 'plain', device='cpu', progress=False, data=data)
    avg = train(TrainConfig(**base, swa=True, swa_start=1), out_dir=tmp_path / 'swa', device='cpu', progress=False, data=data)
    e1, e2 = (read_checkpoint(tmp_path / 'plain' / f)['state_dict'] for f in ('last.prev.pt', 'last.pt'))
    final = read_checkpoint(tmp_path / 'swa' / 'final.pt')['state_dict']
    params = {n for n, _ in plain['model'].named_parameters()}
    assert all(torch.allclose(final[k], (e1[k] + e2[k]) / 2, atol=1e-6) for k in params)
    bn = next(k for k in final if k.endswith('running_mean'))
    assert not torch.allclose(final[bn], e2[bn])                             # recomputed for the average, not the student's
    assert all(torch.equal(final[k], v) for k, v in avg['model'].state_dict().items())   # train() returns the average
    while True:
        b = train(TrainConfig(**base, swa=True, swa_start=1), out_dir=tmp_path / 'b', device='cpu', progress=False, data=data, time_limit=1e-9)
        if b['status'] == 'done': break
    assert _same(avg['model'], b['model'])


def test_weight_average_settings():
    "SAAD averages by default from 0.47 of the run (its script's epoch 95 of 200); a start without averaging, or after the last epoch, is refused."
    assert (resolve(TrainConfig(method='saad', epochs=200)).swa_start, resolve(TrainConfig(method='saad', epochs=8)).swa_start) == (94, 4)
    assert resolve(TrainConfig(method='adaad')).swa is False and resolve(TrainConfig(method='saad', swa=False)).swa_start is None
    with pytest.raises(ValueError, match='swa_start needs swa=True'): resolve(TrainConfig(method='adaad', swa_start=3))
    with pytest.raises(ValueError, match=r'swa_start must be < epochs \(8\)'): resolve(TrainConfig(method='saad', epochs=8, swa_start=8))


def test_settings_flow_from_the_config_to_the_method_once_per_run(tmp_path, cifar_train, monkeypatch):
    "train() builds its method once from the config; the eps schedule then changes only that method's budget, per epoch."
    from adaad import methods as M
    built, build = [], M._build
    monkeypatch.setattr(M, '_build', lambda m, kw: built.append(m) or build(m, kw))
    torch.manual_seed(0); teacher = create_model('wrn-10-1').eval()
    cfg = TrainConfig(method='adaad', student='wrn-10-1', epochs=2, batch_size=32, steps=1, val_n=64, milestones=(1,),
                      eps_start=2 / 255, eps_ramp_epochs=2)
    train(cfg, teacher=teacher, out_dir=tmp_path, device='cpu', progress=False, data=_tiny_data(cifar_train))
    assert built == ['adaad']


def test_a_cuda_training_turns_on_the_cudnn_autotuner_and_leaves_tf32_alone(tmp_path, monkeypatch):
    "gpu_defaults: cudnn.benchmark on CUDA only, TF32 flags untouched; start_run applies it to the run's device."
    import adaad.train as T
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', False)
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    T.gpu_defaults(torch.device('cpu'))
    assert torch.backends.cudnn.benchmark is False
    T.gpu_defaults(torch.device('cuda', 0))
    assert torch.backends.cudnn.benchmark is True and (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == tf32
    seen = []
    def stop(device): seen.append(device); raise KeyboardInterrupt
    monkeypatch.setattr(T, 'gpu_defaults', stop)
    with pytest.raises(KeyboardInterrupt): T.start_run(TrainConfig(method='pgd-at', student='wrn-10-1'), out_dir=tmp_path / 'r', device='cpu')
    assert seen == [torch.device('cpu')]


def test_the_training_progress_bar_names_the_device_and_precision(tmp_path, cifar_train, capsys):
    data = _tiny_data(cifar_train)
    train(TrainConfig(method='natural', student='wrn-10-1', epochs=1, batch_size=32, val_n=64), out_dir=tmp_path, device='cpu',
          progress=True, data=data)
    assert 'natural epoch 0 (cpu, fp32)' in capsys.readouterr().err


def _sync_bn_worker(rank, world, port, out):
    "One rank: `sync_bn` converts the BatchNorms (on the same parameters); a training on the CPU with it is refused."
    from adaad.train import sync_batchnorm
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group('gloo'); torch.set_num_threads(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    w = net[1].weight
    same = sync_batchnorm(net, TrainConfig(), world)[1]                       # off by default
    synced = sync_batchnorm(net, TrainConfig(sync_bn=True), world)
    MODELS['_nobn'], refused = (lambda num_classes, **kw: _NoBN(num_classes)), None
    try: train(TrainConfig(method='natural', student='_nobn', sync_bn=True, epochs=1), out_dir=f'{out}/run{rank}', device='cpu', progress=False, data=_marked_data())
    except ValueError as e: refused = str(e)
    json.dump(dict(types=[type(same).__name__, type(synced[1]).__name__], shares=synced[1].weight is w, refused=refused),
              open(f'{out}/{rank}.json', 'w'))
    torch.distributed.destroy_process_group()


def test_sync_bn_converts_the_batchnorms_under_a_gloo_process_group(tmp_path):
    "TrainConfig(sync_bn=True) under 2 gloo ranks: SyncBatchNorm on the same parameters; torch's SyncBatchNorm runs on GPUs only, so train refuses it on the CPU."
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    mp.spawn(_sync_bn_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r = [json.loads((tmp_path / f'{k}.json').read_text()) for k in (0, 1)]
    assert r[0]['types'] == ['BatchNorm2d', 'SyncBatchNorm'] and r[0]['shares']
    assert r[1]['types'] == r[0]['types'] and all('sync_bn needs CUDA devices' in x['refused'] for x in r)   # on the CPU: refused, by name
    assert TrainConfig(sync_bn=True).validate().sync_bn and not TrainConfig().sync_bn
