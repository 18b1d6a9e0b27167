r"""Benchmark: the CPU kernels of ``dfkd_jax.models.cpu_kernels`` against plain XLA, for the layer
shapes of the zoo. Prints the machine (``machine.py``: CPU, vector flags, jax version), then
milliseconds and ratios (> 1: the kernel wins):

- convolution kernel gradients: XLA's own versus the per-offset GEMMs and versus what ``conv2d``
  picks for the shape (GEMMs, shifted products for narrow outputs from wide inputs, or XLA's own);
- a whole convolution step (forward, dx and dW) repeated in a ``lax.scan``, as training runs it:
  XLA's autodiff versus ``conv2d``'s custom backward (explicit input-gradient convolution), and
  versus that backward with XLA's own kernel gradient (``conv2d``'s dx, XLA's dW);
- nearest-x2 upsampling + 3x3 conv versus the fused ``upsample2_conv3x3``;
- train-mode batch normalisation forward + backward: autodiff of the forward versus
  ``normalize_with_batch_stats``'s closed-form backward.

Run it once per platform (jax 0.10 on Python 3.11, jax 0.12 on Python 3.12) on the same machine to
decide which kernels still pay.

  python benchmarks/conv_cpu.py [--rounds 3] [--batch N] [--sections kernel_grad,upsample,scan,bn]

``--batch`` runs every shape at batch N instead of its own (``--batch 2 --rounds 1``: a quick check).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import machine  # noqa: E402

from dfkd_jax.models import cpu_kernels, layers  # noqa: E402

# (batch, size, c_in, c_out, kernel, stride, padding): ResNet-18/WRN/LeNet/generator layers.
KERNEL_GRAD_SHAPES = [
    (64, 32, 3, 64, 3, 1, 1), (64, 32, 64, 64, 3, 1, 1), (64, 32, 64, 128, 3, 2, 1), (64, 16, 128, 128, 3, 1, 1),
    (64, 8, 256, 256, 3, 1, 1), (64, 4, 512, 512, 3, 1, 1), (64, 32, 16, 16, 3, 1, 1), (64, 16, 32, 32, 3, 1, 1),
    (256, 14, 6, 16, 5, 1, 0), (64, 32, 128, 64, 3, 1, 1), (64, 32, 64, 1, 3, 1, 1), (64, 32, 16, 3, 3, 1, 1),
    (256, 32, 1, 6, 5, 1, 0), (128, 32, 1, 3, 5, 1, 0)]
UPSAMPLE_SHAPES = [(64, 8, 128, 128), (64, 16, 128, 64)]
# (batch, size, c_in, c_out) of 3x3 stride-1 convs: WRN-40-2 / WRN-16-1 / ResNet stages.
SCAN_CONV_SHAPES = [(64, 32, 32, 32), (64, 16, 64, 64), (64, 8, 128, 128), (64, 32, 16, 16)]
# (batch, size, channels) of BatchNorm inputs: WRN stages, generator blocks, LeNet-sized maps.
BN_SHAPES = [(64, 32, 32), (64, 16, 64), (64, 8, 128), (64, 16, 128), (256, 10, 16)]
SCAN_LENGTH = 4
SECTIONS = ('kernel_grad', 'upsample', 'scan', 'bn')


def timed_ms(fn, *args, reps=3):
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - t0) / reps * 1000


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--batch', type=int, default=None, help="every shape's batch (default: the shape's own)")
  parser.add_argument('--sections', default=','.join(SECTIONS), help=f'a comma-separated subset of {SECTIONS}')
  args = parser.parse_args()
  sections = args.sections.split(',')
  if set(sections) - set(SECTIONS):
    parser.error(f'--sections: unknown {sorted(set(sections) - set(SECTIONS))}; choose from {SECTIONS}')
  key = jax.random.key(0)
  print(machine.markdown(machine.describe()) + '\n')
  if 'kernel_grad' in sections:
    kernel_grad_section(args, key)
  if 'upsample' in sections:
    upsample_section(args, key)
  if 'scan' in sections:
    scan_section(args, key)
  if 'bn' in sections:
    bn_section(args, key)


def kernel_grad_section(args, key):
  print('kernel gradient\n| shape (N, HxW, Cin->Cout, k, stride) | XLA ms | GEMM ms | conv2d ms | XLA / conv2d |\n'
        '|---|---|---|---|---|')
  for n, size, c_in, c_out, k, s, p in KERNEL_GRAD_SHAPES:
    n = args.batch or n
    x = jax.random.normal(key, (n, size, size, c_in))
    out = (size + 2 * p - k) // s + 1
    dy = jax.random.normal(key, (n, out, out, c_out))
    shape = (k, k, c_in, c_out)
    xla = jax.jit(lambda x, dy: jax.vjp(lambda w: cpu_kernels.xla_conv(x, w, s, p), jnp.zeros(shape))[1](dy)[0])
    gemm = jax.jit(lambda x, dy: cpu_kernels._kernel_grad_by_gemm(x, dy, shape, s, p))
    ours = jax.jit(lambda x, dy: jax.vjp(lambda w: layers.conv2d(x, w, s, p), jnp.zeros(shape))[1](dy)[0])
    a, b, c = (statistics.median(timed_ms(f, x, dy) for _ in range(args.rounds)) for f in (xla, gemm, ours))
    print(f'| {n}, {size}x{size}, {c_in}->{c_out}, {k}, {s} | {a:.1f} | {b:.1f} | {c:.1f} | {a / c:.2f} |', flush=True)


def upsample_section(args, key):
  print('\nupsample x2 + conv3x3, forward + backward\n'
        '| shape (N, HxW, Cin->Cout) | upsample then conv ms | fused ms | ratio |\n|---|---|---|---|')
  for n, size, c_in, c_out in UPSAMPLE_SHAPES:
    n = args.batch or n
    x = jax.random.normal(key, (n, size, size, c_in))
    w = jax.random.normal(key, (3, 3, c_in, c_out))
    naive = jax.jit(jax.grad(lambda x, w: jnp.sum(layers.conv2d(layers.upsample_nearest(x, 2), w, 1, 1) ** 2), (0, 1)))
    fused = jax.jit(jax.grad(lambda x, w: jnp.sum(layers.upsample2_conv3x3(x, w) ** 2), (0, 1)))
    a = statistics.median(timed_ms(naive, x, w) for _ in range(args.rounds))
    b = statistics.median(timed_ms(fused, x, w) for _ in range(args.rounds))
    print(f'| {n}, {size}x{size}, {c_in}->{c_out} | {a:.1f} | {b:.1f} | {a / b:.2f} |', flush=True)


def scan_section(args, key):
  print(f'\nconv3x3 forward + dx + dW, {SCAN_LENGTH} steps in a lax.scan (ms; ratios: XLA / the column)\n'
        '| shape (N, HxW, Cin->Cout) | XLA autodiff | conv2d | ratio | conv2d dx, XLA dW | ratio |\n'
        '|---|---|---|---|---|---|')
  for n, size, c_in, c_out in SCAN_CONV_SHAPES:
    n = args.batch or n
    x = jax.random.normal(key, (n, size, size, c_in))
    w = 0.01 * jax.random.normal(key, (3, 3, c_in, c_out))
    xla, ours = (jax.jit(functools.partial(scanned_conv_steps, conv)) for conv in (cpu_kernels.xla_conv, layers.conv2d))
    with xla_kernel_gradients():
      ours_xla_dw = jax.jit(functools.partial(scanned_conv_steps, layers.conv2d)).lower(x, w).compile()
    # one call per round: XLA's own backward inside a loop takes seconds here
    a, b, c = (statistics.median(timed_ms(f, x, w, reps=1) for _ in range(args.rounds))
               for f in (xla, ours, ours_xla_dw))
    print(f'| {n}, {size}x{size}, {c_in}->{c_out} | {a:.1f} | {b:.1f} | {a / b:.2f} | {c:.1f} | {a / c:.2f} |',
          flush=True)


@contextlib.contextmanager
def xla_kernel_gradients():
  """``conv2d`` computes every kernel gradient with XLA's own rule while tracing inside."""
  saved = cpu_kernels._GEMM_KERNEL_GRAD_MIN_OUT_CHANNELS, cpu_kernels._SHIFTED_KERNEL_GRAD_MIN_IN_CHANNELS
  cpu_kernels._GEMM_KERNEL_GRAD_MIN_OUT_CHANNELS = cpu_kernels._SHIFTED_KERNEL_GRAD_MIN_IN_CHANNELS = math.inf
  try:
    yield
  finally:
    cpu_kernels._GEMM_KERNEL_GRAD_MIN_OUT_CHANNELS, cpu_kernels._SHIFTED_KERNEL_GRAD_MIN_IN_CHANNELS = saved


def bn_section(args, key):
  print('\nbatch norm (train mode) forward + backward\n'
        '| shape (N, HxW, C) | autodiff ms | closed form ms | ratio |\n|---|---|---|---|')
  for n, size, c in BN_SHAPES:
    n = args.batch or n
    x = jax.random.normal(key, (1, n, size, size, c))
    r = jax.random.normal(jax.random.fold_in(key, 1), x.shape)
    autodiff = jax.jit(jax.grad(functools.partial(bn_loss, lambda x: cpu_kernels._normalize_fwd(x, 1e-5)[0], r)))
    closed = jax.jit(jax.grad(functools.partial(bn_loss, lambda x: cpu_kernels.normalize_with_batch_stats(x, 1e-5), r)))
    a = statistics.median(timed_ms(autodiff, x) for _ in range(args.rounds))
    b = statistics.median(timed_ms(closed, x) for _ in range(args.rounds))
    print(f'| {n}, {size}x{size}, {c} | {a:.1f} | {b:.1f} | {a / b:.2f} |', flush=True)


def scanned_conv_steps(conv, x, w):
  """SCAN_LENGTH gradient steps on the kernel of sum(conv(x, w)²) plus dx, inside a ``lax.scan``."""
  def step(w, _):
    dx, dw = jax.grad(lambda x, w: jnp.sum(conv(x, w, 1, 1) ** 2), (0, 1))(x, w)
    return w - 1e-6 * dw, jnp.sum(dx)
  return jax.lax.scan(step, w, None, length=SCAN_LENGTH)


def bn_loss(normalize, r, x):
  """A loss using every output of a batch normalisation (x̂, μ, σ²), as the BN-statistics terms do."""
  x_hat, mean, var = normalize(x)
  return jnp.sum(x_hat * r) + jnp.sum(mean ** 2) + jnp.sum(var ** 2)


if __name__ == '__main__':
  main()
