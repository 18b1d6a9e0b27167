"""The loss terms of the methods that learn from little or unlabelled data (PU compression, DFND)
and of data-free super-resolution (DFSR), as small pure functions, in the conventions of
``dfkd_jax.losses`` (logits (N, C), images NHWC; each docstring states the formula and its
reference, ``shared/notes/reference_semantics.md`` §2.11).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dfkd_jax.losses import kl_per_example

Array = jax.Array


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


def robust_kd_class_weights(teacher_probs: Array, *, num_perturbations: int = 1, epsilon: float = 0.1,
                            key: jax.Array | None = None, power: float = 1.0) -> Array:
  """PU compression's class weight sets, shape (1 + num_perturbations, C).

  w_c = C · m_c^(−p) / Σ_c' m_c'^(−p),  m_c = Σ_n softmax(t_n)_c  over the selected data, followed
  by ``num_perturbations`` copies w ⊙ (1 + ε·u) with u ~ U(−1, 1)^C drawn from ``key``. The
  reference has p = ``power`` = 1: rare classes weigh more and every class gets the same total
  weight m_c·w_c (Σ_c w_c = C). On a very skewed selection that puts a whole class's weight on a
  few images; p < 1 tempers it, p = 0 gives uniform weights (plain KD).

  The perturbation is relative: on a skewed selection the weights span orders of magnitude, and an
  additive ε would turn the small ones negative (pushing the student away from the teacher).
  """
  inverse = jnp.sum(teacher_probs, axis=0) ** -power
  weights = teacher_probs.shape[-1] * inverse / jnp.sum(inverse)
  if not num_perturbations:
    return weights[None]
  noise = jax.random.uniform(key, (num_perturbations, weights.shape[0]), minval=-1.0, maxval=1.0)
  return jnp.concatenate([weights[None], weights[None] * (1.0 + epsilon * noise)])


def robust_kd(student_logits: Array, teacher_logits: Array, class_weights: Array,
              temperature: float = 1.0) -> Array:
  """PU compression's robust KD:  max_k (1/N) Σ_n w_k[ŷ_n] · KL(p_t,n ‖ p_s,n) · T,

  ŷ_n = argmax t_n, p = softmax(·/T), w_k the rows of ``class_weights`` (``robust_kd_class_weights``).
  The reference multiplies by T (not T²) and uses T = 1. The gradient is that of the maximising set.
  """
  per_example = kl_per_example(student_logits, teacher_logits, temperature) / temperature
  weights = class_weights[:, jnp.argmax(teacher_logits, axis=-1)]  # (K, N)
  return jnp.max(jnp.mean(weights * per_example, axis=-1))


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


def noise_adaptation_nll(student_logits: Array, teacher_labels: Array, transition: Array) -> Array:
  """DFND's noise-adaptation term  −(1/N) Σ_n log (softmax(s_n) · N)[ŷ_n]  with ŷ_n the teacher's
  label: the student's clean-class probabilities pushed through the transition matrix N must
  explain the teacher's (noisy) labels."""
  noisy = jax.nn.softmax(student_logits, axis=-1) @ transition
  picked = jnp.take_along_axis(noisy, teacher_labels[:, None], axis=-1)[:, 0]
  return -jnp.mean(jnp.log(picked))
