"""CPU speed kernels behind the layers of ``models.layers``: the same numbers as the plain JAX
formulation (up to float rounding), computed in a way XLA:CPU runs faster.

- ``conv2d``: ``F.conv2d`` whose kernel gradient is per-offset GEMMs or shifted products, and whose
  input gradient is an explicit convolution (``benchmarks/conv_cpu.py`` measures why).
- ``upsample2_conv3x3``: nearest x2 upsampling then a 3x3 conv, as four 2x2 convs on the input.
- ``normalize_with_batch_stats``: train-mode batch normalisation with a closed-form backward pass.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Padding = int | tuple[tuple[int, int], tuple[int, int]]


def _pads(padding: Padding) -> tuple[tuple[int, int], tuple[int, int]]:
  """``p`` -> ((p, p), (p, p)); explicit ((top, bottom), (left, right)) pass through."""
  return ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding


def xla_conv(x, kernel, stride: int, padding: Padding, groups: int = 1):
  """``F.conv2d`` (NHWC/HWIO, zero padding, ``groups``) as XLA's own convolution and gradients."""
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


# Measured on jax 0.10.2 and 0.12.1, same 2-core AVX2 machine (benchmarks/results/conv_cpu.md).
# Inside a loop (a lax.scan of training steps: nearly every backward pass here) XLA:CPU's own
# convolution kernel gradient is 20-42x slower than the per-offset GEMMs on both platforms. Outside
# a loop jax 0.10's is slower for most shapes (9x for a 3x3 128->64 conv on 32x32 maps), jax 0.12's
# only for some (2x for 64->64 on 32x32, but 0.2-0.7x for stride 2 and 16-32 channels); one rule is
# kept for both. Below this many output channels the GEMMs become matrix-vector products, slower
# than XLA's own gradient; there, at stride 1 and with a wide input (a generator's output layer), a
# multiply-reduce per offset and channel is faster (jax 0.10: 2.9x faster than XLA and 21x than the
# GEMMs for 64->1 on 32x32 maps; jax 0.12 outside a loop: 0.65x XLA, 13x the GEMMs), but from a
# narrow input it is 5x slower than XLA (LeNet-5's 1->3 5x5 conv).
_GEMM_KERNEL_GRAD_MIN_OUT_CHANNELS = 8
_SHIFTED_KERNEL_GRAD_MIN_IN_CHANNELS = 8


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, stride: int = 1, padding: Padding = 0):
  """``F.conv2d`` on NHWC/HWIO with zero padding (``p`` on every side, or ((top, bottom),
  (left, right))); its kernel gradient is computed as per-offset GEMMs where that is faster on
  CPU (the values are the same up to float rounding)."""
  return xla_conv(x, kernel, stride, padding)


def _conv2d_fwd(x, kernel, stride, padding):
  return xla_conv(x, kernel, stride, padding), (x, kernel)


def _input_grad(dy, kernel, in_shape, stride: int, padding: Padding):
  """dx of ``_xla_conv``: the stride-dilated dy convolved with the kernel flipped in space and
  with its in/out channels swapped, padded back to the input size. The same numbers as JAX's
  transpose rule, whose reversed, dimension-swapped kernel XLA:CPU convolves far slower inside a
  while loop (every ``lax.scan`` of training steps; measured on jax 0.10.2 and 0.12.1 with the
  kernel gradient: a whole 3x3 conv step 20-47x slower than this custom backward)."""
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
    dkernel = jax.vjp(lambda k_: xla_conv(x, k_, stride, padding), kernel)[1](dy)[0]
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
  (4·4 instead of 4·9 multiply-adds per input pixel, the same result up to float rounding):
  forward + backward 1.8-2.3x faster than upsampling then convolving, on jax 0.10.2 and 0.12.1."""
  n, h, w, _ = x.shape
  phases = []
  for a in range(2):
    rows = jnp.stack([sum(kernel[i] for i in t) for t in _PHASE_TAPS[a]])
    for b in range(2):
      k2 = jnp.stack([sum(rows[:, j] for j in t) for t in _PHASE_TAPS[b]], axis=1)
      phases.append(conv2d(x, k2, 1, (_PHASE_PADS[a], _PHASE_PADS[b])))
  y = jnp.stack(phases, axis=3).reshape(n, h, w, 2, 2, -1)
  return y.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, -1)




@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def normalize_with_batch_stats(x, eps: float):
  """Train-mode batch normalisation of ``x`` (G, N, ..., C) within each group g over the axes
  between the first and the last: returns (x̂, μ, σ²) with x̂ = (x - μ)/sqrt(σ² + eps), σ² biased.

  The backward pass is the closed form (per group and channel, means over the n reduced entries)
  dx = (dx̂ - mean(dx̂) - x̂·mean(dx̂·x̂))/sqrt(σ² + eps) + dμ/n + 2·dσ²·(x - μ)/n,
  which XLA:CPU runs faster than the autodiff of the forward pass on average over the zoo's shapes:
  1.17x on jax 0.10.2 (0.73-1.48x), 1.08x on jax 0.12.1 (0.90-1.23x).
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
