"""The experiment configs in configs/, loaded as the command line loads them, for the tests."""
from __future__ import annotations

import importlib.util
import os

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def load_module(path: str):
  """The config file at ``path`` as a module (its ``get_config``)."""
  spec = importlib.util.spec_from_file_location(f'cfg_{os.path.basename(path)[:-3]}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(name: str, arg: str | None = 'runlocal', **overrides):
  """``configs/<name>.py``'s ``get_config(arg)`` with dotted-path overrides, e.g.
  ``load_config('dafl_mnist', **{'mesh.num_devices': 2})``."""
  return with_overrides(load_module(os.path.join(CONFIGS, f'{name}.py')).get_config(arg), **overrides)


def with_overrides(config, **overrides):
  """``config`` with each dotted-path field set, as ``--config.a.b=value`` sets it."""
  for path, value in overrides.items():
    *parents, leaf = path.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config
