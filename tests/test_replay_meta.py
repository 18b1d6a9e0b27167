"""Trajectories recorded from the reference code of Fast (zju-vipa/Fast-Datafree
``FastMetaSynthesizer``), NAYER (tmtuan1307/NAYER) and CuDFKD (ljrprocc/DataFree
``ProbSynthesizer``), replayed through dfkd_jax's production methods
(``dfkd_jax.replay.adapters.fast``, ``nayer``, ``cudfkd``).

NAYER replays with ``nayer.reference_student_train_mode=True`` (the reference's second batch of
an epoch runs the student's adversarial forward in train mode); dfkd_jax's default, eval mode, must
not match.
"""
from __future__ import annotations

import pytest
from replays import assert_matched, replayed, replayed_default

NOT_PINNED = ('the trajectory leaves the reference where float32 rounding decides the outcome (Adam steps of '
              'size lr on gradients at rounding level, 8-bit pool codes); docs/fidelity.md, '
              '"What the trajectories cannot pin down"')
# What must match in each fixture: everything before the first rounding-decided update.
MATCHED = {
    # the warm-up call (its meta-optimiser moments matched at 0.44 of the tolerance here: left out,
    # too close to hold on every CPU)
    'fast_meta': r'it0_(g\d+_|hooks/|student/|best_step|adv_on|reset_l0_fired)',
    # the first step of each epoch's first batch, from a re-created generator (its second step follows
    # an Adam step on a weight whose gradient's sign rounding decides: docs/fidelity.md)
    'nayer': r'it\d+_l0_(g0_|targets$)',
    'cudfkd': r'it0_(g1_|generator/)',  # the first epoch's generator steps (g0's adversarial KL: see docs)
}


@pytest.fixture(params=sorted(MATCHED))
def fixture_report(request):
  return request.param, replayed_default(request.param)


@pytest.mark.slow
def test_the_steps_before_rounding_decides_match_the_reference(fixture_report):
  name, report = fixture_report
  assert_matched(report, MATCHED[name], 10)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=NOT_PINNED)
def test_the_whole_trajectory_matches_the_reference(fixture_report):
  _, report = fixture_report
  assert report.ok, '\n'.join(report.lines())


@pytest.mark.slow
def test_nayer_student_mode_follows_the_reference_only_with_its_flag():
  mode = lambda r: next(c for c in r.compared if c.name == 'it1_l1_g0_student_train_mode')
  assert mode(replayed_default('nayer')).ok
  assert not mode(replayed('nayer', **{'nayer.reference_student_train_mode': False})).ok
