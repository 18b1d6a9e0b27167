"""PU compression and DFND: the nnPU risk, robust-KD weights and noise-adaptation terms against
hand-computed values, the class-prior estimator, the selections, the offline MNIST pool, a few
fused iterations of each method (and of PU's selector) on tiny configs, and PU's two stages run,
preempted, resumed and re-run."""
import importlib.util
import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from config_files import load_config
from conftest import compilations
from dfkd_jax import data, losses, methods
from dfkd_jax.data import unlabelled
from dfkd_jax.engines import selected_kd
from dfkd_jax.errors import UserError
from dfkd_jax.methods import dfnd, pu
from dfkd_jax.run import loop, outputs, parallel, stages
from dfkd_jax.run.job import compile_job
from dfkd_jax.train import train_and_evaluate


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


def test_inverse_mass_class_weights():
  probs = jnp.array([[0.5, 0.5], [1.0, 0.0]])   # class mass m = (1.5, 0.5)
  w = losses.inverse_mass_class_weights(probs)
  np.testing.assert_allclose(w, [0.5, 1.5], rtol=1e-6)   # 2 * (1/m) / Σ(1/m)
  np.testing.assert_allclose(losses.inverse_mass_class_weights(probs, power=0.0), [1.0, 1.0])
  w_half = 2 * np.array([1.5, 0.5]) ** -0.5 / np.sum(np.array([1.5, 0.5]) ** -0.5)
  np.testing.assert_allclose(losses.inverse_mass_class_weights(probs, power=0.5), w_half, rtol=1e-6)


def test_class_weight_perturbations():
  w, u = jnp.array([0.5, 1.5]), jnp.array([[0.0, 1.0], [0.5, 0.25]])
  # The reference's perturb(): w + ε·U(0, 1), so every perturbed set is >= w (the robust max takes one).
  additive = losses.perturbed_class_weights(w, u, epsilon=0.1)
  np.testing.assert_allclose(additive, [[0.5, 1.5], [0.5, 1.6], [0.55, 1.525]], rtol=1e-6)
  # 'relative': w·(1 + ε·(2u − 1)), within ±ε of w.
  relative = losses.perturbed_class_weights(w, u, epsilon=0.1, perturbation='relative')
  np.testing.assert_allclose(relative, [[0.5, 1.5], [0.45, 1.65], [0.5, 1.425]], rtol=1e-6)
  with pytest.raises(UserError, match='pu.perturbation'):
    losses.perturbed_class_weights(w, u, perturbation='multiplicative')
  drawn = losses.draw_class_weight_perturbations(jax.random.key(0), 3, 2)
  assert drawn.shape == (3, 2) and np.all((drawn >= 0) & (drawn < 1))


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


def test_to_input_is_torchvision_to_tensor_then_normalize():
  # Bit for bit torch's float32 x / 255, then (x - mean) / std, eagerly and compiled, on any CPU.
  images = np.random.default_rng(0).integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
  mean, std = (np.asarray(c, np.float32) for c in data.NORMALIZATION['cifar10'])
  expected = (images.astype(np.float32) / np.float32(255.0) - mean) / std
  np.testing.assert_array_equal(selected_kd.to_input(images, 'cifar10'), expected)
  np.testing.assert_array_equal(jax.jit(selected_kd.to_input, static_argnums=1)(images, 'cifar10'), expected)
  gray = images[..., :1]
  mean, std = (np.asarray(c, np.float32) for c in data.NORMALIZATION['mnist'])
  np.testing.assert_array_equal(jax.jit(selected_kd.to_input, static_argnums=1)(gray, 'mnist'),
                                (gray.astype(np.float32) / np.float32(255.0) - mean) / std)


def test_pool_normalization_defaults_to_the_teachers():
  config = load_config('dfnd_cifar', None)
  assert config.batch_size == 256  # DFND-train.py:208 (its line 209's 512 only sets the epoch count)
  assert selected_kd.normalization(config) == 'cifar10'
  config.pool_normalization = 'imagenet'  # the reference's constants
  assert selected_kd.normalization(config) == 'imagenet'


# ------------------------------------------------------------------------------------------------
# A few iterations of each method
# ------------------------------------------------------------------------------------------------

def tiny_config(name):
  config = load_config(name)
  config.unlabelled.update(noise=40, photo_patches=40, sklearn_digits=0)
  config.batch_size = 16
  return config


def run_iterations(job, mesh, n=3):
  """``n`` compiled iterations of ``job``: (state before, state after, last metrics, frozen before, frozen)."""
  init, step, _ = compile_job(job, mesh, jax.random.key(0))
  state = init(jax.random.key(0))
  before = jax.device_get(state)
  frozen = jax.device_put(job.frozen, parallel.replicated(mesh))
  frozen_before = jax.device_get(frozen)
  sharding = parallel.data_sharded(mesh)
  for i in range(n):
    batch = {k: jax.device_put(v, sharding) for k, v in job.next_batch(i).items()}
    state, metrics = step(state, frozen, jax.random.key(1), batch)
  metrics = jax.device_get(metrics)
  assert compilations(step) == 1
  assert metrics and all(np.isfinite(v).all() for v in metrics.values()), metrics
  return before, jax.device_get(state), metrics, frozen_before, jax.device_get(frozen)


def all_changed(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: not np.array_equal(x, y), a, b)))


@pytest.mark.slow
@pytest.mark.parametrize('name', ['dfnd_mnist', 'pu_mnist'])
def test_method_iterations(name):
  config = tiny_config(name)
  mesh = parallel.make_mesh(2)
  job = methods.get(config.method).make_job(config, mesh)
  if name == 'pu_mnist':  # stage 2, built from a stand-in selector's results
    selector, distillation = job
    assert selector.name == pu.STAGE1
    pool_size = len(unlabelled.load_pool(config.unlabelled, config.seed).images)
    job = distillation.build({'prior': 0.2, 'prior_source': 'config', 'selector_risk': 0.5,
                              'scores': np.linspace(-1.0, 1.0, pool_size)})
    assert job.report['prior'] == 0.2 and job.results_file == 'selection.json'
    assert job.notes[0].startswith('pu: selected ')
  before, after, _, teacher_before, teacher_after = run_iterations(job, mesh)
  assert all_changed(before['student'].params, after['student'].params), 'student parameters did not all change'
  if name == 'dfnd_mnist':
    assert not np.array_equal(before['aux'].params['theta'], after['aux'].params['theta'])
    assert job.notes[1].startswith('dfnd: noise-adaptation diagonal a = ')
  for a, b in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(teacher_after)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_pu_selector_iterations_train_the_head_only():
  config = tiny_config('pu_mnist')
  config.pu.prior = 0.2
  mesh = parallel.make_mesh(2)
  selector = methods.get('pu').make_job(config, mesh)[0].build({})
  assert selector.evaluators == () and selector.num_steps == config.pu.steps
  before, after, metrics, _, _ = run_iterations(selector, mesh)
  assert {'train/nnpu_risk', 'train/nnpu_objective'} <= set(metrics)
  assert all_changed(before['selector'].params['head'], after['selector'].params['head'])
  trunks = (before['selector'].params['trunk'], after['selector'].params['trunk'])
  for a, b in zip(*map(jax.tree.leaves, trunks)):
    np.testing.assert_array_equal(a, b)  # pu.train_backbone=False
  assert float(after['risk']) == float(metrics['train/nnpu_risk'])


def stop_at(monkeypatch, step: int, num_steps: int):
  """SIGTERM while the loop fetches the batch of ``step`` (0-based) of the job of ``num_steps``
  steps: the loop finishes that iteration, checkpoints and stops, as a preempted run does."""
  real = loop.device_batch

  def signalling_batch(job, s, sharding):
    if s == step and job.num_steps == num_steps:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(job, s, sharding)

  monkeypatch.setattr(loop, 'device_batch', signalling_batch)


def stage1_steps(workdir):
  """The steps stage 1 trained, as logged (the stage's metrics.jsonl)."""
  return [r['step'] for r in outputs.read_metrics(os.path.join(workdir, pu.STAGE1)) if 'train/nnpu_risk' in r]


@pytest.mark.slow
def test_pu_stage1_is_a_resumable_stage(tmp_path, monkeypatch):
  """Stage 1 runs in WORKDIR/stage1 with its own checkpoints: a SIGTERM during it checkpoints and
  stops (stage 2 not started); the re-run resumes it and goes on to stage 2; a further re-run does
  not train it again, a stage-2 setting keeps it, and a selector setting trains it again."""
  config = tiny_config('pu_mnist')
  config.pu.prior = 0.2  # from the config: no teacher features needed
  config.pu.steps, config.num_epochs = 4, 1
  config.checkpoint.every_steps, config.mesh.num_devices = 100, 2
  workdir = str(tmp_path)
  stop_at(monkeypatch, 1, config.pu.steps)
  summary = train_and_evaluate(config, workdir)
  assert summary.stopped_by_signal == signal.SIGTERM and summary.values['steps'] == 2
  stage_dir = os.path.join(workdir, pu.STAGE1)
  assert os.listdir(os.path.join(stage_dir, 'checkpoints')) == ['2']
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))  # stage 2 never started
  assert stage1_steps(workdir) == [1, 2]

  monkeypatch.undo()
  summary = train_and_evaluate(config, workdir)
  assert summary.stopped_by_signal is None and summary.values['finished']
  assert stage1_steps(workdir) == [1, 2, 3, 4]  # resumed at step 3
  stage1 = outputs.read_json(os.path.join(stage_dir, 'summary.json'))
  assert stage1['finished'] and stage1['prior'] == 0.2 and stage1['prior_source'] == 'config'
  selection = outputs.read_json(os.path.join(workdir, 'selection.json'))
  assert selection['prior'] == 0.2 and selection['selector_risk'] == stage1['selector_risk']
  assert summary.values['selected'] == selection['selected'] and 'student_top1_final' in summary.values
  assert os.path.isdir(os.path.join(workdir, 'student'))

  config.pu.selection = 'prior'  # a stage-2 setting: stage 1 stands
  train_and_evaluate(config, workdir)
  assert stage1_steps(workdir) == [1, 2, 3, 4]
  assert outputs.read_json(os.path.join(stage_dir, 'summary.json')) == stage1

  config.pu.steps = 3  # a selector setting: stage 1 is trained again from scratch
  train_and_evaluate(config, workdir)
  assert stage1_steps(workdir) == [1, 2, 3]
  assert outputs.read_json(os.path.join(stage_dir, stages.KEY_FILE))['key'] == pu._stage1_key(
      config, len(unlabelled.load_pool(config.unlabelled, config.seed).images))


def distillation_stage(config, mesh):
  """PU's stage 2, built from a stand-in selector that scores the pool's first half positive."""
  _, distillation = methods.get('pu').make_job(config, mesh)
  pool_size = len(unlabelled.load_pool(config.unlabelled, config.seed).images)
  scores = np.where(np.arange(pool_size) < pool_size // 2, 1.0, -1.0)
  return distillation.build({'prior': 0.2, 'prior_source': 'config', 'selector_risk': 0.5, 'scores': scores})


@pytest.mark.slow
def test_pu_distills_on_the_labelled_images_and_the_selected_ones():
  config = tiny_config('pu_mnist')
  config.pu.selection = 'positive'
  mesh = parallel.make_mesh(1)
  config.pu.distill_labelled = True  # the reference: label_train_subset + unlabel_positive_set
  report = distillation_stage(config, mesh).report
  labelled = config.pu.labelled_per_class * config.num_classes
  assert report['labelled'] == labelled and report['distilled'] == labelled + report['selected']
  config.pu.distill_labelled = False
  report = distillation_stage(config, mesh).report
  assert report['distilled'] == report['selected']


@pytest.mark.slow
def test_pu_selector_crops_and_flips_its_batches():
  config = tiny_config('pu_mnist')
  config.pu.prior = 0.2
  config.augment.update(crop_padding=2, flip=True)
  mesh = parallel.make_mesh(1)
  batch = {'positives': np.full((3, 32, 32, 1), 255, np.uint8), 'unlabelled': np.zeros((2, 32, 32, 1), np.uint8)}
  config.pu.update(batch_p=3, batch_u=2, augment_selector=False)
  assert pu.make_job(config, mesh)[0].build({}).phases[0].draw(jax.random.key(0), None) == {}
  config.pu.augment_selector = True  # the reference's RandomCrop(32, 4) + RandomHorizontalFlip
  job = pu.make_job(config, mesh)[0].build({})
  drawn = job.phases[0].draw(jax.random.key(0), None)
  assert drawn['offsets'].shape == (5, 2) and drawn['flips'].shape == (5,)
  drawn = {'offsets': np.array([[0, 0], [2, 2], [4, 4], [0, 0], [0, 0]], np.int32), 'flips': np.zeros(5, bool)}
  state = jax.jit(job.init)(jax.random.key(0))
  _, metrics = jax.jit(job.phases[0].apply)(state, job.frozen, drawn, batch)
  white = np.asarray(selected_kd.to_input(np.full((1, 1, 1, 1), 255, np.uint8), config.dataset))[0, 0, 0, 0]
  black = np.asarray(selected_kd.to_input(np.zeros((1, 1, 1, 1), np.uint8), config.dataset))[0, 0, 0, 0]
  images = np.asarray(metrics['trace/images'])[..., 0]
  assert np.all(images[0, :2] == black) and np.all(images[0, 2:, 2:] == white)  # zero padding top and left
  assert np.all(images[1] == white)  # the centre crop
  assert np.all(images[2, -2:] == black) and np.all(images[2, :-2, :-2] == white)
