"""ZSKT: Zero-shot Knowledge Transfer via Adversarial Belief Matching (Micaelli & Storkey, NeurIPS 2019).

The generator seeks images where student and teacher disagree, and the student learns to agree:

  L_G = −KL(p_T ‖ p_S)                               (maximise the disagreement)
  L_S = KL(p_T ‖ p_S) + β · Σ_g AT(student_g, teacher_g)   (attention transfer, β = 250)

``config.variant``:
  'original' — polo5/ZeroShotKnowledgeTransfer: per pseudo-batch one generator step (the student
               in train mode: ``synth_student_bn='train'``), then ``kd_steps`` (10) student steps
               on the pseudo-batch's latent through the updated generator
               (``student_batch='regenerate'``); KL with torch's elementwise 'mean' reduction;
               attention transfer on the outputs of ``kd.attention_modules``; Adam for both with
               a cosine schedule over all pseudo-batches, gradients clipped at 5.
  'cmi'      — the CMI framework's ``--method zskt``: −KL at T=1 (batchmean) for the generator,
               ``kd_steps`` student steps on fresh samples, no attention transfer.
"""
from __future__ import annotations

from dfkd_jax import losses
from dfkd_jax.engines import generative
from dfkd_jax.errors import check_choice


def make_job(config, mesh):
  check_choice('variant', config.variant, ('original', 'cmi'))
  reduction = 'mean' if config.variant == 'original' else 'batchmean'

  def generator_loss(t, student_logits, images):
    adv = -losses.kd_kl(student_logits, t.logits, 1.0, reduction=reduction)
    return config.loss.adv * adv, {'train/loss_adv': adv}

  return generative.make_job(config, mesh, generator_loss, adversarial=True, bn_taps=False)
