"""Each generator-adversarial method runs a few fused iterations on a tiny config: metrics are
finite, generator and student change, the teacher does not, and the step is traced once."""

import jax
import numpy as np
import pytest

from config_files import load_config
from conftest import compilations
from dfkd_jax import methods
from dfkd_jax.run import parallel
from dfkd_jax.run.job import compile_job


@pytest.mark.slow
@pytest.mark.parametrize('name', ['dafl_mnist', 'zskt_mnist', 'dfad_mnist', 'dfq_mnist'])
def test_method_iterations(name):
  config = load_config(name)
  config.batch_size = 8
  mesh = parallel.make_mesh(2)
  job = methods.get(config.method).make_job(config, mesh)
  init, step, _ = compile_job(job, mesh, jax.random.key(0))
  state = init(jax.random.key(0))
  before = jax.device_get(state)
  frozen = jax.device_put(job.frozen, parallel.replicated(mesh))
  teacher_before = jax.device_get(frozen)
  for _ in range(3):
    state, metrics = step(state, frozen, jax.random.key(1), None)
  metrics = jax.device_get(metrics)
  assert compilations(step) == 1, 'the iteration was compiled more than once'
  assert int(state['step']) == 3
  assert metrics and all(np.isfinite(v).all() for v in metrics.values()), metrics
  assert 'train/generator_loss' in metrics and 'train/student_loss' in metrics
  after = jax.device_get(state)
  for part in ('generator', 'student'):
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before[part].params, after[part].params)
    assert all(jax.tree.leaves(changed)), f'{part} parameters did not all change'
  for a, b in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(jax.device_get(frozen))):
    np.testing.assert_array_equal(a, b)
