"""One module per method. Each exposes ``make_job(config, mesh)``, which returns a
``dfkd_jax.run.job.Job`` or, for a job of several stages, ``dfkd_jax.run.job.Stages``."""
from __future__ import annotations

import importlib

from dfkd_jax.errors import UserError

METHODS = ('supervised', 'dafl', 'zskt', 'dfad', 'dfq', 'deepinv', 'cmi', 'fast', 'cudfkd', 'nayer', 'pu', 'dfnd',
           'dfsr', 'sr_supervised', 'ssdkd')


def get(name: str):
  """The module of method ``name``."""
  if name not in METHODS:
    raise UserError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
  return importlib.import_module(f'dfkd_jax.methods.{name}')
