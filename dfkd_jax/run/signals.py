"""Stop signals: SIGTERM (preemption) and SIGINT (Ctrl-C) during a run."""
from __future__ import annotations

import signal

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

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
