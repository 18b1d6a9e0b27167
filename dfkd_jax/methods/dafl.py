"""DAFL: Data-Free Learning of Student Networks (Chen et al., ICCV 2019).

A generator is trained so that the teacher's outputs on its images look like those on real data:

  L_G = oh · CE(t, argmax t)            confident one-hot predictions
      + ie · Σ_c p̄_c log p̄_c           balanced classes over the batch (p̄ = batch-mean softmax)
      + a  · (−mean |f_T|)              large penultimate activations

while the student learns KL(p_T ‖ p_S) on the generated images.

``config.variant``:
  'huawei' — the original code (``DAFL-train.py``): log base 10 in the entropy term; the generator
             step and the student step share one batch and one teacher forward (the student's
             images are detached copies of the generator's, made before its update); the
             generator ends in Tanh -> affine-free BN, no input normaliser.
  'cmi'    — the CMI framework's ``--method dafl``: natural log; ``g_steps`` generator steps then
             ``kd_steps`` student steps on fresh samples from the generator in eval mode; Sigmoid
             generator output through the dataset normaliser.
"""
from __future__ import annotations

import math

from dfkd_jax import losses
from dfkd_jax.engines import generative
from dfkd_jax.errors import check_choice


def make_job(config, mesh):
  check_choice('variant', config.variant, ('huawei', 'cmi'))
  w = config.loss
  log_base = 10.0 if config.variant == 'huawei' else math.e
  adv = w.get('adv', 0.0)

  def generator_loss(t, student_logits, images):
    oh = losses.cross_entropy_onehot(t.logits)
    ie = losses.information_entropy(t.logits, log_base=log_base)
    act = losses.activation_loss(t.penultimate)
    loss, metrics = w.oh * oh + w.ie * ie + w.a * act, {'train/loss_oh': oh, 'train/loss_ie': ie, 'train/loss_a': act}
    if adv:
      disagreement = losses.kd_kl(student_logits, t.logits, 1.0, reduction='batchmean')
      loss, metrics['train/loss_adv'] = loss - adv * disagreement, -disagreement
    return loss, metrics

  return generative.make_job(config, mesh, generator_loss, adversarial=adv > 0, bn_taps=False)
