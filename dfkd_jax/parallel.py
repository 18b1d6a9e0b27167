"""The device mesh and shardings: every step runs data-parallel on a 1-D ``data`` mesh.

State and frozen variables are replicated; batches and latent noise are split along their first
axis. With ``jax.sharding.AxisType.Auto`` no mesh context is needed anywhere.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dfkd_jax.errors import UserError

DATA_AXIS = 'data'


def make_mesh(num_devices: int = -1) -> jax.sharding.Mesh:
  """A 1-D ``data`` mesh over the first ``num_devices`` devices (-1: all of them)."""
  devices = jax.devices()
  n = len(devices) if num_devices in (-1, None) else num_devices
  if not 1 <= n <= len(devices):
    raise UserError(f'mesh.num_devices={num_devices} but {len(devices)} devices are available')
  return jax.sharding.Mesh(np.asarray(devices[:n]), (DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh) -> NamedSharding:
  """Splits the leading (batch) axis over the ``data`` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch(batch_size: int, mesh, name: str) -> None:
  """A global batch must split evenly over the devices; says which numbers to change if not."""
  n = mesh.devices.size
  if batch_size % n:
    lower, upper = (batch_size // n) * n, (batch_size // n + 1) * n
    choices = f'{lower} or {upper}' if lower else f'{upper}'
    raise UserError(f'{name}={batch_size} is not divisible by the {n} devices of the mesh: '
                    f'use {name}={choices}, or --config.mesh.num_devices=<a divisor of {batch_size}>')
