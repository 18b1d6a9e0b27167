"""What a benchmark's CPU can do: the measurements that put a timing against the machine's limit
(FLOPs from XLA's cost analysis, the float32 matmul peak through XLA and PyTorch). Where it ran
(``describe``, ``markdown``, ``machine_key``) is ``dfkd_jax.run.machine``, which every run's
``summary.json`` records too.
"""
from __future__ import annotations

import statistics
import time

from dfkd_jax.run.machine import PACKAGES, VECTOR_FLAGS, describe, machine_key, markdown  # noqa: F401 (re-exported)


def compiled_flops(compiled) -> float:
  """Floating-point operations of one call of a compiled jax program, from XLA's cost analysis
  (``jitted.lower(...).compile()``). jax 0.10 and 0.12 return a dict; older versions a list with a
  dict per program, summed here. XLA counts a while loop's (``lax.scan``'s) body once, whatever
  its trip count: time a loop of n steps against the FLOPs of one step, not of the loop."""
  analysis = compiled.cost_analysis()
  per_program = analysis if isinstance(analysis, (list, tuple)) else [analysis]
  return float(sum((program or {}).get('flops', 0.0) for program in per_program))


def _median_seconds(call, runs: int) -> float:
  call()  # warm-up (compilation, thread pools)
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def jax_matmul_peak_gflops(size: int = 2048, runs: int = 5) -> float:
  """This machine's float32 matmul throughput under XLA:CPU: a jitted size^3 square matmul
  (2 size^3 FLOPs), median of ``runs`` calls, in GFLOP/s: the practical ceiling for the dense
  arithmetic of a training step."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  return 2 * size ** 3 / _median_seconds(lambda: jax.block_until_ready(matmul(a, b)), runs) / 1e9


def torch_matmul_peak_gflops(size: int = 2048, runs: int = 5) -> float:
  """The same float32 matmul peak measured through PyTorch (its own BLAS, its own thread count)."""
  import torch
  a, b = torch.randn(size, size), torch.randn(size, size)
  with torch.no_grad():
    return 2 * size ** 3 / _median_seconds(lambda: torch.mm(a, b), runs) / 1e9
