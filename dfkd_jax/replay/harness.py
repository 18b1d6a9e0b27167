"""What every replay adapter shares: the method's job on one CPU device, its phases' ``apply``
compiled, models in and out of the reference's key names and layouts, and comparisons of whole
recorded state_dicts."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np

from dfkd_jax.convert import api, naming
from dfkd_jax.errors import UserError
from dfkd_jax.replay.compare import Report
from dfkd_jax.replay.fixture import Fixture
from dfkd_jax.run import parallel
from dfkd_jax.run.job import Job

# torch buffers no update of dfkd_jax reads or keeps (Flax's BatchNorm has no step counter; every
# reference BN here uses a fixed momentum, so torch's counter changes nothing it computes).
UNTRACKED_SUFFIXES = ('num_batches_tracked',)


def with_overrides(config, overrides: Mapping[str, Any]):
  """``config`` with each dotted-path field set (``{'kd.reference_temperature_bug': False}``), as
  ``--config.a.b=value`` sets it; an unknown field is a one-line error."""
  for path, value in (overrides or {}).items():
    *parents, leaf = path.split('.')
    node = config
    for i, parent in enumerate(parents):
      if parent not in node:
        raise UserError(f"override {path}: the replay's config has no field {'.'.join(parents[:i + 1])!r}")
      node = node[parent]
    if leaf not in node:
      raise UserError(f"override {path}: the replay's config has no field {path!r}")
    node[leaf] = value
  return config


def mesh():
  """One device: the replay compares arithmetic, not sharding."""
  return parallel.make_mesh(1)


def phase_applies(job: Job) -> dict[str, Callable]:
  """``{phase name: jitted apply(state, frozen, draws, batch)}`` of ``job``: the production arithmetic
  of each phase, fed recorded draws instead of its own ``draw``."""
  return {phase.name: jax.jit(phase.apply) for phase in job.phases}


def variables(arch: str, state_dict: Mapping[str, np.ndarray], num_classes: int | None = None,
              **model_kwargs) -> dict:
  """Flax variables of ``arch`` from a reference state_dict (reference key names and layouts)."""
  return api.convert_state_dict(state_dict, arch, num_classes, model_kwargs or None,
                                what='the fixture weights').variables


def state_dict(arch: str, variables_: Any, **model_kwargs) -> dict[str, np.ndarray]:
  """The reference state_dict of ``arch``'s Flax variables (canonical reference names)."""
  return dict(api.to_state_dict(arch, jax.device_get(variables_), model_kwargs or None))


def nhwc(x) -> np.ndarray:
  """A reference NCHW image batch in dfkd_jax's NHWC."""
  x = np.asarray(x)
  return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x


def nchw(x) -> np.ndarray:
  """dfkd_jax's NHWC images in the reference's NCHW."""
  x = np.asarray(x)
  return x.transpose(0, 3, 1, 2) if x.ndim == 4 else x


def check_state_dict(report: Report, fixture: Fixture, prefix: str, actual: Mapping[str, np.ndarray],
                     layout: Any = None) -> None:
  """Compares every recorded ``<prefix>/<key>`` of the trace with ``actual`` (reference names; with
  ``layout``, the architecture's alternative namings are matched too). A recorded key ``actual``
  lacks is a failure, except torch's untracked BN counters (listed as not compared)."""
  recorded = fixture.entries(prefix)
  if not recorded:
    report.check(f'{prefix}/*', np.array([np.inf]), np.zeros(1))  # the trace lacks what the adapter expects
    return
  if layout is not None:
    canonical = {next(iter(naming.canonical_keys({k: None}, layout))): k for k in recorded}
    actual = {canonical.get(k, k): v for k, v in actual.items()}
  for key, expected in recorded.items():
    name = f'{prefix}/{key}'
    if key in actual:
      report.check(name, actual[key], expected)
    elif key.endswith(UNTRACKED_SUFFIXES):
      report.skip(name, 'torch BatchNorm num_batches_tracked (no dfkd_jax update reads it)')
    else:
      report.check(name, np.full(np.shape(expected), np.inf), expected)
