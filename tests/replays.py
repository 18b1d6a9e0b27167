"""What the replay tests share: replaying a committed reference trajectory (``dfkd_jax.replay``)
and asserting the named part of it that float32 rounding cannot move (docs/fidelity.md)."""
from __future__ import annotations

import functools
import os
import re

from dfkd_jax.replay.__main__ import replay

TRAJECTORIES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'trajectories')


def replayed(name: str, **overrides):
  """The replay report of fixture ``name`` with config ``overrides``."""
  return replay(os.path.join(TRAJECTORIES, name), overrides=overrides)


@functools.lru_cache(maxsize=None)
def replayed_default(name: str):
  """``replayed(name)``, computed once per test process (several tests read the same replay)."""
  return replayed(name)


def assert_matched(report, pattern: str, minimum: int):
  """Every compared quantity whose name matches ``pattern`` (at least ``minimum`` of them) is
  within the replay's tolerance."""
  checked = [c for c in report.compared if re.match(pattern, c.name)]
  assert len(checked) >= minimum, f'only {len(checked)} quantities match {pattern!r}'
  assert all(c.ok for c in checked), '\n'.join(f'{c.name}: {c.error:.3g}' for c in checked if not c.ok)
