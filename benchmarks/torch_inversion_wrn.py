"""PyTorch implementations of the inner synthesis step and the student (KD) step of the inversion
methods DeepInversion (the CMI framework's ``DeepInvSyntheiszer``), CMI and Fast (Fast-Datafree,
FOMAML) for WRN-40-2 -> WRN-16-1 on CIFAR shapes (reference_semantics.md §2.0, §2.5–§2.7), used by
``step_times.py --torch`` to time the reference loops on the same machine in the same run. Random
weights: the cost of a step does not depend on them.

Each ``*_steps`` function returns ``(synthesis_step, student_step)``, no-argument callables that
run one inner optimisation step and one student optimiser step and return its loss. The teacher
carries forward hooks on every BatchNorm2d, as in the reference, which also run during the student
step's teacher forward. The teacher is frozen (as in ``torch_dafl_wrn.py``); the student is
trainable, so a synthesis backward through its forward also computes its weight gradients, as the
reference's does.

Left out as negligible or not part of a step: the per-call set-up (generator re-initialisation,
fresh optimisers, targets), keeping the best iterate, writing the pool's PNGs, the data loader's
PNG decoding (the student reads a fixed random tensor) and the learning-rate schedules.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

# torch_dafl_wrn puts the tests' PyTorch models (written from the reference structures) on the path.
from torch_dafl_wrn import CIFAR10_MEAN as _MEAN
from torch_dafl_wrn import CIFAR10_STD as _STD
from torch_dafl_wrn import WideResNet, _torch_cmi_stack, _View

NUM_CLASSES = 10


def cmi_generator(nz: int = 256, ngf: int = 64, nc: int = 3) -> nn.Module:
  """The CMI ``Generator`` (img_size 32, used by CMI and Fast): Linear(nz, 2ngf·8·8), then the CMI stack."""
  return nn.Sequential(nn.Linear(nz, 2 * ngf * 8 * 8), _View(2 * ngf, 8, 8),
                       _torch_cmi_stack((2 * ngf, 2 * ngf, ngf), nc))


class _BNHooks:
  """Forward hooks on every BatchNorm2d of a model. After a forward, ``bn_loss()`` is the sum over
  the layers of ``‖var − running_var‖₂ + ‖mean − running_mean‖₂`` of the BN input (biased variance
  over N, H, W: the reference's DeepInversionHook, computed in the hook as there) and
  ``features()`` the concatenated spatial means of the BN inputs (CMI's InstanceMeanHook)."""

  def __init__(self, model: nn.Module):
    self.taps = {}
    for module in model.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.register_forward_hook(self._hook)

  def _hook(self, module, inputs, _):
    x = inputs[0]
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    self.taps[module] = ((var - module.running_var).norm() + (mean - module.running_mean).norm(), x)

  def bn_loss(self):
    return sum(term for term, _ in self.taps.values())

  def features(self):
    return torch.cat([x.mean((2, 3)) for _, x in self.taps.values()], 1)


def _crop_flip(x, padding: int = 4):
  """Per sample: a random crop of x's size from x zero-padded by ``padding``, then a horizontal flip
  with p=0.5 (kornia RandomCrop + RandomHorizontalFlip; the CIFAR train transform)."""
  n, _, h, w = x.shape
  rows = torch.randint(0, 2 * padding + 1, (n, 1)) + torch.arange(h)
  cols = torch.arange(w).expand(n, w)
  cols = torch.where(torch.rand(n, 1) < 0.5, cols.flip(1), cols) + torch.randint(0, 2 * padding + 1, (n, 1))
  padded = F.pad(x, (padding,) * 4)
  return padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _resized_crop_flip(x, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3)):
  """Per sample: a random crop of area fraction in ``scale`` and aspect ratio in ``ratio``, resized
  bilinearly to x's size, then a horizontal flip with p=0.5 (kornia RandomResizedCrop + flip;
  crops wider or taller than the image are clipped to it rather than redrawn)."""
  n = x.shape[0]
  area = torch.empty(n).uniform_(*scale)
  aspect = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
  w, h = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
  cx, cy = (2 * torch.rand(n) - 1) * (1 - w), (2 * torch.rand(n) - 1) * (1 - h)
  sign, zero = torch.where(torch.rand(n) < 0.5, -1.0, 1.0), torch.zeros(n)
  theta = torch.stack([torch.stack([sign * w, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
  return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)


def _normalise(x):
  return (x - _MEAN) / _STD


def _masked_adv(s_logits, t_logits):
  """−mean over the batch of [argmax s == argmax t] · KL(p_t ‖ p_s), T=1 (§2.0)."""
  mask = (s_logits.argmax(1) == t_logits.argmax(1)).float()
  kl = F.kl_div(F.log_softmax(s_logits, 1), F.softmax(t_logits, 1), reduction='none').sum(1)
  return -(kl * mask).mean()


def _js(s_logits, t_logits, temperature: float = 3.0):
  """Jensen–Shannon divergence of softmax(s/T) and softmax(t/T), batchmean."""
  p, q = F.softmax(s_logits / temperature, 1), F.softmax(t_logits / temperature, 1)
  log_m = ((p + q) / 2).log()
  return 0.5 * (F.kl_div(log_m, p, reduction='batchmean') + F.kl_div(log_m, q, reduction='batchmean'))


def _tv_l1(x):
  """Sum of the mean absolute horizontal, vertical and two diagonal neighbour differences."""
  diffs = (x[..., :, :-1] - x[..., :, 1:], x[..., :-1, :] - x[..., 1:, :],
           x[..., 1:, :-1] - x[..., :-1, 1:], x[..., :-1, :-1] - x[..., 1:, 1:])
  return sum(d.abs().mean() for d in diffs)


def _models(threads: int | None):
  """(teacher WRN-40-2 (eval, frozen), its BN hooks, student WRN-16-1), seeded."""
  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(0)
  teacher, student = WideResNet(40, 2, NUM_CLASSES).eval(), WideResNet(16, 1, NUM_CLASSES)
  for p in teacher.parameters():
    p.requires_grad_(False)
  return teacher, _BNHooks(teacher), student


def _student_step(teacher, student, batch: int, lr: float = 0.1, temperature: float = 20.0, pool_size: int = 256):
  """The reference's KD step: a random batch of a pool of images in [0, 1] (a fixed random tensor),
  random crop (padding 4) + flip per sample, normalise; teacher in no_grad; student in train mode;
  KL(p_t ‖ p_s) at T=20, batchmean, ×T²; SGD(lr, momentum 0.9, weight decay 1e-4)."""
  pool = torch.rand(pool_size, 3, 32, 32)
  opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)

  def student_step():
    student.train()
    x = _normalise(_crop_flip(pool[torch.randint(pool_size, (batch,))]))
    with torch.no_grad():
      t_logits, _ = teacher(x)
    s_logits, _ = student(x)
    loss = F.kl_div(F.log_softmax(s_logits / temperature, 1), F.softmax(t_logits / temperature, 1),
                    reduction='batchmean') * temperature ** 2
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss

  return student_step


def deepinv_steps(batch: int, threads: int | None = None):
  """DeepInversion (CMI framework, ``--bn 10 --oh 1 --adv 1``, tv 1e-3, l2 0). Synthesis step: the
  normalised-space pixels x ~ N(0, 1) with Adam(lr 0.1, betas (0.5, 0.99)); roll x by up to ±4 px
  and flip with p=0.5 (one draw for the batch); loss = 10·bn + CE(teacher, sorted random targets)
  − JS_T=3(student in eval mode, teacher) + 0.001·TV_L1(x); step; clamp x to the image range."""
  teacher, hooks, student = _models(threads)
  x = torch.randn(batch, 3, 32, 32, requires_grad=True)
  targets = torch.randint(NUM_CLASSES, (batch,)).sort().values
  opt = torch.optim.Adam([x], lr=0.1, betas=(0.5, 0.99))
  lo, hi = -_MEAN / _STD, (1 - _MEAN) / _STD

  def synthesis_step():
    student.eval()
    dy, dx = torch.randint(-4, 5, (2,)).tolist()
    view = torch.roll(x, (dy, dx), (2, 3))
    if torch.rand(()) < 0.5:
      view = view.flip(3)
    t_logits, _ = teacher(view)
    s_logits, _ = student(view)
    loss = 10 * hooks.bn_loss() + F.cross_entropy(t_logits, targets) - _js(s_logits, t_logits) + 1e-3 * _tv_l1(x)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
      x.clamp_(lo, hi)
    return loss

  return synthesis_step, _student_step(teacher, student, batch)


def cmi_steps(batch: int, negatives: int = 4096, threads: int | None = None):
  """CMI (``--adv 0.5 --bn 1 --oh 1 --cr 0.8 --cr_T 0.1 --lr_g 1e-3``). Synthesis step: x = G(z),
  G and z in Adam(lr 1e-3, betas (0.5, 0.999)); a global view (crop + flip) and a local view
  (resized crop, scale 0.25–1, + flip), per-sample parameters; inversion loss on the global view
  bn + CE(teacher, sorted random targets) + 0.5·masked adversarial KL (student in eval mode); the
  teacher's BN-input spatial means of both views (2704-d) through the projection head (Linear,
  ReLU, Linear to 256, L2-normalise; its own Adam(lr 1e-3)) with ``negatives`` cached
  [local‖global] rows of a full memory bank; contrastive CE at T=0.1 against the detached global
  projections, split mean(CE[:B]) + mean(CE[B:]); total = inv + 0.8·cr; both optimisers step.
  The bank's negatives are a fixed random tensor: the reference's random draw of them from a
  40,960-row CPU bank is left out."""
  teacher, hooks, student = _models(threads)
  generator = cmi_generator()
  z = torch.randn(batch, 256, requires_grad=True)
  targets = torch.randint(NUM_CLASSES, (batch,)).sort().values
  dim = sum(m.num_features for m in teacher.modules() if isinstance(m, nn.BatchNorm2d))
  head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 256))
  bank = torch.randn(negatives, 2 * dim)
  opt_g = torch.optim.Adam([*generator.parameters(), z], lr=1e-3, betas=(0.5, 0.999))
  opt_head = torch.optim.Adam(head.parameters(), lr=1e-3)
  labels = torch.arange(batch + negatives)

  def synthesis_step():
    generator.train()
    student.eval()
    x = generator(z)
    global_view, local_view = _normalise(_crop_flip(x)), _normalise(_resized_crop_flip(x))
    t_logits, _ = teacher(global_view)
    bn, global_features = hooks.bn_loss(), hooks.features()
    s_logits, _ = student(global_view)
    inv = bn + F.cross_entropy(t_logits, targets) + 0.5 * _masked_adv(s_logits, t_logits)
    teacher(local_view)
    cached_local, cached_global = bank.chunk(2, 1)
    proj = F.normalize(head(torch.cat([hooks.features(), cached_local, global_features, cached_global])), dim=1)
    proj_local, proj_global = proj.chunk(2)
    ce = F.cross_entropy(proj_local @ proj_global.detach().T / 0.1, labels, reduction='none')
    loss = inv + 0.8 * (ce[:batch].mean() + ce[batch:].mean())
    opt_g.zero_grad()
    opt_head.zero_grad()
    loss.backward()
    opt_g.step()
    opt_head.step()
    return loss

  return synthesis_step, _student_step(teacher, student, batch)


def fast_steps(batch: int, lr_g: float = 2e-3, lr_z: float = 0.01, threads: int | None = None):
  """Fast (Fast-Datafree, FOMAML; wrn40_2 weights ``--bn 10 --oh 0.4 --adv 1.1``, Fast-10's lr_g
  2e-3 and lr_z 0.01 by default). Synthesis step, one inner step of the fast generator (a clone of
  the meta-generator): x = fast_G(z), fast_G and z in Adam(lr_g / lr_z, betas (0.5, 0.999)); crop +
  flip per sample, normalise; loss = 10·bn + 0.4·CE(teacher, random targets) + 1.1·masked
  adversarial KL (student in eval mode); backward; fast_G's gradients added into the
  meta-generator's ``.grad`` (FOMAML); inner step. Left out: the meta optimiser's single step per
  synthesis call, and the bn_mmt blending of the batch statistics (a few elementwise operations
  per BN layer). The student's SGD has Fast's lr 0.2."""
  teacher, hooks, student = _models(threads)
  meta_generator = cmi_generator()
  for p in meta_generator.parameters():
    p.grad = torch.zeros_like(p)
  fast_generator = copy.deepcopy(meta_generator)
  z = torch.randn(batch, 256, requires_grad=True)
  targets = torch.randint(NUM_CLASSES, (batch,))
  opt = torch.optim.Adam([{'params': fast_generator.parameters()}, {'params': [z], 'lr': lr_z}], lr=lr_g,
                         betas=(0.5, 0.999))

  def synthesis_step():
    fast_generator.train()
    student.eval()
    view = _normalise(_crop_flip(fast_generator(z)))
    t_logits, _ = teacher(view)
    s_logits, _ = student(view)
    loss = 10 * hooks.bn_loss() + 0.4 * F.cross_entropy(t_logits, targets) + 1.1 * _masked_adv(s_logits, t_logits)
    opt.zero_grad()
    loss.backward()
    for meta, fast in zip(meta_generator.parameters(), fast_generator.parameters()):
      meta.grad += fast.grad
    opt.step()
    return loss

  return synthesis_step, _student_step(teacher, student, batch, lr=0.2)
