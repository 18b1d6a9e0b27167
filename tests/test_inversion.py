"""The inversion engine (``engines/inversion.py``) and its methods (DeepInversion, CMI).

- The engine, on a toy synthesizer whose losses are a hand-written table: the inner loop is one
  ``lax.scan`` traced independently of ``g_steps`` and the iteration compiled once; the best
  iterate is the first lowest loss across stages (NaN never wins); the kept images reach the pool;
  ``warmup_epochs`` skips the kd phase.
- DeepInversion's ``best`` flags on one inner step: ``last`` keeps the initial pixels moved by
  exactly Adam's first step, ``lowest_loss`` the initial pixels; the removed ``post_step`` names
  ``last`` (the references' final iterate; the cmi_deepinv trajectory replay shows it reproduces them).
- Each method runs 3 fused iterations of its MNIST ``runlocal`` config on 2 devices: finite
  metrics, student, pool (and CMI's head and bank) change, the teacher does not, one compilation.
- A CMI run stopped by SIGTERM and resumed ends bitwise equal to an uninterrupted one (student,
  pool, memory bank, projection head).
- Hand values of what is new here: the masked contrastive loss, NVlabs' cosine-with-warm-up
  learning rate, BN and named-input taps from one forward, ``pool.latest``, the projection head.
"""
from __future__ import annotations

import math
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_loop import assert_bitwise_equal, compile_once, load_config, restore_arrays, stop_at  # noqa: F401

from conftest import compilations
from dfkd_jax import data, losses, methods
from dfkd_jax.engines import common, inversion
from dfkd_jax.errors import UserError
from dfkd_jax.methods import cmi, deepinv
from dfkd_jax.models import hooks
from dfkd_jax.run import parallel
from dfkd_jax.run.job import compile_job
from dfkd_jax.synth import pool
from dfkd_jax.train import train_and_evaluate


def small_config(name='deepinv_mnist', **overrides):
  return load_config(name, **{'eval.data': '', **overrides})

def assert_resume_after_sigterm_is_bitwise(name, tmp_path, monkeypatch, parts):
  """``name``'s runlocal config (4 calls, a checkpoint after each), run whole and, separately,
  stopped by SIGTERM during call 1 and resumed: the resumed run's final state holds every one of
  ``parts`` (checkpoint key prefixes) and equals the whole run's bit for bit. Returns the resumed
  run's workdir."""
  config = small_config(name, **{'mesh.num_devices': 1, 'report.phase_timing_reps': 0, 'checkpoint.every_steps': 1})
  full = str(tmp_path / 'full')
  train_and_evaluate(config, full)
  workdir = str(tmp_path / 'resumed')
  stop_at(monkeypatch, 1)
  summary = train_and_evaluate(config, workdir)
  assert summary.stopped_by_signal == signal.SIGTERM and summary.values['steps'] == 2
  monkeypatch.undo()
  summary = train_and_evaluate(config, workdir)
  assert summary.values['finished'] is True
  final = restore_arrays(workdir, 4)
  for part in parts:
    assert any(k.startswith(part) for k in final), part
  assert_bitwise_equal(final, restore_arrays(full, 4))
  return workdir



def compile_and_init(job, mesh):
  init, iteration, _ = compile_job(job, mesh, jax.random.key(0))
  return init(jax.random.key(0)), iteration, jax.device_put(job.frozen, parallel.replicated(mesh))

def run_method_iterations(config, count: int, metric_keys):
  """``config``'s job on a 2-device mesh for ``count`` iterations: compiled once, every metric
  finite and ``metric_keys`` among them, the teacher's variables untouched. Returns the state before
  and after and the last iteration's metrics, on the host."""
  mesh = parallel.make_mesh(2)
  job = methods.get(config.method).make_job(config, mesh)
  state, iteration, frozen = compile_and_init(job, mesh)
  before, teacher_before = jax.device_get(state), jax.device_get(frozen)
  for _ in range(count):
    state, metrics = iteration(state, frozen, jax.random.key(1), None)
  assert compilations(iteration) == 1, 'the iteration was compiled more than once'
  metrics, after = jax.device_get(metrics), jax.device_get(state)
  assert metrics and all(np.isfinite(v).all() for v in metrics.values()), metrics
  for key in metric_keys:
    assert key in metrics, key
  for a, b in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(jax.device_get(frozen))):
    np.testing.assert_array_equal(a, b)
  return before, after, metrics



# ------------------------------------------------------------------------------------------------
# The engine on a toy synthesizer
# ------------------------------------------------------------------------------------------------

LOSSES = [5.0, 3.0, 4.0, math.nan, 3.0, 2.5, 2.5, 9.0]  # the first 2.5 (step 5) is the best


def toy_synthesizer(config, traces, stage_steps):
  """Inner step k (counted across stages) has loss LOSSES[k] and candidate images filled with
  (k + 1) / 10; the method state counts steps, and the stages entered (from the carry)."""
  batch, shape = config.synthesis_batch_size, (32, 32, 1)

  def step(carry, method_state, ctx, key):
    traces.append(1)
    k = carry['k']
    images = jnp.full((batch,) + shape, (k + 1) / 10, jnp.float32)
    return inversion.Step(dict(carry, k=k + 1), dict(method_state, steps=method_state['steps'] + 1),
                          jnp.asarray(LOSSES)[k], {'images': images}, {'train/k': k})

  def finish(carry, method_state, best, ctx):
    return dict(method_state, stages=carry['stages']), best['images']

  stages = [inversion.Stage(n, step, enter=lambda c: dict(c, stages=c['stages'] + 1)) for n in stage_steps]
  zero = jnp.zeros((), jnp.int32)
  return inversion.Synthesizer(init=lambda key: {'steps': zero, 'stages': zero},
                               begin=lambda m, ctx, key: {'k': zero, 'stages': zero}, stages=stages, finish=finish)


def toy_job(stage_steps, traces, **overrides):
  config = small_config(**{'pool.dtype': 'float32', **overrides})
  mesh = parallel.make_mesh(1)
  s = common.setup(config, mesh)
  return inversion.make_job(config, mesh, s, toy_synthesizer(config, traces, stage_steps)), mesh, config


@pytest.mark.slow
@pytest.mark.parametrize('stage_steps', [(8,), (3, 5)])
def test_best_iterate_is_the_first_lowest_loss_and_reaches_the_pool(stage_steps):
  traces = []
  job, mesh, config = toy_job(stage_steps, traces)
  state, iteration, frozen = compile_and_init(job, mesh)
  state, metrics = iteration(state, frozen, jax.random.key(1), None)
  batch = config.synthesis_batch_size
  assert float(metrics['train/best_synthesis_loss']) == 2.5
  assert int(metrics['train/k']) == 7  # the last step's metrics
  assert int(state['method']['steps']) == 8 and int(state['method']['stages']) == len(stage_steps)
  assert int(pool.size(state['pool'])) == batch
  np.testing.assert_array_equal(pool.latest(state['pool'], batch), np.full((batch, 32, 32, 1), 0.6, np.float32))


@pytest.mark.slow
def test_inner_loop_is_one_scan_compiled_once():
  counts = {}
  for g_steps in (2, 8):
    traces = []
    job, mesh, _ = toy_job((g_steps,), traces)
    state, iteration, frozen = compile_and_init(job, mesh)
    for _ in range(3):
      state, _ = iteration(state, frozen, jax.random.key(1), None)
    assert compilations(iteration) == 1, 'the iteration was compiled more than once'
    counts[g_steps] = len(traces)
  # The step is traced a fixed number of times (shape inference + the scan body), whatever g_steps.
  assert counts[2] == counts[8] <= 3, counts


@pytest.mark.slow
def test_warmup_epochs_skip_distillation():
  job, mesh, config = toy_job((2,), [], warmup_epochs=1)  # runlocal: 2 iterations per epoch
  state, iteration, frozen = compile_and_init(job, mesh)
  student0 = jax.device_get(state['student'].params)
  for i in range(3):
    state, _ = iteration(state, frozen, jax.random.key(1), None)
    changed = any(jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), student0,
                                               jax.device_get(state['student'].params))))
    assert changed == (i == 2), f'iteration {i}: epoch {i // config.iters_per_epoch}'
    assert int(state['student'].step) == (config.kd_steps if i == 2 else 0)
  assert int(pool.size(state['pool'])) == 3 * config.synthesis_batch_size  # synthesis ran every time


# ------------------------------------------------------------------------------------------------
# DeepInversion: which iterate is kept
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_deepinversion_best_flags_on_one_step():
  kept = {}
  for best in ('lowest_loss', 'last'):
    config = small_config(**{'pool.dtype': 'float32', 'g_steps': 1, 'deepinv.best': best})
    mesh = parallel.make_mesh(1)
    job = deepinv.make_job(config, mesh)
    state, _, frozen = compile_and_init(job, mesh)
    synth = jax.jit(lambda s, f, k: job.phases[0](s, f, k, None))
    state, _ = synth(state, frozen, jax.random.key(3))
    kept[best] = np.asarray(pool.latest(state['pool'], config.synthesis_batch_size))
  # One step: 'lowest_loss' keeps the initial pixels (the loss is evaluated before the update),
  # 'last' the stepped and clipped ones (the clip to the valid pixel range is the pool's to [0, 1]).
  # Adam's first step moves every pixel by lr·g/(|g| + eps) = ±lr (normalised), ±lr·std in [0, 1].
  inside = (kept['lowest_loss'] > 0) & (kept['lowest_loss'] < 1) & (kept['last'] > 0) & (kept['last'] < 1)
  assert inside.mean() > 0.2
  step = np.abs(kept['last'] - kept['lowest_loss'])[inside]
  np.testing.assert_allclose(step, config.optimizer_g.lr * 0.3081, rtol=2e-2)  # eps = 1e-8 against small |g|
  np.testing.assert_allclose(np.median(step), config.optimizer_g.lr * 0.3081, rtol=1e-4)


def test_deepinversion_post_step_names_the_reproducing_flag():
  config = small_config(**{'deepinv.best': 'post_step'})
  with pytest.raises(UserError, match="deepinv.best='last'"):
    deepinv.make_job(config, parallel.make_mesh(1))


def test_cosine_with_warmup_hand_values():
  lr = deepinv.cosine_with_warmup(1.0, 2, 6)
  expected = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]
  np.testing.assert_allclose([float(lr(k)) for k in range(6)], expected, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Each method: 3 fused iterations
# ------------------------------------------------------------------------------------------------

def _changed(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: not np.array_equal(x, y), a, b)))


@pytest.mark.slow
@pytest.mark.parametrize('name', ['deepinv_mnist', 'cmi_mnist'])
def test_method_iterations(name):
  config = small_config(name)
  before, after, metrics = run_method_iterations(
      config, 3, ('train/synthesis_loss', 'train/best_synthesis_loss', 'train/student_loss', 'train/loss_bn'))
  assert int(after['step']) == 3 and int(metrics['train/pool_size']) == 3 * config.synthesis_batch_size
  assert _changed(before['student'].params, after['student'].params), 'student parameters did not all change'
  assert not np.array_equal(before['pool']['items'], after['pool']['items'])
  if name == 'cmi_mnist':
    assert _changed(before['method']['head'].params, after['method']['head'].params)
    assert int(after['method']['bank']['filled']) == 3 * config.synthesis_batch_size
    assert 'train/loss_cr' in metrics


@pytest.mark.slow
def test_cmi_resume_after_sigterm_is_bitwise(tmp_path, monkeypatch):
  assert_resume_after_sigterm_is_bitwise('cmi_mnist', tmp_path, monkeypatch,
                                         ("['pool']", "['method']['bank']", "['method']['head']", "['student']"))


# ------------------------------------------------------------------------------------------------
# Hand values
# ------------------------------------------------------------------------------------------------

def _contrastive_by_hand(local, global_, tau, num_current, valid):
  """Rows and columns of the invalid cached entries removed, then the reference's split mean."""
  keep = np.concatenate([np.ones(num_current, bool), valid])
  logits = local[keep] @ global_[keep].T / tau
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  per_row = -np.diagonal(log_p)
  cached = per_row[num_current:]
  return per_row[:num_current].mean() + (cached.mean() if cached.size else 0.0)


@pytest.mark.parametrize('valid', [[True, True, True], [True, False, True], [False, False, False]])
def test_masked_contrastive_loss_hand_values(valid):
  rng = np.random.default_rng(0)
  local, global_ = (rng.normal(size=(5, 4)).astype(np.float32) for _ in range(2))
  valid = np.asarray(valid)
  got = losses.cmi_contrastive_loss(local, global_, temperature=0.5, num_current=2, cached_valid=jnp.asarray(valid))
  np.testing.assert_allclose(got, _contrastive_by_hand(local, global_, 0.5, 2, valid), rtol=1e-5)
  if valid.all():
    np.testing.assert_allclose(got, losses.cmi_contrastive_loss(local, global_, temperature=0.5, num_current=2),
                               rtol=1e-6)
  grad = jax.grad(lambda loc: losses.cmi_contrastive_loss(loc, global_, temperature=0.5, num_current=2,
                                                        cached_valid=jnp.asarray(valid)))(jnp.asarray(local))
  assert np.isfinite(grad).all()
  np.testing.assert_array_equal(grad[2:][~valid], 0.0)  # invalid rows get no gradient


@pytest.mark.slow
def test_bn_and_input_taps_from_one_forward():
  from dfkd_jax import models
  model = models.create('resnet8', num_classes=10, in_channels=1)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 1))
  variables = model.init(jax.random.key(1), x, train=False)
  logits, bn, named = hooks.apply_with_bn_and_input_taps(model, variables, x, ['layer1', 'layer3', 'layer2.0.bn1'])
  logits_bn, bn_alone = hooks.apply_with_bn_taps(model, variables, x, train=False)
  _, named_alone = hooks.apply_with_input_taps(model, variables, x, ['layer1', 'layer3', 'layer2.0.bn1'])
  np.testing.assert_array_equal(logits, logits_bn)
  assert [t.name for t in bn] == [t.name for t in bn_alone] and [t.name for t in named] == [t.name for t in named_alone]
  for a, b in zip(jax.tree.leaves((bn, named)), jax.tree.leaves((bn_alone, named_alone))):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_pool_latest_returns_the_newest_items_oldest_first():
  p = pool.init(4, (1,), jnp.float32)
  p = pool.add(p, jnp.asarray([[1.0], [2.0], [3.0]]))
  p = pool.add(p, jnp.asarray([[4.0], [5.0]]))  # wraps: slots hold 5, 2, 3, 4
  np.testing.assert_array_equal(pool.latest(p, 3)[:, 0], [3.0, 4.0, 5.0])


def test_projection_head_rows_are_unit_vectors():
  head = cmi.ProjectionHead(hidden=6, features=3)
  f = jax.random.normal(jax.random.key(0), (5, 6))
  params = head.init(jax.random.key(1), f)['params']
  assert sorted(params) == ['head.0', 'head.2'] and params['head.0']['kernel'].shape == (6, 6)
  np.testing.assert_allclose(np.linalg.norm(head.apply({'params': params}, f), axis=1), 1.0, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Teacher logits cached in the pool
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('views', [0, 2])
def test_cached_teacher_logits_are_the_teacher_on_the_stored_images(views):
  """``pool.teacher_logits``: each pool entry's logits are the teacher's on that entry as the
  student reads it, and the student trains as with a teacher forward per step; with
  ``pool.insert_views`` K the pool holds K augmented views of each image."""
  overrides = {'pool.insert_views': views} if views else {'kd_augment.crop_padding': 0, 'kd_augment.flip': False}
  runs = {}
  for cached in (False, True):
    config = small_config(**overrides, **{'pool.teacher_logits': cached})
    mesh = parallel.make_mesh(1)
    job = deepinv.make_job(config, mesh)
    state, iteration, frozen = compile_and_init(job, mesh)
    for _ in range(2):
      state, _ = iteration(state, frozen, jax.random.key(1), None)
    runs[cached] = jax.device_get(state)
  cached = runs[True]
  filled = int(pool.size(cached['pool']))
  assert filled == 2 * max(views, 1) * config.synthesis_batch_size and int(pool.size(cached['pool_logits'])) == filled
  entries = pool.read(cached['pool'], jnp.arange(filled))
  teacher = common.setup(config, mesh).teacher
  expected = teacher.model.apply(frozen['teacher'], data.normalize(entries, config.dataset), train=False)
  np.testing.assert_allclose(pool.read(cached['pool_logits'], jnp.arange(filled)), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(cached['pool']['items'], runs[False]['pool']['items'])
  if views:  # two views of one image: the same pixels shifted by at most 2 x crop_padding, away from the borders
    batch, pad = config.synthesis_batch_size, config.kd_augment.crop_padding
    first, second = np.asarray(entries[:batch]), np.asarray(entries[batch:2 * batch])
    assert not np.array_equal(first, second)
    inner = slice(2 * pad, 32 - 2 * pad)
    for a, b in zip(first, second):
      assert any(np.array_equal(a[inner, inner], np.roll(b, (dy, dx), (0, 1))[inner, inner])
                 for dy in range(-2 * pad, 2 * pad + 1) for dx in range(-2 * pad, 2 * pad + 1))
  # The same targets up to float rounding (the teacher ran on other batch sizes): the same student.
  for a, b in zip(jax.tree.leaves(cached['student'].params), jax.tree.leaves(runs[False]['student'].params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_cached_teacher_logits_need_unaugmented_reads():
  config = small_config(**{'pool.teacher_logits': True})  # crop-pad 2 read augmentation on
  with pytest.raises(UserError, match='kd_augment'):
    deepinv.make_job(config, parallel.make_mesh(1))
  with pytest.raises(UserError, match='insert_views'):
    deepinv.make_job(small_config(**{'pool.insert_views': -1}), parallel.make_mesh(1))
