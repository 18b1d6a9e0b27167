"""Top-1 accuracy over a whole split: padded batches with a mask, so no example is dropped."""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dfkd_jax import parallel


class EvalSet(NamedTuple):
  """This process's share of a split, preprocessed (float32 NHWC in the teacher's input space),
  padded to whole global batches; ``mask`` is 0 on padding."""
  images: np.ndarray
  labels: np.ndarray
  mask: np.ndarray
  size: int  # real examples in this process's share

  @classmethod
  def build(cls, images: np.ndarray, labels: np.ndarray, local_batch: int) -> 'EvalSet':
    n = len(images)
    padded = -(-max(n, 1) // local_batch) * local_batch
    pad = padded - n
    return cls(np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)]),
               np.concatenate([labels, np.zeros((pad,), labels.dtype)]),
               np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)]), n)


@functools.lru_cache(maxsize=None)
def _correct_count_fn(apply_fn: Callable, out_sharding) -> Callable:
  def count(variables, images, labels, mask):
    logits = apply_fn(variables, images, train=False)
    return jnp.sum((jnp.argmax(logits, -1) == labels) * mask), jnp.sum(mask)
  return jax.jit(count, out_shardings=(out_sharding, out_sharding))


def top1(apply_fn: Callable, variables: Any, eval_set: EvalSet, mesh, global_batch: int) -> float:
  """Top-1 accuracy (in [0, 1]) of ``apply_fn(variables, x, train=False)`` on the whole split.

  Each process feeds its own shard; ``make_array_from_process_local_data`` assembles the global
  batch, and the sums are global.
  """
  local_batch = global_batch // jax.process_count()
  data_sharding = parallel.data_sharded(mesh)
  count = _correct_count_fn(apply_fn, parallel.replicated(mesh))
  correct, total = 0.0, 0.0
  for start in range(0, len(eval_set.images), local_batch):
    sl = slice(start, start + local_batch)
    batch = [jax.make_array_from_process_local_data(data_sharding, a[sl])
             for a in (eval_set.images, eval_set.labels, eval_set.mask)]
    c, t = count(variables, *batch)
    correct, total = correct + c, total + t
  return float(correct) / max(float(total), 1.0)
