"""SSD-KD (``methods/ssdkd.py``) and its prioritised replay buffer (``synth/priority.py``).

- The modulating function φ (difficulty, diversity, normalisation, collision penalty) and PER's
  sampling probabilities, stratified/independent index draws, importance-sampling weights, β
  annealing and priority updates against hand-computed values.
- Buffer admission: the class quota, replacement of the easiest entry of a full class, eviction
  from the richest class once full, discards, FIFO; ``write`` keeps the last of a batch's
  duplicate slots.
- Two fused iterations of the MNIST ``runlocal`` config on 2 devices (defaults, and every switch
  flipped): finite metrics, the buffer fills, one compilation.
- A run stopped by SIGTERM and resumed ends bitwise equal to an uninterrupted one.
- The ``runlocal`` configs build a job for every CIFAR pair.
"""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_inversion import assert_resume_after_sigterm_is_bitwise, run_method_iterations, small_config
from test_loop import compile_once  # noqa: F401 (the module-scoped autouse fixture)

from config_files import load_config
from dfkd_jax import configlib, methods
from dfkd_jax.errors import UserError
from dfkd_jax.methods import ssdkd
from dfkd_jax.run import parallel
from dfkd_jax.synth import priority as buffer_lib

# ------------------------------------------------------------------------------------------------
# The modulating function φ
# ------------------------------------------------------------------------------------------------


def test_difficulty_confidence_and_entropy_hand_values():
  ln3 = math.log(3.0)
  logits = jnp.asarray([[ln3, 0.0], [0.0, 0.0]])  # softmax (3/4, 1/4) and (1/2, 1/2)
  np.testing.assert_allclose(ssdkd.difficulty(logits, 'confidence', 2.0), [(1 / 4) ** 2, (1 / 2) ** 2], rtol=1e-6)
  np.testing.assert_allclose(ssdkd.difficulty(logits, 'confidence', 0.0), [1.0, 1.0], rtol=1e-6)
  h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2.0)  # normalised entropy of (3/4, 1/4)
  np.testing.assert_allclose(ssdkd.difficulty(logits, 'entropy', 2.0), [h ** 2, 1.0], rtol=1e-6)


def test_diversity_inverse_count_and_cap():
  counts = jnp.asarray([5, 1, 0])  # buffer ∪ batch: 6 entries over 3 classes, n̄ = 2
  got = ssdkd.diversity(jnp.asarray([0, 1, 2]), counts, jnp.asarray(6), phi_max=5.0)
  np.testing.assert_allclose(got, [2 / 6, 2 / 2, 2 / 1], rtol=1e-6)
  capped = ssdkd.diversity(jnp.asarray([2]), counts, jnp.asarray(6), phi_max=1.5)
  np.testing.assert_allclose(capped, [1.5], rtol=1e-6)


def test_phi_normalised_to_mean_one_and_collision_penalty():
  np.testing.assert_allclose(ssdkd.normalised(jnp.asarray([1.0, 3.0])), [0.5, 1.5], rtol=1e-6)
  spread = jnp.log(jnp.eye(4) + 1e-30)  # four one-hot rows of distinct classes: mean p uniform
  np.testing.assert_allclose(ssdkd.collision_penalty(spread), 0.25, rtol=1e-5)
  np.testing.assert_allclose(ssdkd.collision_penalty(spread[:1].repeat(4, 0)), 1.0, rtol=1e-5)


def test_cross_entropy_per_example_hand_values():
  logits = jnp.asarray([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
  got = ssdkd.cross_entropy_per_example(logits, jnp.asarray([1, 0]))
  expected = [np.log(np.exp([1.0, 2.0, 0.5]).sum()) - 2.0, np.log(np.exp([0.0, -1.0, 3.0]).sum())]
  np.testing.assert_allclose(got, expected, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Prioritised sampling
# ------------------------------------------------------------------------------------------------

def test_per_probabilities_and_importance_weights():
  priority = jnp.asarray([1.0, 4.0, 9.0, 100.0])
  valid = jnp.asarray([True, True, True, False])  # the last entry is empty: never drawn, not counted
  probs = buffer_lib.probabilities(priority, valid, alpha=0.5)
  np.testing.assert_allclose(probs, [1 / 6, 2 / 6, 3 / 6, 0.0], rtol=1e-6)
  # w_i = (n P_i)^-β / max_j (n P_j)^-β = (P_min / P_i)^β, n = 3 valid entries.
  n, beta = 3, 0.4
  raw = [(n * p) ** -beta for p in (1 / 6, 2 / 6, 3 / 6)]
  expected = [r / max(raw) for r in raw]
  got = buffer_lib.importance_weights(probs, valid, jnp.asarray([0, 1, 2, 2]), jnp.asarray(beta))
  np.testing.assert_allclose(got, expected + [expected[2]], rtol=1e-6)
  # normalised by the batch's largest weight instead: entries 1 and 2 drawn, the likelier one below 1
  got = buffer_lib.importance_weights(probs, valid, jnp.asarray([1, 2]), jnp.asarray(beta), normaliser='batch')
  np.testing.assert_allclose(got, [1.0, (2 / 3) ** beta], rtol=1e-6)
  np.testing.assert_allclose(buffer_lib.probabilities(priority, valid, alpha=0.0), [1 / 3, 1 / 3, 1 / 3, 0], rtol=1e-6)


def test_stratified_and_independent_indices_invert_the_cdf():
  probs = jnp.asarray([0.25, 0.0, 0.25, 0.5])  # cdf 0.25, 0.25, 0.5, 1
  # stratified, batch 2: points (k + u_k) / 2 = 0.25 and 0.75 -> the first entry whose cdf exceeds them
  got = buffer_lib.indices(probs, jnp.asarray([0.5, 0.5]), 'stratified')
  np.testing.assert_array_equal(got, [2, 3])
  got = buffer_lib.indices(probs, jnp.asarray([0.1, 0.3, 0.6, 0.9999999]), 'independent')
  np.testing.assert_array_equal(got, [0, 2, 3, 3])  # the empty entry 1 is never drawn
  # A point rounded past the total lands on the last entry with mass, not past it.
  np.testing.assert_array_equal(buffer_lib.indices(jnp.asarray([0.5, 0.5, 0.0]), jnp.asarray([1.0]), 'independent'),
                                [1])
  # Many draws follow P.
  u = jax.random.uniform(jax.random.key(0), (40000,))
  freq = np.bincount(np.asarray(buffer_lib.indices(probs, u, 'stratified')), minlength=4) / 40000
  np.testing.assert_allclose(freq, probs, atol=1e-3)
  with pytest.raises(UserError):
    buffer_lib.indices(probs, u, 'roulette')


def test_beta_annealing_and_priority_updates():
  np.testing.assert_allclose([buffer_lib.annealed_beta(0.4, jnp.asarray(p)) for p in (0.0, 0.5, 1.0, 2.0)],
                             [0.4, 0.7, 1.0, 1.0], rtol=1e-6)
  priority = jnp.asarray([1.0, 2.0, 3.0])
  # entry 2 drawn twice: it keeps the larger of its two losses, whatever their order
  got = buffer_lib.update_priorities(priority, jnp.asarray([2, 0, 2]), jnp.asarray([0.5, 7.0, 0.25]), 1e-6)
  np.testing.assert_allclose(got, [7.0 + 1e-6, 2.0, 0.5 + 1e-6], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Buffer admission and eviction
# ------------------------------------------------------------------------------------------------

def _empty(capacity):
  return buffer_lib.init(capacity, {'x': jax.ShapeDtypeStruct((), jnp.float32)})


def _admit(buffer, labels, scores, policy='balanced', num_classes=2, priority=1.0):
  labels, scores = jnp.asarray(labels), jnp.asarray(scores, jnp.float32)
  slots = buffer_lib.admission_slots(buffer, labels, scores, num_classes=num_classes, policy=policy)
  items = {'x': jnp.arange(len(labels), dtype=jnp.float32) + 10 * (int(buffer['admitted']) + 1)}
  return slots, buffer_lib.write(buffer, slots, items, labels, scores, jnp.asarray(priority))


def test_balanced_admission_quota_replacement_and_discard():
  # capacity 4, 2 classes: quota 2 per class.
  slots, buffer = _admit(_empty(4), [0, 0, 0, 1], [0.5, 0.2, 0.9, 0.1])
  # 0 -> slot 0, 0 -> slot 1, the third 0 finds its class full and replaces its easiest (0.2 in
  # slot 1) being harder (0.9); 1 -> the next free slot 2.
  np.testing.assert_array_equal(slots, [0, 1, 1, 2])
  np.testing.assert_array_equal(buffer['valid'], [True, True, True, False])
  np.testing.assert_array_equal(buffer['label'][:3], [0, 0, 1])
  np.testing.assert_allclose(buffer['score'][:3], [0.5, 0.9, 0.1])
  np.testing.assert_allclose(buffer['items']['x'][:3], [10.0, 12.0, 13.0])  # the batch's entry 1 was replaced
  np.testing.assert_array_equal(buffer['stamp'][:3], [0, 2, 3])
  assert int(buffer['admitted']) == 4
  np.testing.assert_array_equal(buffer_lib.class_counts(buffer, 2), [2, 1])
  # 1 (0.3) -> free slot 3; 1 (0.05) is easier than its class's easiest (0.1): discarded;
  # 0 (0.1) is easier than 0.5: discarded.
  slots, buffer = _admit(buffer, [1, 1, 0], [0.3, 0.05, 0.1])
  np.testing.assert_array_equal(slots, [3, -1, -1])
  np.testing.assert_array_equal(buffer_lib.class_counts(buffer, 2), [2, 2])
  assert int(buffer_lib.size(buffer)) == 4 and int(buffer['admitted']) == 5


def test_balanced_admission_evicts_the_richest_class_once_full():
  # capacity 4, 3 classes: quota 2; full with classes 0, 0, 1, 1 (class 0 first of the richest).
  _, buffer = _admit(_empty(4), [0, 0, 1, 1], [0.7, 0.3, 0.2, 0.6], num_classes=3)
  slots, buffer = _admit(buffer, [2], [0.0], num_classes=3)
  np.testing.assert_array_equal(slots, [1])  # class 0's easiest entry (0.3) gives way to class 2
  np.testing.assert_array_equal(buffer_lib.class_counts(buffer, 3), [1, 2, 1])


def test_equal_scores_replace_the_oldest_of_the_class():
  _, buffer = _admit(_empty(2), [0, 0], [0.0, 0.0], num_classes=1)
  slots, _ = _admit(buffer, [0], [0.0], num_classes=1)
  np.testing.assert_array_equal(slots, [0])


def test_fifo_admission_and_new_priorities():
  _, buffer = _admit(_empty(4), [0, 1, 0], [0.0] * 3, policy='fifo', priority=2.0)
  slots, buffer = _admit(buffer, [1, 1, 1], [0.0] * 3, policy='fifo', priority=5.0)
  np.testing.assert_array_equal(slots, [3, 0, 1])  # a ring: the oldest entries are overwritten
  np.testing.assert_allclose(buffer['priority'], [5.0, 5.0, 2.0, 5.0])
  assert float(buffer_lib.new_priority(buffer, 'max')) == 5.0
  np.testing.assert_allclose(buffer_lib.new_priority(buffer, 'mean'), 17 / 4, rtol=1e-6)
  assert float(buffer_lib.new_priority(_empty(3), 'max')) == 1.0
  with pytest.raises(UserError):
    buffer_lib.admission_slots(buffer, jnp.zeros((5,), jnp.int32), jnp.zeros((5,)), num_classes=2, policy='fifo')


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------

ALL_SWITCHES_FLIPPED = {
    'ssdkd.difficulty': 'entropy', 'ssdkd.diversity': 'penalty', 'ssdkd.phi_grad': True,
    'ssdkd.phi_in_generator': False, 'ssdkd.phi_in_buffer': False, 'ssdkd.phi_in_kd': False,
    'ssdkd.eviction': 'fifo', 'ssdkd.budget_mode': 'total', 'ssdkd.views': 0, 'ssdkd.targets': 'inverse_count',
    'ssdkd.sampler': 'uniform', 'ssdkd.new_priority': 'mean', 'ssdkd.priority': 'kl', 'ssdkd.meta': 'reptile',
    'ssdkd.is_normaliser': 'batch'}


@pytest.mark.slow
@pytest.mark.parametrize('overrides', [{}, ALL_SWITCHES_FLIPPED], ids=['defaults', 'switches_flipped'])
def test_ssdkd_iterations(overrides):
  config = small_config('ssdkd_mnist', **{'warmup_epochs': 0, **overrides})
  before, after, metrics = run_method_iterations(
      config, 2, ('train/synthesis_loss', 'train/student_loss', 'train/loss_bn', 'train/loss_oh', 'train/loss_adv',
                  'train/buffer_size', 'train/beta', 'train/is_weight_min'))
  buffer = after['method']['buffer']
  size = int(buffer['valid'].sum())
  assert int(metrics['train/buffer_size']) == size
  if overrides:  # FIFO: every image of both calls, up to the budget; nothing read by priority
    assert size == min(2 * config.synthesis_batch_size, config.data_budget)
    assert float(metrics['train/is_weight_min']) == 1.0
  else:  # the class quota: at most ⌈48 / 10⌉ = 5 per class
    assert 0 < size <= config.data_budget
    assert np.bincount(buffer['label'][buffer['valid']], minlength=10).max() <= 5
    # read entries had their priority set to their loss; entries never read keep their first one
    assert not np.array_equal(np.unique(buffer['priority'][buffer['valid']]), [1.0])
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before['student'].params, after['student'].params)
  assert all(jax.tree.leaves(changed)), 'student parameters did not all change'
  assert int(after['step']) == 2


@pytest.mark.slow
def test_ssdkd_resume_after_sigterm_is_bitwise(tmp_path, monkeypatch):
  """runlocal: 4 calls, the first epoch (2 calls) synthesis only, reset_l0 at call 1, the buffer
  (48 digits) full after 2 calls."""
  workdir = assert_resume_after_sigterm_is_bitwise(
      'ssdkd_mnist', tmp_path, monkeypatch,
      ("['method']['buffer']['priority']", "['method']['buffer']['items']['images']", "['method']['generator']",
       "['method']['meta_opt']", "['method']['bn_ema']", "['student']"))
  with open(os.path.join(workdir, 'buffer.json')) as f:
    histograms = json.load(f)
  assert sum(histograms['buffer_class_counts']) == histograms['buffer_size'] == sum(
      histograms['buffer_confidence_histogram'])


@pytest.mark.slow
@pytest.mark.parametrize('pair', configlib.CIFAR_PAIRS)
def test_cifar_runlocal_configs_build(pair):
  for dataset in ('cifar10', 'cifar100'):
    config = load_config('ssdkd_cifar', f'runlocal,dataset={dataset},pair={pair}')
    assert config.method == 'ssdkd' and config.g_steps == 2 and 'fast' not in config
    job = methods.get('ssdkd').make_job(config, parallel.make_mesh(1))
    state = jax.eval_shape(job.init, jax.random.key(0))
    assert state['method']['buffer']['items']['images'].shape == (config.data_budget, 1, 32, 32, 3)


def test_default_budgets_are_ten_percent_of_the_training_sets():
  assert load_config('ssdkd_mnist', None).data_budget == 6000
  assert load_config('ssdkd_cifar', 'dataset=cifar100').data_budget == 5000
  assert load_config('ssdkd_mnist', 'data_budget=1000').data_budget == 1000


def test_bad_switches_are_one_line_errors():
  for overrides in ({'ssdkd.eviction': 'lru'}, {'data_budget': 8}, {'pool.insert_views': 2}):
    with pytest.raises(UserError):
      methods.get('ssdkd').make_job(small_config('ssdkd_mnist', **overrides), parallel.make_mesh(1))
