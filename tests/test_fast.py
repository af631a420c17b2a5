"The speed techniques keep results: folded BatchNorm, bf16 attack strength, no host sync in the inner loops, compile."
import dataclasses, json

import pytest
import torch
import torch.nn as nn

from adaad.fast import Autocast, SyncWatch, amp_check, count_batchnorms, fold_batchnorm, prepare_teacher
from adaad.core import kl
from adaad.methods import METHODS, Logits, get_method, inner_point, training_loss
from adaad.models import create_model
from adaad.train import TrainConfig, train


@pytest.fixture(autouse=True)
def _threads(one_thread): yield


def adaad_inner(s, t, x, steps=10):
    "AdaAD's inner point of student `s` and teacher `t` on `x`."
    return inner_point(get_method('adaad', steps=steps), Logits(s, t, x), None)


def random_bn(model, seed=0):
    "Give every BatchNorm non-trivial running statistics and affine parameters; eval mode."
    g = torch.Generator().manual_seed(seed)
    for b in model.modules():
        if isinstance(b, nn.BatchNorm2d):
            n = b.num_features
            b.running_mean.copy_(0.2 * torch.randn(n, generator=g)); b.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
            b.weight.data.copy_(0.5 + torch.rand(n, generator=g)); b.bias.data.copy_(0.1 * torch.randn(n, generator=g))
    return model.eval()


@pytest.mark.parametrize('arch, left', [('resnet18', 0), ('mobilenetv2', 0), ('preact_resnet18', 9), ('wrn-16-2', 6),
                                        ('wrn-10-1', 4)])
def test_fold_same_logits_and_input_gradient(arch, left):
    torch.manual_seed(0)
    m = random_bn(create_model(arch)); f = fold_batchnorm(m)
    assert count_batchnorms(f) == left < count_batchnorms(m)
    x = torch.rand(6, 3, 32, 32, requires_grad=True)
    ym, = torch.autograd.grad(m(x).logsumexp(1).sum(), x)
    yf, = torch.autograd.grad(f(x).logsumexp(1).sum(), x)
    with torch.no_grad(): torch.testing.assert_close(f(x), m(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(yf, ym, atol=1e-4 * ym.abs().max().item(), rtol=1e-3)


def test_fold_leaves_the_original_alone():
    m = random_bn(create_model('wrn-10-1')).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    f = prepare_teacher(m)
    assert m.training and all(p.requires_grad for p in m.parameters())
    assert not f.training and not any(p.requires_grad for p in f.parameters())
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_fold_untraceable_model_is_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__(); self.c = nn.Conv2d(3, 4, 3); self.b = nn.BatchNorm2d(4)
        def forward(self, x):
            return self.b(self.c(x)) if x.sum() > 0 else x       # data-dependent control flow: fx cannot trace it
    with pytest.raises(TypeError, match='fold_bn=False'): fold_batchnorm(Branchy())
    t = prepare_teacher(Branchy(), fold_bn=False)                 # the way out the message names
    assert not t.training


def test_folded_teacher_gives_the_same_adaad_step():
    "Same inner points (a rounding-level gradient can flip a sign at a few pixels) and the same loss at a given point."
    s, t = create_model('wrn-10-1'), random_bn(create_model('wrn-10-2'), seed=1)
    ft = prepare_teacher(t)
    x = torch.rand(8, 3, 32, 32)
    pts = []
    for teacher in (t, ft):
        torch.manual_seed(0); pts.append(adaad_inner(s, teacher, x, steps=3))
    assert (pts[0] == pts[1]).float().mean() > 0.99
    with torch.no_grad():
        torch.testing.assert_close(kl(ft(pts[0]), s(pts[0])), kl(t(pts[0]), s(pts[0])), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('field', ['fold_teacher', 'compile', 'amp', 'channels_last', 'faithful'])
def test_bool_fields_are_checked(field):
    with pytest.raises(ValueError, match=field): TrainConfig(**{field: 'yes'}).validate()


@pytest.mark.parametrize('name', sorted(n for n, c in METHODS.items() if c().budget is not None))
def test_inner_loops_make_no_host_sync(name):
    s, t = create_model('wrn-10-1'), create_model('wrn-10-1')
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    peers = {k: create_model('wrn-10-1') for k in get_method(name).peer_archs('wrn-10-1')}   # PeerAiD's peer
    with SyncWatch() as w: inner_point(get_method(name, steps=2), Logits(s, t, x, peers=peers), y)
    assert w.calls == []


def test_sync_watch_sees_syncs():
    with SyncWatch() as w:
        v = torch.ones(3)
        v.sum().item(); bool(v.max() > 0); v.nonzero(); v.tolist()
    assert w.calls == ['item', '__bool__', 'nonzero', 'tolist']


def test_autocast_wrapper_returns_float32_and_a_float32_input_gradient():
    "The convolutions inside run in bf16 (a no-op wrapper would run them in fp32), the logits and input gradient are fp32."
    net = create_model('wrn-10-1').eval()
    m, dtypes = Autocast(net), []
    net.conv1.register_forward_hook(lambda mod, i, o: dtypes.append(o.dtype))
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = m(x)
    assert out.dtype == torch.float32 and dtypes == [torch.bfloat16]
    g, = torch.autograd.grad(out.sum(), x)
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    with torch.no_grad(): assert not torch.equal(out, net(x))              # bf16 arithmetic, not fp32


def _tiny_cfg(**kw):
    return TrainConfig(method='adaad', student='wrn-10-1', epochs=1, batch_size=32, steps=2, train_n=64, val_n=20,
                       val_steps=1, **kw)


def test_train_with_and_without_folding_agree(data_root, tmp_path):
    "Folding changes rounding only: the same run with and without it ends with the same weights (to float tolerance)."
    teacher = random_bn(create_model('wrn-10-1'), seed=2)
    out = {}
    for fold in (True, False):
        r = train(_tiny_cfg(fold_teacher=fold, data_root=str(data_root)), teacher=teacher, out_dir=tmp_path / str(fold),
                  device='cpu', progress=False)
        out[fold] = r['model'].state_dict()
    for k, v in out[True].items():
        if v.is_floating_point(): torch.testing.assert_close(v, out[False][k], atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_compiled_networks_match_eager():
    """torch.compile (inductor on the CPU) of student and teacher: the same inner points (up to rounding-level sign flips),
    and the same AdaAD loss and weight gradients at a given point."""
    from adaad.losses import adaad_loss
    s, t = create_model('wrn-10-1'), prepare_teacher(random_bn(create_model('wrn-10-1'), seed=3))
    cs, ct = torch.compile(s), torch.compile(t)
    x = torch.rand(8, 3, 32, 32)
    pts = []
    for st, te in ((s, t), (cs, ct)):
        torch.manual_seed(0); pts.append(adaad_inner(st, te, x, steps=2))
    assert (pts[0] == pts[1]).float().mean() > 0.99
    res = []
    for st, te in ((s, t), (cs, ct)):
        s.train()
        with torch.no_grad(): t_adv = te(pts[0])
        loss = adaad_loss(st(pts[0]), t_adv)
        res.append((loss.detach(), torch.autograd.grad(loss, list(s.parameters()))))
    torch.testing.assert_close(res[1][0], res[0][0], atol=1e-6, rtol=1e-4)
    for a, b in zip(res[1][1], res[0][1]): torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=1e-3)


@pytest.mark.slow
def test_train_with_compile_writes_plain_checkpoints(data_root, tmp_path):
    "compile=True end to end (inductor on the CPU, about 30 s): the run finishes and final.pt loads into an uncompiled model."
    from adaad.checkpoint import load_model
    cfg = _tiny_cfg(compile=True, drop_last=True, data_root=str(data_root))
    r = train(cfg, teacher=create_model('wrn-10-1').eval(), out_dir=tmp_path, device='cpu', progress=False)
    assert r['status'] == 'done'
    m = load_model('wrn-10-1', tmp_path / 'final.pt')
    assert all(torch.isfinite(v).all() for v in m.state_dict().values() if v.is_floating_point())


def test_the_bf16_check_leaves_the_network_as_it_was():
    """amp_check attacks through an autocast wrapper: no forward of it may run the network in train mode (BatchNorm
    statistics would move, and a teacher checked before training would no longer be the teacher the runs recorded)."""
    from adaad.core import content_digest
    from adaad.fast import amp_check
    from adaad.models import create_model
    torch.manual_seed(0)
    m = create_model('wrn-10-1').eval()
    before = content_digest(m.state_dict())
    amp_check(m, torch.rand(8, 3, 32, 32), torch.arange(8) % 10, steps=2, batch_size=4)
    assert content_digest(m.state_dict()) == before and not m.training
