"""DFQ as in the CMI framework (``--method dfq``; after Choi et al., "Data-free network quantization
with adversarial knowledge distillation", CVPRW 2020).

The generator matches the teacher's BatchNorm statistics, makes confident and class-balanced
predictions and seeks student-teacher disagreement:

  L_G = bn · Σ_l (‖σ²_run,l − σ²_l‖₂ + ‖μ_run,l − μ_l‖₂)   (BN-input statistics)
      + oh · CE(t, argmax t)
      + adv · (−KL(p_T ‖ p_S))                              (T = 1, batchmean)
      + balance · Σ_c p̄_c ln p̄_c

and the student learns KL(p_T ‖ p_S) for ``kd_steps`` (10) steps on fresh samples.
"""
from __future__ import annotations

import jax.numpy as jnp

from dfkd_jax import losses
from dfkd_jax.engines import generative


def make_job(config, mesh):
  w = config.loss

  def generator_loss(t, student_logits, images):
    bn = losses.bn_statistics_loss(t.bn_moments, t.bn_running)
    oh = losses.cross_entropy_onehot(t.logits)
    adv = -losses.kd_kl(student_logits, t.logits, 1.0)
    balance = losses.information_entropy(t.logits)
    total = w.bn * bn + w.oh * oh + w.adv * adv + w.balance * balance
    # Each BN layer's term of loss_bn, for replays (the compiled iteration drops trace/ metrics).
    bn_terms = jnp.stack([losses.bn_statistics_loss([m], [r]) for m, r in zip(t.bn_moments, t.bn_running)]
                         or [jnp.zeros(())])
    return total, {'train/loss_bn': bn, 'train/loss_oh': oh, 'train/loss_adv': adv, 'train/loss_balance': balance,
                   'trace/bn_terms': bn_terms}

  return generative.make_job(config, mesh, generator_loss, adversarial=True, bn_taps=w.bn > 0)
