"""Comparing a replay with the reference's trace.

The error of one array is its maximum absolute deviation relative to the reference's largest
magnitude, ``max|a - r| / max|r|`` (the absolute deviation where the reference is all zeros): one
number per recorded quantity, independent of its scale, and not inflated by entries near zero.
Integer arrays (counters, indices) must match exactly (error 0 or 1).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from dfkd_jax.errors import UserError

TOLERANCE = 1e-4          # per array, for quantities at the end of a chain of updates
SINGLE_PASS_FACTOR = 0.1  # a single forward pass from the initial weights: 1e-5 at the default


def relative_error(actual, expected) -> float:
  """``max|actual - expected| / max|expected|`` (see the module docstring)."""
  a, e = np.asarray(actual), np.asarray(expected)
  if a.shape != e.shape:
    if a.size == e.size:  # (1,) against (), as a reference's scalar may be shaped
      a = a.reshape(e.shape)
    else:
      return float('inf')
  if not np.issubdtype(e.dtype, np.floating):
    return 0.0 if np.array_equal(a, e) else 1.0
  a, e = a.astype(np.float64), e.astype(np.float64)
  if not np.all(np.isfinite(a)):
    return float('inf')
  scale = np.max(np.abs(e)) if e.size else 0.0
  deviation = np.max(np.abs(a - e)) if e.size else 0.0
  return float(deviation / scale) if scale > 0 else float(deviation)


@dataclasses.dataclass
class Compared:
  name: str           # the trace entry
  error: float
  tolerance: float
  shape: tuple

  @property
  def ok(self) -> bool:
    return self.error <= self.tolerance


class Report:
  """Every comparison of a replay, in order; ``tolerance`` for trajectories, a tenth of it for
  single forward passes from the initial weights."""

  def __init__(self, tolerance: float = TOLERANCE):
    if not tolerance > 0:
      raise UserError(f'--tolerance must be > 0, got {tolerance}')
    self.tolerance = tolerance
    self.compared: list[Compared] = []
    self.not_compared: list[tuple[str, str]] = []

  def check(self, name: str, actual, expected, *, single_pass: bool = False) -> Compared:
    tolerance = self.tolerance * (SINGLE_PASS_FACTOR if single_pass else 1.0)
    result = Compared(name, relative_error(actual, expected), tolerance, tuple(np.shape(expected)))
    self.compared.append(result)
    return result

  def skip(self, name: str, why: str) -> None:
    """A recorded quantity this replay does not compare, and why (printed with the report)."""
    self.not_compared.append((name, why))

  @property
  def failures(self) -> list[Compared]:
    return [c for c in self.compared if not c.ok]

  @property
  def worst(self) -> float:
    return max((c.error for c in self.compared), default=0.0)

  @property
  def ok(self) -> bool:
    return bool(self.compared) and not self.failures

  def lines(self) -> list[str]:
    """One line per deviating quantity, the quantities not compared (grouped by reason), and the
    final line ``N quantities compared, worst relative error E``."""
    out = [f'{c.name}: relative error {c.error:.3g} > tolerance {c.tolerance:.3g}' for c in self.failures]
    reasons: dict[str, list[str]] = {}
    for name, why in self.not_compared:
      reasons.setdefault(why, []).append(name)
    for why, names in reasons.items():
      out.append(f'not compared ({len(names)}): {why}')
    out.append(f'{len(self.compared)} quantities compared, worst relative error {self.worst:.3g}')
    return out
