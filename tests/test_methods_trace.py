"""The methods whose fused iterations only the slow tier runs (the generator-adversarial ones, teacher
training), at small scale for the fast tier: the job builds from the method's runlocal config, and its
iteration, evaluated on abstract values (``jax.eval_shape``: every Python line of the step runs, XLA compiles
nothing), maps the state to a state of the same shapes and dtypes, as the donated loop state needs."""
import jax
import pytest
from test_methods import load_config

from dfkd_jax import methods
from dfkd_jax.run import parallel
from dfkd_jax.run.job import compile_job


@pytest.mark.parametrize('name', ['dafl_mnist', 'zskt_mnist', 'dfad_mnist', 'dfq_mnist', 'teacher_lenet5_mnist',
                                  'teacher_vdsr_local'])
def test_iteration_keeps_the_state_shapes(name):
  config = load_config(name)
  mesh = parallel.make_mesh(2)
  job = methods.get(config.method).make_job(config, mesh)
  init, iteration, _ = compile_job(job, mesh, jax.random.key(0))
  state = jax.eval_shape(init, jax.random.key(0))
  batch = None if job.next_batch is None else job.next_batch(0)
  new_state, metrics = jax.eval_shape(iteration, state, job.frozen, jax.random.key(1), batch)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), new_state) == jax.tree.map(lambda a: (a.shape, a.dtype), state)
  assert metrics, 'the iteration reports no metrics'
