"""Layers with PyTorch semantics, shared by every model of the zoo.

Models are NHWC. Module names in the zoo mirror the reference PyTorch state_dict prefixes
(e.g. ``name="layer1.0"`` then ``name="conv1"`` gives ``layer1.0.conv1``), so a torch key maps to a
Flax path mechanically (see ``dfkd_jax.convert``).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dfkd_jax.errors import UserError

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


Padding = int | tuple[tuple[int, int], tuple[int, int]]


def _pads(padding: Padding) -> tuple[tuple[int, int], tuple[int, int]]:
  """``p`` -> ((p, p), (p, p)); explicit ((top, bottom), (left, right)) pass through."""
  return ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding


def _xla_conv(x, kernel, stride: int, padding: Padding, groups: int = 1):
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), _pads(padding),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)


def _kernel_grad_by_gemm(x, dy, kernel_shape, stride: int, padding: Padding):
  """dW[i, j] = Σ_{n,h,w} x_pad[n, s·h + i, s·w + j, :]ᵀ dy[n, h, w, :], one GEMM per kernel
  offset (kh·kw GEMMs of (C_in × N·H·W) by (N·H·W × C_out))."""
  kh, kw = kernel_shape[:2]
  _, ho, wo, c_out = dy.shape
  c_in = x.shape[-1]
  xp = jnp.pad(x, ((0, 0),) + _pads(padding) + ((0, 0),))
  d = dy.reshape(-1, c_out)
  span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
  grads = [xp[:, i:i + span_h:stride, j:j + span_w:stride, :].reshape(-1, c_in).T @ d
           for i in range(kh) for j in range(kw)]
  return jnp.stack(grads).reshape(kernel_shape)


def _kernel_grad_by_shifted_products(x, dy, kernel_shape, padding: Padding):
  """Stride 1: dW[i, j, :, o] = Σ_{n,a,b} x[n, a, b, :] · dy[n, a + p_top - i, b + p_left - j, o]
  (dy zero outside its extent), one multiply-reduce over ``x`` per kernel offset and output
  channel; the narrow ``dy`` is shifted rather than the wide ``x`` sliced."""
  kh, kw = kernel_shape[:2]
  (pt, _), (pl, _) = _pads(padding)
  h, w = x.shape[1:3]
  dyp = jnp.pad(dy, ((0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)))
  grads = []
  for i in range(kh):
    for j in range(kw):
      top, left = kh - 1 + pt - i, kw - 1 + pl - j
      shifted = dyp[:, top:top + h, left:left + w, :]
      grads.append(jnp.stack([jnp.sum(x * shifted[..., o:o + 1], axis=(0, 1, 2))
                              for o in range(dy.shape[-1])], axis=-1))
  return jnp.stack(grads).reshape(kernel_shape)


# XLA:CPU computes convolution kernel gradients very slowly for most shapes (e.g. 9x slower than
# the GEMM formulation for a 3x3 128->64 conv on 32x32 maps, 6x for ResNet's 64->64 layers; see
# benchmarks/conv_cpu.py). Below this many output channels the GEMMs become matrix-vector
# products, slower than XLA's own gradient; there, at stride 1 and with a wide input (a
# generator's output layer), a multiply-reduce per offset and channel is faster still (2.4x faster
# than XLA and 13x than the GEMMs for 64->1 on 32x32 maps), but from a narrow input it is 5x
# slower than XLA (LeNet-5's 1->3 5x5 conv).
_GEMM_KERNEL_GRAD_MIN_OUT_CHANNELS = 8
_SHIFTED_KERNEL_GRAD_MIN_IN_CHANNELS = 8


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, stride: int = 1, padding: Padding = 0):
  """``F.conv2d`` on NHWC/HWIO with zero padding (``p`` on every side, or ((top, bottom),
  (left, right))); its kernel gradient is computed as per-offset GEMMs where that is faster on
  CPU (the values are the same up to float rounding)."""
  return _xla_conv(x, kernel, stride, padding)


def _conv2d_fwd(x, kernel, stride, padding):
  return _xla_conv(x, kernel, stride, padding), (x, kernel)


def _input_grad(dy, kernel, in_shape, stride: int, padding: Padding):
  """dx of ``_xla_conv``: the stride-dilated dy convolved with the kernel flipped in space and
  with its in/out channels swapped, padded back to the input size. The same numbers as JAX's
  transpose rule, whose reversed, dimension-swapped kernel XLA:CPU convolves ~7x slower inside a
  while loop (every ``lax.scan`` of training steps)."""
  kh, kw = kernel.shape[:2]
  (pt, pb), (pl, pr) = _pads(padding)
  h, w = in_shape[1:3]
  rh, rw = (h + pt + pb - kh) % stride, (w + pl + pr - kw) % stride  # rows/columns no window reads
  flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  return jax.lax.conv_general_dilated(
      dy, flipped, (1, 1), ((kh - 1 - pt, kh - 1 - pb + rh), (kw - 1 - pl, kw - 1 - pr + rw)),
      lhs_dilation=(stride, stride), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _conv2d_bwd(stride, padding, residuals, dy):
  x, kernel = residuals
  dx = _input_grad(dy, kernel, x.shape, stride, padding)
  if kernel.shape[-1] >= _GEMM_KERNEL_GRAD_MIN_OUT_CHANNELS:
    dkernel = _kernel_grad_by_gemm(x, dy, kernel.shape, stride, padding)
  elif stride == 1 and kernel.shape[-2] >= _SHIFTED_KERNEL_GRAD_MIN_IN_CHANNELS:
    dkernel = _kernel_grad_by_shifted_products(x, dy, kernel.shape, padding)
  else:
    dkernel = jax.vjp(lambda k_: _xla_conv(x, k_, stride, padding), kernel)[1](dy)[0]
  return dx, dkernel


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


# Output row/column phase a of a nearest x2 upsampling followed by a 3x3 conv (padding 1) reads
# input rows (i - 1, i) for a = 0 and (i, i + 1) for a = 1; the 3x3 kernel's taps collapse onto
# those two rows as below (and likewise for columns).
_PHASE_TAPS = (((0,), (1, 2)), ((0, 1), (2,)))
_PHASE_PADS = ((1, 0), (0, 1))


def upsample2_conv3x3(x, kernel):
  """``Conv3x3(padding=1)(Upsample(x2, nearest)(x))`` without materialising the upsampled map:
  each of the 4 output phases is a 2x2 conv on ``x`` whose taps are sums of the 3x3 kernel's
  (4·4 instead of 4·9 multiply-adds per input pixel, the same result up to float rounding)."""
  n, h, w, _ = x.shape
  phases = []
  for a in range(2):
    rows = jnp.stack([sum(kernel[i] for i in t) for t in _PHASE_TAPS[a]])
    for b in range(2):
      k2 = jnp.stack([sum(rows[:, j] for j in t) for t in _PHASE_TAPS[b]], axis=1)
      phases.append(conv2d(x, k2, 1, (_PHASE_PADS[a], _PHASE_PADS[b])))
  y = jnp.stack(phases, axis=3).reshape(n, h, w, 2, 2, -1)
  return y.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, -1)


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
      y = _xla_conv(x, kernel, self.stride, p, self.groups)
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


# How many equal slices of the batch train-mode BatchNorm layers take their statistics over, when
# they don't say (``BatchNorm.stat_groups=None``). Read when a model is traced, like Flax's
# ``logical_axis_rules``: see ``batch_stat_groups``.
_STAT_GROUPS = contextvars.ContextVar('batch_stat_groups', default=1)


@contextlib.contextmanager
def batch_stat_groups(groups: int) -> Iterator[None]:
  """Train-mode ``BatchNorm`` layers traced inside this context (and not setting ``stat_groups``)
  compute their statistics over ``groups`` equal slices of the batch: with the batch split over
  ``groups`` devices, that is per-device BatchNorm (``dfkd_jax.run.parallel.with_batch_norm``)."""
  token = _STAT_GROUPS.set(groups)
  try:
    yield
  finally:
    _STAT_GROUPS.reset(token)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def normalize_with_batch_stats(x, eps: float):
  """Train-mode batch normalisation of ``x`` (G, N, ..., C) within each group g over the axes
  between the first and the last: returns (x̂, μ, σ²) with x̂ = (x - μ)/sqrt(σ² + eps), σ² biased.

  The backward pass is the closed form (per group and channel, means over the n reduced entries)
  dx = (dx̂ - mean(dx̂) - x̂·mean(dx̂·x̂))/sqrt(σ² + eps) + dμ/n + 2·dσ²·(x - μ)/n,
  which XLA:CPU runs about twice as fast as the autodiff of the forward pass.
  """
  return _normalize_fwd(x, eps)[0]


def _normalize_fwd(x, eps):
  axes = tuple(range(1, x.ndim - 1))
  mean = x.mean(axes, keepdims=True)
  centred = x - mean
  var = jnp.square(centred).mean(axes, keepdims=True)
  inv_std = jax.lax.rsqrt(var + eps)
  x_hat = centred * inv_std
  return (x_hat, mean, var), (x_hat, inv_std)


def _normalize_bwd(eps, residuals, cotangents):
  del eps
  x_hat, inv_std = residuals
  d_hat, d_mean, d_var = cotangents
  axes = tuple(range(1, x_hat.ndim - 1))
  n = math.prod(x_hat.shape[1:-1])
  dx = (d_hat - d_hat.mean(axes, keepdims=True) - x_hat * (d_hat * x_hat).mean(axes, keepdims=True)) * inv_std
  return (dx + d_mean / n + (2 / n) * d_var * x_hat / inv_std,)


normalize_with_batch_stats.defvjp(_normalize_fwd, _normalize_bwd)


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
  ``batch_stat_groups`` context (1, the whole batch, outside any).

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
      g = 1 if self.is_initializing() else self.stat_groups or _STAT_GROUPS.get()
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
