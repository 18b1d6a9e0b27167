"""CMI's feature memory bank: a FIFO of ``size`` feature vectors (CMI: 40,960 rows of the
concatenated [local ‖ global] teacher features of each synthesis call's best iterate), initialised
N(0, 1), on device.

It is a ring buffer with the pool's layout (``dfkd_jax.synth.pool``), so ``add`` and ``size`` are
the pool's. Sampling differs: ``sample`` returns a fixed number of rows without replacement plus a
validity mask, because the reference returns fewer rows while the bank is filling.

Reference (CMI ``MemoryBank.get_data(k)``): once more than ``size`` rows were ever added it returns
k distinct rows from the whole bank; before that, min(k, ptr) distinct rows from the written part
[0, ptr). At the call where exactly ``size`` rows have been added, ptr has wrapped to 0 and it
returns no rows, so that call's cached contrastive term is the mean of an empty set (NaN): its
gradients stay finite (the empty mean contributes none), but every loss is NaN, so ``best_cost >
loss`` never holds and that call stores iterate 0 (the freshly re-initialised generator's images and
their features). Here the bank counts as full from that call on and is sampled whole, and the call
keeps its lowest-loss iterate (a deliberate deviation, one call in 161 at CIFAR sizes); all other
calls match (tests/fixtures/trajectories/cmi_cmi, whose bank is exactly full after its last call).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dfkd_jax.errors import UserError
from dfkd_jax.synth.pool import add, random_order, size

__all__ = ['init', 'add', 'size', 'draw_rows', 'rows', 'sample']


def init(key: jax.Array, capacity: int, dim: int, dtype=jnp.float32) -> dict:
  """An empty bank (nothing counted as filled) of ``capacity`` rows of ``dim`` features, every
  row drawn from N(0, 1) as the reference's ``torch.randn`` initialisation."""
  if capacity < 1:
    raise UserError(f'memory bank size must be >= 1, got {capacity}')
  return {'items': jax.random.normal(key, (capacity, dim), dtype),
          'next': jnp.zeros((), jnp.int32), 'filled': jnp.zeros((), jnp.int32)}


def draw_rows(bank: dict, key: jax.Array, num: int) -> jax.Array:
  """The random part of ``sample``: (num,) int32 distinct rows, uniform without replacement, of
  which the first min(num, filled) are in the filled part (``rows``' mask)."""
  capacity = bank['items'].shape[0]
  if num > capacity:
    raise UserError(f'cannot sample {num} negatives from a memory bank of {capacity} rows; '
                    'lower the number of negatives or raise the bank size')
  return random_order(key, size(bank), capacity)[:num]


def rows(bank: dict, indices: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The bank's rows ``indices`` (``draw_rows``) and a (num,) bool mask of which are real: the
  first min(num, filled). Rows past the mask are padding (other, unfilled rows) that the
  contrastive loss must leave out of both its logits and its mean over cached rows; with no valid
  row it reduces to the current-batch term only, as the reference's first call."""
  return bank['items'][indices], jnp.arange(indices.shape[0]) < size(bank)


def sample(bank: dict, key: jax.Array, num: int) -> tuple[jax.Array, jax.Array]:
  """``num`` distinct rows drawn uniformly without replacement from the filled part, and the mask
  of which are real: ``rows(bank, draw_rows(bank, key, num))``."""
  return rows(bank, draw_rows(bank, key, num))
