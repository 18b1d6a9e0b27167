"""Trajectories recorded from zju-vipa/CMI's own code (tests/fixtures/trajectories/cmi_deepinv,
cmi_cmi: ``DeepInvSyntheiszer`` / ``CMISynthesizer`` then ``datafree_kd.train``) replayed through
dfkd_jax's production DeepInversion and CMI (``dfkd_jax.replay.adapters.cmi_inversion``).

DeepInversion replays with ``deepinv.best='last'`` (the reference keeps its final iterate through
tensor aliasing); dfkd_jax's default, the lowest-loss iterate, must not match.
"""
from __future__ import annotations

import os

import pytest

from dfkd_jax.replay.__main__ import replay

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'trajectories')


def _replay(name: str, **overrides):
  return replay(os.path.join(FIXTURES, name), overrides=overrides)


@pytest.mark.slow
def test_cmi_deepinversion_trajectory():
  report = _replay('cmi_deepinv')
  assert report.ok, '\n'.join(report.lines())
  default = _replay('cmi_deepinv', **{'deepinv.best': 'lowest_loss'})
  assert not default.ok, 'the lowest-loss iterate matched the reference, which keeps the final one'


@pytest.mark.slow
def test_cmi_trajectory():
  report = _replay('cmi_cmi')
  assert report.ok, '\n'.join(report.lines())
