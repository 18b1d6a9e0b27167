"""Train states: a Flax ``TrainState`` that also carries BatchNorm statistics."""
from __future__ import annotations

from typing import Any

from flax.training import train_state


class TrainState(train_state.TrainState):
  """``params``, ``opt_state``, ``step`` and the model's ``batch_stats`` (may be empty)."""
  batch_stats: Any = None

  @property
  def variables(self) -> dict:
    """The ``{'params', 'batch_stats'}`` dict that ``apply_fn`` takes."""
    if self.batch_stats:
      return {'params': self.params, 'batch_stats': self.batch_stats}
    return {'params': self.params}
