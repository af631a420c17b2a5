"""Three SGD steps of every method with official code, in float64 from one start, against a loop written from the
official training script each reference names. The library runs as a user runs it, `faithful=True`, two ways:
`training_loss` with the trainer's SGD and its teacher (`prepare_teacher`, unfolded), as `train_epoch` runs a batch,
compared after each step on the student's (and peer's) weights, BatchNorm buffers and the inner point x~; and `train`
itself, paused and resumed after each batch, compared on what its checkpoint holds. Where the library departs from the
official script the case is a strict xfail naming the file and lines, so that it flips once the library follows it."""
import copy
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

import adaad.methods as M
import adaad.train
from adaad.checkpoint import read_checkpoint
from adaad.data import CifarSplit, batches
from adaad.fast import prepare_teacher
from adaad.train import TrainConfig, lr_at, method_at, resolve, resolve_run, train
from test_field_methods import (batch, official_adaad_inner, official_fair_ard_step, official_igdm_step,  # noqa: F401
                                official_peeraid_step, official_saad_step, tiny)
import test_field_methods

pytestmark = [pytest.mark.usefixtures('one_thread'),
              pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")]   # the scripts' nn.KLDivLoss() default

RTOL, ATOL = 1e-10, 1e-13


# ---- the two sides --------------------------------------------------------------------------------------------------
def step_batches(y, n=3, seed=11):
    "`n` float64 batches of 8x8 images with the labels `y` shuffled (every class present)."
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(len(y), 3, 8, 8, generator=g, dtype=torch.float64), y[torch.randperm(len(y), generator=g)])
            for _ in range(n)]


def recording(monkeypatch, module, name):
    "Replace `module.name` by a wrapper that appends each return value to the list returned here."
    out, fn = [], getattr(module, name)
    def wrapped(*a, **kw):
        r = fn(*a, **kw); out.append(r); return r
    monkeypatch.setattr(module, name, wrapped)
    return out


def snapshot(student, peers=None, x_adv=None, kappa=None):
    "Copies of what the trajectories compare: state dicts (weights and BatchNorm buffers), x~, Fair-ARD's counts."
    nets = {'student': student, **(peers or {})}
    out = {} if x_adv is None else {'x_adv': x_adv.detach().clone()}          # first: a different x~ explains the rest
    if kappa is not None: out['kappa'] = kappa.clone()
    return {**out, **{f'{n}.{k}': v.detach().clone() for n, net in nets.items() for k, v in net.state_dict().items()}}


def library_run(monkeypatch, method, S, T, batches, epoch=0, peers=None, weights=None, natural=None, **cfg):
    """The library's snapshots after each step, run as `train_epoch` runs a batch: method and schedule from
    `resolve_run`, the teachers (`natural`: the naturally trained one) as `_prepare` hands them over (`prepare_teacher`,
    folded unless faithful), one SGD over student and peers (Nesterov's momentum as resolved), `faithful=True` unless
    `cfg` says otherwise."""
    cfg, m = resolve_run(TrainConfig(method=method, faithful=cfg.pop('faithful', True), **cfg))
    m = method_at(m, cfg, epoch)
    teacher, natural = (None if t is None else prepare_teacher(copy.deepcopy(t).eval().requires_grad_(False),
                                                               fold_bn=cfg.fold_teacher) for t in (T, natural))
    groups = [{'params': n.parameters()} for n in (S, *peers.values())] if peers else S.parameters()   # as train._setup
    opt = torch.optim.SGD(groups, lr=lr_at(epoch, cfg.lr, cfg.milestones, cfg.single_decay), momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    state = m.new_state(10)
    if state is not None and weights is not None: state['weights'].copy_(weights)
    points, out = recording(monkeypatch, M, 'inner_point'), []
    S.train()
    for p in (peers or {}).values(): p.train()
    for x, y in batches:
        loss, _ = M.training_loss(m, S, teacher, x, y, epoch=epoch, num_classes=10, faithful=cfg.faithful, state=state,
                                  peers=peers, natural_teacher=natural)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        out.append(snapshot(S, peers, points[-1], None if state is None else state['correct'].double()))
    return out


def official_run(step, S, batches, wd, nesterov=False, peers=None):
    """Snapshots after each step of the official loop: `step(x, y)` returns (loss, x~[, per-class Kappa]); one SGD per
    network as the scripts build it: lr 0.1 (its value in the first epoch in every script), momentum 0.9, weight decay
    `wd`, Nesterov's momentum where `nesterov`."""
    lr, momentum = 0.1, 0.9
    opts = [torch.optim.SGD(n.parameters(), lr=lr, momentum=momentum, weight_decay=wd, nesterov=nesterov)
            for n in (S, *(peers or {}).values())]
    kappa, out = None, []
    for x, y in batches:
        loss, xa, *k = step(x, y)
        for o in opts: o.zero_grad()
        loss.backward()
        for o in opts: o.step()
        if k: kappa = (0 if kappa is None else kappa) + k[0].double()
        out.append(snapshot(S, peers, xa, kappa))
    return out


def assert_same_trajectory(ours, theirs):
    "Every compared tensor equal to rounding after every step (the first difference is reported)."
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.keys() == b.keys(), (i, sorted(a.keys() ^ b.keys()))
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=lambda m: f'step {i + 1}, {k}: {m}')


def kl_mean_all(s, t, temp=1.):
    "nn.KLDivLoss()(log_softmax(s/temp), softmax(t/temp)): the scripts' default 'mean', over all B*C elements."
    return F.kl_div(F.log_softmax(s / temp, dim=1), F.softmax(t / temp, dim=1), reduction='mean')


def kl_rows(s, t, temp=1.):
    "nn.KLDivLoss(reduce=False)(log_softmax(s/temp), softmax(t/temp)).sum(dim=1): one KL per example."
    return F.kl_div(F.log_softmax(s / temp, dim=1), F.softmax(t / temp, dim=1), reduction='none').sum(1)


def randn_start(x):
    "x + 0.001 N(0, 1) (the scripts' `torch.randn(x.shape).cuda()`, here in the batch's dtype)."
    return x.detach() + 0.001 * torch.randn(x.shape, dtype=x.dtype)


def sign_step(xa, grad, x, step_size, eps):
    "The scripts' update: a sign step, then torch.min(torch.max(., x - eps), x + eps), then clamp to [0, 1]."
    xa = xa.detach() + step_size * torch.sign(grad.detach())
    return torch.clamp(torch.min(torch.max(xa, x - eps), x + eps), 0.0, 1.0)


def train_mode_pgd(S, x, y, eps=8 / 255, step_size=2 / 255, steps=10):
    """goldblum/AdversariallyRobustDistillation main.py:68-79 (AttackPGD.forward; ZFancy/IAD IAD-I.py:95-106, and with
    Kappa NISP-official/Fair-ARD Fair-IAD.py:76-94): uniform start, train-mode student, summed CE; returns x~ and the
    per-example count of steps at which the student was right."""
    k = torch.zeros(len(x))
    xa = x.detach() + torch.zeros_like(x).uniform_(-eps, eps)
    for _ in range(steps):
        xa.requires_grad_()
        out = S(xa)
        k += (out.max(1)[1] == y).float()
        with torch.enable_grad(): loss = F.cross_entropy(out, y, reduction='sum')
        xa = sign_step(xa, torch.autograd.grad(loss, [xa])[0], x, step_size, eps)
    return xa, k


def reliability(t_adv, y, beta=0.1):
    """IAD's Alpha[i] = softmax(guide)[i][y_i] ** beta (IAD-I.py:174-178; AdaAD main.py:372-376), in the batch's dtype
    (the scripts store it in a float32 tensor, where everything is float32)."""
    return F.softmax(t_adv, dim=1)[torch.arange(len(y)), y].pow(beta).detach()


# ---- the official steps, one function each ------------------------------------------------------------------------
def pgd_at_step(S, dead_pass=True):
    """boyellow/AdaAD main.py:307-324 (Plain_Madry) with AT_helper.py:51-85 (Madry_PGD): clipped start, eval BN, mean CE
    (`dead_pass=False` drops the unread S(x), to show the comparison sees it)."""
    def step(x, y, eps=8 / 255, step_size=2 / 255):
        S.eval()
        xa = torch.clamp(randn_start(x), 0.0, 1.0)
        for _ in range(10):
            xa.requires_grad_()
            with torch.enable_grad(): loss = F.cross_entropy(S(xa), y)
            xa = sign_step(xa, torch.autograd.grad(loss, [xa])[0], x, step_size, eps)
        S.train()
        adv_outputs = S(xa)
        if dead_pass: S(x)                                          # ori_outputs: read for the accuracy only
        return F.cross_entropy(adv_outputs, y), xa
    return step


def trades_step(S, beta=6., eps=0.031, step_size=0.007):
    """yaodongyu/TRADES trades.py:17-84 (l_inf), called by train_trades_cifar10.py:73-90 with beta 6, eps 0.031, step
    0.007: eval-mode ascent on sum KL(S(x) || S(x')), then S(x) for the CE, S(x~), S(x) again as the KL's target."""
    def step(x, y):
        S.eval()
        xa = randn_start(x)
        for _ in range(10):
            xa.requires_grad_()
            with torch.enable_grad():
                loss_kl = F.kl_div(F.log_softmax(S(xa), dim=1), F.softmax(S(x), dim=1), reduction='sum')
            xa = sign_step(xa, torch.autograd.grad(loss_kl, [xa])[0], x, step_size, eps)
        S.train()
        xa = torch.clamp(xa, 0.0, 1.0)
        loss_natural = F.cross_entropy(S(x), y)
        loss_robust = (1.0 / len(x)) * F.kl_div(F.log_softmax(S(xa), dim=1), F.softmax(S(x), dim=1), reduction='sum')
        return loss_natural + beta * loss_robust, xa
    return step


def ard_step(S, T, temp=30., alpha=1.):
    "goldblum/AdversariallyRobustDistillation main.py:117-129: AttackPGD (train mode), S(x~), T(x), S(x), KL 'mean'."
    def step(x, y):
        S.train()
        xa, _ = train_mode_pgd(S, x, y)
        outputs = S(xa)
        teacher_outputs = T(x)
        basic_outputs = S(x)
        kl = kl_mean_all(outputs, teacher_outputs, temp)
        return alpha * temp * temp * kl + (1.0 - alpha) * F.cross_entropy(basic_outputs, y), xa
    return step


def akd_step(S, T, Tn, temp=1., alpha1=0.5, alpha2=0.25):
    """ZFancy/IAD AKD2.py:97-108 (AttackPGD, train mode: `net.train()` of line 169, its last line S(x~)) and 175-179:
    T(x~) and the standard teacher's Tn(x~), both in eval mode (lines 156, 161); the KLs summed per row, over B."""
    def step(x, y):
        S.train()
        xa, _ = train_mode_pgd(S, x, y)
        outputs = S(xa)
        teacher_outputs, st_outputs = T(xa), Tn(xa)
        loss = ((1 - alpha1 - alpha2) * F.cross_entropy(outputs, y)
                + alpha1 * temp * temp * kl_rows(outputs, teacher_outputs, temp).sum() / len(outputs)
                + alpha2 * temp * temp * kl_rows(outputs, st_outputs, temp).sum() / len(outputs))
        return loss, xa
    return step


def iad_step(S, T, epoch, temp=1., alpha=1., beta=0.1, begin=60):
    """ZFancy/IAD IAD-I.py:156-181: T(x), AttackPGD (train mode) and S(x~), the dead S(x~) `basicop` (line 169), T(x~),
    then the loss with S(x) twice from `begin` on (introspection and CE), once before (CE)."""
    def step(x, y):
        S.train()
        teacher_outputs = T(x)
        xa, _ = train_mode_pgd(S, x, y)
        outputs = S(xa)
        S(xa).detach()                                              # basicop: never read
        guide = T(xa)
        loss = alpha * temp * temp * kl_rows(outputs, teacher_outputs, temp).mean()
        if epoch >= begin:
            loss = loss + alpha * (kl_rows(outputs, S(x)) * (1 - reliability(guide, y, beta))).mean()
        return loss + (1.0 - alpha) * F.cross_entropy(S(x), y), xa
    return step


def rslad_step(S, T):
    """zibojia/RSLAD resnet18_rslad_cifar10.py:47-65 with rslad_loss.py:26-59: T(x), eval-mode ascent on
    sum KL(T(x) || S(x')), then S(x~), S(x); kl_loss (line 38) averaged over all B*C elements."""
    def kl_loss(a, b): return -a * b + torch.log(b + 1e-5) * b
    def step(x, y, eps=8 / 255, step_size=2 / 255):
        S.train()
        with torch.no_grad(): teacher_logits = T(x)
        S.eval()
        xa = randn_start(x)
        for _ in range(10):
            xa.requires_grad_()
            with torch.enable_grad():
                loss_kl = F.kl_div(F.log_softmax(S(xa), dim=1), F.softmax(teacher_logits, dim=1), reduction='none')
                loss_kl = torch.sum(loss_kl)
            xa = sign_step(xa, torch.autograd.grad(loss_kl, [xa])[0], x, step_size, eps)
        S.train()
        xa = torch.clamp(xa, 0.0, 1.0)
        adv_logits = S(xa)
        nat_logits = S(x)
        pt = F.softmax(teacher_logits.detach(), dim=1)
        m = lambda s: kl_loss(F.log_softmax(s, dim=1), pt).mean()
        return 5 / 6.0 * m(adv_logits) + 1 / 6.0 * m(nat_logits), xa
    return step


def adaad_step(S, T, alpha=1.):
    """boyellow/AdaAD main.py:326-353 (method AdaAD, CIFAR-10) with AT_helper.py:8-48 (adaad_inner_loss, the same code
    as HongsinLee/saad attacks.py's): S(x) then S(x~), the KLs' 'mean' over all B*C elements."""
    def step(x, y):
        xa = official_adaad_inner(S, T, x, step_size=2 / 255, epsilon=8 / 255)
        S.train()
        ori_outputs = S(x)
        adv_outputs = S(xa)
        with torch.no_grad(): t_ori, t_adv = T(x), T(xa)
        return alpha * kl_mean_all(adv_outputs, t_adv) + (1 - alpha) * kl_mean_all(ori_outputs, t_ori), xa
    return step


def adaiad_step(S, T, epoch, temp=30., alpha=1., beta=0.1, begin=60):
    """boyellow/AdaAD main.py:355-381 (method AdaAD_with_IAD1): S(x), S(x~), T(x~) as guide and target, then the loss
    with S(x) in the introspection term (from `begin` on) and S(x) in the CE term."""
    def step(x, y):
        xa = official_adaad_inner(S, T, x, step_size=2 / 255, epsilon=8 / 255)
        S.train()
        S(x)                                                        # ori_outputs: read for the accuracy only
        adv_outputs = S(xa)
        guide = teacher_outputs = T(xa)
        loss = alpha * temp * temp * kl_rows(adv_outputs, teacher_outputs, temp).mean()
        if epoch >= begin:
            loss = loss + alpha * (kl_rows(adv_outputs, S(x)) * (1 - reliability(guide, y, beta))).mean()
        return loss + (1.0 - alpha) * F.cross_entropy(S(x), y), xa
    return step


def fair_iad_step(S, T, epoch, reweight, temp=1., alpha=1., beta_iad=0.1, begin=60):
    """NISP-official/Fair-ARD Fair-IAD.py:155-202: T(x), AttackPGD with Kappa (train mode), S(x), the dead S(x~)
    `basicop` (line 170), T(x~); each example's terms weighted by reweight[y_i] (the CE term reads S(x~), line 185)."""
    def step(x, y):
        S.train()
        teacher_outputs = T(x)
        xa, kappa = train_mode_pgd(S, x, y)
        outputs = S(xa)
        basic_net_outputs = S(x)
        S(xa).detach()                                              # basicop: never read
        guide = T(xa)
        w = reweight[y].to(x.dtype)
        loss = alpha * temp * temp * (kl_rows(outputs, teacher_outputs, temp) * w).mean()
        if epoch >= begin:
            intro = kl_rows(outputs, basic_net_outputs) * (1 - reliability(guide, y, beta_iad))
            loss = (loss + alpha * (intro * w).mean()
                    + (1.0 - alpha) * (F.cross_entropy(outputs, y, reduction='none') * w).mean())
        return loss, xa, torch.zeros(10).index_add_(0, y, kappa)
    return step


def fair_rslad_step(S, T, reweight, eps=8 / 255, step_size=2 / 255):
    """NISP-official/Fair-ARD Fair-RSLAD.py:110-140 with its rslad_inner_loss (lines 40-79: Kappa at each eval-mode
    pass),
    the per-example kl_loss (line 86) weighted by reweight[y_i], summed, / B, averaged over classes."""
    def kl_loss(a, b): return -a * b + torch.log(b + 1e-5) * b
    def step(x, y):
        S.train()
        with torch.no_grad(): teacher_logits = T(x)
        S.eval()
        xa, kappa = randn_start(x), torch.zeros(len(x))
        for _ in range(10):
            xa.requires_grad_()
            out = S(xa)
            kappa += (out.max(1)[1] == y).float()
            with torch.enable_grad():
                loss_kl = F.kl_div(F.log_softmax(out, dim=1), F.softmax(teacher_logits, dim=1), reduction='none').sum()
            xa = sign_step(xa, torch.autograd.grad(loss_kl, [xa])[0], x, step_size, eps)
        S.train()
        xa = torch.clamp(xa, 0.0, 1.0)
        adv_logits = S(xa)
        nat_logits = S(x)
        pt, w = F.softmax(teacher_logits.detach(), dim=1), reweight[y].to(x.dtype)[:, None]
        m = lambda s: (kl_loss(F.log_softmax(s, dim=1), pt) * w).sum(0).div(len(y)).mean()
        return 5 / 6.0 * m(adv_logits) + 1 / 6.0 * m(nat_logits), xa, torch.zeros(10).index_add_(0, y, kappa)
    return step


def first_train_input_after(net, n):
    "A forward pre-hook that keeps the input of `net`'s train-mode call number `n` (0-based) of each step in `kept`."
    seen, kept = [0], []
    def hook(module, inputs):
        if module.training:
            if seen[0] == n: kept.append(inputs[0].detach().clone())
            seen[0] += 1
    net.register_forward_pre_hook(hook)
    def new_step(): kept.clear(); seen[0] = 0
    return kept, new_step


def fair_ard_step(S, T, reweight):
    "NISP-official/Fair-ARD Fair-ARD.py:127-150 (`official_fair_ard_step`); x~ read as the input of S after AttackPGD."
    kept, new_step = first_train_input_after(S, 10)                  # after AttackPGD's 10 train-mode passes: S(x~)
    def step(x, y):
        new_step()
        old = torch.get_default_dtype(); torch.set_default_dtype(torch.float32)   # it counts in float32 zeros
        try: loss, kappa = official_fair_ard_step(S, T, x, y, reweight)
        finally: torch.set_default_dtype(old)
        return loss, kept[0], kappa
    return step


def fair_mtard_step(S, T, reweight):
    """NISP-official/Fair-ARD Fair-MTARD.py (`official_fair_mtard_step` of test_mtard: lines 42-79, 140-171), MTARD's
    shares kept by one loop over the steps; x~ read as S's first train-mode input, the counts summed per class."""
    from test_mtard import OfficialLoop, official_fair_mtard_step
    loop, (kept, new_step) = OfficialLoop(), first_train_input_after(S, 0)
    def step(x, y):
        new_step()
        loss, kappa = official_fair_mtard_step(loop, S, T, x, y, reweight)
        return loss, kept[0], torch.zeros(10, dtype=torch.float64).index_add_(0, y, torch.tensor(kappa).double())
    return step


def peeraid_step(S, P):
    """jaewonalive/PeerAiD main.py:315-404 (`official_peeraid_step`, the CIFAR-10 settings); x~ read as the peer's first
    train-mode input. Its two SGDs (lines 219-220) have the same lr (configs/PeerAiD_resnet18_cifar10.json)."""
    kept, new_step = first_train_input_after(P, 0)
    P.train()
    def step(x, y):
        new_step()
        return official_peeraid_step(S, P, x, y), kept[0]
    return step


def igdm_step(S, T, P, mp, epoch, w=None):
    "HongsinLee/saad igdm.py:45-61 (`official_igdm_step`, its budget of line 49); x~ from its adaad_inner_loss."
    inner = recording(mp, test_field_methods, 'official_adaad_inner')
    return lambda x, y: (official_igdm_step(S, T, x, epoch + 1, step_size=8 / 255, epsilon=2 / 255), inner[-1])


def saad_step(S, T, P, mp, epoch, w=None, epochs=200):
    "HongsinLee/saad saad.py:48-86 (`official_saad_step`, main.sh's settings); x~ from its saad_inner_loss."
    inner = recording(mp, test_field_methods, 'official_saad_inner')
    return lambda x, y: (official_saad_step(S, T, x, y, epoch + 1, epochs), inner[-1])


# ---- the cases ------------------------------------------------------------------------------------------------------
WEIGHTS = torch.linspace(5 / 6, 5 / 2, 10)                   # Fair-ARD's class weights: unequal, float32 as the state's
NO_NESTEROV = dict(nesterov=False)                           # Fair-ARD's scripts' SGD without Nesterov's momentum
OFFICIAL_IGDM = dict(eps=2 / 255, step_size=8 / 255)         # igdm.py:49 passes step_size=8/255, epsilon=2/255


@dataclass
class Case:
    "A method as the library runs it (`cfg`: TrainConfig fields) and the official loop it should follow."
    method: str
    reference: object                                        # (S, T, P, monkeypatch, epoch, weights) -> step(x, y)
    cfg: dict = field(default_factory=dict)
    epoch: int = 0
    nesterov: bool = False                                   # the reference's SGD
    deviation: str = ''                                      # where the library departs from the script (xfail)
    weight_decay: float = 2e-4                               # the script's (5e-4: boyellow/AdaAD main.py:64)
    peer: bool = False
    weights: object = None                                   # Fair-ARD's class weights in the method's state
    natural: bool = False                                    # a naturally trained teacher too: reference(natural=Tn)


CASES = dict(
    pgd_at=Case('pgd-at', lambda S, T, P, mp, e, w: pgd_at_step(S), weight_decay=5e-4),
    trades=Case('trades', lambda S, T, P, mp, e, w: trades_step(S)),
    ard=Case('ard', lambda S, T, P, mp, e, w: ard_step(S, T)),
    akd=Case('akd', lambda S, T, P, mp, e, w, natural: akd_step(S, T, natural), natural=True),
    iad=Case('iad', lambda S, T, P, mp, e, w: iad_step(S, T, e)),
    iad_introspection=Case('iad', lambda S, T, P, mp, e, w: iad_step(S, T, e, begin=0),
                           dict(method_kwargs=dict(begin=0))),
    rslad=Case('rslad', lambda S, T, P, mp, e, w: rslad_step(S, T)),
    adaad=Case('adaad', lambda S, T, P, mp, e, w: adaad_step(S, T), weight_decay=5e-4),
    adaiad=Case('adaiad', lambda S, T, P, mp, e, w: adaiad_step(S, T, e), weight_decay=5e-4),
    adaiad_introspection=Case('adaiad', lambda S, T, P, mp, e, w: adaiad_step(S, T, e, begin=0),
                              dict(method_kwargs=dict(begin=0)), weight_decay=5e-4),
    igdm=Case('igdm', igdm_step, OFFICIAL_IGDM),
    igdm_lean=Case('igdm', igdm_step, dict(OFFICIAL_IGDM, faithful=False)),
    saad=Case('saad', saad_step),
    peeraid=Case('peeraid', lambda S, T, P, mp, e, w: peeraid_step(S, P), peer=True),
    fair_ard=Case('fair-ard', lambda S, T, P, mp, e, w: fair_ard_step(S, T, w), nesterov=True, weights=WEIGHTS),
    fair_ard_without_nesterov=Case('fair-ard', lambda S, T, P, mp, e, w: fair_ard_step(S, T, w), NO_NESTEROV,
                                   weights=WEIGHTS),
    fair_rslad=Case('fair-ard', lambda S, T, P, mp, e, w: fair_rslad_step(S, T, w),
                    dict(method_kwargs=dict(base='rslad')), nesterov=True, weights=WEIGHTS),
    fair_rslad_without_nesterov=Case('fair-ard', lambda S, T, P, mp, e, w: fair_rslad_step(S, T, w),
                                     dict(NO_NESTEROV, method_kwargs=dict(base='rslad')), weights=WEIGHTS),
    fair_mtard=Case('fair-ard', lambda S, T, P, mp, e, w: fair_mtard_step(S, T, w),      # Fair-MTARD.py:84 Nesterov
                    dict(method_kwargs=dict(base='mtard')), nesterov=True, weights=WEIGHTS),
    fair_iad=Case('fair-ard', lambda S, T, P, mp, e, w: fair_iad_step(S, T, e, w),
                  dict(method_kwargs=dict(base='iad')), nesterov=True, weights=WEIGHTS),
    fair_iad_without_nesterov=Case('fair-ard', lambda S, T, P, mp, e, w: fair_iad_step(S, T, e, w),
                                   dict(NO_NESTEROV, method_kwargs=dict(base='iad')), weights=WEIGHTS),
    fair_iad_introspection_without_nesterov=Case(                   # fair-ard takes no `begin`: epoch 60 of 200
        'fair-ard', lambda S, T, P, mp, e, w: fair_iad_step(S, T, e, w),
        dict(NO_NESTEROV, method_kwargs=dict(base='iad')),
        epoch=60, weights=WEIGHTS),
)


def xfail(reason):
    "A strict xfail on a mismatch (an AssertionError) only: any other error fails the test."
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)


def cases(where):
    "The cases as pytest parameters, the deviating ones strict xfails; `where='trainer'`: those at epoch 0."
    return [pytest.param(c, id=k.replace('_', '-'), marks=[xfail(c.deviation)] if c.deviation else [])
            for k, c in CASES.items() if where != 'trainer' or c.epoch == 0]


@pytest.mark.parametrize('case', cases('loss'))
def test_three_steps_match_the_official_loop(batch, monkeypatch, case):
    """`training_loss` and the trainer's SGD, as `train_epoch` runs them, against the official loop: weights, BatchNorm
    buffers, x~ (and Fair-ARD's counts) after each of three steps."""
    S, T, _, y = batch
    xy = step_batches(y)
    s1, s2 = copy.deepcopy(S), copy.deepcopy(S)
    p1, p2 = ({'peer': tiny(seed=3).double()} for _ in range(2)) if case.peer else (None, None)
    teacher = T if M.get_method(case.method, **case.cfg.get('method_kwargs', {})).uses_teacher else None
    natural = {'natural': tiny(seed=5).double().eval()} if case.natural else {}
    torch.manual_seed(7)
    ours = library_run(monkeypatch, case.method, s1, teacher, xy, case.epoch, peers=p1, weights=case.weights,
                       **natural, **copy.deepcopy(case.cfg))
    step = case.reference(s2, T, p2 and p2['peer'], monkeypatch, case.epoch, case.weights, **natural)
    torch.manual_seed(7); theirs = official_run(step, s2, xy, case.weight_decay, case.nesterov, peers=p2)
    assert_same_trajectory(ours, theirs)


# ---- the same steps through the trainer -----------------------------------------------------------------------------
@pytest.fixture
def float64_default():
    "torch's default dtype float64 for one test: the trainer's images (`to_float`) and networks are then float64."
    old = torch.get_default_dtype(); torch.set_default_dtype(torch.float64)
    try: yield
    finally: torch.set_default_dtype(old)


def toy(name=None, num_classes=10, **kw):
    "The `tiny` network for any architecture name, its seed drawn from the global RNG (which the trainer seeds)."
    seed = torch.randint(2 ** 31, (), device='cpu')           # on the CPU also where `validate` builds it on 'meta'
    return tiny(num_classes, seed=int(seed))


def trainer_data(n=48, val=8):
    "A split of `n` random uint8 images (three batches of 16, every class present) and `val` validation images."
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (n + val, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n + val) % 10
    return CifarSplit(x[:n], y[:n], 10, split='train'), CifarSplit(x[n:], y[n:], 10, split='test')


def trainer_run(tmp_path, case, teacher, data, steps=3, natural=None):
    """`train` itself, paused after every batch (`time_limit`) and resumed, for `steps` batches; the weights, BatchNorm
    buffers (student's and peers') and Fair-ARD's counts its `last.pt` holds after each."""
    cfg = TrainConfig(method=case.method, student='toy', batch_size=16, val_n=8, **{'faithful': True, **case.cfg})
    out = []
    for _ in range(steps):
        r = train(cfg, teacher=teacher, out_dir=tmp_path, device='cpu', progress=False, data=data, time_limit=1e-9,
                  natural_teacher=natural)
        assert r['status'] == 'paused'
        st = read_checkpoint(tmp_path / 'last.pt')
        snap = {} if st.get('method_state') is None else {'kappa': st['method_state']['correct'].double()}
        for n, sd in (('student', st['state_dict']), *(st.get('peers') or {}).items()):
            snap.update({f'{n}.{k}': v for k, v in sd.items()})
        out.append(snap)
    return out, resolve(cfg)


@pytest.mark.parametrize('case', cases('trainer'))
def test_the_trainer_takes_the_official_steps(tmp_path, monkeypatch, float64_default, case):
    """`train` (its method, schedule, folded teacher, SGD, batches, RNG, pause and resume) with the toy network as its
    architecture, on CIFAR-shaped uint8 images, against the official loop on the same augmented batches: weights,
    BatchNorm buffers (and Fair-ARD's counts) after each of three steps. Fair-ARD starts from equal class weights."""
    monkeypatch.setattr(adaad.train, 'create_model', toy)
    T = tiny(seed=1).eval()
    natural = {'natural': tiny(seed=5).eval()} if case.natural else {}
    data = trainer_data()
    uses_teacher = M.get_method(case.method, **case.cfg.get('method_kwargs', {})).uses_teacher
    ours, cfg = trainer_run(tmp_path, case, T if uses_teacher else None, data, **natural)
    torch.manual_seed(cfg.seed); S = toy(); P = toy() if case.peer else None   # as train._setup draws them
    step = case.reference(S, T, P, monkeypatch, 0, torch.ones(10), **natural)
    xy = list(batches(data[0], cfg.batch_size, shuffle=True, augment=True, seed=cfg.seed, epoch=0))
    torch.manual_seed(cfg.seed + 1)                                          # a fresh run's training RNG
    theirs = official_run(step, S, xy, case.weight_decay, case.nesterov, peers=None if P is None else {'peer': P})
    assert_same_trajectory(ours, [{k: v for k, v in t.items() if k != 'x_adv'} for t in theirs])


# ---- the comparison itself ------------------------------------------------------------------------------------------
def test_folding_the_teacher_is_exact_in_float64(batch):
    "prepare_teacher's folded teacher gives the toy teacher's logits to 2e-16 in float64 (2e-7 in float32)."
    _, T, x, _ = batch
    folded = prepare_teacher(copy.deepcopy(T))
    with torch.no_grad(): a, b = T.eval()(x), folded(x)
    assert not torch.equal(a, b) and ((a - b).abs().max() / b.abs().max()) < 1e-13


def test_a_missing_dead_pass_or_another_optimiser_is_seen(batch, monkeypatch):
    "The comparison fails when the reference drops PGD-AT's dead S(x) pass (buffers) or uses Nesterov (weights)."
    S, _, _, y = batch
    xy = step_batches(y)
    torch.manual_seed(7); ours = library_run(monkeypatch, 'pgd-at', copy.deepcopy(S), None, xy)
    for kw, nesterov, seen in ((dict(dead_pass=False), False, 'running_mean'), ({}, True, r'student\.0\.weight')):
        s2 = copy.deepcopy(S)
        torch.manual_seed(7); theirs = official_run(pgd_at_step(s2, **kw), s2, xy, 5e-4, nesterov=nesterov)
        with pytest.raises(AssertionError, match=seen): assert_same_trajectory(ours, theirs)
