"""A trajectory fixture folder: settings, initial weights, recorded draws and the reference trace."""
from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

from dfkd_jax.convert import torch_pickle
from dfkd_jax.errors import UserError

REQUIRED = ('config.json', 'draws.npz', 'trace.npz')


@dataclasses.dataclass
class Fixture:
  """One recorded trajectory. ``settings`` is ``config.json``; ``draws`` and ``trace`` map names
  to arrays (``draw_order`` is the order in which the reference consumed the draws)."""
  root: str
  settings: dict
  draws: dict
  draw_order: list
  trace: dict

  @property
  def name(self) -> str:
    return os.path.basename(os.path.normpath(self.root))

  def init_state_dict(self, model: str) -> dict[str, np.ndarray]:
    """``init_<model>.pth``: the reference's initial weights, keyed as in the reference."""
    path = os.path.join(self.root, f'init_{model}.pth')
    if not os.path.isfile(path):
      raise UserError(f'{self.root} has no init_{model}.pth (the initial {model} weights this replay needs)')
    return torch_pickle.load_state_dict(path)

  def has_init(self, model: str) -> bool:
    return os.path.isfile(os.path.join(self.root, f'init_{model}.pth'))

  def draw(self, name: str) -> np.ndarray:
    if name not in self.draws:
      raise UserError(f'{self.root}: draws.npz has no {name!r}, which this replay consumes '
                      f'(it has {_abbreviated(self.draws)})')
    return self.draws[name]

  def expected(self, name: str) -> np.ndarray:
    if name not in self.trace:
      raise UserError(f'{self.root}: trace.npz has no {name!r} (it has {_abbreviated(self.trace)})')
    return self.trace[name]

  def setting(self, *path: str):
    """``settings[path[0]][path[1]]...``, or a one-line error naming the missing field."""
    value = self.settings
    for i, part in enumerate(path):
      if not isinstance(value, dict) or part not in value:
        raise UserError(f"{self.root}/config.json has no {'.'.join(path[:i + 1])!r}")
      value = value[part]
    return value

  def iterations(self, prefix: str = 'it') -> int:
    """How many outer iterations the trace records (``it<k>_...`` names)."""
    found = {int(m.group(1)) for name in self.trace if (m := re.match(rf'{prefix}(\d+)_', name))}
    return max(found) + 1 if found else 0

  def substeps(self, iteration: int, tag: str) -> int:
    """How many sub-steps ``it<iteration>_<tag><j>_...`` the trace records (e.g. tag 'g', 's')."""
    found = {int(m.group(1)) for name in self.trace if (m := re.match(rf'it{iteration}_{tag}(\d+)_', name))}
    return max(found) + 1 if found else 0

  def entries(self, prefix: str) -> dict[str, np.ndarray]:
    """Trace entries ``<prefix>/<key>`` as ``{key: array}`` (a recorded state_dict)."""
    return {name[len(prefix) + 1:]: value for name, value in self.trace.items() if name.startswith(prefix + '/')}


def _abbreviated(arrays: dict, limit: int = 8) -> str:
  names = sorted(arrays)
  return ', '.join(names[:limit]) + (f', ... ({len(names)} in all)' if len(names) > limit else '')


def _npz(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    raise UserError(f'{path} is not a readable .npz file ({e})') from None


def load(root: str | os.PathLike) -> Fixture:
  """The fixture in folder ``root``; a one-line ``UserError`` when it is not one."""
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise UserError(f'{root} is not a folder (a trajectory fixture is a folder holding {", ".join(REQUIRED)})')
  missing = [f for f in REQUIRED if not os.path.isfile(os.path.join(root, f))]
  if missing:
    raise UserError(f'{root} is not a trajectory fixture: it has no {", ".join(missing)}')
  try:
    with open(os.path.join(root, 'config.json')) as f:
      settings = json.load(f)
  except ValueError as e:
    raise UserError(f'{root}/config.json is not valid JSON ({e})') from None
  draws = _npz(os.path.join(root, 'draws.npz'))
  order = [str(n) for n in draws.pop('draw_order', np.array([], dtype=str)).tolist()]
  return Fixture(root, settings, draws, order, _npz(os.path.join(root, 'trace.npz')))
