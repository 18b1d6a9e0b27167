"""The numerics guard: what the loop does when a loss, a metric or a part of the state becomes
NaN/inf (``config.numerics.on_nonfinite``).

'stop' adds per-part ``finite/<part>`` flags to each step's metrics; the loop holds the metrics on
device (no host sync per step) and checks them before anything derived from that step is logged,
evaluated, checkpointed or exported, so a non-finite state is never saved. 'skip' keeps the
previous state inside the compiled step (a select) and counts the skipped update.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dfkd_jax.errors import UserError

ON_NONFINITE = ('stop', 'skip')
SKIPPED = 'skipped_updates'  # state entry (and train/ metric) counting updates skipped as non-finite
FINITE = 'finite/'  # per-step flags (is each part of the state finite) the loop checks, never logs


def all_finite(tree) -> jax.Array:
  """True if every floating-point value in ``tree`` is finite."""
  checks = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(checks).all() if checks else jnp.array(True)


def parts(state) -> list[str]:
  """The named parts of a state whose finiteness is checked: 'generator', 'student', 'model'..."""
  return [name for name in state if name not in ('step', SKIPPED)]


class NumericalError(UserError):
  """A loss, metric or part of the state became NaN/inf."""
  exit_code = 3


class FiniteGuard:
  """Holds each step's metrics as device values (no host sync per step) until something derived
  from that step's state is about to be kept; ``verify`` then fetches them all and, when checking
  ('stop' mode), raises NumericalError at the first step with a non-finite metric or state part."""

  def __init__(self, check: bool):
    self.check = check
    self.pending = []  # [(step, metrics)], oldest first

  def add(self, step: int, metrics: dict) -> None:
    if not self.check:
      self.pending.clear()  # only the latest metrics are logged
    self.pending.append((step, metrics))

  def verify(self, last_saved: int | None) -> dict:
    """The latest step's metrics on the host (without the ``finite/`` flags)."""
    steps = [step for step, _ in self.pending]
    fetched = jax.device_get([metrics for _, metrics in self.pending])
    self.pending.clear()
    if self.check:
      for step, metrics in zip(steps, fetched):
        _raise_if_nonfinite(step, metrics, last_saved)
    return {name: value for name, value in fetched[-1].items() if not name.startswith(FINITE)}


def _raise_if_nonfinite(step: int, metrics: Mapping[str, Any], last_saved: int | None) -> None:
  terms = [f'{name}={_show(value)}' for name, value in metrics.items()
           if not name.startswith(FINITE) and not np.isfinite(value).all()]
  parts = [name[len(FINITE):] for name, finite in metrics.items() if name.startswith(FINITE) and not finite]
  if not (terms or parts):
    return
  kept = (f'the last good checkpoint (step {last_saved}) is kept' if last_saved is not None else
          'no checkpoint had been saved yet')
  raise NumericalError(
      f"numerical failure at step {step}: {', '.join(terms) if terms else 'every loss is finite'}; "
      f"{'non-finite values in: ' + ', '.join(parts) if parts else 'the state is still finite'}; "
      f'the run stopped without keeping anything of this step and {kept}; lower the learning rate, or '
      f'set --config.numerics.on_nonfinite=skip to skip such updates')


def _show(value) -> str:
  value = np.asarray(value)
  return str(value.item()) if value.ndim == 0 else 'non-finite'
