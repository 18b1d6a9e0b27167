"""Every loss term of the data-free KD methods, as small pure functions.

Logits are (N, C), batch first; images and feature maps are NHWC (the references are NCHW: every
spatial term below gives the same number on the transposed array). Reductions, norms and KL
directions follow the reference PyTorch code exactly (see ``docs/reference_semantics.md``: its
shared conventions and method sections); each docstring states the formula and which reference it reproduces.

Signs: a term that a method maximises is returned as the plain divergence and negated by the
caller (ZSKT/DFQ use ``-kd_kl``, DFAD ``-l1_logits``, CMI-fw DeepInversion ``-jensen_shannon``).
The exceptions are the terms that carry their own sign in the references:
``masked_adversarial_kl`` and ``adi_competition_loss``.

Notation: p_t = softmax(t/T), p_s = softmax(s/T) (student s, teacher t), KL(p‖q) =
Σ_c p_c (log p_c − log q_c), p̄ = (1/N) Σ_n softmax(logits_n).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from dfkd_jax.errors import check_choice

Array = jax.Array
# (mean, var) of one BN layer, each of shape (channels,).
Moments = tuple[Array, Array]

# JS clamps of NVlabs ADI and CMI-fw ``jsdiv``.
_JS_CLAMP_MIN, _JS_CLAMP_MAX = 0.01, 0.99
# ``F.normalize``'s default eps.
_NORMALIZE_EPS = 1e-12


def _log_softmax_t(logits: Array, temperature: float) -> Array:
  """log softmax(logits / T) over the class axis."""
  return jax.nn.log_softmax(logits / temperature, axis=-1)


def _l2_norm(x: Array) -> Array:
  """‖x‖₂ over all elements, with gradient 0 at x = 0 (as ``torch.norm``), not NaN."""
  squared = jnp.sum(jnp.square(x))
  is_zero = squared == 0
  # Double where: keeps sqrt's infinite derivative at 0 out of the backward pass.
  return jnp.where(is_zero, 0.0, jnp.sqrt(jnp.where(is_zero, 1.0, squared)))


# ----------------------------------------------------------------------------------------------
# Distillation terms
# ----------------------------------------------------------------------------------------------

def kl_per_example(student_logits: Array, teacher_logits: Array, temperature: float = 1.0) -> Array:
  """Per-example distillation KL, shape (N,):  ℓ_n = T² · KL(p_t,n ‖ p_s,n).

  CMI-fw ``kldiv(s, t, T, reduction='none').sum(1)`` (the T² factor is applied for any
  reduction there). Used unreduced by the masked adversarial KL and by per-sample weighting.
  """
  kl = optax.losses.kl_divergence_with_log_targets(_log_softmax_t(student_logits, temperature),
                                                   _log_softmax_t(teacher_logits, temperature))
  return kl * temperature**2


def kd_kl(student_logits: Array, teacher_logits: Array, temperature: float = 1.0, *,
          reduction: str = 'batchmean') -> Array:
  """Distillation loss T² · KL(p_t ‖ p_s), reduced over the batch.

  - ``reduction='batchmean'``: (1/N) Σ_n ℓ_n with ℓ_n from ``kl_per_example``. This is CMI-fw
    ``kldiv`` (CMI, DeepInv, Fast, NAYER students at T=20; zskt/dafl/dfq students at T=1) and the
    original DAFL ``kl_div(log_softmax(s), softmax(t), size_average=False) / N`` (T=1).
  - ``reduction='mean'``: (1/(N·C)) Σ_n ℓ_n, torch's elementwise 'mean'. The original ZSKT uses
    ``F.kl_div``'s default 'mean' at T=1 (it has no T² factor, which is 1 there): C times smaller
    than batchmean.
  """
  per_example = kl_per_example(student_logits, teacher_logits, temperature)
  if reduction == 'batchmean':
    return jnp.mean(per_example)
  if reduction == 'mean':
    return jnp.sum(per_example) / student_logits.size
  raise ValueError(f"reduction must be 'batchmean' or 'mean', got {reduction!r}")


def l1_logits(student_logits: Array, teacher_logits: Array) -> Array:
  """DFAD: mean over all N·C entries of |s − t| (torch ``L1Loss()``, reduction 'mean')."""
  return jnp.mean(jnp.abs(student_logits - teacher_logits))


def attention_map(features: Array) -> Array:
  """Attention map of NHWC activations, shape (N, H·W):  a_n = v_n / max(‖v_n‖₂, 1e-12) with
  v_n = mean_c f_n,c² flattened over (H, W).

  ZSKT (after Zagoruyko & Komodakis, p = 2): ``F.normalize(x.pow(2).mean(1).view(N, -1))``.
  """
  spatial = jnp.mean(jnp.square(features), axis=-1).reshape(features.shape[0], -1)
  norms = jax.vmap(_l2_norm)(spatial)[:, None]
  return spatial / jnp.maximum(norms, _NORMALIZE_EPS)


def attention_transfer(student_features: Sequence[Array], teacher_features: Sequence[Array]) -> Array:
  """ZSKT attention loss:  Σ_g mean_{n,i} (a_s,g − a_t,g)²  over paired groups g.

  a = ``attention_map``; the mean runs over the N·H·W entries of each group. The original
  multiplies this sum by β = 250; callers apply β.
  """
  if len(student_features) != len(teacher_features):
    raise ValueError(f'{len(student_features)} student vs {len(teacher_features)} teacher groups')
  return sum(jnp.mean(jnp.square(attention_map(s) - attention_map(t)))
             for s, t in zip(student_features, teacher_features))


def curriculum_weight(loss: Array, lam: float) -> Array:
  """CuDFKD self-paced weight ('log' type):  v = (1 + e^{−λ}) / (1 + e^{ℓ − λ}).

  ljrprocc/DataFree ``curr_v(l, lamda, 'log')``, evaluated under ``torch.no_grad``: the weight is
  a constant for the backward pass (stop_gradient), the student loss is then Σ v·ℓ. v = 1 at
  ℓ = 0 and decreases with ℓ. The reference's extra term g is computed under no_grad too, so it
  only shifts the reported loss and is left out.
  """
  loss = jax.lax.stop_gradient(loss)
  return (1.0 + jnp.exp(-lam)) / (1.0 + jnp.exp(loss - lam))


# ----------------------------------------------------------------------------------------------
# Pseudo-label and class-balance terms
# ----------------------------------------------------------------------------------------------

def cross_entropy(logits: Array, labels: Array) -> Array:
  """−(1/N) Σ_n log softmax(logits_n)[y_n] for integer labels (``F.cross_entropy``, mean)."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))


def cross_entropy_onehot(logits: Array) -> Array:
  """DAFL "one-hot" loss: ``cross_entropy(logits, argmax logits)``; the labels carry no gradient.

  Original DAFL, CMI-fw ``onehot_loss`` (DAFL, DFQ), CuDFKD ``oh`` term.
  """
  return cross_entropy(logits, jnp.argmax(logits, axis=-1))


def soft_cross_entropy(logits: Array, target_probs: Array) -> Array:
  """−(1/N) Σ_n Σ_c y_n,c log softmax(logits_n)_c for target distributions y (NAYER
  ``custom_cross_entropy``). With one-hot y it equals ``cross_entropy`` on the hot index.
  """
  return jnp.mean(optax.losses.softmax_cross_entropy(logits, target_probs))


def activation_loss(features: Array) -> Array:
  """DAFL activation term −mean|f| over all entries of the teacher's penultimate features."""
  return -jnp.mean(jnp.abs(features))


def information_entropy(logits: Array, *, log_base: float = math.e) -> Array:
  """DAFL class-balance term  Σ_c p̄_c log_b p̄_c  (= −H(p̄)), minimised by a uniform p̄.

  ``log_base=10`` is the original DAFL (``torch.log10``); the natural log (default) is CMI-fw
  ``class_balance_loss`` (DAFL and DFQ ``--balance``). As in both references, a class whose p̄
  underflows to 0 gives NaN.
  """
  mean_probs = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)
  return jnp.sum(mean_probs * jnp.log(mean_probs)) / math.log(log_base)


def batch_mean_entropy(logits: Array, *, temperature: float = 1.0) -> Array:
  """CuDFKD entropy  H(p̄) = −Σ_c p̄_c ln p̄_c  of the batch-mean softmax(logits/T).

  The generator loss adds ``lmda_ent · H`` with lmda_ent = −20 (entropy maximised).
  """
  return -information_entropy(logits / temperature)


# ----------------------------------------------------------------------------------------------
# Adversarial (student-teacher disagreement) terms
# ----------------------------------------------------------------------------------------------

def masked_adversarial_kl(student_logits: Array, teacher_logits: Array,
                          temperature: float = 1.0) -> Array:
  """Decision-adversarial term  −(1/N) Σ_n m_n ℓ_n,  m_n = [argmax s_n = argmax t_n].

  ℓ_n = ``kl_per_example`` (including T²); the mean divides by the full batch N, masked samples
  included. Minimising it drives the generator towards samples on which the student still agrees
  with the teacher but diverges in distribution. CMI, Fast and NAYER use T = 1; CuDFKD
  ``adv_type='kl'`` uses T = 3, where the reference's ``kldiv`` multiplies by T² = 9.
  """
  agree = jnp.argmax(student_logits, axis=-1) == jnp.argmax(teacher_logits, axis=-1)
  per_example = kl_per_example(student_logits, teacher_logits, temperature)
  return -jnp.mean(per_example * agree)


def jensen_shannon(student_logits: Array, teacher_logits: Array, temperature: float = 3.0) -> Array:
  """Clamped JS-style divergence of NVlabs ADI and CMI-fw ``jsdiv``:

    P = softmax(s/T), Q = softmax(t/T), M = (P + Q)/2, then P, Q, M each clamped to [0.01, 0.99];
    JS = ½ (1/N) Σ_n KL(M_n ‖ P_n) + ½ (1/N) Σ_n KL(M_n ‖ Q_n).

  Exactly what both references compute (``KLDivLoss(batchmean)(log P, M)``): M is formed from the
  unclamped P, Q; each KL runs from M to P/Q (the textbook JS has KL(P ‖ M)); no T² factor.
  Symmetric in (s, t); 0 when s = t. Both references call it with T = 3. CMI-fw DeepInversion
  uses ``-jensen_shannon`` (caller negates); NVlabs ADI and CuDFKD ``adv_type='js'`` use
  ``adi_competition_loss``.
  """
  p = jnp.exp(_log_softmax_t(student_logits, temperature))
  q = jnp.exp(_log_softmax_t(teacher_logits, temperature))
  m = jnp.clip(0.5 * (p + q), _JS_CLAMP_MIN, _JS_CLAMP_MAX)
  log_m = jnp.log(m)

  def kl_from_m(dist):
    dist = jnp.clip(dist, _JS_CLAMP_MIN, _JS_CLAMP_MAX)
    return jnp.sum(m * (log_m - jnp.log(dist))) / dist.shape[0]

  return 0.5 * kl_from_m(p) + 0.5 * kl_from_m(q)


def adi_competition_loss(student_logits: Array, teacher_logits: Array,
                         temperature: float = 3.0) -> Array:
  """Adaptive DeepInversion competition term  1 − clamp(JS, 0, 1)  with JS = ``jensen_shannon``.

  NVlabs ``deepinversion.py`` (scaled by ``adi_scale``) and CuDFKD ``adv_type='js'``.
  """
  return 1.0 - jnp.clip(jensen_shannon(student_logits, teacher_logits, temperature), 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# BatchNorm-statistics (DeepInversion feature) terms
# ----------------------------------------------------------------------------------------------

def bn_statistics_loss(batch_stats: Sequence[Moments], running_stats: Sequence[Moments], *,
                       first_multiplier: float = 1.0) -> Array:
  """DeepInversion feature loss  Σ_l m_l (‖σ²_run,l − σ²_l‖₂ + ‖μ_run,l − μ_l‖₂).

  (μ_l, σ²_l) are the mean and **biased** variance of BN layer l's *input* over (N, H, W);
  (μ_run, σ²_run) its running statistics; both sequences list every BN layer in the same order.
  The norms are plain L2 norms (not squared, not averaged). m_0 = ``first_multiplier`` (10 in
  NVlabs ImageNet, 1 in CMI-fw and NVlabs CIFAR), m_l = 1 otherwise. CMI-fw ``DeepInversionHook``.
  At σ² = σ²_run and μ = μ_run the loss is 0 and its gradient is 0 (torch's ``norm`` subgradient).
  From a teacher forward: ``engines.common.TeacherView.bn_moments`` and ``.bn_running``.
  """
  if len(batch_stats) != len(running_stats):
    raise ValueError(f'{len(batch_stats)} batch vs {len(running_stats)} running BN statistics')
  terms = [_l2_norm(run_var - var) + _l2_norm(run_mean - mean)
           for (mean, var), (run_mean, run_var) in zip(batch_stats, running_stats)]
  if not terms:  # a teacher without BN layers (LeNet-5): the references' empty sum
    return jnp.zeros(())
  return first_multiplier * terms[0] + sum(terms[1:])


def blend_batch_stats(batch_stats: Sequence[Moments], ema_stats: Sequence[Moments] | None, *,
                      momentum: float) -> list[Moments]:
  """Fast/NAYER ``bn_mmt``: the statistics compared with the running ones,
  (1 − mmt)·(μ, σ²) + mmt·EMA(μ, σ²), per layer; feed the result to ``bn_statistics_loss``.

  The EMA carries no gradient (``.data`` in the reference). Before the first EMA update
  (``ema_stats=None``) the batch statistics are used as they are, as the reference hook does.
  """
  if ema_stats is None:
    return list(batch_stats)
  ema_stats = jax.lax.stop_gradient(ema_stats)
  return [((1 - momentum) * mean + momentum * ema_mean, (1 - momentum) * var + momentum * ema_var)
          for (mean, var), (ema_mean, ema_var) in zip(batch_stats, ema_stats)]


def update_stats_ema(ema_stats: Sequence[Moments] | None, batch_stats: Sequence[Moments], *,
                     momentum: float) -> list[Moments]:
  """Fast/NAYER ``update_mmt``, once per synthesis call on the last iteration's statistics:
  EMA ← mmt·EMA + (1 − mmt)·(μ, σ²), initialised to (μ, σ²) on the first call. No gradient.
  """
  batch_stats = jax.lax.stop_gradient(list(batch_stats))
  if ema_stats is None:
    return batch_stats
  return [(momentum * ema_mean + (1 - momentum) * mean, momentum * ema_var + (1 - momentum) * var)
          for (ema_mean, ema_var), (mean, var) in zip(ema_stats, batch_stats)]


# ----------------------------------------------------------------------------------------------
# DeepInversion image priors (images NHWC)
# ----------------------------------------------------------------------------------------------

def _neighbour_differences(images: Array) -> tuple[Array, Array, Array, Array]:
  """The 4 neighbour differences of DeepInversion's ``get_image_prior_losses``: horizontal,
  vertical, anti-diagonal x[h+1, w] − x[h, w+1] and diagonal x[h, w] − x[h+1, w+1]."""
  return (images[:, :, :-1] - images[:, :, 1:],
          images[:, :-1, :] - images[:, 1:, :],
          images[:, 1:, :-1] - images[:, :-1, 1:],
          images[:, :-1, :-1] - images[:, 1:, 1:])


def abs_zero_subgradient(x: Array) -> Array:
  """|x| with derivative sign(x), 0 at x = 0, as torch's ``abs`` (``jnp.abs``'s is 1 at 0). It
  matters for TV-L1 on images clipped to the pixel range: neighbours both at a bound differ by
  exactly 0, and the references give that difference no gradient. The forward value is |x|
  bitwise (x·(±1) is exact)."""
  return x * jax.lax.stop_gradient(jnp.sign(x))


def total_variation_l1(images: Array) -> Array:
  """TV-L1 prior  Σ_{k=1..4} mean|d_k|  over the 4 neighbour differences d_k (each averaged
  over its own N·(H−·)·(W−·)·C entries, then summed). CMI-fw ``get_image_prior_losses`` and
  NVlabs ``loss_var_l1`` (their ÷255 … ×255 cancels). |·| has derivative 0 at 0, as torch's
  (``abs_zero_subgradient``).
  """
  return sum(jnp.mean(abs_zero_subgradient(d)) for d in _neighbour_differences(images))


def total_variation_l2(images: Array) -> Array:
  """TV-L2 prior  Σ_{k=1..4} ‖d_k‖₂  (NVlabs ``loss_var_l2``): each norm runs over the whole
  batch tensor of one difference and is not squared.
  """
  return sum(_l2_norm(d) for d in _neighbour_differences(images))


def l2_prior(images: Array, *, per_example: bool = True) -> Array:
  """ℓ2 image prior.

  - ``per_example=True``: (1/N) Σ_n ‖x_n‖₂, NVlabs ``torch.norm(x.view(N, -1), dim=1).mean()``.
  - ``per_example=False``: ‖x‖₂ of the whole batch, CMI-fw DeepInversion ``torch.norm(inputs, 2)``
    (weighted by ``l2=0`` in its scripts).
  """
  if not per_example:
    return _l2_norm(images)
  return jnp.mean(jax.vmap(_l2_norm)(images))


def pixel_range_penalty(images_unit: Array) -> Array:
  """Out-of-range mass  mean(relu(−u) + relu(u − 1))  of images ``u`` mapped back to pixel units
  ([0, 1] is what a camera can record). Not from a reference: a data-free prior that uses only the
  teacher's input normalisation (``config.generator.range_penalty``, engines/generative.py)."""
  return jnp.mean(jax.nn.relu(-images_unit) + jax.nn.relu(images_unit - 1.0))


# ----------------------------------------------------------------------------------------------
# CMI contrastive term
# ----------------------------------------------------------------------------------------------

def cmi_contrastive_loss(local_projections: Array, global_projections: Array, *,
                         temperature: float, num_current: int, cached_valid: Array | None = None) -> Array:
  """CMI's contrastive loss on projected (L2-normalised) features, rows = [current; cached].

  logits = local @ stop_gradient(global)ᵀ / τ, shape (B+K, B+K); ℓ_i = CE(logits_i, i) (the
  positive is the diagonal). With cached rows (K > 0) the loss is mean_{i<B} ℓ_i + mean_{i≥B} ℓ_i
  (B = ``num_current``), so the cached rows do not dilute the generator's gradient; with K = 0 it
  is mean_i ℓ_i. CMI ``CMISynthesizer.synthesize`` (τ = ``cr_T``).

  ``cached_valid`` (K,) bool marks which cached rows are real (``synth.bank.sample``'s mask while
  the bank is filling): the others are left out of every softmax (their columns) and of the mean
  over cached rows, which is then over the valid ones only, or dropped if there are none (the
  reference's first call, whose bank is empty). With every row valid it equals the unmasked loss.
  """
  logits = local_projections @ jax.lax.stop_gradient(global_projections).T / temperature
  if cached_valid is not None:
    columns = jnp.concatenate([jnp.ones((num_current,), bool), cached_valid])
    logits = jnp.where(columns[None, :], logits, -jnp.inf)
  per_row = -jnp.diagonal(jax.nn.log_softmax(logits, axis=-1))
  if per_row.shape[0] == num_current:
    return jnp.mean(per_row)
  current, cached = per_row[:num_current], per_row[num_current:]
  if cached_valid is None:
    return jnp.mean(current) + jnp.mean(cached)
  count = jnp.sum(cached_valid)
  cached_mean = jnp.sum(jnp.where(cached_valid, cached, 0.0)) / jnp.maximum(count, 1)
  return jnp.mean(current) + cached_mean

# ----------------------------------------------------------------------------------------------
# PU compression
# ----------------------------------------------------------------------------------------------

def sigmoid_loss(z: Array) -> Array:
  """The sigmoid surrogate of the 0-1 loss of a binary score z for label +1:  ℓ(z) = σ(−z)
  (so ℓ(−z) is the loss of z for label −1). nnPU's and PU compression's choice."""
  return jax.nn.sigmoid(-z)


def nnpu_risk(positive_scores: Array, unlabelled_scores: Array, prior: float, *, beta: float = 0.0,
              gamma: float = 1.0) -> tuple[Array, Array]:
  """Non-negative PU risk (Kiryo et al., 2017) with the sigmoid loss ℓ; returns (objective, risk).

    R⁺_p = π · mean_P ℓ(g(x)),   R⁻_p = π · mean_P ℓ(−g(x)),   R⁻_u = mean_U ℓ(−g(x)),
    risk = R⁺_p + max(0, R⁻_u − R⁻_p)                      (the reported nnPU risk)
    objective = R⁺_p + (R⁻_u − R⁻_p)   if R⁻_u − R⁻_p ≥ −β
              = −γ · (R⁻_u − R⁻_p)     otherwise (a step that pushes the negative-class risk back up)

  π = ``prior`` is the positive-class prior in the unlabelled data; the objective's gradient is
  the nnPU update (PU compression uses π = 0.21, β = 0, γ = 1).
  """
  r_pos = prior * jnp.mean(sigmoid_loss(positive_scores))
  r_neg = jnp.mean(sigmoid_loss(-unlabelled_scores)) - prior * jnp.mean(sigmoid_loss(-positive_scores))
  objective = jnp.where(r_neg >= -beta, r_pos + r_neg, -gamma * r_neg)
  return objective, r_pos + jnp.maximum(r_neg, 0.0)


def inverse_mass_class_weights(teacher_probs: Array, *, power: float = 1.0) -> Array:
  """PU compression's class weights, shape (C,):  w_c = C · m_c^(−p) / Σ_c' m_c'^(−p),
  m_c = Σ_n softmax(t_n)_c  over the distillation data.

  The reference has p = ``power`` = 1: rare classes weigh more and every class gets the same total
  weight m_c·w_c (Σ_c w_c = C). On a very skewed selection that puts a whole class's weight on a
  few images; p < 1 tempers it, p = 0 gives uniform weights (plain KD).
  """
  inverse = jnp.sum(teacher_probs, axis=0) ** -power
  return teacher_probs.shape[-1] * inverse / jnp.sum(inverse)


PERTURBATIONS = ('additive', 'relative')


def draw_class_weight_perturbations(key: jax.Array, num_perturbations: int, num_classes: int) -> Array:
  """The random part of ``perturbed_class_weights``: U(0, 1), shape (num_perturbations, C)."""
  return jax.random.uniform(key, (num_perturbations, num_classes))


def perturbed_class_weights(weights: Array, uniforms: Array, *, epsilon: float = 0.1,
                            perturbation: str = 'additive') -> Array:
  """The robust KD's weight sets, shape (1 + K, C): ``weights`` and one perturbed copy per row u of
  ``uniforms`` (K, C), U(0, 1) (``draw_class_weight_perturbations``):

    'additive' (the reference, ``main.py perturb``):  w + ε·u. Every perturbed set is ≥ w
        element-wise, so the robust max always picks a perturbed set.
    'relative':  w ⊙ (1 + ε·(2u − 1)), a symmetric relative perturbation: on a skewed selection the
        weights span orders of magnitude, which an additive ε of the order of the smallest
        weights would dominate.
  """
  check_choice('pu.perturbation', perturbation, PERTURBATIONS)
  if perturbation == 'additive':
    perturbed = weights[None] + epsilon * uniforms
  else:
    perturbed = weights[None] * (1.0 + epsilon * (2.0 * uniforms - 1.0))
  return jnp.concatenate([weights[None], perturbed])


def robust_kd_set_losses(student_logits: Array, teacher_logits: Array, class_weights: Array,
                         temperature: float = 1.0) -> tuple[Array, Array]:
  """(loss of each weight set (K,), per-sample weights (K, N)): (1/N) Σ_n w_k[ŷ_n] · KL(p_t,n ‖ p_s,n) · T,
  ŷ_n = argmax t_n, p = softmax(·/T), w_k the rows of ``class_weights``. The reference multiplies
  by T (not T²) and uses T = 1."""
  per_example = kl_per_example(student_logits, teacher_logits, temperature) / temperature
  weights = class_weights[:, jnp.argmax(teacher_logits, axis=-1)]  # (K, N)
  return jnp.mean(weights * per_example, axis=-1), weights


def robust_kd(student_logits: Array, teacher_logits: Array, class_weights: Array,
              temperature: float = 1.0) -> Array:
  """PU compression's robust KD:  max_k of ``robust_kd_set_losses`` (the gradient is that of the
  maximising set; the reference back-propagates the first strictly largest, as ``argmax`` picks)."""
  return jnp.max(robust_kd_set_losses(student_logits, teacher_logits, class_weights, temperature)[0])


# ----------------------------------------------------------------------------------------------
# DFND
# ----------------------------------------------------------------------------------------------

def noise_transition(theta: Array, accuracy: float) -> Array:
  """DFND's noise-adaptation matrix N, shape (C, C), rows summing to 1:

    N_ii = a,   N_ij = (1 − a) · softmax_{j≠i}(θ_i)_j  for j ≠ i,

  a = the teacher's accuracy (fixed), θ (C, C) learned (its diagonal is unused). N_ij models
  P(teacher label j | true class i).
  """
  num_classes = theta.shape[0]
  off_diagonal = jnp.where(jnp.eye(num_classes, dtype=bool), -jnp.inf, theta)
  return accuracy * jnp.eye(num_classes) + (1.0 - accuracy) * jax.nn.softmax(off_diagonal, axis=-1)


def noise_adapted_probs(student_logits: Array, transition: Array) -> Array:
  """softmax(s) · N: the student's clean-class probabilities pushed through the transition matrix."""
  return jax.nn.softmax(student_logits, axis=-1) @ transition


def noise_adaptation_nll(student_logits: Array, teacher_labels: Array, transition: Array) -> Array:
  """DFND's noise-adaptation term  −(1/N) Σ_n log (softmax(s_n) · N)[ŷ_n]  with ŷ_n the teacher's
  label: the student's clean-class probabilities pushed through the transition matrix N must
  explain the teacher's (noisy) labels."""
  noisy = noise_adapted_probs(student_logits, transition)
  picked = jnp.take_along_axis(noisy, teacher_labels[:, None], axis=-1)[:, 0]
  return -jnp.mean(jnp.log(picked))
