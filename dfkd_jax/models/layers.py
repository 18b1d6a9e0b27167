"""Layers with PyTorch semantics, shared by every model of the zoo.

Models are NHWC. Module names in the zoo mirror the reference PyTorch state_dict prefixes
(e.g. ``name="layer1.0"`` then ``name="conv1"`` gives ``layer1.0.conv1``), so a torch key maps to a
Flax path mechanically (see ``dfkd_jax.convert``). The CPU speed kernels the layers compute with
are in ``models.cpu_kernels``; the per-device BatchNorm context in ``models.bn_groups``.
"""
from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dfkd_jax.errors import UserError
from dfkd_jax.models import bn_groups
from dfkd_jax.models.cpu_kernels import conv2d, normalize_with_batch_stats, upsample2_conv3x3, xla_conv

Array = jax.Array


def torch_default_kernel_init(key, shape, dtype=jnp.float32):
  """PyTorch's default Conv/Linear weight init, kaiming_uniform(a=sqrt(5)): U(±1/sqrt(fan_in)).

  ``shape`` is a Flax kernel shape: (..., in, out) with fan_in = prod(shape[:-1]).
  """
  fan_in = math.prod(shape[:-1])
  bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_default_bias_init(fan_in: int) -> Callable:
  """PyTorch's default bias init for a layer with ``fan_in`` inputs: U(±1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def kaiming_normal_fan_out(key, shape, dtype=jnp.float32):
  """``nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu')`` for a Flax kernel."""
  fan_out = math.prod(shape[:-2]) * shape[-1]
  return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / fan_out)


class Conv2d(nn.Module):
  """``torch.nn.Conv2d`` on NHWC input: explicit symmetric zero padding, never "SAME".

  Default init is PyTorch's (kaiming_uniform(a=sqrt(5)) weights and bias); ``kernel_init``
  overrides the weights (e.g. WRN's normal(0, sqrt(2/(k*k*out)))). ``upsample=2`` applies a
  nearest x2 upsampling first (the generators' ``Upsample -> Conv``), computed by
  ``upsample2_conv3x3`` for 3x3 kernels with padding 1.
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = True
  groups: int = 1
  kernel_init: Callable | None = None
  bias_init: Callable | None = None
  upsample: int = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, p = self.kernel_size, self.padding
    fan_in = (x.shape[-1] // self.groups) * k * k
    kernel = self.param('kernel', self.kernel_init or torch_default_kernel_init,
                        (k, k, x.shape[-1] // self.groups, self.features))
    fused_upsample = self.upsample == 2 and (k, p, self.stride, self.groups) == (3, 1, 1, 1)
    if self.upsample > 1 and not fused_upsample:
      x = upsample_nearest(x, self.upsample)
    if fused_upsample:
      y = upsample2_conv3x3(x, kernel)
    elif self.groups == 1:
      y = conv2d(x, kernel, self.stride, p)
    else:
      y = xla_conv(x, kernel, self.stride, p, self.groups)
    if self.use_bias:
      y = y + self.param('bias', self.bias_init or torch_default_bias_init(fan_in), (self.features,))
    return y


class Linear(nn.Module):
  """``torch.nn.Linear`` with PyTorch's default init (Flax layout: kernel (in, out))."""
  features: int
  use_bias: bool = True
  kernel_init: Callable | None = None
  bias_init: Callable | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    fan_in = x.shape[-1]
    kernel = self.param('kernel', self.kernel_init or torch_default_kernel_init, (fan_in, self.features))
    y = x @ kernel
    if self.use_bias:
      y = y + self.param('bias', self.bias_init or torch_default_bias_init(fan_in), (self.features,))
    return y


class BatchNorm(nn.Module):
  """``torch.nn.BatchNorm{1,2}d`` over the last axis, with PyTorch's exact semantics.

  Train mode normalises with the batch mean and *biased* batch variance and updates the running
  statistics as ``r <- momentum * r + (1 - momentum) * s`` (Flax convention: torch momentum 0.1 is
  0.9 here), where the variance fed to the running average is the *unbiased* one, n/(n-1) * var,
  as torch does. Eval mode uses the running statistics. ``affine=False`` keeps running stats only.

  ``stat_groups > 1`` normalises each of ``stat_groups`` equal, contiguous slices of the batch with
  its own statistics, as each GPU does under PyTorch DataParallel/DDP, and the running statistics
  follow the first slice only, as there (DDP broadcasts rank 0's buffers before every forward;
  DataParallel keeps device 0's replica's). ``None`` takes the count from the enclosing
  ``bn_groups.batch_stat_groups`` context (1, the whole batch, outside any).

  The taps of ``dfkd_jax.models.hooks`` intercept this module's ``__call__`` to read its *input*.
  """
  use_running_average: bool | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  affine: bool = True
  stat_groups: int | None = None

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
    use_ra = nn.merge_param('use_running_average', self.use_running_average, use_running_average)
    c = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    if use_ra:
      mean, var = ra_mean.value, ra_var.value
      y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    else:
      # Initialisation runs on a dummy batch that need not split; it updates no statistics.
      g = 1 if self.is_initializing() else self.stat_groups or bn_groups.current()
      if x.shape[0] % g:
        raise UserError(f'BatchNorm {self.name} gets a batch of {x.shape[0]}, which does not split into {g} '
                        f'equal slices for per-device statistics: use a batch that is a multiple of {g}')
      xg = x.reshape((g, x.shape[0] // g) + x.shape[1:])
      y, mean, var = normalize_with_batch_stats(xg, self.epsilon)
      y = y.reshape(x.shape)
      if not self.is_initializing():
        n = math.prod(xg.shape[1:-1])
        first_mean = mean.reshape(g, c)[0]
        first_var = var.reshape(g, c)[0] * (n / max(n - 1, 1))
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * first_mean
        ra_var.value = m * ra_var.value + (1 - m) * first_var
    if self.affine:
      y = y * self.param('scale', nn.initializers.ones, (c,)) + self.param('bias', nn.initializers.zeros, (c,))
    return y


class InstanceNorm(nn.Module):
  """``torch.nn.InstanceNorm2d`` (no running stats): each sample's channels are normalised with
  their own spatial mean and biased variance; ``affine`` adds a per-channel scale and bias."""
  epsilon: float = 1e-5
  affine: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    mean = x.mean((1, 2), keepdims=True)
    var = jnp.square(x - mean).mean((1, 2), keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    if self.affine:
      c = x.shape[-1]
      y = y * self.param('scale', nn.initializers.ones, (c,)) + self.param('bias', nn.initializers.zeros, (c,))
    return y


def max_pool(x: Array, window: int, stride: int | None = None, padding: int = 0) -> Array:
  """``torch.nn.MaxPool2d`` (pads with -inf). Non-overlapping, unpadded windows use a reshape,
  whose backward pass is much faster on CPU than ``select_and_scatter``."""
  stride = stride or window
  n, h, w, c = x.shape
  if stride == window and padding == 0 and h % window == 0 and w % window == 0:
    return x.reshape(n, h // window, window, w // window, window, c).max((2, 4))
  return nn.max_pool(x, (window, window), (stride, stride), ((padding, padding), (padding, padding)))


def avg_pool(x: Array, window: int, stride: int | None = None) -> Array:
  """``torch.nn.AvgPool2d`` without padding."""
  stride = stride or window
  n, h, w, c = x.shape
  if stride == window and h % window == 0 and w % window == 0:
    return x.reshape(n, h // window, window, w // window, window, c).mean((2, 4))
  return nn.avg_pool(x, (window, window), (stride, stride))


def upsample_nearest(x: Array, factor: float = 2) -> Array:
  """``nn.Upsample(scale_factor=factor)`` / ``F.interpolate`` nearest, NHWC.

  A non-integer factor (ZSKT's 1.6) follows torch exactly: the output side is floor(in * factor)
  and output index d reads input index min(floor(d * float32(1 / factor)), in - 1), computed in
  float32 as torch does (not floor(d * in / out), which differs e.g. for 6 -> 10 at factor 1.7).
  """
  if float(factor).is_integer():
    f = int(factor)
    return jnp.repeat(jnp.repeat(x, f, axis=1), f, axis=2)
  inv = np.float32(1.0 / factor)

  def source_index(size):
    dst = np.arange(math.floor(size * factor), dtype=np.float32)
    return np.minimum(np.floor(dst * inv).astype(np.int32), size - 1)

  return x[:, source_index(x.shape[1])][:, :, source_index(x.shape[2])]


def global_avg_pool(x: Array) -> Array:
  """``adaptive_avg_pool2d(x, 1).flatten(1)`` on NHWC."""
  return x.mean((1, 2))
