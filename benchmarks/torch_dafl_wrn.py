"""A PyTorch implementation of the CMI framework's DAFL steps (``GenerativeSynthesizer`` with
``--oh 1 --act 0.001 --balance 20``; the student's KL at T=1) for WRN-40-2 -> WRN-16-1 on CIFAR
shapes, used by ``step_times.py --torch`` to time the reference loop on the same machine in the
same run. Random weights: the cost of a step does not depend on them.

The teacher runs without the framework's BatchNorm forward hooks (DAFL's bn weight is 0, so they
only add work): the PyTorch figure is, if anything, a little optimistic.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Block(nn.Module):
  """Pre-activation wide-ResNet block (BN-ReLU-conv twice; 1x1 shortcut on a shape change)."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

  def forward(self, x):
    o = F.relu(self.bn1(x))
    y = self.conv2(F.relu(self.bn2(self.conv1(o))))
    return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
  def __init__(self, depth: int, widen: int, num_classes: int = 10):
    super().__init__()
    n, widths = (depth - 4) // 6, (16, 16 * widen, 32 * widen, 64 * widen)
    self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.blocks = nn.Sequential(*[_Block(widths[g] if b == 0 else widths[g + 1], widths[g + 1],
                                         2 if b == 0 and g > 0 else 1) for g in range(3) for b in range(n)])
    self.bn, self.fc = nn.BatchNorm2d(widths[3]), nn.Linear(widths[3], num_classes)

  def forward(self, x):
    features = F.adaptive_avg_pool2d(F.relu(self.bn(self.blocks(self.conv(x)))), 1).flatten(1)
    return self.fc(features), features


class LargeGenerator(nn.Module):
  """Linear(nz, 4ngf·8·8) -> BN -> (Upsample x2 -> Conv -> BN -> LReLU) x2 -> Conv -> Sigmoid."""

  def __init__(self, nz: int = 512, ngf: int = 64, nc: int = 3):
    super().__init__()
    self.linear, self.ngf = nn.Linear(nz, 4 * ngf * 8 * 8), ngf
    self.blocks = nn.Sequential(
        nn.BatchNorm2d(4 * ngf), nn.Upsample(scale_factor=2), nn.Conv2d(4 * ngf, 2 * ngf, 3, 1, 1, bias=False),
        nn.BatchNorm2d(2 * ngf), nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2),
        nn.Conv2d(2 * ngf, ngf, 3, 1, 1, bias=False), nn.BatchNorm2d(ngf), nn.LeakyReLU(0.2),
        nn.Conv2d(ngf, nc, 3, 1, 1), nn.Sigmoid())

  def forward(self, z):
    return self.blocks(self.linear(z).view(z.shape[0], 4 * self.ngf, 8, 8))


def dafl_steps(batch: int, nz: int = 512, threads: int | None = None):
  """(generator_step, student_step): no-argument callables, each one optimiser step."""
  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(0)
  teacher, student, generator = WideResNet(40, 2).eval(), WideResNet(16, 1), LargeGenerator(nz)
  for p in teacher.parameters():
    p.requires_grad_(False)
  opt_g = torch.optim.Adam(generator.parameters(), lr=1e-3, betas=(0.5, 0.999))
  opt_s = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
  mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
  std = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)

  def generator_step():
    generator.train()
    student.eval()
    t_logits, t_features = teacher((generator(torch.randn(batch, nz)) - mean) / std)
    p = F.softmax(t_logits, dim=1).mean(0)
    loss = (F.cross_entropy(t_logits, t_logits.argmax(1)) - 0.001 * t_features.abs().mean()
            + 20.0 * (p * torch.log(p)).sum())
    opt_g.zero_grad()
    loss.backward()
    opt_g.step()

  def student_step():
    generator.eval()
    student.train()
    with torch.no_grad():
      x = (generator(torch.randn(batch, nz)) - mean) / std
      t_logits, _ = teacher(x)
    s_logits, _ = student(x)
    loss = F.kl_div(F.log_softmax(s_logits, 1), F.softmax(t_logits, 1), reduction='batchmean')
    opt_s.zero_grad()
    loss.backward()
    opt_s.step()

  return generator_step, student_step
