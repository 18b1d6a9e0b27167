"""PU compression and DFND: the nnPU risk, robust-KD weights and noise-adaptation terms against
hand-computed values, the class-prior estimator, the selections, the offline MNIST pool, and a few
fused iterations of each method on tiny configs."""
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfkd_jax import losses, methods
from dfkd_jax.data import unlabelled
from dfkd_jax.engines import selected_kd
from dfkd_jax.errors import UserError
from dfkd_jax.methods import dfnd, pu
from dfkd_jax.run import parallel
from dfkd_jax.run.job import compile_job
from conftest import compilations

CONFIGS = os.path.join(os.path.dirname(__file__), '..', 'configs')


def load_config(name, arg='runlocal'):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def sig(x):
  return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------------------------------
# Loss terms against hand-computed values
# ------------------------------------------------------------------------------------------------

def test_nnpu_risk_non_negative_branch():
  p, u, prior = [0.0, 2.0], [0.0, -1.0, 1.0], 0.3
  r_pos = prior * (sig(-0.0) + sig(-2.0)) / 2                        # ℓ(g) = σ(−g) on P
  r_neg = (sig(0.0) + sig(-1.0) + sig(1.0)) / 3 - prior * (sig(0.0) + sig(2.0)) / 2
  assert r_neg > 0
  objective, risk = losses.nnpu_risk(jnp.array(p), jnp.array(u), prior)
  np.testing.assert_allclose([objective, risk], [r_pos + r_neg, r_pos + r_neg], rtol=1e-6)


def test_nnpu_risk_negative_branch_reverses_the_step():
  # Positives scored high, unlabelled far negative: the unbiased negative-class risk goes below zero.
  p, u, prior, gamma = [3.0, 2.0], [-5.0, -6.0], 0.6, 0.5
  r_pos = prior * (sig(-3.0) + sig(-2.0)) / 2
  r_neg = (sig(-5.0) + sig(-6.0)) / 2 - prior * (sig(3.0) + sig(2.0)) / 2
  assert r_neg < 0
  objective, risk = losses.nnpu_risk(jnp.array(p), jnp.array(u), prior, gamma=gamma)
  np.testing.assert_allclose(objective, -gamma * r_neg, rtol=1e-6)
  np.testing.assert_allclose(risk, r_pos, rtol=1e-6)   # max(0, r_neg) = 0
  # beta widens the unbiased branch
  objective, _ = losses.nnpu_risk(jnp.array(p), jnp.array(u), prior, beta=1.0)
  np.testing.assert_allclose(objective, r_pos + r_neg, rtol=1e-6)


def test_robust_kd_class_weights():
  probs = jnp.array([[0.5, 0.5], [1.0, 0.0]])   # class mass m = (1.5, 0.5)
  w = losses.robust_kd_class_weights(probs, num_perturbations=0)
  np.testing.assert_allclose(w, [[0.5, 1.5]], rtol=1e-6)   # 2 * (1/m) / Σ(1/m)
  np.testing.assert_allclose(losses.robust_kd_class_weights(probs, num_perturbations=0, power=0.0), [[1.0, 1.0]])
  w_half = 2 * np.array([1.5, 0.5]) ** -0.5 / np.sum(np.array([1.5, 0.5]) ** -0.5)
  np.testing.assert_allclose(losses.robust_kd_class_weights(probs, num_perturbations=0, power=0.5), [w_half], rtol=1e-6)
  w = losses.robust_kd_class_weights(probs, num_perturbations=3, epsilon=0.1, key=jax.random.key(0))
  assert w.shape == (4, 2)
  np.testing.assert_allclose(w[0], [0.5, 1.5], rtol=1e-6)
  assert np.all(np.abs(np.asarray(w[1:]) / np.array([0.5, 1.5]) - 1) <= 0.1 + 1e-6)
  assert not np.allclose(w[1], w[2])


def test_robust_kd_max_over_weight_sets():
  t = jnp.array([[2.0, 0.0], [0.0, 1.0]])    # teacher labels (0, 1)
  s = jnp.array([[0.0, 0.0], [1.0, 0.0]])

  def kl(tl, sl):
    pt = np.exp(tl) / np.exp(tl).sum()
    ps = np.exp(sl) / np.exp(sl).sum()
    return float(np.sum(pt * np.log(pt / ps)))

  kls = [kl(np.array([2.0, 0.0]), np.array([0.0, 0.0])), kl(np.array([0.0, 1.0]), np.array([1.0, 0.0]))]
  weights = jnp.array([[1.0, 1.0], [0.2, 1.8], [1.8, 0.2]])
  expected = max((w[0] * kls[0] + w[1] * kls[1]) / 2 for w in np.asarray(weights))
  np.testing.assert_allclose(losses.robust_kd(s, t, weights), expected, rtol=1e-5)
  # T multiplies once: KL at T times T
  kls_t = [kl(np.array([1.0, 0.0]), np.array([0.0, 0.0])), kl(np.array([0.0, 0.5]), np.array([0.5, 0.0]))]
  np.testing.assert_allclose(losses.robust_kd(s, t, weights[:1], temperature=2.0), 2 * sum(kls_t) / 2, rtol=1e-5)


def test_noise_transition_and_nll():
  n = losses.noise_transition(jnp.zeros((3, 3)), 0.7)
  np.testing.assert_allclose(n, [[0.7, 0.15, 0.15], [0.15, 0.7, 0.15], [0.15, 0.15, 0.7]], rtol=1e-6)
  theta = jnp.array([[9.0, 0.0, math.log(3.0)], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
  n = losses.noise_transition(theta, 0.6)
  np.testing.assert_allclose(n[0], [0.6, 0.1, 0.3], rtol=1e-6)   # θ_00 is unused
  np.testing.assert_allclose(n.sum(-1), 1.0, rtol=1e-6)
  logits = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
  noisy = np.array([0.5, 0.25, 0.25]) @ np.asarray(n)
  np.testing.assert_allclose(losses.noise_adaptation_nll(logits, jnp.array([2]), n), -math.log(noisy[2]), rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Selection and prior estimation
# ------------------------------------------------------------------------------------------------

def test_dfnd_selects_the_confident_samples():
  logits = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 1.0], [0.0, 9.0], [3.0, 3.0]])
  np.testing.assert_array_equal(dfnd.select_confident(logits, 2), [False, True, False, True, False])
  np.testing.assert_array_equal(dfnd.select_confident(logits, 3), [False, True, True, True, False])
  with pytest.raises(UserError, match='num_select'):
    dfnd.select_confident(logits, 6)


def test_pu_selection_rules():
  scores = np.array([0.5, -1.0, 2.0, -0.1, 3.0])
  np.testing.assert_array_equal(pu.select(scores, 0.4, 'positive'), [True, False, True, False, True])
  np.testing.assert_array_equal(pu.select(scores, 0.4, 'prior'), [False, False, True, False, True])
  logits = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # teacher: 0 0 1 1 1
  np.testing.assert_array_equal(pu.select(scores, 0.4, 'balanced', logits), [True, False, False, False, True])
  with pytest.raises(UserError, match='selection'):
    pu.select(scores, 0.4, 'all')


def test_prior_estimate_on_separable_features():
  rng = np.random.default_rng(0)
  dim, prior = 8, 0.25
  shift = np.zeros(dim)
  shift[0] = 6.0
  positives = rng.normal(size=(200, dim)) + shift
  unlabelled_pos = rng.normal(size=(1000, dim)) + shift
  negatives = rng.normal(size=(3000, dim)) - shift
  estimate = pu.estimate_prior(positives, np.concatenate([unlabelled_pos, negatives]), seed=0)
  assert abs(estimate - prior) < 0.06, estimate


def test_selection_report_counts_true_digits():
  pool = unlabelled.Pool(np.zeros((5, 2, 2, 1), np.uint8), np.array([0, 1, 0, 2, 3]), 'toy')
  rep = selected_kd.selection_report(pool, np.array([True, True, False, False, True]))
  assert rep['selected'] == 3 and rep['selected_true_digits'] == 1
  assert rep['precision'] == pytest.approx(1 / 3) and rep['recall'] == pytest.approx(1 / 2)
  assert rep['selected_composition'] == {'digit': 1, 'noise': 1, 'photo_patch': 0, 'sklearn_digit': 1}


def test_mnist_mix_pool_records_its_parts():
  pool = unlabelled.mnist_mix(0, digits_split='heldout', noise=10, photo_patches=12, sklearn_digits=7)
  expected = {'digit': 500, 'noise': 10, 'photo_patch': 12,
              'sklearn_digit': 7 if importlib.util.find_spec('sklearn') else 0}
  assert pool.composition() == expected
  assert pool.images.shape == (sum(expected.values()), 28, 28, 1) and pool.images.dtype == np.uint8
  again = unlabelled.mnist_mix(0, digits_split='heldout', noise=10, photo_patches=12, sklearn_digits=7)
  np.testing.assert_array_equal(pool.images, again.images)


def test_labelled_subset_per_class():
  ds = unlabelled.labelled_subset('embedded_mnist', 'train', 3, 10, seed=0)
  assert len(ds.labels) == 30 and np.all(np.bincount(ds.labels) == 3)
  with pytest.raises(UserError, match='fewer'):
    unlabelled.labelled_subset('embedded_mnist', 'heldout', 51, 10, seed=0)


# ------------------------------------------------------------------------------------------------
# A few iterations of each method
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['dfnd_mnist', 'pu_mnist'])
def test_method_iterations(name):
  config = load_config(name)
  config.unlabelled.update(noise=40, photo_patches=40, sklearn_digits=0)
  config.batch_size = 16
  mesh = parallel.make_mesh(2)
  job = methods.get(config.method).make_job(config, mesh)
  init, step, _ = compile_job(job, mesh, jax.random.key(0))
  state = init(jax.random.key(0))
  before = jax.device_get(state)
  frozen = jax.device_put(job.frozen, parallel.replicated(mesh))
  teacher_before = jax.device_get(frozen)
  sharding = parallel.data_sharded(mesh)
  for i in range(3):
    batch = {k: jax.device_put(v, sharding) for k, v in job.next_batch(i).items()}
    state, metrics = step(state, frozen, jax.random.key(1), batch)
  metrics = jax.device_get(metrics)
  assert compilations(step) == 1
  assert metrics and all(np.isfinite(v).all() for v in metrics.values()), metrics
  after = jax.device_get(state)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before['student'].params, after['student'].params)
  assert all(jax.tree.leaves(changed)), 'student parameters did not all change'
  if name == 'dfnd_mnist':
    assert not np.array_equal(before['aux'].params['theta'], after['aux'].params['theta'])
  for a, b in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(jax.device_get(frozen))):
    np.testing.assert_array_equal(a, b)


def test_pu_stage1_result_is_kept_in_the_workdir(tmp_path, monkeypatch):
  """A re-run reads stage 1 from WORKDIR/pu_stage1.npz; a stage-2 setting keeps it, a selector
  setting retrains it."""
  calls = []

  def fake_selector(config, mesh, s, positives, images, prior):
    calls.append(prior)
    return np.arange(len(images), dtype=np.float32) - len(calls), 0.25 * len(calls)

  monkeypatch.setattr(pu, 'train_selector', fake_selector)
  config = load_config('pu_mnist')
  config.pu.prior = 0.2  # from the config: no teacher features needed
  pool = np.zeros((7, 32, 32, 1), np.uint8)
  first = pu.stage1(config, None, None, pool[:2], pool, str(tmp_path))
  assert len(calls) == 1 and os.path.isfile(tmp_path / pu.STAGE1_FILE)
  config.pu.selection = 'prior'  # stage 2 only
  again = pu.stage1(config, None, None, pool[:2], pool, str(tmp_path))
  assert len(calls) == 1
  assert again[:2] == (0.2, 'config') and again[3] == 0.25
  np.testing.assert_array_equal(again[2], first[2])
  config.pu.steps += 1  # the selector changes: trained again, and the new result replaces the old
  retrained = pu.stage1(config, None, None, pool[:2], pool, str(tmp_path))
  assert len(calls) == 2 and retrained[3] == 0.5
  np.testing.assert_array_equal(pu.stage1(config, None, None, pool[:2], pool, str(tmp_path))[2], np.arange(7) - 2)
  assert len(calls) == 2 and not os.path.exists(tmp_path / (pu.STAGE1_FILE + '.partial'))
