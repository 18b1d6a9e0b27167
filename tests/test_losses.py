"""dfkd_jax.losses: hand-computed values, identities, gradient signs, layout equivalence, and the
reference formulas written with torch.nn.functional (their values committed; computed live in the
``torch`` group)."""
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_fixtures as rf
import torch_files
from dfkd_jax import losses

LN2, LN3 = math.log(2.0), math.log(3.0)


def _kl(p, q):
  """KL(p‖q) of two probability vectors, written out by hand in float64."""
  return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _random_logits(seed, shape=(6, 5), scale=2.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


# ------------------------------------------------------------------------------------------------
# Distillation KL
# ------------------------------------------------------------------------------------------------

def test_kd_kl_hand_values():
  # Row 0: p_t = (3/4, 1/4), p_s = (1/2, 1/2). Row 1: identical logits, KL 0.
  student = jnp.array([[0.0, 0.0], [1.0, -1.0]])
  teacher = jnp.array([[LN3, 0.0], [1.0, -1.0]])
  kl_row0 = _kl([0.75, 0.25], [0.5, 0.5])
  np.testing.assert_allclose(losses.kl_per_example(student, teacher), [kl_row0, 0.0], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(losses.kd_kl(student, teacher), kl_row0 / 2, rtol=1e-6)
  # torch's elementwise 'mean' divides by N·C = 4 (original ZSKT).
  np.testing.assert_allclose(losses.kd_kl(student, teacher, reduction='mean'), kl_row0 / 4, rtol=1e-6)
  # At T = 2 the same probabilities need doubled logits; the T² factor multiplies by 4.
  np.testing.assert_allclose(losses.kd_kl(2 * student, 2 * teacher, 2.0), 4 * kl_row0 / 2, rtol=1e-6)


def test_kd_kl_rejects_unknown_reduction():
  with pytest.raises(ValueError, match='reduction'):
    losses.kd_kl(jnp.zeros((2, 3)), jnp.zeros((2, 3)), reduction='sum')


def test_kl_at_t1_is_cross_entropy_minus_entropy():
  student, teacher = _random_logits(0), _random_logits(1)
  p_teacher = jax.nn.softmax(teacher)
  entropy = -jnp.mean(jnp.sum(p_teacher * jnp.log(p_teacher), axis=-1))
  expected = losses.soft_cross_entropy(student, p_teacher) - entropy
  np.testing.assert_allclose(losses.kd_kl(student, teacher), expected, rtol=1e-5)


def test_kl_of_a_distribution_with_itself_is_zero():
  logits = _random_logits(2)
  np.testing.assert_allclose(losses.kl_per_example(logits, logits, 4.0), np.zeros(6), atol=1e-6)
  # Adding a per-row constant does not change the softmax.
  np.testing.assert_allclose(losses.kd_kl(logits + 3.0, logits, 20.0), 0.0, atol=1e-4)


def test_dafl_original_kd_is_batchmean():
  """DAFL: kl_div(log_softmax(s), softmax(t), size_average=False) / N, written with numpy."""
  student, teacher = np.asarray(_random_logits(3)), np.asarray(_random_logits(4))
  log_q = student - np.log(np.exp(student).sum(1, keepdims=True))
  p = np.exp(teacher) / np.exp(teacher).sum(1, keepdims=True)
  expected = np.sum(p * (np.log(p) - log_q)) / student.shape[0]
  np.testing.assert_allclose(losses.kd_kl(student, teacher), expected, rtol=1e-5)


def test_kd_kl_gradient_pulls_student_towards_teacher():
  student, teacher = _random_logits(5), _random_logits(6)
  grad = jax.grad(losses.kd_kl)(student, teacher, 4.0)
  assert float(losses.kd_kl(student - 0.1 * grad, teacher, 4.0)) < float(losses.kd_kl(student, teacher, 4.0))
  # d/ds [T² KL] = T (p_s − p_t) / N: rows sum to zero.
  np.testing.assert_allclose(jnp.sum(grad, axis=-1), np.zeros(6), atol=1e-6)


def test_l1_logits_hand_value():
  student = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  teacher = jnp.array([[0.0, 0.0], [0.0, 8.0]])
  np.testing.assert_allclose(losses.l1_logits(student, teacher), (1 + 2 + 3 + 4) / 4)


# ------------------------------------------------------------------------------------------------
# Pseudo-label and class-balance terms
# ------------------------------------------------------------------------------------------------

def test_cross_entropy_family_hand_values():
  logits = jnp.array([[0.0, LN3], [LN3, 0.0]])  # softmax rows (1/4, 3/4) and (3/4, 1/4)
  np.testing.assert_allclose(losses.cross_entropy(logits, jnp.array([1, 1])),
                             -(math.log(0.75) + math.log(0.25)) / 2, rtol=1e-6)
  # argmax labels are (1, 0): both rows hit their 3/4 class.
  np.testing.assert_allclose(losses.cross_entropy_onehot(logits), -math.log(0.75), rtol=1e-6)
  halves = jnp.full((2, 2), 0.5)
  np.testing.assert_allclose(losses.soft_cross_entropy(logits, halves),
                             -(0.5 * math.log(0.25) + 0.5 * math.log(0.75)), rtol=1e-6)


def test_soft_cross_entropy_with_one_hot_targets_is_cross_entropy():
  logits = _random_logits(7)
  labels = jnp.array([0, 4, 2, 2, 1, 3])
  np.testing.assert_allclose(losses.soft_cross_entropy(logits, jax.nn.one_hot(labels, 5)),
                             losses.cross_entropy(logits, labels), rtol=1e-6)


def test_cross_entropy_onehot_labels_carry_no_gradient():
  logits = _random_logits(8)
  labels = jnp.argmax(logits, axis=-1)
  np.testing.assert_allclose(jax.grad(losses.cross_entropy_onehot)(logits),
                             jax.grad(losses.cross_entropy)(logits, labels), rtol=1e-6)


def test_activation_loss_hand_value():
  np.testing.assert_allclose(losses.activation_loss(jnp.array([[1.0, -2.0], [3.0, -4.0]])), -2.5)


def test_information_entropy_hand_values_and_bases():
  one_row = jnp.array([[0.0, LN3]])  # p̄ = (1/4, 3/4)
  natural = 0.25 * math.log(0.25) + 0.75 * math.log(0.75)
  np.testing.assert_allclose(losses.information_entropy(one_row), natural, rtol=1e-6)
  np.testing.assert_allclose(losses.information_entropy(one_row, log_base=10.0),
                             0.25 * math.log10(0.25) + 0.75 * math.log10(0.75), rtol=1e-6)
  # Two opposite rows average to a uniform p̄: the minimum, −ln C.
  balanced = jnp.array([[0.0, LN3], [LN3, 0.0]])
  np.testing.assert_allclose(losses.information_entropy(balanced), -LN2, rtol=1e-6)


@pytest.mark.slow
def test_information_entropy_is_minimised_by_uniform_mean():
  uniform_value = float(losses.information_entropy(jnp.zeros((4, 5))))
  np.testing.assert_allclose(uniform_value, -math.log(5), rtol=1e-6)
  for seed in range(5):
    assert float(losses.information_entropy(_random_logits(seed))) > uniform_value
  # At a uniform p̄ the gradient vanishes; elsewhere a descent step moves p̄ towards uniform.
  np.testing.assert_allclose(jax.grad(losses.information_entropy)(jnp.zeros((4, 5))), 0.0, atol=1e-7)
  logits = _random_logits(9)
  step = logits - 0.5 * jax.grad(losses.information_entropy)(logits)
  assert float(losses.information_entropy(step)) < float(losses.information_entropy(logits))


def test_batch_mean_entropy_at_temperature():
  logits = jnp.array([[2 * LN3, 0.0]])  # at T = 2: (3/4, 1/4)
  np.testing.assert_allclose(losses.batch_mean_entropy(logits, temperature=2.0),
                             -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), rtol=1e-6)


def test_curriculum_weight_hand_values_and_no_gradient():
  np.testing.assert_allclose(losses.curriculum_weight(jnp.array(0.0), 0.0), 1.0)
  np.testing.assert_allclose(losses.curriculum_weight(jnp.array(LN3), 0.0), 2 / (1 + 3), rtol=1e-6)
  np.testing.assert_allclose(losses.curriculum_weight(jnp.array([1.0]), 1.0), [(1 + math.exp(-1)) / 2], rtol=1e-6)
  # The weight is a constant for the backward pass: d(v·ℓ)/dℓ = v.
  loss = jnp.array(0.7)
  grad = jax.grad(lambda x: losses.curriculum_weight(x, 0.3) * x)(loss)
  np.testing.assert_allclose(grad, losses.curriculum_weight(loss, 0.3), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Adversarial terms
# ------------------------------------------------------------------------------------------------

# Row 0 agrees (argmax 0 for both): p_s = (2/3, 1/3), p_t = (9/10, 1/10). Row 1 disagrees.
_ADV_STUDENT = jnp.array([[LN2, 0.0], [0.0, 1.0]])
_ADV_TEACHER = jnp.array([[math.log(9.0), 0.0], [1.0, 0.0]])
_ADV_KL_ROW0 = _kl([0.9, 0.1], [2 / 3, 1 / 3])


def test_masked_adversarial_kl_hand_values():
  # Divided by the full batch (2), the disagreeing row counted as 0.
  np.testing.assert_allclose(losses.masked_adversarial_kl(_ADV_STUDENT, _ADV_TEACHER), -_ADV_KL_ROW0 / 2, rtol=1e-6)
  # CuDFKD at T = 3: logits ×3 give the same probabilities; the reference kldiv multiplies by T² = 9.
  np.testing.assert_allclose(losses.masked_adversarial_kl(3 * _ADV_STUDENT, 3 * _ADV_TEACHER, 3.0),
                             -9 * _ADV_KL_ROW0 / 2, rtol=1e-6)


def test_masked_adversarial_kl_gradient_pushes_student_away_from_teacher():
  grad = jax.grad(losses.masked_adversarial_kl)(_ADV_STUDENT, _ADV_TEACHER)
  np.testing.assert_array_equal(grad[1], [0.0, 0.0])  # masked row: no gradient
  assert float(jnp.abs(grad[0]).sum()) > 0
  before = losses.kl_per_example(_ADV_STUDENT, _ADV_TEACHER)
  after = losses.kl_per_example(_ADV_STUDENT - 0.1 * grad, _ADV_TEACHER)
  assert float(after[0]) > float(before[0])


def _js_by_hand(p, q):
  """Clamped JS of the references for one row, computed from probabilities in float64."""
  clamp = lambda v: min(max(v, 0.01), 0.99)
  m = [clamp(0.5 * (a + b)) for a, b in zip(p, q)]
  p, q = [clamp(v) for v in p], [clamp(v) for v in q]
  return 0.5 * sum(mi * math.log(mi / pi) for mi, pi in zip(m, p)) + \
      0.5 * sum(mi * math.log(mi / qi) for mi, qi in zip(m, q))


def test_jensen_shannon_hand_values():
  # Row 0 stays inside the clamps: P = (1/2, 1/2), Q = (3/4, 1/4). Row 1 is clamped everywhere:
  # P ≈ (1, 0), Q ≈ (0, 1) → clamped (0.99, 0.01) and (0.01, 0.99), M = (1/2, 1/2).
  student = 3 * jnp.array([[0.0, 0.0], [30.0, 0.0]])
  teacher = 3 * jnp.array([[LN3, 0.0], [0.0, 30.0]])
  expected = (_js_by_hand([0.5, 0.5], [0.75, 0.25]) + _js_by_hand([1.0, 0.0], [0.0, 1.0])) / 2
  np.testing.assert_allclose(losses.jensen_shannon(student, teacher, 3.0), expected, rtol=1e-6)


def test_jensen_shannon_is_symmetric_and_zero_on_equal_inputs():
  student, teacher = _random_logits(10), _random_logits(11)
  np.testing.assert_allclose(losses.jensen_shannon(student, teacher), losses.jensen_shannon(teacher, student),
                             rtol=1e-6)
  np.testing.assert_allclose(losses.jensen_shannon(student, student), 0.0, atol=1e-7)
  assert float(losses.jensen_shannon(student, teacher)) > 0


def test_adi_competition_loss_clamps():
  # Identical outputs: JS = 0 → 1. Opposite saturated outputs: JS = 1.614 > 1 → clamped to 0.
  logits = _random_logits(12)
  np.testing.assert_allclose(losses.adi_competition_loss(logits, logits), 1.0, atol=1e-7)
  student, teacher = jnp.array([[90.0, 0.0]]), jnp.array([[0.0, 90.0]])
  assert _js_by_hand([1.0, 0.0], [0.0, 1.0]) > 1
  np.testing.assert_allclose(losses.adi_competition_loss(student, teacher), 0.0)
  mid_s, mid_t = jnp.array([[0.0, 0.0]]), jnp.array([[3 * LN3, 0.0]])
  np.testing.assert_allclose(losses.adi_competition_loss(mid_s, mid_t), 1 - _js_by_hand([0.5, 0.5], [0.75, 0.25]),
                             rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# BN-statistics loss
# ------------------------------------------------------------------------------------------------

def _moments(*pairs):
  return [(jnp.asarray(m, jnp.float32), jnp.asarray(v, jnp.float32)) for m, v in pairs]


def test_bn_statistics_loss_hand_values():
  batch = _moments(([0.0, 0.0], [1.0, 1.0]), ([1.0, 1.0, 1.0], [2.0, 2.0, 2.0]))
  running = _moments(([3.0, 4.0], [1.0, 1.0]), ([1.0, 1.0, 1.0], [2.0, 8.0, 10.0]))
  # Layer 0: ‖(3, 4)‖ = 5 from the means; layer 1: ‖(0, 6, 8)‖ = 10 from the variances.
  np.testing.assert_allclose(losses.bn_statistics_loss(batch, running), 15.0, rtol=1e-6)
  np.testing.assert_allclose(losses.bn_statistics_loss(batch, running, first_multiplier=10.0), 60.0, rtol=1e-6)


def test_bn_statistics_loss_zero_at_running_stats_with_zero_gradient():
  stats = _moments(([0.1, -0.2], [0.5, 1.5]), ([0.3], [2.0]))
  assert float(losses.bn_statistics_loss(stats, stats)) == 0.0
  grads = jax.grad(losses.bn_statistics_loss)(stats, stats)
  for mean_grad, var_grad in grads:
    np.testing.assert_array_equal(mean_grad, np.zeros_like(mean_grad))
    np.testing.assert_array_equal(var_grad, np.zeros_like(var_grad))


def test_bn_statistics_loss_without_bn_layers_is_zero():
  assert float(losses.bn_statistics_loss([], [])) == 0.0


def test_bn_statistics_loss_rejects_mismatched_layers():
  with pytest.raises(ValueError, match='BN statistics'):
    losses.bn_statistics_loss(_moments(([0.0], [1.0])), [])


def test_bn_statistics_loss_matches_reference_hook_fixture():
  """The CMI-fw DeepInversionHook sum on wrn16_1 (torch fixture), from the recorded BN-input moments."""
  doc, ref, state_dict = rf.load('cmi__wrn16_1')
  names = doc['bn_modules']
  batch = [(ref[f'bn_in_mean/{n}'], ref[f'bn_in_var/{n}']) for n in names]
  running = [(state_dict[f'{n}.running_mean'], state_dict[f'{n}.running_var']) for n in names]
  per_layer = [losses.bn_statistics_loss([b], [r]) for b, r in zip(batch, running)]
  rf.assert_close(per_layer, ref['bn_r_feature_eval'], 'bn_r_feature_eval')
  rf.assert_close(losses.bn_statistics_loss(batch, running), ref['bn_loss_eval'], 'bn_loss_eval')


def test_blend_and_ema_follow_the_reference_hook():
  momentum = 0.9
  first = _moments(([1.0], [2.0]))
  second = _moments(([11.0], [12.0]))
  # First call: no EMA yet, statistics used as they are; the EMA is initialised to them.
  np.testing.assert_array_equal(losses.blend_batch_stats(first, None, momentum=momentum)[0][0], [1.0])
  ema = losses.update_stats_ema(None, first, momentum=momentum)
  np.testing.assert_array_equal(ema[0][1], [2.0])
  # Second call: compared statistics are 0.1·batch + 0.9·EMA.
  blended = losses.blend_batch_stats(second, ema, momentum=momentum)
  np.testing.assert_allclose(blended[0][0], [0.1 * 11 + 0.9 * 1], rtol=1e-6)
  np.testing.assert_allclose(blended[0][1], [0.1 * 12 + 0.9 * 2], rtol=1e-6)
  ema = losses.update_stats_ema(ema, second, momentum=momentum)
  np.testing.assert_allclose(ema[0][0], [0.9 * 1 + 0.1 * 11], rtol=1e-6)
  # Gradient reaches the batch statistics scaled by (1 − mmt), never the EMA.
  running = _moments(([0.0], [0.0]))

  def loss_of(batch_stats, ema_stats):
    return losses.bn_statistics_loss(losses.blend_batch_stats(batch_stats, ema_stats, momentum=momentum), running)

  batch_grad, ema_grad = jax.grad(loss_of, argnums=(0, 1))(second, ema)
  np.testing.assert_allclose(batch_grad[0][0], [0.1], rtol=1e-6)  # d|x|/dx = 1 for x > 0
  np.testing.assert_array_equal(ema_grad[0][0], [0.0])


# ------------------------------------------------------------------------------------------------
# Image priors
# ------------------------------------------------------------------------------------------------

def test_total_variation_hand_values():
  image = jnp.array([[1.0, 2.0], [4.0, 8.0]])[None, :, :, None]  # NHWC, one 2×2 channel
  # horizontal (−1, −4), vertical (−3, −6), anti-diagonal 4 − 2 = 2, diagonal 1 − 8 = −7
  np.testing.assert_allclose(losses.total_variation_l1(image), 2.5 + 4.5 + 2 + 7, rtol=1e-6)
  np.testing.assert_allclose(losses.total_variation_l2(image), math.sqrt(17) + math.sqrt(45) + 2 + 7, rtol=1e-6)


def _tv_nchw_numpy(x):
  """The reference's four differences on an NCHW array (numpy, float64)."""
  diffs = [x[:, :, :, :-1] - x[:, :, :, 1:], x[:, :, :-1, :] - x[:, :, 1:, :],
           x[:, :, 1:, :-1] - x[:, :, :-1, 1:], x[:, :, :-1, :-1] - x[:, :, 1:, 1:]]
  return sum(np.abs(d).mean() for d in diffs), sum(np.sqrt((d**2).sum()) for d in diffs)


def test_total_variation_nhwc_equals_reference_on_nchw():
  x_nchw = np.random.default_rng(13).normal(size=(2, 3, 5, 7))  # H ≠ W catches swapped axes
  tv_l1, tv_l2 = _tv_nchw_numpy(x_nchw)
  x_nhwc = jnp.asarray(x_nchw.transpose(0, 2, 3, 1), jnp.float32)
  np.testing.assert_allclose(losses.total_variation_l1(x_nhwc), tv_l1, rtol=1e-6)
  np.testing.assert_allclose(losses.total_variation_l2(x_nhwc), tv_l2, rtol=1e-6)


@pytest.mark.slow
def test_total_variation_l2_gradient_finite_on_constant_image():
  grad = jax.grad(losses.total_variation_l2)(jnp.ones((1, 4, 4, 3)))
  np.testing.assert_array_equal(grad, np.zeros((1, 4, 4, 3)))


def test_l2_prior_hand_values():
  images = jnp.array([[3.0, 4.0], [0.0, 0.0]]).reshape(2, 1, 1, 2)
  np.testing.assert_allclose(losses.l2_prior(images), (5 + 0) / 2)
  np.testing.assert_allclose(losses.l2_prior(images, per_example=False), 5.0)
  grad = jax.grad(losses.l2_prior)(images)
  np.testing.assert_allclose(grad[0].ravel(), [0.3, 0.4], rtol=1e-6)  # x/‖x‖ / N
  np.testing.assert_array_equal(grad[1].ravel(), [0.0, 0.0])



def test_pixel_range_penalty_hand_values():
  """Mean out-of-range mass of pixel-unit images; the subgradient at the bounds is 0 (relu)."""
  images = jnp.array([-0.5, 0.2, 1.0, 1.5, 0.0, 0.7]).reshape(1, 2, 3, 1)
  np.testing.assert_allclose(losses.pixel_range_penalty(images), (0.5 + 0.5) / 6)
  grad = jax.grad(losses.pixel_range_penalty)(images)
  np.testing.assert_allclose(grad.ravel(), [-1 / 6, 0, 0, 1 / 6, 0, 0])

# ------------------------------------------------------------------------------------------------
# Attention transfer and CMI contrastive loss
# ------------------------------------------------------------------------------------------------

def test_attention_transfer_hand_values():
  student = jnp.array([3.0, 4.0]).reshape(1, 1, 2, 1)  # squares (9, 16), norm sqrt(337)
  teacher = jnp.ones((1, 1, 2, 1))                     # map (1, 1)/sqrt(2)
  a_s = np.array([9.0, 16.0]) / math.sqrt(337)
  a_t = np.array([1.0, 1.0]) / math.sqrt(2)
  np.testing.assert_allclose(losses.attention_map(student), a_s[None], rtol=1e-6)
  expected = np.mean((a_s - a_t)**2)
  np.testing.assert_allclose(losses.attention_transfer([student], [teacher]), expected, rtol=1e-6)
  # Groups add up; identical activations give 0.
  np.testing.assert_allclose(losses.attention_transfer([student, teacher], [teacher, teacher]), expected, rtol=1e-6)
  with pytest.raises(ValueError, match='groups'):
    losses.attention_transfer([student], [])


def test_attention_map_is_channel_mean_of_squares_in_nchw_order():
  x_nchw = np.random.default_rng(14).normal(size=(2, 4, 3, 5))
  v = (x_nchw**2).mean(1).reshape(2, -1)
  expected = v / np.linalg.norm(v, axis=1, keepdims=True)
  np.testing.assert_allclose(losses.attention_map(jnp.asarray(x_nchw.transpose(0, 2, 3, 1), jnp.float32)),
                             expected, rtol=1e-5)


def test_cmi_contrastive_loss_hand_values():
  eye3 = jnp.eye(3)
  # τ = 0.5: logits 2·I, each row's CE = log(1 + 2e^{-2}).
  per_row = math.log(1 + 2 * math.exp(-2))
  np.testing.assert_allclose(losses.cmi_contrastive_loss(eye3, eye3, temperature=0.5, num_current=3), per_row,
                             rtol=1e-6)
  # Two current rows + one cached row: mean of each part, summed.
  np.testing.assert_allclose(losses.cmi_contrastive_loss(eye3, eye3, temperature=0.5, num_current=2), 2 * per_row,
                             rtol=1e-6)


def test_cmi_contrastive_loss_global_view_gets_no_gradient():
  rng = np.random.default_rng(15)
  local = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  global_ = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  local_grad, global_grad = jax.grad(losses.cmi_contrastive_loss, argnums=(0, 1))(
      local, global_, temperature=0.2, num_current=3)
  np.testing.assert_array_equal(global_grad, np.zeros((5, 4)))
  assert float(jnp.abs(local_grad).sum()) > 0


# ------------------------------------------------------------------------------------------------
# jit / grad over every term
# ------------------------------------------------------------------------------------------------

_S, _T = _random_logits(16), _random_logits(17)
_IMAGES = jnp.asarray(np.random.default_rng(18).normal(size=(2, 6, 6, 3)), jnp.float32)
_LOGIT_TERMS = {
    'kd_kl': lambda s: losses.kd_kl(s, _T, 20.0),
    'kd_kl_mean': lambda s: losses.kd_kl(s, _T, reduction='mean'),
    'l1_logits': lambda s: losses.l1_logits(s, _T),
    'cross_entropy': lambda s: losses.cross_entropy(s, jnp.arange(6) % 5),
    'cross_entropy_onehot': losses.cross_entropy_onehot,
    'soft_cross_entropy': lambda s: losses.soft_cross_entropy(s, jax.nn.softmax(_T)),
    'information_entropy': lambda s: losses.information_entropy(s, log_base=10.0),
    'batch_mean_entropy': lambda s: losses.batch_mean_entropy(s, temperature=3.0),
    'masked_adversarial_kl': lambda s: losses.masked_adversarial_kl(s, _T, 3.0),
    'jensen_shannon': lambda s: losses.jensen_shannon(s, _T),
    'adi_competition_loss': lambda s: losses.adi_competition_loss(s, _T),
}
_IMAGE_TERMS = {
    'total_variation_l1': losses.total_variation_l1,
    'total_variation_l2': losses.total_variation_l2,
    'l2_prior': losses.l2_prior,
    'activation_loss': losses.activation_loss,
    'attention_transfer': lambda x: losses.attention_transfer([x], [_IMAGES[::-1]]),
}


@pytest.mark.parametrize('name', sorted(_LOGIT_TERMS) + sorted(_IMAGE_TERMS))
def test_every_term_jits_and_differentiates(name):
  fn, arg = (_LOGIT_TERMS[name], _S) if name in _LOGIT_TERMS else (_IMAGE_TERMS[name], _IMAGES)
  value, grad = jax.jit(jax.value_and_grad(fn))(arg)
  np.testing.assert_allclose(value, fn(arg), rtol=1e-5)
  assert value.shape == () and grad.shape == arg.shape
  assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).sum()) > 0


# ------------------------------------------------------------------------------------------------
# Against the reference formulas written with torch
# ------------------------------------------------------------------------------------------------

_TEMPERATURES = (1.0, 3.0, 20.0)


def _image_inputs():
  """(x, y) in NCHW for the image priors and attention transfer."""
  x = np.random.default_rng(19).normal(size=(3, 2, 6, 9)).astype(np.float32)
  return x, x[::-1].copy()


def _statistics_inputs():
  rng = np.random.default_rng(20)
  features = rng.normal(size=(4, 3, 5, 5)).astype(np.float32)
  running = rng.normal(size=3).astype(np.float32), rng.uniform(0.5, 1.5, size=3).astype(np.float32)
  local, global_ = (rng.normal(size=(6, 4)).astype(np.float32) for _ in range(2))
  return features, running, local, global_


def torch_reference(torch) -> dict:
  """The reference formulas with torch.nn.functional on the inputs above: name -> value (committed as
  fixtures/torch_files/losses.npz by fixtures/make_torch_files.py)."""
  F = torch.nn.functional
  s, t = torch.from_numpy(np.array(_S)), torch.from_numpy(np.array(_T))
  out = {}
  for temperature in _TEMPERATURES:
    log_q, p = F.log_softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1)
    out[f'kd_kl/batchmean/{temperature}'] = F.kl_div(log_q, p, reduction='batchmean') * temperature**2
    with warnings.catch_warnings():
      warnings.filterwarnings('ignore', 'reduction')  # torch's note on its elementwise 'mean'
      out[f'kd_kl/mean/{temperature}'] = F.kl_div(log_q, p, reduction='mean') * temperature**2
    mask = (s.max(1)[1] == t.max(1)[1]).float()
    out['argmax_agrees'] = mask
    out[f'masked_adversarial_kl/{temperature}'] = -(F.kl_div(log_q, p, reduction='none').sum(1) * temperature**2
                                                    * mask).mean()
  for scale in (1, 4):  # 4 saturates some probabilities so the clamps act
    p, q = F.softmax(scale * s / 3, dim=1), F.softmax(scale * t / 3, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    js = 0.5 * F.kl_div(p.log(), m, reduction='batchmean') + 0.5 * F.kl_div(q.log(), m, reduction='batchmean')
    out[f'jensen_shannon/{scale}'], out[f'adi_competition/{scale}'] = js, 1 - js.clamp(0, 1)
  out['cross_entropy_onehot'] = F.cross_entropy(s, s.max(1)[1])
  out['soft_cross_entropy'] = torch.mean(torch.sum(-F.softmax(t, 1) * F.log_softmax(s, dim=-1), dim=-1))
  mean_p = F.softmax(s, dim=1).mean(0)
  out['information_entropy/log10'] = (mean_p * torch.log10(mean_p)).sum()
  mean_p3 = F.softmax(s / 3, dim=1).mean(0)
  out['batch_mean_entropy/3'] = -(mean_p3 * mean_p3.log()).sum()

  x, y = map(torch.from_numpy, _image_inputs())
  diffs = [x[:, :, :, :-1] - x[:, :, :, 1:], x[:, :, :-1, :] - x[:, :, 1:, :],
           x[:, :, 1:, :-1] - x[:, :, :-1, 1:], x[:, :, :-1, :-1] - x[:, :, 1:, 1:]]
  out['total_variation_l1'] = sum((d.abs() / 255.0).mean() for d in diffs) * 255.0
  out['total_variation_l2'] = sum(torch.norm(d) for d in diffs)
  out['l2_prior/per_example'] = torch.norm(x.view(3, -1), dim=1).mean()
  out['l2_prior/whole'] = torch.norm(x, 2)
  at = lambda f: F.normalize(f.pow(2).mean(1).view(f.size(0), -1))
  out['attention_transfer'] = (at(x) - at(y)).pow(2).mean()

  features, running, local, global_ = _statistics_inputs()
  features, (run_mean, run_var) = torch.from_numpy(features), map(torch.from_numpy, running)
  out['bn/mean'] = mean = features.mean([0, 2, 3])
  out['bn/var'] = var = features.permute(1, 0, 2, 3).contiguous().view([3, -1]).var(1, unbiased=False)
  out['bn/hook'] = torch.norm(run_var - var, 2) + torch.norm(run_mean - mean, 2)
  out['contrastive/local'] = local = F.normalize(torch.from_numpy(local), dim=1)
  out['contrastive/global'] = global_ = F.normalize(torch.from_numpy(global_), dim=1)
  per_row = F.cross_entropy(torch.mm(local, global_.T) / 0.1, torch.arange(6), reduction='none')
  out['contrastive/6'], out['contrastive/4'] = per_row.mean(), per_row[:4].mean() + per_row[4:].mean()
  return {name: value.numpy() for name, value in out.items()}


@pytest.fixture(scope='module', params=torch_files.SOURCES)
def reference(request):
  """torch_reference's values: committed, or (the torch group) computed by the installed torch."""
  return torch_files.values('losses', request.param, torch_reference)


def test_kl_terms_match_torch(reference):
  for temperature in _TEMPERATURES:
    np.testing.assert_allclose(losses.kd_kl(_S, _T, temperature), reference[f'kd_kl/batchmean/{temperature}'],
                               rtol=1e-5)
    np.testing.assert_allclose(losses.kd_kl(_S, _T, temperature, reduction='mean'),
                               reference[f'kd_kl/mean/{temperature}'], rtol=1e-5)
    np.testing.assert_allclose(losses.masked_adversarial_kl(_S, _T, temperature),
                               reference[f'masked_adversarial_kl/{temperature}'], rtol=1e-5)
  mask = reference['argmax_agrees']
  assert 0 < float(mask.sum()) < len(mask)  # the inputs exercise both masked and unmasked rows


def test_js_and_adi_match_torch(reference):
  for scale in (1, 4):
    student, teacher = scale * np.asarray(_S), scale * np.asarray(_T)
    np.testing.assert_allclose(losses.jensen_shannon(student, teacher), reference[f'jensen_shannon/{scale}'],
                               rtol=1e-5)
    np.testing.assert_allclose(losses.adi_competition_loss(student, teacher), reference[f'adi_competition/{scale}'],
                               rtol=1e-5)


def test_cross_entropies_and_class_balance_match_torch(reference):
  np.testing.assert_allclose(losses.cross_entropy_onehot(_S), reference['cross_entropy_onehot'], rtol=1e-6)
  np.testing.assert_allclose(losses.soft_cross_entropy(_S, jax.nn.softmax(_T)), reference['soft_cross_entropy'],
                             rtol=1e-5)
  np.testing.assert_allclose(losses.information_entropy(_S, log_base=10.0), reference['information_entropy/log10'],
                             rtol=1e-5)
  np.testing.assert_allclose(losses.batch_mean_entropy(_S, temperature=3.0), reference['batch_mean_entropy/3'],
                             rtol=1e-5)


@pytest.mark.slow
def test_image_priors_and_attention_match_torch(reference):
  x, y = (f.transpose(0, 2, 3, 1) for f in _image_inputs())
  np.testing.assert_allclose(losses.total_variation_l1(x), reference['total_variation_l1'], rtol=1e-5)
  np.testing.assert_allclose(losses.total_variation_l2(x), reference['total_variation_l2'], rtol=1e-5)
  np.testing.assert_allclose(losses.l2_prior(x), reference['l2_prior/per_example'], rtol=1e-5)
  np.testing.assert_allclose(losses.l2_prior(x, per_example=False), reference['l2_prior/whole'], rtol=1e-5)
  np.testing.assert_allclose(losses.attention_transfer([x], [y]), reference['attention_transfer'], rtol=1e-5)


def test_bn_loss_and_contrastive_match_torch(reference):
  running = _statistics_inputs()[1]
  ours = losses.bn_statistics_loss([(reference['bn/mean'], reference['bn/var'])], [running])
  np.testing.assert_allclose(ours, reference['bn/hook'], rtol=1e-6)
  for num_current in (6, 4):
    np.testing.assert_allclose(
        losses.cmi_contrastive_loss(reference['contrastive/local'], reference['contrastive/global'], temperature=0.1,
                                    num_current=num_current),
        reference[f'contrastive/{num_current}'], rtol=1e-5)


def test_total_variation_l1_gives_equal_neighbours_no_gradient_as_torch():
  """Pixels clipped to a bound differ by exactly 0; torch's |.| has derivative 0 there (jnp.abs: 1,
  which would push every pixel of a flat image)."""
  flat = jnp.full((2, 4, 4, 3), 1.0)
  np.testing.assert_array_equal(jax.grad(losses.total_variation_l1)(flat), np.zeros(flat.shape))
  assert float(jnp.abs(jax.grad(lambda x: jnp.abs(x[:, :, :-1] - x[:, :, 1:]).mean())(flat)).max()) > 0
  assert losses.abs_zero_subgradient(jnp.float32(-2.5)) == 2.5
