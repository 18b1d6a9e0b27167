"""How many equal slices of the batch train-mode ``layers.BatchNorm`` layers take their statistics
over when they don't say (``BatchNorm.stat_groups=None``): a context read when a model is traced,
like Flax's ``logical_axis_rules``. ``dfkd_jax.run.parallel`` sets it for per-device BatchNorm."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

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


def current() -> int:
  """The group count of the innermost ``batch_stat_groups`` context (1, the whole batch, outside any)."""
  return _STAT_GROUPS.get()
