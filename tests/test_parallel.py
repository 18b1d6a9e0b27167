"""Data-parallel execution on 8 fake CPU devices (tests/conftest.py) gives the results of 1 device.

For each method family (one row of ``CASES``; a new method adds a row), the job of its
``:runlocal`` config is compiled by ``compile_job`` on a 1-device and on an 8-device mesh and
runs ``ITERATIONS`` iterations from the same initial state; every metric of every iteration and
the change of every part of the state (generator, student, ...: parameters, BatchNorm statistics,
optimiser state) must agree within float32 rounding:

- metrics: elementwise, relative error <= ``METRICS_RTOL``;
- state: per part and collection, the normwise relative error of the change over the run,
  ||Δ8 − Δ1|| / ||Δ1|| <= ``STATE_RTOL``; integer leaves (step counters, the uint8 replay pool)
  exactly.

Measured on the development machine: metrics within about 2e-6, state within about 6e-5 (the
largest: DFAD's generator with FSDP; 1e-7 to 2e-5 elsewhere). A sharding mistake (statistics over
the wrong slice, noise or batches in another order, a loss averaged per device) shows up at 1e-3
and above.

The rows use SGD for every model, with learning rates small enough that two iterations stay
where rounding differences are not amplified by the dynamics. Adam divides each gradient
entry by its running magnitude, so an entry whose gradient is at rounding level (a conv bias
followed by BatchNorm has zero gradient in exact arithmetic) moves by about ±lr whatever its sign
noise says: two float32 runs that only sum in a different order (1 vs 8 devices) then part by up
to lr on such entries, which no float32 tolerance covers. SGD keeps each update proportional to
its gradient, so the comparison measures what sharding can change: losses, gradients, BatchNorm
statistics, latent noise, batches and their order. (Adam itself is elementwise and replicated.)

Variants in the table: ``mesh.batch_norm='per_device'`` on 8 devices against 1 device computing
BatchNorm statistics over 8 slices of the batch; ``mesh.fsdp_min_mb`` splitting the state and the
teacher over the 8 devices. Checkpoints written on 8 devices restore on 1 and 2, with and without
FSDP. Compiles are shared through a persistent compilation cache in a temporary directory, and the
1- and 8-device runs of a row are compiled concurrently (XLA compiles on its own thread).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import PartitionSpec as P

import config_files
from dfkd_jax import methods
from dfkd_jax.engines import common
from dfkd_jax.errors import UserError
from dfkd_jax.models import bn_groups, layers
from dfkd_jax.run import checkpoint as ckpt_lib
from dfkd_jax.run import parallel
from dfkd_jax.run.job import Job, compile_job, device_batch, frozen_sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERATIONS = 2
METRICS_RTOL = 1e-5
STATE_RTOL = 2e-4
_CACHE_OPTIONS = {'jax_compilation_cache_dir': None, 'jax_persistent_cache_min_compile_time_secs': 0.0,
                  'jax_persistent_cache_min_entry_size_bytes': 0}


@dataclasses.dataclass(frozen=True)
class Case:
  """A method's ``:runlocal`` config with ``overrides`` (dotted keys), run on 1 and 8 devices.

  mesh: ``config.mesh`` fields of the 8-device run. With ``batch_norm='per_device'`` the 1-device
  reference computes BatchNorm statistics over 8 slices of the batch, which is what the 8 devices
  must reproduce.
  """
  config: str
  overrides: dict
  mesh: dict = dataclasses.field(default_factory=dict)

  @property
  def id(self) -> str:
    return '-'.join([self.config] + [f'{k}={v}' for k, v in self.mesh.items()])


def sgd(*optimizers: str) -> dict:
  """Overrides making ``optimizers`` (config fields) SGD with momentum, keeping their rates."""
  return {f'{name}.{field}': value for name in optimizers for field, value in (('name', 'sgd'), ('momentum', 0.9))}


# The generator-adversarial engine (engines/generative.py) runs DAFL, ZSKT, DFAD and DFQ: the rows
# cover its student batches ('reuse': DAFL; 'fresh': DFAD) and the mesh options; the methods differ
# only in their losses.
GAN = {'batch_size': 16, **sgd('optimizer_g', 'optimizer_s'), 'optimizer_g.lr': 0.01, 'kd_steps': 2}
CASES = [
    Case('teacher_lenet5_mnist', {'batch_size': 16, **sgd('optimizer'), 'optimizer.lr': 0.05}),
    Case('dafl_mnist', GAN),
    Case('dafl_mnist', GAN, mesh={'batch_norm': 'per_device'}),
    Case('dfad_mnist', GAN, mesh={'fsdp_min_mb': 0.01}),  # splits most arrays, the teacher's too
    # The inversion engine; its synthesis optimiser (Adam on the pixels) is the method's own.
    Case('deepinv_mnist', {'batch_size': 16, 'synthesis_batch_size': 16, **sgd('optimizer_s'),
                           'optimizer_s.lr': 1e-4}),
]


@pytest.fixture(scope='module', autouse=True)
def compile_once(tmp_path_factory):
  saved = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
  compilation_cache.reset_cache()
  for name, value in dict(_CACHE_OPTIONS, jax_compilation_cache_dir=str(tmp_path_factory.mktemp('xla'))).items():
    jax.config.update(name, value)
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


def case_config(case: Case, mesh_fields: dict):
  mesh_overrides = {f'mesh.{k}': v for k, v in mesh_fields.items()}
  return config_files.load_config(case.config, **dict(case.overrides, **mesh_overrides))


@dataclasses.dataclass
class Run:
  """A job compiled on a mesh, and what ``ITERATIONS`` iterations gave."""
  job: Job
  mesh: Any
  state_sharding: Any
  initial: Any = None
  final: Any = None
  metrics: list = dataclasses.field(default_factory=list)


def place(values, shardings):
  """Host ``values`` into the tree of ``shardings`` (same leaves; the static parts of the
  shardings' tree, e.g. a TrainState's apply_fn, are the ones of the job being run)."""
  return jax.tree.unflatten(jax.tree.structure(shardings),
                            [jax.device_put(v, s) for v, s in zip(jax.tree.leaves(values), jax.tree.leaves(shardings))])


def run(case: Case, num_devices: int, initial=None) -> Run:
  """``ITERATIONS`` iterations of ``case`` on the first ``num_devices`` devices, from ``initial``
  (host arrays) or from the job's own initialisation."""
  mesh_fields = case.mesh if num_devices > 1 else {}
  config = case_config(case, mesh_fields)
  mesh = parallel.make_mesh(num_devices)
  job = methods.get(config.method).make_job(config, mesh)
  if num_devices == 1 and case.mesh.get('batch_norm') == 'per_device':
    job = dataclasses.replace(job, phases=parallel.with_batch_norm(job.phases, 8))
  init, iteration, state_sharding = compile_job(job, mesh, jax.random.key(0), mesh_config=config.mesh)
  result = Run(job, mesh, state_sharding)
  state = init(jax.random.key(0)) if initial is None else place(initial, state_sharding)
  result.initial = jax.device_get(state)
  frozen = jax.device_put(job.frozen, frozen_sharding(job, mesh, config.mesh))
  for step in range(ITERATIONS):
    batch = device_batch(job, step, parallel.data_sharded(mesh))
    state, metrics = iteration(state, frozen, jax.random.key(1), batch)
    result.metrics.append(jax.device_get(metrics))
  result.final = state
  return result


_RUNS: dict[str, tuple[Run, Run]] = {}


def runs(case: Case) -> tuple[Run, Run]:
  """(1-device run, 8-device run) of ``case``, computed once per module. The 8-device run starts
  from the 1-device run's initial state (initialisation itself is compared in
  ``test_initialisation_is_the_same_on_8_devices``); both are compiled concurrently."""
  if case.id not in _RUNS:
    config = case_config(case, {})
    mesh = parallel.make_mesh(1)
    job = methods.get(config.method).make_job(config, mesh)
    init, _, _ = compile_job(job, mesh, jax.random.key(0), mesh_config=config.mesh)
    initial = jax.device_get(init(jax.random.key(0)))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      one, eight = pool.map(lambda n: run(case, n, initial), (1, 8))
    _RUNS[case.id] = one, eight
  return _RUNS[case.id]


def flat(tree) -> dict:
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
          jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def assert_same_run(one: Run, eight: Run):
  assert len(one.metrics) == len(eight.metrics) == ITERATIONS
  for step, (m1, m8) in enumerate(zip(one.metrics, eight.metrics)):
    assert m1.keys() == m8.keys()
    for name in m1:
      np.testing.assert_allclose(m8[name], m1[name], rtol=METRICS_RTOL, atol=0,
                                 err_msg=f'{name} at iteration {step}')
  initial, final1, final8 = flat(one.initial), flat(one.final), flat(eight.final)
  assert final1.keys() == final8.keys()
  groups: dict[str, list] = {}
  for key, start in initial.items():
    if not np.issubdtype(start.dtype, np.floating):
      np.testing.assert_array_equal(final8[key], final1[key], err_msg=key)
      continue
    # Group by part and collection: "['student'].params", "['generator'].batch_stats", ...
    group = key.split(']')[0] + ']' + key.split(']')[1].split('[')[0]
    delta1 = final1[key].astype(np.float64) - start
    delta8 = final8[key].astype(np.float64) - start
    err, ref = groups.setdefault(group, [0.0, 0.0])
    groups[group] = [err + np.sum((delta8 - delta1) ** 2), ref + np.sum(delta1 ** 2)]
  for group, (err, ref) in groups.items():
    assert ref > 0, f'{group} did not change: nothing is compared'
    assert np.sqrt(err) <= STATE_RTOL * np.sqrt(ref), f'{group}: normwise relative error {np.sqrt(err / ref):.2e}'


@pytest.mark.slow
@pytest.mark.parametrize('case', CASES, ids=lambda c: c.id)
def test_eight_devices_give_the_results_of_one(case):
  one, eight = runs(case)
  assert_same_run(one, eight)
  assert all(s.mesh.devices.size == 8 for s in jax.tree.leaves(eight.state_sharding))
  for leaf in jax.tree.leaves(eight.final):
    assert leaf.sharding.mesh.devices.size == 8
  if case.mesh.get('fsdp_min_mb'):
    def is_split(sharding):
      return parallel.DATA_AXIS in tuple(sharding.spec)
    for part in ('generator', 'student'):
      assert any(is_split(leaf.sharding) for leaf in jax.tree.leaves(eight.final[part])), f'no {part} array split'
    frozen = frozen_sharding(eight.job, eight.mesh, case.mesh)
    assert any(is_split(s) for s in jax.tree.leaves(frozen)), 'no teacher array split'
  else:
    assert all(leaf.sharding.spec == P() for leaf in jax.tree.leaves(eight.final))


@pytest.mark.slow
def test_per_device_batch_norm_differs_from_global():
  """The per-device row is not trivially equal to the global one: the generator's statistics and
  what follows from them differ."""
  (_, global8), (_, per_device8) = runs(CASES[1]), runs(CASES[2])
  assert not np.allclose(global8.metrics[0]['train/generator_loss'], per_device8.metrics[0]['train/generator_loss'],
                         rtol=1e-3)


@pytest.mark.slow
def test_initialisation_is_the_same_on_8_devices():
  case = CASES[0]
  one, _ = runs(case)
  config = case_config(case, {})
  mesh = parallel.make_mesh(8)
  job = methods.get(config.method).make_job(config, mesh)
  init, _, _ = compile_job(job, mesh, jax.random.key(0), mesh_config=config.mesh)
  initial8, initial1 = flat(init(jax.random.key(0))), flat(one.initial)
  for key, value in initial1.items():
    np.testing.assert_array_equal(initial8[key], value, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize('fsdp_min_mb', [0.0, 0.01])
@pytest.mark.parametrize('restore_devices', [1, 2])
def test_checkpoint_from_8_devices_restores_on_fewer(tmp_path, fsdp_min_mb, restore_devices):
  _, eight = runs(CASES[1])
  written = place(jax.device_get(eight.final), parallel.array_shardings(eight.final, eight.mesh, fsdp_min_mb))
  writer = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  writer.save(ITERATIONS, written, {'written_on': 8}, force=True)
  writer.close()

  mesh = parallel.make_mesh(restore_devices)
  shardings = parallel.array_shardings(eight.final, mesh, fsdp_min_mb)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), written, shardings)
  reader = ckpt_lib.Checkpointer(str(tmp_path))
  restored, step = reader.restore_latest(target)
  reader.close()
  assert step == ITERATIONS
  expected = flat(eight.final)
  for key, value in flat(restored).items():
    assert value.tobytes() == expected[key].tobytes(), key
  for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
    assert leaf.sharding == sharding


# --- the pieces -------------------------------------------------------------------------------

def test_latent_noise_is_drawn_sharded_and_equal_to_unsharded():
  mesh = parallel.make_mesh(8)
  draw = jax.jit(lambda key: common.latent(key, (16, 100), mesh))
  z = draw(jax.random.key(3))
  assert z.sharding.spec == P(parallel.DATA_AXIS) and z.addressable_shards[0].data.shape == (2, 100)
  np.testing.assert_array_equal(np.asarray(z), np.asarray(jax.random.normal(jax.random.key(3), (16, 100))))


def test_array_shardings_split_large_arrays_along_their_largest_divisible_dimension():
  mesh = parallel.make_mesh(8)
  tree = {'big': jnp.zeros((3, 16, 24)), 'odd': jnp.zeros((3, 5, 7, 9, 11)), 'small': jnp.zeros((8,)),
          'abstract': jax.ShapeDtypeStruct((40, 8), jnp.float32)}
  specs = {k: s.spec for k, s in parallel.array_shardings(tree, mesh, fsdp_min_mb=1e-3).items()}
  assert specs == {'big': P(None, None, 'data'), 'odd': P(), 'small': P(), 'abstract': P('data', None)}
  assert all(s.spec == P() for s in jax.tree.leaves(parallel.array_shardings(tree, mesh, 0.0)))


@pytest.mark.parametrize('groups', [1, 4])
def test_batch_norm_per_slice_statistics(groups):
  """Each slice is normalised with its own biased statistics; the running statistics follow the
  first slice with torch's unbiased variance (DDP and DataParallel keep device 0's buffers)."""
  x = jax.random.normal(jax.random.key(0), (8, 3, 3, 2)) * jnp.arange(1, 9)[:, None, None, None]
  bn = layers.BatchNorm(use_running_average=False, momentum=0.9, affine=False)
  variables = bn.init(jax.random.key(1), x)
  with bn_groups.batch_stat_groups(groups):
    y, updates = bn.apply(variables, x, mutable=['batch_stats'])
  xs = np.asarray(x, np.float64).reshape(groups, 8 // groups, 3, 3, 2)
  mean, var = xs.mean((1, 2, 3), keepdims=True), xs.var((1, 2, 3), keepdims=True)
  np.testing.assert_allclose(y, ((xs - mean) / np.sqrt(var + 1e-5)).reshape(x.shape), rtol=1e-5, atol=1e-5)
  n = xs[0].size // 2
  np.testing.assert_allclose(updates['batch_stats']['mean'], 0.1 * mean[0].ravel(), rtol=1e-5)
  np.testing.assert_allclose(updates['batch_stats']['var'], 0.9 + 0.1 * var[0].ravel() * n / (n - 1), rtol=1e-5)


def test_bad_mesh_config_is_a_one_line_error():
  mesh = parallel.make_mesh(8)
  with pytest.raises(UserError, match="mesh.batch_norm must be one of global, per_device, not 'sync'"):
    parallel.batch_norm_groups('sync', mesh)
  with pytest.raises(UserError, match='mesh.num_devices=9 but 8 devices are available'):
    parallel.make_mesh(9)
  with pytest.raises(UserError, match='batch_size=20 is not divisible by the 8 devices of the mesh: '
                                      'use batch_size=16 or 24'):
    parallel.check_batch(20, mesh, 'batch_size')
  bn = layers.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), jnp.zeros((6, 2)))
  with bn_groups.batch_stat_groups(4), pytest.raises(UserError, match='a batch of 6, which does not split into 4'):
    bn.apply(variables, jnp.zeros((6, 2)), mutable=['batch_stats'])


def test_default_eval_batch_is_rounded_up_to_the_device_count():
  from dfkd_jax.run import evaluation
  mesh = parallel.make_mesh(8)
  assert parallel.round_up_batch(500, mesh) == 504 and evaluation.local_batch_size(500, mesh) == 504
  assert parallel.round_up_batch(64, mesh) == 64
