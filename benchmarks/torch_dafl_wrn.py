"""A PyTorch implementation of the CMI framework's DAFL steps (``GenerativeSynthesizer`` with
``--oh 1 --act 0.001 --balance 20``; the student's KL at T=1) for WRN-40-2 -> WRN-16-1 on CIFAR
shapes, used by ``step_times.py --torch`` to time the reference loop on the same machine in the
same run. Random weights: the cost of a step does not depend on them.

The teacher runs without the framework's BatchNorm forward hooks (DAFL's bn weight is 0, so they
only add work): the PyTorch figure is, if anything, a little optimistic.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

# The tests' PyTorch models, written from the reference structures (reference_semantics.md).
_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests')
sys.path[:0] = [_TESTS, os.path.join(_TESTS, 'fixtures')]  # torch_generators imports fixtures/weights_rule
from torch_classifiers import WideResNet  # noqa: E402
from torch_generators import _torch_cmi_stack, _View  # noqa: E402

# CIFAR-10 normalisation, as the CMI framework's.
CIFAR10_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
CIFAR10_STD = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)


def large_generator(nz: int = 512, ngf: int = 64, nc: int = 3) -> torch.nn.Module:
  """The CMI framework's ``LargeGenerator``: Linear(nz, 4ngf·8·8), then the CMI stack."""
  return torch.nn.Sequential(torch.nn.Linear(nz, 4 * ngf * 8 * 8), _View(4 * ngf, 8, 8),
                             _torch_cmi_stack((4 * ngf, 2 * ngf, ngf), nc))


def dafl_steps(batch: int, nz: int = 512, threads: int | None = None):
  """(generator_step, student_step): no-argument callables, each one optimiser step."""
  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(0)
  teacher, student, generator = WideResNet(40, 2, 10).eval(), WideResNet(16, 1, 10), large_generator(nz)
  for p in teacher.parameters():
    p.requires_grad_(False)
  opt_g = torch.optim.Adam(generator.parameters(), lr=1e-3, betas=(0.5, 0.999))
  opt_s = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
  mean, std = CIFAR10_MEAN, CIFAR10_STD

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
