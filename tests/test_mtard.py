"""MTARD against loops written from its official files, the natural-teacher interface (refusal, digests, resumption,
former names), and training through `train` and the command line."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adaad.checkpoint import atomic_save, read_checkpoint
from adaad.cli import main, parser
from adaad.core import content_digest, file_sha256
from adaad.data import CifarSplit
from adaad.methods import Method, get_method, known_methods, training_loss
from adaad.methods_2024 import MTARD
from adaad.models import create_model
from adaad.train import TrainConfig, build_method, resolve, train

from test_field_methods import grads, tiny  # noqa: E402  (the same toy network and checks)

pytestmark = pytest.mark.usefixtures('one_thread')


# ---- the official loop -------------------------------------------------------------------------------------------
def official_inner(model, teacher_adv, x_natural, y, step_size=2 / 255, epsilon=8 / 255, perturb_steps=10):
    """zhaoshiji123/MTARD mtard/mtard_loss.py, mtard_inner_loss_ce (lines 27-58): eval-mode student, start
    x + 0.001 N (not clipped), sign steps on the mean cross-entropy, projection and clipping each step; then the
    train-mode student's logits at x~ and the robust teacher's (no graph). The start is drawn on the CPU here."""
    model.eval()
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape, dtype=x_natural.dtype).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_ce = nn.CrossEntropyLoss()(model(x_adv), y)
        grad = torch.autograd.grad(loss_ce, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    student_logits = model(x_adv)
    with torch.no_grad(): teacher_logits = teacher_adv(x_adv)
    return student_logits, teacher_logits, x_adv


def official_kl(a, b):
    "mtard_resnet18_cifar10.py kl_loss (lines 51-53), then torch.mean over every element (lines 79-80)."
    return torch.mean(-a * b + torch.log(b + 1e-5) * b)


class OfficialLoop:
    """mtard_resnet18_cifar10.py (lines 44-49, 72-103, 135-138): weights 1/2 each; L_0 from the run's first step;
    the natural share moved every step before the loss; the rate x0.1 after the epochs `milestones` (1-based)."""
    def __init__(self, weight_learn_rate=0.025, bert=1, milestones=(215, 260, 285)):
        self.weight = {'adv_loss': 1 / 2.0, 'nat_loss': 1 / 2.0}
        self.init_loss_nat = self.init_loss_adv = None
        self.weight_learn_rate, self.bert, self.milestones = weight_learn_rate, bert, milestones

    def step(self, student, teacher, teacher_nat, x, y):
        with torch.no_grad(): teacher_nat_logits = teacher_nat(x)                        # lines 72-73
        student_adv_logits, teacher_adv_logits, x_adv = official_inner(student, teacher, x, y)     # line 74
        student.train()
        student_nat_logits = student(x)                                                  # line 76
        kl1 = official_kl(F.log_softmax(student_adv_logits, dim=1), F.softmax(teacher_adv_logits.detach(), dim=1))
        kl2 = official_kl(F.log_softmax(student_nat_logits, dim=1), F.softmax(teacher_nat_logits.detach(), dim=1))
        if self.init_loss_nat is None: self.init_loss_nat = kl2.item()                   # lines 82-85
        if self.init_loss_adv is None: self.init_loss_adv = kl1.item()
        lhat_adv, lhat_nat = kl1.item() / self.init_loss_adv, kl2.item() / self.init_loss_nat
        inv_rate_adv, inv_rate_nat = lhat_adv ** self.bert, lhat_nat ** self.bert      # lines 91-92
        w = self.weight
        w['nat_loss'] = w['nat_loss'] - self.weight_learn_rate * (w['nat_loss'] - inv_rate_nat / (inv_rate_adv +
                                                                                                 inv_rate_nat))
        w['adv_loss'] = 1 - w['nat_loss']                                                # line 98
        return w['adv_loss'] * kl1 + w['nat_loss'] * kl2, x_adv                          # line 100

    def end_epoch(self, epoch):
        "Lines 135-138: after the 1-based epoch `epoch` in the list, the rate (with the LR) x0.1."
        if epoch in self.milestones: self.weight_learn_rate *= 0.1


@pytest.fixture
def nets():
    torch.manual_seed(0)
    S, T, Tn = tiny(seed=0).double(), tiny(seed=1).double().eval(), tiny(seed=2).double().eval()
    return S, T, Tn


def test_steps_match_the_official_loop(nets):
    """Four SGD steps over two epochs (the rate lowered after the first): the inner point, both teachers' roles, the
    loss, the gradients and the natural share equal the script's at every step."""
    S, T, Tn = nets
    S2 = copy.deepcopy(S)
    m = get_method('mtard', share_rate_milestones=(1,))
    st = m.new_state(10)
    ref = OfficialLoop(milestones=(1,))
    opt, opt2 = (torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4) for n in (S, S2))
    for i, epoch in enumerate((0, 0, 1, 1)):
        g = torch.Generator().manual_seed(i)
        x = torch.rand(12, 3, 8, 8, generator=g, dtype=torch.float64); y = torch.randint(0, 10, (12,), generator=g)
        torch.manual_seed(100 + i); loss, _ = training_loss(m, S, T, x, y, epoch=epoch, natural_teacher=Tn, state=st)
        torch.manual_seed(100 + i); ref_loss, _ = ref.step(S2, T, Tn, x, y)
        opt.zero_grad(); loss.backward(); opt2.zero_grad(); ref_loss.backward()
        assert torch.allclose(loss, ref_loss, rtol=1e-12, atol=0), (i, loss, ref_loss)
        assert torch.allclose(grads(S), grads(S2), rtol=1e-10, atol=1e-14), i
        assert abs(st['nat_share'].item() - ref.weight['nat_loss']) < 1e-12, i
        opt.step(); opt2.step()
        if i == 1: ref.end_epoch(1)
    assert st['nat_share'].item() != 0.5 and st['init_adv'].item() == pytest.approx(ref.init_loss_adv, rel=1e-12)


def test_each_teacher_has_its_role(nets):
    "The robust teacher is read only at x~ and the natural one only at x: the loss is the script's formula on them."
    S, T, Tn = nets
    x, y = torch.rand(8, 3, 8, 8, dtype=torch.float64), torch.arange(8) % 10
    seen = []
    for name, net in (('robust', T), ('natural', Tn)):
        net.register_forward_hook(lambda mod, inp, out, name=name: seen.append((name, inp[0].clone())))
    torch.manual_seed(0); training_loss('mtard', S, T, x, y, natural_teacher=Tn)
    nat = [i for n, i in seen if n == 'natural']; rob = [i for n, i in seen if n == 'robust']
    assert len(nat) == 1 and torch.equal(nat[0], x)
    assert len(rob) == 1 and not torch.equal(rob[0], x) and (rob[0] - x).abs().max() <= 8 / 255 + 1e-12


def test_without_a_state_the_shares_stay_half(nets):
    S, T, Tn = nets
    x, y = torch.rand(8, 3, 8, 8, dtype=torch.float64), torch.arange(8) % 10
    torch.manual_seed(0); loss, _ = training_loss('mtard', copy.deepcopy(S), T, x, y, natural_teacher=Tn)
    torch.manual_seed(0); ref, _ = OfficialLoop().step(copy.deepcopy(S), T, Tn, x, y)   # first step: shares 1/2
    assert torch.allclose(loss, ref, rtol=1e-12, atol=0)


def test_defaults_are_the_scripts():
    m = get_method('mtard')
    assert (m.share_rate, m.share_exponent, m.initial_nat_share, m.share_rate_milestones, m.tau, m.natural_target) == (
        .025, 1., .5, None, 1., 'natural')
    assert (m.epochs, m.milestones, m.weight_decay) == (300, (215, 260, 285), 2e-4)
    assert (m.budget.eps, m.budget.step_size, m.budget.steps, m.budget.init, m.budget.attack_bn) == (
        8 / 255, 2 / 255, 10, 'gaussian', 'eval')
    assert m.needs_natural_teacher and m.passes(0) == ('adv', 'nat')
    assert [m.rate_at(e) for e in (0, 214, 215, 260, 285)] == pytest.approx([.025, .025, .0025, .00025, .000025])
    assert resolve(TrainConfig(method='mtard')).batch_size == 128


@pytest.mark.parametrize('kw, msg', [(dict(share_rate=2.), 'share_rate must be in'),
                                     (dict(initial_nat_share=-1.), 'initial_nat_share must be in'),
                                     (dict(share_rate_milestones='215'), 'share_rate_milestones must be a sequence'),
                                     (dict(tau=0.), 'tau must be > 0')])
def test_bad_options_are_refused_by_name(kw, msg):
    with pytest.raises(ValueError, match=msg): get_method('mtard', **kw)


# ---- the natural-teacher interface ---------------------------------------------------------------------------------
def _data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (48, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(48) % 10
    return CifarSplit(x[:32], y[:32], 10, split='train'), CifarSplit(x[32:], y[32:], 10, split='test')


def _cfg(**kw):
    return TrainConfig(method='mtard', student='wrn-10-1', epochs=2, batch_size=16, steps=2, val_n=8, val_steps=1,
                       milestones=(1,), method_kwargs=dict(share_rate_milestones=(1,), **kw))


def _teachers():
    torch.manual_seed(5); t = create_model('wrn-10-1').eval()
    torch.manual_seed(6); tn = create_model('wrn-10-1').eval()
    return t, tn


def test_a_method_that_needs_a_natural_teacher_is_refused_without_one(tmp_path):
    t, tn = _teachers()
    with pytest.raises(ValueError, match="'mtard' needs a naturally trained teacher; pass natural_teacher="):
        train(_cfg(), teacher=t, out_dir=tmp_path / 'a', device='cpu', progress=False, data=_data())
    with pytest.raises(ValueError, match='reads no natural teacher'):
        train(TrainConfig(method='rslad', student='wrn-10-1', epochs=1), teacher=t, natural_teacher=tn,
              out_dir=tmp_path / 'b', device='cpu', progress=False, data=_data())


def test_trains_through_train_records_the_digest_and_resumes_exactly(tmp_path):
    "Pausing after every step and resuming gives bit-identical weights and shares; identity.json holds the digest."
    t, tn = _teachers()
    a = train(_cfg(), teacher=t, natural_teacher=tn, out_dir=tmp_path / 'a', device='cpu', progress=False,
              data=_data())
    assert a['status'] == 'done'
    log = [json.loads(l) for l in (tmp_path / 'a' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in log] == [0, 1] and all(r['loss'] > 0 for r in log)
    ident = json.loads((tmp_path / 'a' / 'identity.json').read_text())
    # the key older run folders were written with, so that they resume
    assert ident['standard_teacher'] == content_digest(tn.state_dict()) != ident['teacher']
    while True:
        b = train(_cfg(), teacher=t, natural_teacher=tn, out_dir=tmp_path / 'b', device='cpu', progress=False,
                  data=_data(), time_limit=1e-9)
        if b['status'] == 'done': break
    sa, sb = a['model'].state_dict(), b['model'].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ca, cb = (read_checkpoint(tmp_path / d / 'last.pt')['method_state'] for d in 'ab')
    assert all(torch.equal(ca[k], cb[k]) for k in ca) and ca['nat_share'].item() != 0.5
    with pytest.raises(ValueError, match='standard_teacher'):   # another natural teacher: another run
        train(_cfg(), teacher=t, natural_teacher=t, out_dir=tmp_path / 'a', device='cpu', progress=False,
              data=_data())


def test_former_names_still_work_with_a_warning(tmp_path, nets):
    S, T, Tn = nets
    x, y = torch.rand(8, 3, 8, 8, dtype=torch.float64), torch.arange(8) % 10
    torch.manual_seed(0); new, _ = training_loss('mtard', copy.deepcopy(S), T, x, y, natural_teacher=Tn)
    with pytest.warns(FutureWarning, match='teacher_st is deprecated, use natural_teacher'):
        torch.manual_seed(0); old, _ = training_loss('mtard', copy.deepcopy(S), T, x, y, teacher_st=Tn)
    assert torch.equal(new, old)
    with pytest.warns(FutureWarning, match='needs_standard_teacher is deprecated'):
        assert get_method('mtard').needs_standard_teacher
    with pytest.warns(FutureWarning, match='needs_standard_teacher is deprecated, set needs_natural_teacher'):
        class Mine(Method):
            needs_standard_teacher = True
    assert Mine.needs_natural_teacher is True
    t, tn = _teachers()
    with pytest.warns(FutureWarning, match='standard_teacher is deprecated, use natural_teacher'):
        r = train(_cfg(), teacher=t, standard_teacher=tn, out_dir=tmp_path, device='cpu', progress=False,
                  data=_data(), time_limit=1e-9)
    assert r['status'] in ('paused', 'done')
    import warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        ns = parser().parse_args(['train', '--standard-teacher', 'n.pt', '--standard-teacher-arch', 'wrn-10-1'])
    assert (ns.natural_teacher, ns.natural_teacher_arch) == ('n.pt', 'wrn-10-1')
    assert [str(w.message) for w in seen if w.category is FutureWarning] == [
        '--standard-teacher is deprecated, use --natural-teacher',
        '--standard-teacher-arch is deprecated, use --natural-teacher-arch']


# ---- the command line ----------------------------------------------------------------------------------------------
def test_cli_refuses_mtard_without_a_natural_teacher(capsys):
    with pytest.raises(SystemExit) as e:
        main(['train', '--method', 'mtard', '--teacher', 'x.pt', '--teacher-arch', 'wrn-10-1'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and '--method mtard needs a naturally trained teacher: --natural-teacher' in err


def test_cli_trains_mtard_and_records_both_files(tmp_path, data_root, capsys):
    t, tn = _teachers()
    atomic_save(t.state_dict(), tmp_path / 't.pt'); atomic_save(tn.state_dict(), tmp_path / 'n.pt')
    main(['train', '--method', 'mtard', '--student', 'wrn-10-1', '--teacher', str(tmp_path / 't.pt'),
          '--teacher-arch', 'wrn-10-1', '--natural-teacher', str(tmp_path / 'n.pt'), '--natural-teacher-arch',
          'wrn-10-1', '--out', str(tmp_path / 's'), '--data-root', str(data_root), '--epochs', '1', '--train-n', '32',
          '--val-n', '16', '--batch-size', '16', '--steps', '1', '--device', 'cpu', '--no-progress'])
    assert (tmp_path / 's' / 'DONE').exists()
    rec = json.loads((tmp_path / 's' / 'teachers.json').read_text())
    assert rec['natural_teacher']['sha256'] == file_sha256(tmp_path / 'n.pt') != rec['teacher']['sha256']
    assert rec['teacher']['sha256'] == file_sha256(tmp_path / 't.pt') and rec['natural_teacher']['arch'] == 'wrn-10-1'


def test_cli_records_the_natural_teachers_accuracy_check(tmp_path, data_root, capsys):
    "A natural-teacher file with an accuracy record beside it is checked before training; the check is named."
    t, tn = _teachers()
    atomic_save(t.state_dict(), tmp_path / 't.pt'); atomic_save(tn.state_dict(), tmp_path / 'n.pt')
    (tmp_path / 'n.json').write_text(json.dumps(dict(sha256=file_sha256(tmp_path / 'n.pt'),
                                                     accuracy=dict(clean=0., pgd10=0.))))
    main(['train', '--method', 'mtard', '--student', 'wrn-10-1', '--teacher', str(tmp_path / 't.pt'),
          '--teacher-arch', 'wrn-10-1', '--natural-teacher', str(tmp_path / 'n.pt'), '--natural-teacher-arch',
          'wrn-10-1', '--out', str(tmp_path / 's'), '--data-root', str(data_root), '--epochs', '1', '--train-n', '16',
          '--val-n', '16', '--batch-size', '16', '--steps', '1', '--device', 'cpu', '--no-progress'])
    assert 'natural-teacher check' in capsys.readouterr().err
    rec = json.loads((tmp_path / 's' / 'teachers.json').read_text())
    assert rec['natural_teacher']['check'] == 'natural-teacher-check.json' and rec['teacher']['check'] is None
    assert json.loads((tmp_path / 's' / 'natural-teacher-check.json').read_text())['key']['ckpt_sha256'] == (
        rec['natural_teacher']['sha256'])


# ---- Fair-ARD on MTARD ---------------------------------------------------------------------------------------------
def official_fair_mtard_step(loop, student, teacher, x, y, reweight, step_size=2 / 255, epsilon=8 / 255, steps=10):
    """NISP-official/Fair-ARD Fair-MTARD.py: the inner loop counting, per example, the steps at which the student is
    right (lines 42-79), the per-example KL terms multiplied by the class weight, the clean one against the robust
    teacher at x~ (lines 140-151), then MTARD's share update and loss (lines 153-171). Returns loss and counts."""
    student.eval()
    x_adv = x.detach() + 0.001 * torch.randn(x.shape, dtype=x.dtype).detach()
    kappa = [0 for _ in range(len(x))]
    for _ in range(steps):
        x_adv.requires_grad_()
        logits_adv = student(x_adv)
        predict = logits_adv.max(1, keepdim=True)[1]
        for p in range(len(x_adv)):
            if predict[p] == y[p]: kappa[p] += 1
        loss_ce = nn.CrossEntropyLoss()(logits_adv, y)
        grad = torch.autograd.grad(loss_ce, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - epsilon), x + epsilon), 0.0, 1.0)
    student.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    s_adv = student(x_adv)
    with torch.no_grad(): t_adv = teacher(x_adv)
    s_nat = student(x)
    k1 = [official_kl(F.log_softmax(s_adv[i], dim=0), F.softmax(t_adv[i], dim=0)) * reweight[y[i]]
          for i in range(len(x))]
    k2 = [official_kl(F.log_softmax(s_nat[i], dim=0), F.softmax(t_adv[i], dim=0)) * reweight[y[i]]
          for i in range(len(x))]
    kl1, kl2 = (1 / len(x)) * sum(k1), (1 / len(x)) * sum(k2)
    if loop.init_loss_nat is None: loop.init_loss_nat = kl2.item()
    if loop.init_loss_adv is None: loop.init_loss_adv = kl1.item()
    r_adv, r_nat = (kl1.item() / loop.init_loss_adv) ** loop.bert, (kl2.item() / loop.init_loss_nat) ** loop.bert
    w = loop.weight
    w['nat_loss'] = w['nat_loss'] - loop.weight_learn_rate * (w['nat_loss'] - r_nat / (r_adv + r_nat))
    w['adv_loss'] = 1 - w['nat_loss']
    return w['adv_loss'] * kl1 + w['nat_loss'] * kl2, kappa


def test_fair_ard_on_mtard_matches_fair_mtard_py(nets):
    "Two steps with unequal class weights: loss, gradients, share and per-class counts equal Fair-MTARD.py's."
    S, T, _ = nets
    S2 = copy.deepcopy(S)
    m = get_method('fair-ard', base='mtard')
    assert not m.needs_natural_teacher and m.epochs == 300
    st = m.new_state(10)
    st['weights'].copy_(torch.linspace(5 / 6, 5 / 2, 10))
    ref, rw = OfficialLoop(), st['weights'].double()
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        x = torch.rand(12, 3, 8, 8, generator=g, dtype=torch.float64); y = torch.randint(0, 10, (12,), generator=g)
        before = st['correct'].clone()
        torch.manual_seed(100 + i); loss, _ = training_loss(m, S, T, x, y, state=st)
        torch.manual_seed(100 + i); ref_loss, kappa = official_fair_mtard_step(ref, S2, T, x, y, rw)
        for n in (S, S2): n.zero_grad()
        loss.backward(); ref_loss.backward()
        assert torch.allclose(loss, ref_loss, rtol=1e-12, atol=0), (i, loss, ref_loss)
        assert torch.allclose(grads(S), grads(S2), rtol=1e-10, atol=1e-14)
        assert abs(st['nat_share'].item() - ref.weight['nat_loss']) < 1e-12
        per_class = torch.zeros(10).index_add_(0, y, torch.tensor(kappa, dtype=torch.float32))
        assert torch.equal(st['correct'] - before, per_class)
    with pytest.raises(ValueError, match="natural_target is an option of base 'mtard'"):
        get_method('fair-ard', natural_target='natural')
    assert get_method('fair-ard', base='mtard', natural_target='natural').needs_natural_teacher


# ---- the shipped natural teacher -----------------------------------------------------------------------------------
def test_cpu_strong_field2_ships_its_natural_teacher():
    """The preset's natural teacher is a shipped file whose SHA-256 the preset records, of the robust teacher's
    architecture, trained naturally as its record says; every preset with a method that needs one gives one."""
    from adaad.presets import PRESETS, preset_config, train_config
    from adaad.repro import shipped_record, shipped_teacher_file
    cfg = preset_config('cpu-strong-field2')
    spec = cfg['standard_teacher']
    assert spec['source'] == 'shipped' and spec['arch'] == cfg['teacher']['arch']
    assert spec['train']['method'] == 'natural'
    p = shipped_teacher_file(spec)                           # refused unless the digest is the preset's
    rec = shipped_record(p)
    assert rec['sha256'] == spec['sha256'] == file_sha256(p) and rec['arch'] == spec['arch']
    assert all(rec['train'][k] == (list(v) if isinstance(v, tuple) else v) for k, v in spec['train'].items())
    assert rec['train']['epochs'] == 3 and 'quarter of an hour' in rec['note'] and rec['accuracy']['clean'] > 50
    for name in PRESETS:
        c = preset_config(name)
        tcs = [train_config(c, r, 'resnet18') for r in list(c['methods']) + list(c['variants'])]
        # a method registered by another module (a preset may name one) is left out
        need = [tc.method for tc in tcs if tc.method in known_methods() and build_method(tc).needs_natural_teacher]
        assert not need or c.get('standard_teacher'), f'{name}: {need} need a natural teacher'


def test_run_folders_written_before_the_natural_teacher_name_still_resume(tmp_path):
    """An AKD folder's identity records its natural teacher under `standard_teacher`, as before; a Fair-ARD folder
    written before its `natural_target` field existed is the same run now."""
    from adaad.train import check_identity, run_identity
    t, tn = _teachers()
    akd = TrainConfig(method='akd', student='wrn-10-1', epochs=1)
    ident = run_identity(akd, t, tn, _data())
    assert set(ident) == {'config', 'teacher', 'standard_teacher', 'data'}
    assert ident['standard_teacher'] == content_digest(tn.state_dict())
    fair = TrainConfig(method='fair-ard', student='wrn-10-1', epochs=1)
    new = run_identity(resolve(fair), t, None, _data(), resolved=True)
    old = json.loads(json.dumps(new)); del old['config']['method_kwargs']['natural_target']
    (tmp_path / 'identity.json').write_text(json.dumps(old)); (tmp_path / 'last.pt').touch()
    check_identity(tmp_path, new)                                         # accepted: the field had its default


# ---- a distributed run ----------------------------------------------------------------------------------------------
def _ddp_shares_worker(rank, world, port, out):
    """One gloo rank: `process_means` of (rank + 1) over rank + 1 examples, then one epoch of MTARD on its half of
    each batch; the rank's MTARD state after the epoch and the first step's, saved as shares{rank}.pt."""
    import os
    from adaad.methods_2024 import process_means
    from adaad.models import MODELS
    from adaad.train import start_run, train_epoch
    from test_train import _marked_data, _NoBN
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    MODELS['_nobn'] = lambda num_classes, **kw: _NoBN(num_classes)
    torch.set_num_threads(1)
    cfg = TrainConfig(method='mtard', student='_nobn', epochs=1, batch_size=32, val_n=32, steps=2, milestones=(1,),
                      method_kwargs=dict(share_rate_milestones=(1,)))
    torch.manual_seed(7); teacher = _NoBN().eval()
    torch.manual_seed(8); natural = _NoBN().eval()
    run = start_run(cfg, teacher, out, device='cpu', progress=False, data=_marked_data(), natural_teacher=natural)
    try:
        means = process_means((torch.tensor(rank + 1.),), rank + 1)
        train_epoch(run, 0)
        torch.save(dict(means=means[0], **{k: v.clone() for k, v in run.method_state.items()}),
                   f'{out}/shares{rank}.pt')
    finally: run.close()
    torch.distributed.destroy_process_group()


def test_distributed_ranks_move_the_same_shares(tmp_path):
    """Two gloo ranks, each with its half of every batch: the shares move with the whole batch's losses (the ranks'
    means weighted by their examples), so both ranks hold the same shares; rank-local losses would part them."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    mp.spawn(_ddp_shares_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f'shares{r}.pt', weights_only=True) for r in (0, 1))
    assert a['means'].item() == b['means'].item() == pytest.approx((1 * 1 + 2 * 2) / 3)
    assert a['nat_share'].item() != 0.5
    for k in ('nat_share', 'init_adv', 'init_nat'): assert torch.equal(a[k], b[k]), (k, a[k], b[k])
