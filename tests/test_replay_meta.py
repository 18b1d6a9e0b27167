"""Trajectories recorded from the reference code of Fast (zju-vipa/Fast-Datafree
``FastMetaSynthesizer``), NAYER (tmtuan1307/NAYER) and CuDFKD (ljrprocc/DataFree
``ProbSynthesizer``), replayed through dfkd_jax's production methods
(``dfkd_jax.replay.adapters.fast``, ``nayer``, ``cudfkd``).

NAYER replays with ``nayer.reference_student_train_mode=True`` (the reference's second batch of
an epoch runs the student's adversarial forward in train mode); dfkd_jax's default, eval mode, must
not match.
"""
from __future__ import annotations

import os

import pytest

from dfkd_jax.replay.__main__ import replay

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'trajectories')


def _replay(name: str, **overrides):
  return replay(os.path.join(FIXTURES, name), overrides=overrides)


@pytest.mark.slow
def test_fast_meta_trajectory():
  report = _replay('fast_meta')
  assert report.ok, '\n'.join(report.lines())


@pytest.mark.slow
def test_nayer_trajectory():
  report = _replay('nayer')
  assert report.ok, '\n'.join(report.lines())
  default = _replay('nayer', **{'nayer.reference_student_train_mode': False})
  assert not default.ok, "the student's eval-mode forward matched the reference's train-mode one"


@pytest.mark.slow
def test_cudfkd_trajectory():
  report = _replay('cudfkd')
  assert report.ok, '\n'.join(report.lines())
