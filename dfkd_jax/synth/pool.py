"""Replay pool of synthesised images: a bounded FIFO ring buffer held as a dict of arrays.

Layout: ``{'items': (capacity, *item_shape), 'next': int32 slot of the next write, 'filled':
int32 number of slots holding data}``. Slots fill from 0 upwards, so the filled part is always
``items[:filled]``. The ring operations here (``add``, ``size``, ``random_order``) are shared with
CMI's feature memory bank (``dfkd_jax.synth.bank``).

The references keep every synthesised image forever (CMI-fw ``ImagePool`` writes one PNG per image
and re-reads the whole folder). With static shapes that is ``capacity`` = every image the run will
ever synthesise (synthesis batch × synthesis calls, plus any pre-inverted images added first); a
smaller capacity keeps a window of the most recent images. There is no host-held variant: at
CIFAR size a full CMI/Fast run's pool is 51,200–56,320 images, 157–173 MB as uint8 (replicated on
each device); ImageNet-size pools (150 KB per image) would need one.

Storage dtype ``uint8`` reproduces the references' lossy PNG round trip: ``quantize`` on write
(clamp to [0, 1], ×255 in float32, truncate to uint8, as ``(x.clamp(0, 1).numpy() * 255)
.astype('uint8')``) and ``dequantize`` on read (code / 255 in float32, as ``ToTensor``). PNG itself
is lossless, so this is the whole round trip. A float storage dtype keeps images as they are.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfkd_jax.errors import UserError

# code / 255 for every uint8 code, computed once in IEEE float32 on the host so that decoding is
# a table lookup and bit-identical on every backend.
_DECODE_TABLE = np.arange(256, dtype=np.float32) / np.float32(255)


def quantize(images: jax.Array) -> jax.Array:
  """uint8 codes trunc(clip(x, 0, 1) · 255), the references' PNG encoding."""
  return (jnp.clip(images.astype(jnp.float32), 0.0, 1.0) * 255.0).astype(jnp.uint8)


def dequantize(codes: jax.Array) -> jax.Array:
  """float32 code / 255, what ``ToTensor`` gives for a decoded 8-bit PNG."""
  return jnp.asarray(_DECODE_TABLE)[codes]


def init(capacity: int, item_shape: Sequence[int], dtype=jnp.float32) -> dict:
  """An empty pool of ``capacity`` items of ``item_shape`` (e.g. (H, W, C)) stored as ``dtype``
  (``jnp.uint8``: quantised as the references' PNG pool)."""
  if capacity < 1:
    raise UserError(f'pool capacity must be >= 1, got {capacity}')
  return {'items': jnp.zeros((capacity, *item_shape), dtype),
          'next': jnp.zeros((), jnp.int32), 'filled': jnp.zeros((), jnp.int32)}


def size(pool: dict) -> jax.Array:
  """Number of items held (int32), at most the capacity."""
  return pool['filled']


def add(pool: dict, items: jax.Array) -> dict:
  """Appends ``items`` (n, *item_shape) in order, overwriting the oldest items once full (FIFO).
  If n exceeds the capacity only the newest ``capacity`` items are kept."""
  stored = pool['items']
  capacity, count = stored.shape[0], items.shape[0]
  if items.shape[1:] != stored.shape[1:]:
    raise ValueError(f'items of shape {items.shape[1:]} do not fit a pool of {stored.shape[1:]}')
  encoded = _encode(items, stored.dtype)
  first = pool['next']
  if count > capacity:
    encoded, first = encoded[count - capacity:], (first + count - capacity) % capacity
  slots = (first + jnp.arange(encoded.shape[0])) % capacity
  return {'items': stored.at[slots].set(encoded, unique_indices=True),
          'next': (pool['next'] + count) % capacity,
          'filled': jnp.minimum(pool['filled'] + count, capacity)}


def _encode(items: jax.Array, dtype) -> jax.Array:
  return quantize(items) if dtype == jnp.uint8 else items.astype(dtype)


def _decode(stored: jax.Array) -> jax.Array:
  return dequantize(stored) if stored.dtype == jnp.uint8 else stored


def round_trip(pool: dict, items: jax.Array) -> jax.Array:
  """What reading ``items`` back from ``pool`` gives once added (e.g. the uint8 round trip)."""
  return _decode(_encode(items, pool['items'].dtype))


def read(pool: dict, indices: jax.Array) -> jax.Array:
  """The items in slots ``indices`` (float32 in [0, 1] for a uint8 pool)."""
  return _decode(pool['items'][indices])


def sample_indices(pool: dict, key: jax.Array, shape: Sequence[int]) -> jax.Array:
  """int32 slots of ``shape`` drawn uniformly **with replacement** from the filled part (slot 0
  for an empty pool)."""
  return jax.random.randint(key, tuple(shape), 0, jnp.maximum(size(pool), 1))


def sample(pool: dict, key: jax.Array, batch: int) -> jax.Array:
  """``batch`` items drawn uniformly **with replacement** from the filled part (float32 in [0, 1]
  for a uint8 pool). An empty pool returns its initial zeros."""
  return read(pool, sample_indices(pool, key, (batch,)))


def latest(pool: dict, num: int) -> jax.Array:
  """The ``num`` most recently added items, oldest first (float32 in [0, 1] for a uint8 pool), for
  sample grids; slots never written read as their initial zeros."""
  capacity = pool['items'].shape[0]
  return read(pool, (pool['next'] - num + jnp.arange(num)) % capacity)


def random_order(key: jax.Array, filled: jax.Array, capacity: int) -> jax.Array:
  """(capacity,) int32 slot indices whose first ``filled`` entries are a uniformly random
  permutation of [0, filled) (the rest are the empty slots)."""
  bits = jax.random.bits(key, (capacity,), jnp.uint32)
  # Empty slots get the largest key; a stable sort keeps any filled slot that drew it (lower
  # index) ahead of them. Ties among filled slots (about n²/2³³ pairs) fall back to index order.
  keys = jnp.where(jnp.arange(capacity) < filled, bits, jnp.uint32(jnp.iinfo(jnp.uint32).max))
  return jnp.argsort(keys, stable=True).astype(jnp.int32)


def epoch_indices(pool: dict, key: jax.Array, start: jax.Array, batch: int) -> jax.Array:
  """Slots of positions ``start .. start + batch - 1`` of a stream that visits the filled items
  in a fresh random order every epoch (epoch e = position // filled, its order
  ``random_order(fold_in(key, e), ...)``): sampling **without replacement** within an epoch,
  like the references' ``DataLoader(shuffle=True)`` re-created after each synthesis call (pass a
  new ``key`` per call and ``start`` = items drawn since). Unlike that loader (no
  ``drop_last``), a batch that crosses an epoch boundary continues into the next epoch instead of
  being short."""
  capacity = pool['items'].shape[0]
  filled = jnp.maximum(size(pool), 1)
  position = start + jnp.arange(batch)
  epoch, offset = position // filled, position % filled

  def take_epoch(e, indices):
    order = random_order(jax.random.fold_in(key, e), filled, capacity)
    return jnp.where(epoch == e, order[offset], indices)

  # One pass per epoch the batch touches: one or two unless the pool is smaller than a batch.
  return jax.lax.fori_loop(epoch[0], epoch[-1] + 1, take_epoch, jnp.zeros((batch,), jnp.int32))
