"""One replay adapter per reference family. An adapter module defines

  describe: str                      what it replays (reference, methods), for error messages
  matches(fixture) -> bool           whether it reads this fixture (from config.json, not the
                                     folder's name)
  replay(fixture, report, overrides) -> None
                                     builds the dfkd_jax config the fixture's settings mean
                                     (then ``harness.with_overrides(config, overrides)``) and its
                                     job, loads its initial weights into the state, runs its
                                     iterations phase by phase with the recorded draws and checks
                                     every recorded quantity into ``report``; a setting dfkd_jax
                                     does not support is a one-line ``UserError`` naming it
"""
from __future__ import annotations

import importlib

from dfkd_jax.errors import UserError

# adapter modules under dfkd_jax.replay.adapters, tried in order
MODULES = ('cmi_generative', 'huawei_dafl', 'huawei_little_data', 'cmi_inversion', 'fast', 'nayer', 'cudfkd')


def all_adapters() -> list:
  return [importlib.import_module(f'{__name__}.{name}') for name in MODULES]


def find(fixture):
  """The adapter that reads ``fixture``, or a one-line ``UserError`` naming what the fixture
  records and what dfkd_jax replays."""
  found = [a for a in all_adapters() if a.matches(fixture)]
  if not found:
    reference = fixture.settings.get('reference') or fixture.settings.get('reference_repo') or 'an unknown reference'
    method = fixture.settings.get('method_flag') or fixture.settings.get('method') or fixture.settings.get('script', '')
    known = '; '.join(a.describe for a in all_adapters()) or 'none yet'
    raise UserError(f'{fixture.root}: no replay for {reference} {method}'.rstrip()
                    + f' (dfkd_jax replays: {known})')
  return found[0]
