"""Fast (meta-learned generator), CuDFKD and NAYER on the inversion engine.

- Hand values of the loss terms they use: CuDFKD's batch-mean entropy, the masked adversarial KL
  at T = 3, the self-paced weight, NAYER's soft CE against one-hot targets; the ``bn_mmt`` EMA
  (first call, blend, update).
- Fast's meta step on a hand-built example (one scalar generator parameter, loss (θ − 3)², two
  inner Adam steps written out by hand): FOMAML sums the inner gradients, Reptile takes
  (θ − θ')·67, and one meta Adam step at lr_g × g_steps follows.
- CuDFKD's adversarial-weight ramp and curriculum λ, and its CIFAR configs' values from the pinned
  scripts; NAYER's epoch/re-creation schedule, balanced
  labels, label-embedding file loading and its one-line errors.
- Each method runs 2 fused iterations of its MNIST ``runlocal`` config on 2 devices: finite
  metrics, student, pool and generator change, the teacher does not, one compilation.
- A Fast run stopped by SIGTERM and resumed ends bitwise equal to an uninterrupted one.
"""
from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_inversion import assert_resume_after_sigterm_is_bitwise, compile_and_init, run_method_iterations, small_config
from test_loop import compile_once  # noqa: F401 (the module-scoped autouse fixture)

import config_files
from dfkd_jax import losses, methods, optim
from dfkd_jax.engines import common, inversion_terms
from dfkd_jax.errors import UserError
from dfkd_jax.methods import cudfkd, nayer
from dfkd_jax.run import parallel
from dfkd_jax.synth import meta

# ------------------------------------------------------------------------------------------------
# Loss terms and the bn_mmt EMA
# ------------------------------------------------------------------------------------------------

def test_batch_mean_entropy_hand_values():
  ln3 = math.log(3.0)
  logits = jnp.asarray([[0.0, ln3], [ln3, 0.0]])  # softmax rows (1/4, 3/4), (3/4, 1/4): mean (1/2, 1/2)
  np.testing.assert_allclose(losses.batch_mean_entropy(logits), math.log(2.0), rtol=1e-6)
  # At T = ln 3 the rows become softmax (0, 1) and (1, 0) -> (1/(1+e), e/(1+e)); the mean stays uniform.
  np.testing.assert_allclose(losses.batch_mean_entropy(logits, temperature=ln3), math.log(2.0), rtol=1e-6)
  one = jnp.asarray([[0.0, ln3]])  # a single row: H(1/4, 3/4)
  expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
  np.testing.assert_allclose(losses.batch_mean_entropy(one), expected, rtol=1e-6)


def test_masked_adversarial_kl_at_t3_hand_values():
  teacher = np.asarray([[3.0, 0.0], [0.0, 3.0]])
  student = np.asarray([[1.0, 0.5], [2.0, 0.0]])  # row 0 agrees with the teacher (argmax 0), row 1 not
  p = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()  # softmax(t_0 / 3)
  q = np.exp([1 / 3, 1 / 6]) / np.exp([1 / 3, 1 / 6]).sum()  # softmax(s_0 / 3)
  kl0 = 9.0 * np.sum(p * (np.log(p) - np.log(q)))  # x T² = 9
  got = losses.masked_adversarial_kl(jnp.asarray(student), jnp.asarray(teacher), 3.0)
  np.testing.assert_allclose(got, -kl0 / 2, rtol=1e-5)  # the mean runs over both rows, the masked one included


def test_curriculum_weight_hand_values():
  for loss, lam in [(1.0, 2.0), (0.0, 1.0), (5.0, 2.0)]:
    expected = (1 + math.exp(-lam)) / (1 + math.exp(loss - lam))
    np.testing.assert_allclose(losses.curriculum_weight(jnp.asarray(loss), lam), expected, rtol=1e-6)
  grad = jax.grad(lambda x: losses.curriculum_weight(x, 2.0) * x)(jnp.asarray(1.0))
  np.testing.assert_allclose(grad, (1 + math.exp(-2)) / (1 + math.exp(-1)), rtol=1e-6)  # v is a constant


def test_soft_cross_entropy_against_one_hot_is_cross_entropy():
  logits = jnp.asarray([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
  labels = jnp.asarray([1, 0])
  by_hand = -np.mean([2.0 - np.log(np.exp([1.0, 2.0, 0.5]).sum()), 0.0 - np.log(np.exp([0.0, -1.0, 3.0]).sum())])
  np.testing.assert_allclose(losses.soft_cross_entropy(logits, jax.nn.one_hot(labels, 3)), by_hand, rtol=1e-6)
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), by_hand, rtol=1e-6)


def test_bn_mmt_ema_first_call_blend_and_update():
  view = common.TeacherView(None, [types.SimpleNamespace(mean=jnp.zeros(2), var=jnp.zeros(2))], [], [], None)
  ema = inversion_terms.bn_ema_init(view)
  batch1 = [(jnp.asarray([1.0, 2.0]), jnp.asarray([4.0, 8.0]))]
  # Before any update the batch statistics are compared as they are.
  np.testing.assert_array_equal(inversion_terms.bn_ema_blend(ema, batch1, 0.9)[0][0], [1.0, 2.0])
  ema = inversion_terms.bn_ema_update(ema, batch1, 0.9)  # the first call initialises the EMA
  assert int(ema['count']) == 1
  np.testing.assert_array_equal(ema['mean'][0], [1.0, 2.0])
  np.testing.assert_array_equal(ema['var'][0], [4.0, 8.0])
  batch2 = [(jnp.asarray([11.0, 2.0]), jnp.asarray([14.0, 18.0]))]
  mean, var = inversion_terms.bn_ema_blend(ema, batch2, 0.9)[0]
  np.testing.assert_allclose(mean, [0.1 * 11 + 0.9 * 1, 2.0], rtol=1e-6)
  np.testing.assert_allclose(var, [0.1 * 14 + 0.9 * 4, 0.1 * 18 + 0.9 * 8], rtol=1e-6)
  ema = inversion_terms.bn_ema_update(ema, batch2, 0.9)
  np.testing.assert_allclose(ema['mean'][0], [0.9 * 1 + 0.1 * 11, 2.0], rtol=1e-6)
  np.testing.assert_allclose(ema['var'][0], [0.9 * 4 + 0.1 * 14, 0.9 * 8 + 0.1 * 18], rtol=1e-6)
  # The blend carries gradient to the batch statistics only (x 0.1), none to the EMA.
  g = jax.grad(lambda m: inversion_terms.bn_ema_blend(ema, [(m, batch2[0][1])], 0.9)[0][0].sum())(batch2[0][0])
  np.testing.assert_allclose(g, [0.1, 0.1], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Fast's meta step on a hand-built example
# ------------------------------------------------------------------------------------------------

def _adam_by_hand(theta, grads, lr, b1=0.5, b2=0.999, eps=1e-8):
  """torch Adam on a scalar, one step per gradient of ``grads(theta)``; returns the iterates and
  the gradients seen."""
  m = v = 0.0
  seen = []
  for t in (1, 2):
    g = grads(theta)
    seen.append(g)
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    theta = theta - lr * (m / (1 - b1**t)) / (math.sqrt(v / (1 - b2**t)) + eps)
  return theta, seen


@pytest.mark.parametrize('rule', ['fomaml', 'reptile'])
def test_fast_meta_step_hand_example(rule):
  lr_g, g_steps = 0.1, 2
  tx = optim.torch_adam_groups({'generator': lr_g, 'z': 0.01}, (0.5, 0.999))
  tx_meta = optim.torch_adam(lr_g * g_steps, (0.5, 0.999))
  meta_params = {'w': jnp.asarray(0.0)}
  variables = {'generator': meta_params, 'z': jnp.asarray(1.0)}
  carry = {'variables': variables, 'opt': tx.init(variables),
           'meta_grad': jax.tree.map(jnp.zeros_like, meta_params)}
  objective = lambda v, key: ((v['generator']['w'] - 3.0) ** 2 + 0.0 * v['z'], ())
  for k in range(g_steps):
    carry, _, _ = meta.inner_step(objective, carry, jax.random.key(k), tx, rule)
  fast_w, seen = _adam_by_hand(0.0, lambda w: 2 * (w - 3.0), lr_g)
  np.testing.assert_allclose(seen, [-6.0, 2 * (0.1 - 3.0)], rtol=1e-6)  # Adam's first step moves by lr·sign(g)
  # float32 against the float64 hand computation: 1 − 0.999² rounds to 8e-6 relative in float32.
  np.testing.assert_allclose(carry['variables']['generator']['w'], fast_w, rtol=5e-5)
  grads = meta.meta_gradient(meta_params, carry, rule, 67.0)
  expected = sum(seen) if rule == 'fomaml' else (0.0 - fast_w) * 67.0
  np.testing.assert_allclose(grads['w'], expected, rtol=5e-5)
  opt = tx_meta.init(meta_params)
  new_meta, opt = optim.apply_step(tx_meta, meta_params, opt, grads)
  # The meta Adam's first step: −lr_g·g_steps·sign(grad) (eps aside); its first moment holds (1 − b1)·grad.
  np.testing.assert_allclose(new_meta['w'], -lr_g * g_steps * math.copysign(1, expected), rtol=1e-5)
  np.testing.assert_allclose(opt[0].mu['w'], 0.5 * expected, rtol=5e-5)


# ------------------------------------------------------------------------------------------------
# CuDFKD schedules, NAYER schedule and inputs
# ------------------------------------------------------------------------------------------------

def test_cudfkd_adversarial_ramp_and_curriculum_lambda():
  # 8 epochs, fractions 0.25-0.75: the weight grows after epochs 3, 4, 5 (2 < e < 6).
  got = [float(cudfkd.adv_weight(e, initial=0.5, step=0.2, num_epochs=8, begin_fraction=0.25, end_fraction=0.75))
         for e in range(9)]
  np.testing.assert_allclose(got, [0.5, 0.5, 0.5, 0.5, 0.7, 0.9, 1.1, 1.1, 1.1], rtol=1e-6)
  np.testing.assert_allclose(float(cudfkd.curriculum_lambda(100, lambda_0=2.0, alpha=1e-4)), 2.01, rtol=1e-6)
  np.testing.assert_allclose(float(cudfkd.curriculum_lambda(0, lambda_0=1.0, alpha=2e-5)), 1.0)


@pytest.mark.parametrize('arg,expected', [
    # ljrprocc/DataFree @ bf3096b scripts/cudfkd/: (batch, lr, epochs, adv, grad_adv, begin, end, T, loss,
    # lambda_0, alpha), then the adversarial weight at the end of the ramp.
    ('dataset=cifar10,pair=resnet34-resnet18', ((512, 0.1, 250, 0.0, 0.5, 0.25, 0.75, 20.0, 'l1', 2.0, 1e-4), 62.0)),
    ('dataset=cifar10,pair=wrn40_2-wrn16_1', ((1024, 0.1, 250, 0.5, 0.05, 0.25, 0.75, 20.0, 'kl', 2.0, 1e-4), 6.7)),
    ('dataset=cifar100,pair=vgg11-resnet18', ((768, 0.1, 400, 0.0, 0.35, 0.2, 0.8, 5.0, 'l1', 1.0, 2e-5), 83.65)),
    ('dataset=cifar100,pair=wrn40_2-wrn40_1', ((1024, 0.1, 500, 0.0, 0.12, 0.2, 0.75, 2.0, 'kl', 1.0, 2e-5), 32.88)),
], ids=['c10_r34', 'c10_wrn', 'c100_vgg', 'c100_wrn'])
def test_cudfkd_cifar_configs_follow_the_pinned_scripts(arg, expected):
  """The fidelity audit found values of older script versions (e.g. CIFAR-10 WRN grad_adv 0.2)."""
  settings, final_adv = expected
  c = config_files.load_config('cudfkd_cifar', arg)
  cfg = c.cudfkd
  assert (c.batch_size, c.optimizer_s.lr, c.num_epochs, c.loss.adv, cfg.grad_adv, cfg.begin_fraction,
          cfg.end_fraction, c.kd.temperature, c.kd.loss, cfg.lambda_0, cfg.lambda_alpha) == settings
  assert c.synthesis_batch_size == c.batch_size and cfg.entropy_temperature == c.kd.temperature
  assert c.iters_per_epoch * c.kd_steps == 400  # --ep_steps 400
  ramp = dict(initial=c.loss.adv, step=cfg.grad_adv, num_epochs=c.num_epochs, begin_fraction=cfg.begin_fraction,
              end_fraction=cfg.end_fraction)
  np.testing.assert_allclose(float(cudfkd.adv_weight(c.num_epochs, **ramp)), final_adv, rtol=1e-5)


def test_nayer_schedule_epochs_and_generator_recreation():
  s = nayer.Schedule(warmup_calls=200, warmup_loops=10, loops=2, g_life=10)  # 20 warm-up epochs x 10 batches
  calls = np.asarray([0, 5, 9, 10, 100, 199, 200, 201, 210, 219, 220, 221, 240])
  np.testing.assert_array_equal(s.epoch(calls), [0, 0, 0, 1, 10, 19, 20, 20, 25, 29, 30, 30, 40])
  recreated = [int(c) for c in calls if bool(s.recreate(c))]
  assert recreated == [0, 100, 200, 220, 240]
  with pytest.raises(UserError, match='not a whole number'):
    nayer.Schedule(warmup_calls=15, warmup_loops=10, loops=2, g_life=10)


def test_nayer_balanced_targets():
  remainder = nayer.draw_remainder(jax.random.key(0), 23, 10)
  assert remainder.shape == (3,) and ((0 <= remainder) & (remainder < 10)).all()
  t = nayer.balanced_targets(remainder, 23, 10)  # the balanced block first, as the reference's generate_ys
  np.testing.assert_array_equal(t, np.concatenate([np.tile(np.arange(10), 2), remainder]))


def test_nayer_label_embedding_file_and_fallback(tmp_path):
  table = np.arange(12, dtype=np.float32).reshape(3, 4)
  path = str(tmp_path / 'le.npy')
  np.save(path, table)
  np.testing.assert_array_equal(nayer.load_label_embedding(path, 3, 4, seed=0), table)
  fallback = nayer.load_label_embedding('', 3, 4, seed=7)
  np.testing.assert_allclose(fallback @ fallback.T, np.eye(3), atol=1e-6)  # orthonormal rows
  np.testing.assert_array_equal(fallback, nayer.load_label_embedding('', 3, 4, seed=7))
  assert not np.allclose(fallback, nayer.load_label_embedding('', 3, 4, seed=8))
  np.save(str(tmp_path / 'wrong.npy'), table.T)
  (tmp_path / 'text.npy').write_text('not an array')
  cases = [(str(tmp_path / 'wrong.npy'), 'holds float32[4, 3]; expected a float array [num_classes, le_size] = [3, 4]'),
           (str(tmp_path / 'missing.npy'), 'no such file'),
           (str(tmp_path / 'text.npy'), 'is not a .npy array file')]
  for bad, message in cases:
    with pytest.raises(UserError) as e:
      nayer.load_label_embedding(bad, 3, 4, seed=0)
    assert message in str(e.value) and '\n' not in str(e.value), str(e.value)
  with pytest.raises(UserError, match='le_size >= num_classes'):
    nayer.load_label_embedding('', 5, 4, seed=0)


# ------------------------------------------------------------------------------------------------
# Each method: 2 fused iterations
# ------------------------------------------------------------------------------------------------

def _all_changed(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: not np.array_equal(x, y), a, b)))


def _any_changed(a, b) -> bool:
  return any(jax.tree.leaves(jax.tree.map(lambda x, y: not np.array_equal(x, y), a, b)))


@pytest.mark.slow
@pytest.mark.parametrize('name,overrides', [
    ('fast_mnist', {}),
    ('fast_mnist', {'fast.meta': 'reptile'}),
    ('cudfkd_mnist', {}),
    ('nayer_mnist', {})], ids=['fast', 'fast_reptile', 'cudfkd', 'nayer'])
def test_method_iterations(name, overrides, tmp_path):
  overrides = dict({'warmup_epochs': 0}, **overrides)
  if name == 'nayer_mnist':  # a file of label embeddings, as a user gives it
    path = str(tmp_path / 'le.npy')
    np.save(path, np.random.default_rng(0).normal(size=(10, 512)).astype(np.float32))
    overrides['nayer.label_embedding'] = path
  config = small_config(name, **overrides)
  before, after, metrics = run_method_iterations(
      config, 2, ('train/synthesis_loss', 'train/student_loss', 'train/loss_bn', 'train/loss_oh', 'train/loss_adv'))
  assert int(after['step']) == 2
  assert _all_changed(before['student'].params, after['student'].params), 'student parameters did not all change'
  assert not np.array_equal(before['pool']['items'], after['pool']['items'])
  assert _any_changed(before['method']['generator'], after['method']['generator'])
  if name == 'cudfkd_mnist':  # the pool holds exactly the fresh samples of the last call
    assert int(metrics['train/pool_size']) == config.kd_steps * config.batch_size
    assert 'train/loss_ent' in metrics and float(metrics['train/adv_weight']) == config.loss.adv
  else:
    assert int(metrics['train/pool_size']) == 2 * max(config.pool.insert_views, 1) * config.synthesis_batch_size
    assert int(after['method']['bn_ema']['count']) == 2
  if name == 'fast_mnist':  # every meta parameter moves (FOMAML or Reptile)
    assert _all_changed(before['method']['generator'], after['method']['generator'])


@pytest.mark.slow
def test_fast_resume_after_sigterm_is_bitwise(tmp_path, monkeypatch):
  """runlocal: 4 calls, the first epoch (2 calls) synthesis only, reset_l0 at call 1."""
  assert_resume_after_sigterm_is_bitwise(
      'fast_mnist', tmp_path, monkeypatch,
      ("['pool']", "['method']['generator']", "['method']['meta_opt']", "['method']['bn_ema']", "['student']"))


@pytest.mark.slow
def test_nayer_reference_epoch_order_and_student_mode(tmp_path):
  """``kd_every_batch=False`` (the reference's epoch): both batches, then kd_steps student steps in
  the epoch's last iteration; ``reference_student_train_mode`` moves the student's running BN
  statistics in the second batch's adversarial forward (and only there)."""
  config = small_config('nayer_mnist', **{'warmup_epochs': 0, 'nayer.kd_every_batch': False,
                                          'nayer.reference_student_train_mode': True, 'mesh.num_devices': 1,
                                          'student.arch': 'resnet8'})
  mesh = parallel.make_mesh(1)
  job = methods.get(config.method).make_job(config, mesh)
  state, iteration, frozen = compile_and_init(job, mesh)
  before = jax.device_get(state['student'])
  state, _ = iteration(state, frozen, jax.random.key(1), None)  # the epoch's first batch: no student step
  first = jax.device_get(state['student'])
  assert int(first.step) == 0
  jax.tree.map(np.testing.assert_array_equal, (first.params, first.batch_stats), (before.params, before.batch_stats))
  state, _ = iteration(state, frozen, jax.random.key(1), None)  # the second batch, then the student steps
  assert int(jax.device_get(state['student']).step) == config.kd_steps
  calls = [0, 1, 2, 3]
  assert [bool(nayer.student_train_mode(c, config)) for c in calls] == [False, True, False, True]
  assert not any(bool(nayer.student_train_mode(c, small_config('nayer_mnist', **{'warmup_epochs': 0})))
                 for c in calls)
  assert nayer.schedule_of(config).calls_of_epoch(1) == [2, 3]
