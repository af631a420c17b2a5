"""README's strongest claims, each checked on networks the project's own trainer makes in the test run (the `robust_zoo`
fixture): distillation gives a student more robust than natural training; bf16 autocast keeps the attacks as strong;
the trainer really folds the teacher's BatchNorms when told to, and only then."""
import pytest
import torch

from adaad.attacks import pgd
from adaad.stats import compare

pytestmark = pytest.mark.usefixtures('one_thread')   # the zoo is trained once per run, whichever worker asks first


_CACHE = {}

def pgd_correct(model, data, n=500):
    "Per-image correctness under PGD-10 (8/255) on the first `n` exact test images (computed once per model)."
    if id(model) in _CACHE: return _CACHE[id(model)]
    x, y = data.x[:n].float() / 255, data.y[:n]
    xa = pgd(model, x, y, steps=10, seed=0)
    with torch.no_grad(): _CACHE[id(model)] = model(xa).argmax(1) == y
    return _CACHE[id(model)]


@pytest.mark.timeout(1800)   # the first test to ask trains the zoo: a few CPU minutes; room for a shared machine
@pytest.mark.parametrize('method', ['adaad', 'rslad'])
def test_a_distilled_student_is_more_robust_than_a_natural_one(robust_zoo, cifar_test, method):
    """PGD-10 on 500 exact test images: the student distilled from the PGD-AT teacher beats the naturally trained one
    by a paired, resolved margin (measured when written, on a shared core: natural 8.6%, AdaAD 16.6%; 4 epochs of AdaAD gave
    only +2.8 points, not resolved). A distillation loss that did not reach the student, or an inner point that ignored the
    teacher, would not."""
    nat, dis = pgd_correct(robust_zoo['natural'], cifar_test), pgd_correct(robust_zoo[method], cifar_test)
    c = compare(dis, nat)
    assert c['diff'] >= 3 and c['p'] < 0.01, c


@pytest.mark.timeout(1800)
def test_bf16_autocast_keeps_the_attack_as_strong(robust_zoo, cifar_test):
    """On the PGD-AT teacher (a model PGD does not break completely), PGD-10 under bf16 autocast leaves the same accuracy
    within a point as in fp32, while the input gradients' signs differ at some pixels: the autocast is real (a no-op
    autocast gives identical signs) and harmless."""
    from adaad.fast import amp_check
    m = robust_zoo['teacher']
    r = amp_check(m, cifar_test.x[:200].float() / 255, cifar_test.y[:200], steps=10, batch_size=200)
    assert r['pgd_fp32'] >= 10 and abs(r['pgd_diff']) <= 1.5, r
    assert 0.9 <= r['sign_agreement'] < 1, r


@pytest.mark.parametrize('fold,faithful,folded', [(True, False, True), (False, False, False), (None, False, True),
                                                  (None, True, False), (True, True, True)])
def test_the_trainer_folds_the_teacher_only_when_asked(tmp_path, fold, faithful, folded):
    """`fold_teacher=True` gives the run a teacher without BatchNorms (folded into its convolutions), `False` keeps them,
    None folds unless `faithful` (the official code's teacher is unfolded); either way the teacher's logits are the same
    (an ignored flag would leave the count unchanged in one case)."""
    from adaad.data import CifarSplit
    from adaad.fast import count_batchnorms
    from adaad.train import TrainConfig, start_run
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (40, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(40) % 10
    data = (CifarSplit(x[:32], y[:32], 10, split='train'), CifarSplit(x[32:], y[32:], 10, split='test'))
    from adaad.models import create_model
    torch.manual_seed(0); t = create_model('wrn-10-1')
    with torch.no_grad():
        for m in t.modules():
            if isinstance(m, torch.nn.BatchNorm2d): m.running_mean.uniform_(-.2, .2); m.running_var.uniform_(.5, 2.)
    t.eval()
    run = start_run(TrainConfig(method='adaad', student='wrn-10-1', epochs=1, fold_teacher=fold, faithful=faithful,
                                val_n=8), teacher=t, out_dir=tmp_path, device='cpu', progress=False, data=data)
    assert (count_batchnorms(run.teacher) < count_batchnorms(t)) == folded == run.cfg.fold_teacher
    xb = x[:8].float() / 255
    with torch.no_grad(): torch.testing.assert_close(run.teacher(xb), t(xb), rtol=1e-4, atol=1e-4)
