"""The fixtures' rule for initial weights too large to store: a state_dict made from its keys and
shapes alone (numpy), as ``tests/fixtures/weights_rule.py`` defines it (``tests/test_replay_generative.py``
checks that the two agree). A fixture's ``config.json`` lists the keys and shapes, and the base
seed the recording used.

Each entry draws from its own generator, seeded by the CRC-32 of its key XOR the base seed:
BN running variances 0.5 + U(0, 1), running means 0.1·N(0, 1), BN scales 1 + 0.1·N(0, 1), other
vectors 0.1·N(0, 1), weights N(0, 2/fan_in); ``num_batches_tracked`` is 100.
"""
from __future__ import annotations

import zlib
from typing import Iterable, Sequence

import numpy as np

DEFAULT_BASE_SEED = 20261122


def _entry(key: str, shape: tuple, is_bn_scale: bool, base_seed: int) -> np.ndarray:
  rng = np.random.default_rng(zlib.crc32(key.encode()) ^ base_seed)
  leaf = key.rsplit('.', 1)[-1]
  if leaf == 'num_batches_tracked':
    return np.array(100, dtype=np.int64)
  if leaf == 'running_var':
    value = 0.5 + rng.uniform(0.0, 1.0, shape)
  elif leaf == 'running_mean':
    value = 0.1 * rng.standard_normal(shape)
  elif is_bn_scale:
    value = 1.0 + 0.1 * rng.standard_normal(shape)
  elif len(shape) <= 1:
    value = 0.1 * rng.standard_normal(shape)
  else:
    value = rng.standard_normal(shape) * np.sqrt(2.0 / int(np.prod(shape[1:])))
  return value.astype(np.float32)


def state_dict(keys_and_shapes: Iterable[tuple[str, Sequence[int]]],
               base_seed: int = DEFAULT_BASE_SEED) -> dict[str, np.ndarray]:
  """``{key: array}`` for ``[(key, shape), ...]`` in the given order. A normalisation layer's
  scale is its ``X.weight`` where ``X.running_mean`` is listed too."""
  entries = [(str(k), tuple(int(d) for d in s)) for k, s in keys_and_shapes]
  keys = {k for k, _ in entries}
  bn_scales = {k.removesuffix('running_mean') + 'weight' for k in keys if k.endswith('running_mean')} & keys
  return {k: _entry(k, s, k in bn_scales, base_seed) for k, s in entries}
