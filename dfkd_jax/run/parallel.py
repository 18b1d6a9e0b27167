"""The device mesh, and where every array of a job lives on it (``config.mesh``).

Every step runs data-parallel on a 1-D ``data`` mesh with ``jax.sharding.AxisType.Auto`` axes, so
no mesh context is needed anywhere: batches and latent noise are split along their first axis over
the devices; the state (generator, student, optimiser states) and the frozen teacher variables are
replicated, except that arrays of at least ``mesh.fsdp_min_mb`` MiB are split too (FSDP / ZeRO-3
style: each device keeps a slice, and XLA gathers the whole array where a step uses it).

``config.mesh`` fields:

  num_devices  -1: every device of every process; N: the first N devices (single-process runs).
  batch_norm   train-mode BatchNorm statistics of the student and generator:
               'global'      over the global batch, whatever the device count (SyncBN semantics;
                             the default: 8 devices give the results of 1 within float rounding);
               'per_device'  over each device's slice of the batch, as each GPU computes them under
                             PyTorch DataParallel/DDP (running statistics follow device 0's slice,
                             as there); results then depend on the device count.
               BN-statistics losses on the teacher (DeepInversion-style) always use the global batch.
  fsdp_min_mb  0: replicate the whole state; > 0: split each array of at least this many MiB over
               the devices along its largest dimension that divides the device count.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dfkd_jax.errors import UserError, check_choice
from dfkd_jax.models.bn_groups import batch_stat_groups

DATA_AXIS = 'data'
BATCH_NORM_MODES = ('global', 'per_device')


def make_mesh(num_devices: int = -1) -> jax.sharding.Mesh:
  """A 1-D ``data`` mesh over the first ``num_devices`` devices (-1: all of them)."""
  devices = jax.devices()
  n = len(devices) if num_devices in (-1, None) else num_devices
  if not 1 <= n <= len(devices):
    raise UserError(f'mesh.num_devices={num_devices} but {len(devices)} devices are available')
  if n < len(devices) and jax.process_count() > 1:
    raise UserError(f'mesh.num_devices={num_devices}: a run over {jax.process_count()} processes uses all '
                    f'{len(devices)} devices (mesh.num_devices=-1)')
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n])


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh) -> NamedSharding:
  """Splits the leading (batch) axis over the ``data`` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def array_shardings(tree: Any, mesh, fsdp_min_mb: float = 0.0) -> Any:
  """A ``NamedSharding`` per array of ``tree`` (arrays or ``jax.ShapeDtypeStruct``s): replicated,
  or, for arrays of at least ``fsdp_min_mb`` MiB (when > 0), split along their largest dimension
  that the device count divides (arrays without one stay replicated)."""
  n = mesh.devices.size

  def sharding(leaf) -> NamedSharding:
    shape = np.shape(leaf)
    nbytes = math.prod(shape) * np.dtype(leaf.dtype).itemsize
    if fsdp_min_mb <= 0 or n == 1 or nbytes < fsdp_min_mb * 2**20:
      return replicated(mesh)
    divisible = [d for d in range(len(shape)) if shape[d] % n == 0]
    if not divisible:
      return replicated(mesh)
    split = max(divisible, key=lambda d: (shape[d], d))  # the largest; the last one on ties
    return NamedSharding(mesh, P(*[DATA_AXIS if d == split else None for d in range(len(shape))]))

  return jax.tree.map(sharding, tree)


def batch_norm_groups(mode: str, mesh) -> int:
  """How many slices of the global batch train-mode BatchNorm takes statistics over."""
  check_choice('mesh.batch_norm', mode, BATCH_NORM_MODES)
  return 1 if mode == 'global' else mesh.devices.size


def with_batch_norm(phases: Sequence, groups: int) -> list:
  """``phases`` (a ``run.job.Job``'s ``Phase`` list) whose train-mode BatchNorm layers take their statistics over
  ``groups`` equal slices of the batch: the batch is split over the devices in order, so with one
  group per device each device normalises its own slice."""
  if groups == 1:
    return list(phases)

  def grouped(fn):
    def phase(*args):
      with batch_stat_groups(groups):  # read while the phase is traced
        return fn(*args)
    return phase

  return [phase._replace(apply=grouped(phase.apply)) for phase in phases]


def check_batch(batch_size: int, mesh, name: str) -> None:
  """A global batch must split evenly over the devices; says which numbers to change if not."""
  n = mesh.devices.size
  if batch_size % n:
    lower, upper = (batch_size // n) * n, (batch_size // n + 1) * n
    choices = f'{lower} or {upper}' if lower else f'{upper}'
    raise UserError(f'{name}={batch_size} is not divisible by the {n} devices of the mesh: '
                    f'use {name}={choices}, or --config.mesh.num_devices=<a divisor of {batch_size}>')


def round_up_batch(batch_size: int, mesh) -> int:
  """The smallest multiple of the device count that is at least ``batch_size``: evaluation pads
  its batches, so it can take any requested size this way."""
  n = mesh.devices.size
  return -(-batch_size // n) * n
