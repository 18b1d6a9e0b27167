"""What the inversion methods (DeepInversion, CMI, Fast, NAYER, CuDFKD) build their synthesis from,
beside the engine (``engines.inversion``): the ``bn_mmt`` EMA of the teacher's BatchNorm-input
statistics and the decision/adversarial loss terms (Fast, NAYER), the student's eval-mode logits,
random target labels, and the generator's template and train-mode forward.

The teacher's view of an input (logits, BN-input taps and their running statistics) is
``engines.common.teacher_view``; the BN-statistics loss itself is ``losses.bn_statistics_loss``.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dfkd_jax import data, losses, optim
from dfkd_jax.engines import common
from dfkd_jax.engines.common import TeacherView
from dfkd_jax.synth import augment, meta


def bn_ema_init(view: TeacherView) -> dict:
  """Fast/NAYER ``bn_mmt`` state before the first synthesis call: an EMA of every teacher BN
  input's (μ, σ²) (zeros, shaped by ``view``, e.g. ``common.abstract_view``) and ``count`` = how
  many calls have updated it (0: the reference hook's ``mmt is None``)."""
  return {'mean': [jnp.zeros(t.mean.shape, jnp.float32) for t in view.bn],
          'var': [jnp.zeros(t.var.shape, jnp.float32) for t in view.bn],
          'count': jnp.zeros((), jnp.int32)}


def bn_ema_moments(ema: dict) -> list:
  return list(zip(ema['mean'], ema['var']))


def bn_ema_blend(ema: dict, moments, momentum: float) -> list:
  """The statistics the BN loss compares with the running ones under ``bn_mmt``:
  (1 − mmt)·(μ, σ²) + mmt·EMA once the EMA exists, the batch's own (μ, σ²) before
  (``losses.blend_batch_stats``)."""
  blended = losses.blend_batch_stats(moments, bn_ema_moments(ema), momentum=momentum)
  started = ema['count'] > 0
  return [(jnp.where(started, bm, m), jnp.where(started, bv, v)) for (bm, bv), (m, v) in zip(blended, moments)]


def bn_ema_update(ema: dict, moments, momentum: float) -> dict:
  """The once-per-call update with the last inner iteration's ``moments``: EMA ← mmt·EMA +
  (1 − mmt)·(μ, σ²), or (μ, σ²) itself on the first call (``losses.update_stats_ema``)."""
  updated = losses.update_stats_ema(bn_ema_moments(ema), moments, momentum=momentum)
  first = ema['count'] == 0
  moments = jax.lax.stop_gradient(list(moments))
  pick = [(jnp.where(first, m, um), jnp.where(first, v, uv)) for (um, uv), (m, v) in zip(updated, moments)]
  return {'mean': [m for m, _ in pick], 'var': [v for _, v in pick], 'count': ema['count'] + 1}


def meta_generator_update(tx_meta, carry, method_state, *, rule: str, reptile_scale: float, bn_mmt: float) -> dict:
  """The end of a Fast-style synthesis call (Fast, SSD-KD): one meta step of the generator from the
  call's inner steps (``synth.meta.meta_gradient``, ``rule`` 'fomaml' or 'reptile') and the EMA of
  the teacher's BN statistics updated with the last inner step's ``moments``; returns
  ``{'generator', 'meta_opt', 'bn_ema'}``."""
  grads = meta.meta_gradient(carry['meta'], carry, rule, reptile_scale)
  params, meta_opt = optim.apply_step(tx_meta, carry['meta'], method_state['meta_opt'], grads)
  return {'generator': params, 'meta_opt': meta_opt,
          'bn_ema': bn_ema_update(method_state['bn_ema'], carry['moments'], bn_mmt)}


def decision_adversarial_terms(t: TeacherView, ctx, view, targets, *, moments=None, adversarial=True) -> dict:
  """The inversion loss terms of CMI, Fast and NAYER on one teacher view ``t`` of input ``view``
  (``ctx`` the synthesis step's ``inversion.Context``):

    bn  Σ_l ‖σ²_run,l − σ²_l‖₂ + ‖μ_run,l − μ_l‖₂ (``moments`` replaces (μ_l, σ²_l), e.g. blended);
    oh  CE(T(view), targets)  (NAYER's soft CE against one-hot targets is the same number);
    adv −(1/N) Σ_n [argmax S = argmax T]_n KL(p_T ‖ p_S)_n at T = 1, the student in eval mode,
        times ``adversarial`` (a traced 0/1 gate: Fast/NAYER switch it on after warm-up).
  """
  def adv():
    return losses.masked_adversarial_kl(student_logits(ctx, view), t.logits, 1.0)

  zero = lambda: jnp.zeros((), jnp.float32)
  if isinstance(adversarial, bool):
    adv_term = adv() if adversarial else zero()
  else:  # the student's forward runs only when the gate is on
    adv_term = jax.lax.cond(adversarial, adv, zero)
  bn = losses.bn_statistics_loss(t.bn_moments if moments is None else moments, t.bn_running)
  return {'bn': bn, 'oh': losses.cross_entropy(t.logits, targets), 'adv': adv_term}


def draw_view(key, num: int, cfg) -> dict:
  """The augmentation parameters of Fast's and NAYER's synthesis view of ``num`` images
  (``augment.draw_crop_flip`` with ``cfg.crop_padding``, ``cfg.flip``; crop and flip keys split
  from ``key``): one inner step's draws."""
  return augment.draw_crop_flip(*jax.random.split(key), num, padding=cfg.crop_padding, flip=cfg.flip)


def blended_bn_terms(teacher, ctx, x, view_draws, targets, bn_ema: dict, cfg, dataset: str, *,
                     adversarial) -> tuple[dict, list, dict]:
  """Fast's and NAYER's synthesis terms on generator images ``x`` in [0, 1]: the view
  v = normalise(crop_flip(x)) with ``draw_view``'s parameters ``view_draws``, the ``teacher`` model
  on v, and ``decision_adversarial_terms`` with v's BN statistics blended with the EMA ``bn_ema`` at
  ``cfg.bn_mmt``. Returns (terms, v's own BN moments without gradient, for ``bn_ema_update`` after
  the call's last step, a replay's intermediates: v, the teacher's and the student's logits on v
  and each BN layer's blended term)."""
  view = data.normalize(augment.apply_crop_flip(x, view_draws, padding=cfg.crop_padding), dataset)
  t = common.teacher_view(teacher, ctx.teacher, view)
  moments = t.bn_moments
  blended = bn_ema_blend(bn_ema, moments, cfg.bn_mmt)
  terms = decision_adversarial_terms(t, ctx, view, targets, adversarial=adversarial, moments=blended)
  trace = {'view': view, 't_logits': t.logits, 's_logits': student_logits(ctx, view),
           'loss_bn_per_hook': jnp.stack([losses.bn_statistics_loss([m], [r]) for m, r in zip(blended, t.bn_running)])}
  return terms, jax.lax.stop_gradient(moments), trace


def student_logits(ctx, x) -> jax.Array:
  """The student (``ctx.student``) in eval mode (running BN statistics), as the references run it
  during synthesis."""
  return ctx.student.apply_fn(ctx.student.variables, x, train=False)


def draw_targets(key, num: int, num_classes: int) -> jax.Array:
  """``num`` labels uniform over the classes, in the order drawn (``torch.randint``)."""
  return jax.random.randint(key, (num,), 0, num_classes)


def random_targets(key, num: int, num_classes: int, *, sort: bool) -> jax.Array:
  """``draw_targets``, sorted (CMI-fw DeepInversion and CMI) or not (Fast)."""
  targets = draw_targets(key, num, num_classes)
  return jnp.sort(targets) if sort else targets


def bn_terms(t: TeacherView) -> jax.Array:
  """Each BN layer's term of ``losses.bn_statistics_loss`` on ``t`` (no multiplier), stacked: a
  replay's per-layer view of the sum."""
  return jnp.stack([losses.bn_statistics_loss([m], [r]) for m, r in zip(t.bn_moments, t.bn_running)])


def generator_template(model, latent_shape) -> tuple[Any, Any]:
  """(params, batch_stats) of ``model`` as zeros of the right shapes: what ``models.generators.
  reset_params`` re-draws every parameter of, and fresh running statistics."""
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2,) + tuple(latent_shape)), train=False))
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)
  return zeros['params'], zeros.get('batch_stats', {})


def generate(model, params, batch_stats, z) -> tuple[jax.Array, Any]:
  """``model(z)`` with train-mode BatchNorm (batch statistics), as the references synthesise;
  returns (images, updated running statistics)."""
  images, updates = model.apply({'params': params, 'batch_stats': batch_stats}, z, train=True,
                                mutable=['batch_stats'])
  return images, updates['batch_stats']
