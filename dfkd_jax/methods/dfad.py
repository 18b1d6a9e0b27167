"""DFAD: Data-Free Adversarial Distillation (Fang et al., 2019).

A min-max game on the L1 distance between logits: the student minimises it, the generator (the
DAFL-style ``GeneratorA``) maximises it,

  L_S = mean |s − t|,        L_G = −mean |s − t|,

with ``kd_steps`` (5) student steps on fresh samples per generator step. The CMI framework's
``--method dfad`` is the same game with its ``LargeGenerator``; the generator is chosen by config.
"""
from __future__ import annotations

from dfkd_jax import losses
from dfkd_jax.engines import generative


def make_job(config, mesh):

  def generator_loss(t, student_logits, images):
    adv = -losses.l1_logits(student_logits, t.logits)
    return config.loss.adv * adv, {'train/loss_adv': adv}

  return generative.make_job(config, mesh, generator_loss, adversarial=True, bn_taps=False)
