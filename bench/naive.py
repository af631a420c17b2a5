"""The reference the benchmark compares against: training steps written the way the official scripts write them.

Eager fp32, NCHW, separate student and teacher passes, every pass the official code makes (AdaAD's zero-weight clean
branch included), teacher parameters left with `requires_grad=True` (the official AdaAD code never freezes them; the
inner loop's `autograd.grad` prunes their weight gradients anyway), per-example Python floats where the official code
makes them (AdaIAD's reliability weights), and per-image PIL augmentation in a `DataLoader`
(RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor), as in `boyellow/AdaAD config/dataset_config.py`.

The maths equals `adaad.methods.training_loss` (same passes, reductions and weights as the official scripts named in each function), so the ratio
measures the implementation only. This file is a benchmark reference, not library code: the library never imports it.
"""
import torch
import torch.nn.functional as F

EPS, STEP, STEPS = 8 / 255, 2 / 255, 10


def kl_terms(t_logits, s_logits, tau=1.):
    "Elementwise KL(softmax(t/tau) || softmax(s/tau)) as nn.KLDivLoss(log_softmax(s), softmax(t)) computes it."
    return F.kl_div(F.log_softmax(s_logits / tau, 1), F.softmax(t_logits / tau, 1), reduction='none')


def project(x_adv, x):
    "Clip to the eps-ball, then to [0, 1] (the official order)."
    return torch.clamp(torch.min(torch.max(x_adv, x - EPS), x + EPS), 0., 1.)


def adaad_inner(student, teacher, x, steps=STEPS):
    "boyellow/AdaAD AT_helper.adaad_inner_loss: both nets in eval mode, KL summed, autograd.grad on x_adv."
    student.eval(); teacher.eval()
    x_adv = x.detach() + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv.requires_grad_()
        loss = kl_terms(teacher(x_adv), student(x_adv)).sum()
        g, = torch.autograd.grad(loss, [x_adv])
        x_adv = project(x_adv.detach() + STEP * torch.sign(g.detach()), x)
    student.train()
    return x_adv.detach()


def adaad_step(student, teacher, opt, x, y, alpha=1.):
    "boyellow/AdaAD main.py AdaAD: S(x) and S(x~) with a graph, T on both, alpha-mix of mean KLs (alpha=1 keeps the dead branch)."
    x_adv = adaad_inner(student, teacher, x)
    s_nat, s_adv = student(x), student(x_adv)
    with torch.no_grad(): t_nat, t_adv = teacher(x), teacher(x_adv)
    loss = alpha * kl_terms(t_adv, s_adv).mean() + (1 - alpha) * kl_terms(t_nat, s_nat).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    return loss


def adaiad_step(student, teacher, opt, x, y, tau=30., beta=0.1, alpha=1.):
    "boyellow/AdaAD main.py AdaAD_with_IAD1 after the warm-up: Python-float reliability weights, introspection term."
    x_adv = adaad_inner(student, teacher, x)
    s_nat, s_adv = student(x), student(x_adv)
    with torch.no_grad(): t_adv = teacher(x_adv)
    p_t = F.softmax(t_adv, 1)
    w = [p_t[i, y[i]].item() ** beta for i in range(len(y))]          # one host sync per example, as in the official code
    kl_in = kl_terms(s_nat, s_adv).sum(1)
    intro = sum((1 - w[i]) * kl_in[i] for i in range(len(y))) / len(y)
    loss = alpha * tau ** 2 * kl_terms(t_adv, s_adv, tau).sum(1).mean() + alpha * intro \
        + (1 - alpha) * F.cross_entropy(s_nat, y)
    opt.zero_grad(); loss.backward(); opt.step()
    return loss


def rslad_step(student, teacher, opt, x, y):
    "zibojia/RSLAD: T(x) once, KL inner on the student (eval mode), then S(x~) and S(x) with a graph."
    teacher.eval()
    with torch.no_grad(): t_nat = teacher(x)
    student.eval()
    x_adv = x.detach() + 0.001 * torch.randn_like(x)
    for _ in range(STEPS):
        x_adv.requires_grad_()
        loss = kl_terms(t_nat, student(x_adv)).sum()
        g, = torch.autograd.grad(loss, [x_adv])
        x_adv = project(x_adv.detach() + STEP * torch.sign(g.detach()), x)
    student.train()
    s_adv, s_nat = student(x_adv.detach()), student(x)
    p_t = F.softmax(t_nat, 1)
    m = lambda s: (p_t * (torch.log(p_t + 1e-5) - F.log_softmax(s, 1))).sum() / (10 * len(x))
    loss = 5 / 6 * m(s_adv) + 1 / 6 * m(s_nat)
    opt.zero_grad(); loss.backward(); opt.step()
    return loss


def ard_step(student, teacher, opt, x, y, tau=30., alpha=1.):
    "goldblum/AdversariallyRobustDistillation: CE attack in train mode from a uniform start, then S(x~), T(x), S(x)."
    teacher.eval(); student.train()
    x_adv = x.detach() + torch.empty_like(x).uniform_(-EPS, EPS)
    for _ in range(STEPS):
        x_adv.requires_grad_()
        loss = F.cross_entropy(student(x_adv), y, reduction='sum')
        g, = torch.autograd.grad(loss, [x_adv])
        x_adv = project(x_adv.detach() + STEP * torch.sign(g.detach()), x)
    s_adv = student(x_adv.detach())
    with torch.no_grad(): t_nat = teacher(x)
    s_nat = student(x)
    loss = alpha * tau ** 2 * kl_terms(t_nat, s_adv, tau).mean() + (1 - alpha) * F.cross_entropy(s_nat, y)
    opt.zero_grad(); loss.backward(); opt.step()
    return loss


def pgd_at_step(student, teacher, opt, x, y):
    "boyellow/AdaAD Madry_PGD + Plain_Madry: eval-mode CE attack, S(x~) trained, plus the unused clean forward."
    student.eval()
    x_adv = torch.clamp(x.detach() + 0.001 * torch.randn_like(x), 0., 1.)
    for _ in range(STEPS):
        x_adv.requires_grad_()
        loss = F.cross_entropy(student(x_adv), y)
        g, = torch.autograd.grad(loss, [x_adv])
        x_adv = project(x_adv.detach() + STEP * torch.sign(g.detach()), x)
    student.train()
    s_adv = student(x_adv.detach())
    student(x)                                                      # computed and never used by the official code
    loss = F.cross_entropy(s_adv, y)
    opt.zero_grad(); loss.backward(); opt.step()
    return loss


STEPS_BY_METHOD = {'adaad': adaad_step, 'adaiad': adaiad_step, 'rslad': rslad_step, 'ard': ard_step, 'pgd-at': pgd_at_step}


class PILCifar(torch.utils.data.Dataset):
    "CIFAR images as PIL images through torchvision's per-image train transform (the official loaders)."
    def __init__(self, x_uint8, y):
        from torchvision import transforms
        self.x, self.y = x_uint8.permute(0, 2, 3, 1).contiguous().numpy(), y.numpy()
        self.tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                      transforms.ToTensor()])

    def __len__(self): return len(self.x)

    def __getitem__(self, i):
        from PIL import Image
        return self.tf(Image.fromarray(self.x[i])), int(self.y[i])


def naive_loader(x_uint8, y, batch_size=128, num_workers=2, seed=0):
    "A shuffling DataLoader over `PILCifar` (the official scripts use 2-4 workers)."
    return torch.utils.data.DataLoader(PILCifar(x_uint8, y), batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
                                       persistent_workers=num_workers > 0)
