"""Replays of the Huawei little-data methods' reference trajectories (DFND, pu_compress) and the
1/16-width CIFAR ResNets they record."""
import os

import numpy as np
import pytest
from replays import TRAJECTORIES, replayed

from dfkd_jax.convert import api, identify
from dfkd_jax.replay import compare, fixture, harness


def lines(report) -> str:
  return '\n'.join(report.lines())


@pytest.mark.parametrize('model, arch', [('teacher', 'resnet34'), ('student', 'resnet18')])
def test_narrow_resnet_width_is_read_off_the_shapes_and_computes_the_recorded_logits(model, arch):
  # The fixtures' ResNets have 1/16 of the channels (stem and stages 4, 8, 16, 32): the converter
  # reads width=4 off the shapes, and the converted network gives the reference's logits.
  loaded = fixture.load(os.path.join(TRAJECTORIES, 'dfnd'))
  converted = api.convert_state_dict(loaded.init_state_dict(model), arch)
  assert (converted.model_kwargs['width'], converted.num_classes) == (4, 10)
  train = model == 'student'  # the student's recorded forward is in train mode (batch statistics)
  logits = converted.model.apply(converted.variables, harness.nhwc(loaded.expected('it0_images')), train=train,
                                 mutable=['batch_stats'] if train else False)
  logits = logits[0] if train else logits
  expected = loaded.expected(f'it0_{model}_logits')
  assert compare.relative_error(np.asarray(logits), expected) < compare.TOLERANCE * compare.SINGLE_PASS_FACTOR


@pytest.mark.slow
def test_narrow_resnet_is_identified_without_an_arch():
  state_dict = fixture.load(os.path.join(TRAJECTORIES, 'dfnd')).init_state_dict('teacher')
  assert [(fit.arch, fit.kwargs['width']) for fit in identify.identify(state_dict)] == [('resnet34', 4)]


@pytest.mark.slow
def test_dfnd():
  report = replayed('dfnd')
  assert report.ok, lines(report)
  # dfkd_jax's default normalises the pool as the teacher's data; the reference uses ImageNet's constants.
  report = replayed('dfnd', pool_normalization='teacher')
  assert not report.ok, lines(report)


@pytest.mark.slow
def test_pu():
  report = replayed('pu')
  assert report.ok, lines(report)
