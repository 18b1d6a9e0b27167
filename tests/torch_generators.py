"""Small PyTorch modules with the module structure and state_dict names of the reference
generators and SR nets that have no stored fixture (reference_semantics.md §2.3, §2.4, §2.8, §2.9,
§2.11), written from those descriptions, plus ``reference_outputs`` to run them with the
deterministic fixture weights. Imported only by tests that need torch.
"""
import math

import numpy as np
import torch

import weights_rule

tnn = torch.nn


class _View(tnn.Module):
  def __init__(self, *shape):
    super().__init__()
    self.shape = shape

  def forward(self, x):
    return x.view(x.shape[0], *self.shape)


def _torch_cmi_stack(widths, nc):
  """BN, then per width [Upsample, Conv(no bias), BN, LReLU], then Conv(nc, bias), Sigmoid,
  with the torch Sequential order of the CMI-fw / CuDFKD generators."""
  mods = [tnn.BatchNorm2d(widths[0])]
  for c_in, c_out in zip(widths[:-1], widths[1:]):
    mods += [tnn.Upsample(scale_factor=2), tnn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), tnn.BatchNorm2d(c_out),
             tnn.LeakyReLU(0.2)]
  return tnn.Sequential(*mods, tnn.Conv2d(widths[-1], nc, 3, 1, 1), tnn.Sigmoid())


class TorchCuDFKD(tnn.Module):
  """DCGAN_Generator_CIFAR10(nz, ngf, d): project = [Flatten, Linear], main = the CMI stack."""

  def __init__(self, nz, ngf, d, img_size=32, nc=3):
    super().__init__()
    widths = [ngf * 2 ** (d - i) for i in range(d + 1)]
    self.s, self.c = img_size // 2 ** d, widths[0]
    self.project = tnn.Sequential(tnn.Flatten(), tnn.Linear(nz, self.c * self.s * self.s))
    self.main = _torch_cmi_stack(widths, nc)

  def forward(self, z):
    return self.main(self.project(z).view(z.shape[0], self.c, self.s, self.s))


class TorchNoisyLayerGenerator(tnn.Module):
  """NLGenerator on embeddings: BatchNorm1d, per-chunk Linear (the last takes the rest), l1, CMI stack."""

  def __init__(self, ngf, nl, sbz, le_emb_size, le_size, img_size=32, nc=3):
    super().__init__()
    self.nl, self.s, self.c = nl, img_size // 4, 2 * ngf
    self.n1 = tnn.BatchNorm1d(le_size)
    self.le1 = tnn.ModuleList([tnn.Linear(le_size, le_emb_size) for _ in range(math.ceil(sbz / nl))])
    self.l1 = tnn.Sequential(tnn.Linear(le_emb_size, self.c * self.s * self.s))
    self.conv_blocks = _torch_cmi_stack([2 * ngf, 2 * ngf, ngf], nc)

  def forward(self, le):
    le = self.n1(le)
    last = len(self.le1) - 1
    parts = [layer(le[k * self.nl:] if k == last else le[k * self.nl:(k + 1) * self.nl])
             for k, layer in enumerate(self.le1)]
    return self.conv_blocks(self.l1(torch.cat(parts)).view(le.shape[0], self.c, self.s, self.s))


class TorchDaflLayout(tnn.Module):
  """DFAD GeneratorA (batch norm) or DFSR GeneratorINE1 (instance norm, (tanh+1)/2 output)."""

  def __init__(self, nz, nc, img_size, inner_eps, instance_norm):
    super().__init__()

    def norm(c, eps=1e-5):
      return tnn.InstanceNorm2d(c, eps=eps, affine=True) if instance_norm else tnn.BatchNorm2d(c, eps=eps)

    self.s, self.instance_norm = img_size // 4, instance_norm
    self.l1 = tnn.Sequential(tnn.Linear(nz, 128 * self.s * self.s))
    self.conv_blocks0 = tnn.Sequential(norm(128))
    self.conv_blocks1 = tnn.Sequential(tnn.Conv2d(128, 128, 3, 1, 1), norm(128, inner_eps), tnn.LeakyReLU(0.2))
    tail = [] if instance_norm else [tnn.BatchNorm2d(nc, affine=False)]
    self.conv_blocks2 = tnn.Sequential(tnn.Conv2d(128, 64, 3, 1, 1), norm(64, inner_eps), tnn.LeakyReLU(0.2),
                                       tnn.Conv2d(64, nc, 3, 1, 1), tnn.Tanh(), *tail)

  def forward(self, z):
    x = self.conv_blocks0(self.l1(z).view(z.shape[0], 128, self.s, self.s))
    x = self.conv_blocks1(tnn.functional.interpolate(x, scale_factor=2))
    x = self.conv_blocks2(tnn.functional.interpolate(x, scale_factor=2))
    return (x + 1) * 0.5 if self.instance_norm else x


class TorchZskt(tnn.Module):
  """The ZSKT generator: one Sequential ``layers`` with an x1.6 Upsample and no Tanh."""

  def __init__(self, nz):
    super().__init__()
    self.layers = tnn.Sequential(
        tnn.Linear(nz, 128 * 10 * 10), _View(128, 10, 10), tnn.BatchNorm2d(128),
        tnn.Upsample(scale_factor=1.6), tnn.Conv2d(128, 128, 3, 1, 1), tnn.BatchNorm2d(128), tnn.LeakyReLU(0.2),
        tnn.Upsample(scale_factor=2), tnn.Conv2d(128, 64, 3, 1, 1), tnn.BatchNorm2d(64), tnn.LeakyReLU(0.2),
        tnn.Conv2d(64, 3, 3, 1, 1), tnn.BatchNorm2d(3, affine=False))

  def forward(self, z):
    return self.layers(z)


class _TorchConvReLU(tnn.Module):
  def __init__(self, width):
    super().__init__()
    self.conv = tnn.Conv2d(width, width, 3, 1, 1, bias=False)

  def forward(self, x):
    return torch.relu(self.conv(x))


class TorchVDSR(tnn.Module):
  """VDSR ``Net`` (width 64) / ``NetHalf`` (width 32) with ``num_blocks`` residual blocks."""

  def __init__(self, width, num_blocks):
    super().__init__()
    self.residual_layer = tnn.Sequential(*[_TorchConvReLU(width) for _ in range(num_blocks)])
    self.input = tnn.Conv2d(1, width, 3, 1, 1, bias=False)
    self.output = tnn.Conv2d(width, 1, 3, 1, 1, bias=False)

  def forward(self, x):
    return self.output(self.residual_layer(torch.relu(self.input(x)))) + x


def reference_outputs(module, x):
  """(state_dict rule weights (float32), eval output, train output, running stats after the train
  forward), for the float32 rule weights and input.

  torch runs in float64, so a comparison measures the float32 error of the Flax model alone: in
  eval mode (running stats that do not match the activations) torch's own float32 rounding
  reaches ~6e-6 of max|output| (DFAD's generator), which would use up most of the 1e-5 budget.
  """
  sd = weights_rule.make_state_dict([(k, tuple(v.shape)) for k, v in module.state_dict().items()])
  weights = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}
  module = module.double()
  xt = torch.from_numpy(x).double()
  with torch.no_grad():
    module.load_state_dict(weights)
    out_eval = module.eval()(xt).numpy()
    module.load_state_dict(weights)  # a fresh load: the eval forward must not see train-updated stats
    out_train = module.train()(xt).numpy()
  running = {name: (m.running_mean.numpy(), m.running_var.numpy()) for name, m in module.named_modules()
             if isinstance(m, tnn.modules.batchnorm._BatchNorm)}
  return sd, out_eval, out_train, running
