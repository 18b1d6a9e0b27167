"""Stop signals: SIGTERM (preemption) and SIGINT (Ctrl-C) during a run."""
from __future__ import annotations

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

from dfkd_jax.errors import StopRequested


class StopSignals:
  """SIGTERM (preemption) and SIGINT (Ctrl-C). Until ``training`` is set they stop the run at once
  (``StopRequested`` / ``KeyboardInterrupt``: nothing new exists to save); then they ask the loop
  to checkpoint the current step and stop."""

  def __init__(self):
    self.received = None
    self.training = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. some test runners): no handler
        pass
    return self

  def _handle(self, signum, frame):
    if not self.training:
      raise KeyboardInterrupt if signum == signal.SIGINT else StopRequested(signum)
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.received = signum

  def agreed(self) -> int | None:
    """The signal every process stops on after this step, the same in all of them: with several
    processes, the largest signal any of them has received (a tiny all-gather of each one's flag,
    called by all at every step). A process acting on its own flag alone would enter the collective
    checkpoint save while the others enter the next step's collectives: a deadlock. One process
    pays nothing."""
    if jax.process_count() == 1:
      return self.received
    flags = multihost_utils.process_allgather(np.int32(self.received or 0))
    return int(np.max(flags)) or None

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
