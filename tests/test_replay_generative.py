"""Replays of the generator-adversarial methods' reference trajectories (``dfkd_jax.replay``):
the CMI framework's GAN baselines (dafl, zskt, dfad, dfq) and the original DAFL (MNIST, CIFAR), one
test per fixture; the reproduce-the-reference temperature flag; the fixtures' weights rule."""
import importlib.util
import json
import os

import numpy as np
import pytest
from replays import TRAJECTORIES, assert_matched, replayed, replayed_default

from dfkd_jax.replay import weights_rule

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')


# What must match in every fixture: the first outer iteration's generator steps (CMI framework:
# it0_g<j>_*; the original DAFL: the forwards, losses and student step of iteration 0). Parameters
# after the first Adam steps are not asserted: which way rounding decides them changes even with the
# XLA build's device count (docs/fidelity.md).
HUAWEI_FIRST = r'it0_(gen_imgs|teacher|loss|student_logits|student/)'
FIRST_ITERATION = {**{name: r'it0_g\d+_' for name in ('cmi_dafl', 'cmi_zskt', 'cmi_dfad', 'cmi_dfq')},
                   'huawei_dafl_mnist': HUAWEI_FIRST, 'huawei_dafl_cifar': HUAWEI_FIRST}


@pytest.fixture(params=sorted(FIRST_ITERATION))
def fixture_report(request):
  return request.param, replayed_default(request.param)


@pytest.mark.slow
def test_the_first_iteration_matches_the_reference(fixture_report):
  """Every recorded forward pass, loss term and update of the first iteration, within tolerance."""
  name, report = fixture_report
  assert_matched(report, FIRST_ITERATION[name], 5)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason='the generator parameters leave the reference trajectory once Adam steps '
                   'on gradients that are float32 rounding noise (biases before train-mode BatchNorm: their exact '
                   'gradient is 0); docs/fidelity.md, "What the trajectories cannot pin down"')
def test_the_whole_trajectory_matches_the_reference(fixture_report):
  _, report = fixture_report
  assert report.ok, '\n'.join(report.lines())


@pytest.mark.slow
@pytest.mark.parametrize('name', ['cmi_dafl', 'cmi_dfq'])
def test_the_temperature_flag_is_what_reproduces_the_cmi_framework(name):
  """The framework's student KD runs at T = 1 whatever --T says (its criterion is overwritten);
  dfkd_jax's default honours T = 20, which the reference trajectory does not follow."""
  first_student_loss = lambda report: next(c for c in report.compared if c.name == 'it0_s0_loss_s')
  assert first_student_loss(replayed_default(name)).ok
  assert not first_student_loss(replayed(name, **{'kd.reference_temperature_bug': False})).ok


def test_weights_rule_is_the_fixtures_rule():
  spec = importlib.util.spec_from_file_location('fixtures_weights_rule', os.path.join(FIXTURES, 'weights_rule.py'))
  reference = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(reference)
  for name in ('huawei_dafl_mnist', 'huawei_dafl_cifar'):
    with open(os.path.join(TRAJECTORIES, name, 'config.json')) as f:
      keys = json.load(f)['generator']['keys']
    expected, actual = reference.make_state_dict(keys), weights_rule.state_dict(keys)
    assert list(actual) == list(expected)
    for key, value in expected.items():
      assert actual[key].dtype == value.dtype and np.array_equal(actual[key], value), key
  # Another base seed gives other weights (a fixture may record one).
  other = weights_rule.state_dict([('w', (3, 4))], base_seed=1)['w']
  assert not np.array_equal(other, weights_rule.state_dict([('w', (3, 4))])['w'])
