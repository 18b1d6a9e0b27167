"""CuDFKD: curriculum data-free KD ("How to Teach: Learning Data-Free Knowledge Distillation from
Curriculum", Li et al.; ljrprocc/DataFree ``datafree/synthesis/cudfkd.py`` and ``datafree_kd.py``).

A persistent generator G (``DCGAN_Generator_CIFAR10``: nz 512, Sigmoid output), initialised once
with CMI-fw's ``reset_model`` (weights N(0, 0.02), biases 0, BN scales N(1, 0.02)) and trained by
one Adam(lr_g, (0.9, 0.99)) for the whole run, plays against the student. One outer iteration is
``g_steps`` (1) generator steps, then ``kd_steps`` (``--kd_steps_interval``, 10) student steps;
an epoch is ``ep_steps // kd_steps`` (40) iterations.

Generator step, on x = G(z) ∈ [0, 1] (train-mode BN, z ~ N(0, I) drawn per step, no augmentation),
v = normalise(x):

  L_G = lmda_ent · H(p̄) + adv_e · A(S(v), T(v)) + oh · CE(T(v), argmax T(v)) + bn · L_bn(v),

  H(p̄) = −Σ_c p̄_c ln p̄_c of the batch-mean softmax(T(v)/``entropy_temperature``) (the KD T),
       with lmda_ent = −20: the class entropy is maximised;
  A    ``adv_type`` 'kl': −(1/N) Σ_n [argmax S = argmax T]_n · 9·KL(p_T ‖ p_S)_n at T = 3, or
       'js': 1 − clamp(JS_T=3, 0, 1) (S in eval mode);
  L_bn DeepInversion's BN-statistics loss over every teacher BN (no first-layer multiplier);
  adv_e the adversarial weight of epoch e, ramped: adv_0 + grad_adv · #{e' < e : ⌊E·begin⌋ < e' <
       ⌊E·end⌋} (``adv_weight``; the reference adds grad_adv after each such epoch; E = epochs).

Student steps (train mode): each on a batch of fresh samples of the current G in **eval-mode** BN
(running statistics), normalised, no augmentation, no replay. The engine's pool is used as the
hand-over: after the generator steps, ``finish`` samples kd_steps × batch_size images, the pool
holds exactly those (float32), and the kd phase reads them in a random order without replacement,
so every student step sees its own fresh batch as in the reference. The loss is the self-paced
(curriculum) weighted KD loss

  L_S = v · ℓ,  ℓ = ``config.kd`` of the batch (L1 on logits or KL(T)·T², batch-reduced as the
  notes state), v = (1 + e^{−λ}) / (1 + e^{ℓ − λ}) (no gradient), λ = λ₀ + α · i,

i the student step (from 0), α = ``cudfkd.lambda_alpha`` (1e-4 on CIFAR-10, 2e-5 otherwise;
``curriculum='none'`` trains on ℓ, and the reference then does not ramp the adversarial weight
either). The reference's ``--memory`` replay option is not reproduced.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dfkd_jax import data, losses, models, optim
from dfkd_jax.engines import common, inversion, inversion_terms
from dfkd_jax.errors import check_choice
from dfkd_jax.models.generators import reset_params
from dfkd_jax.run.job import TRACE

_CURRICULA = ('log', 'none')
_ADV_TYPES = ('kl', 'js')


def adv_weight(epoch, *, initial: float, step: float, num_epochs: int, begin_fraction: float,
               end_fraction: float):
  """The adversarial weight during ``epoch`` (from 0): ``initial`` plus ``step`` for every earlier
  epoch e' with int(E·begin) < e' < int(E·end), E = ``num_epochs`` (the reference's
  ``synthesizer.adv += grad_adv`` at the end of those epochs)."""
  begin, end = int(num_epochs * begin_fraction), int(num_epochs * end_fraction)
  ramped = jnp.maximum(jnp.minimum(epoch - 1, end - 1) - begin, 0)
  return initial + step * ramped


def curriculum_lambda(student_step, *, lambda_0: float, alpha: float):
  """λ of the self-paced weight at student step i (from 0): λ₀ + α·i (``lambda_scheduler``)."""
  return lambda_0 + alpha * student_step


def make_job(config, mesh):
  s = common.setup(config, mesh)
  common.abstract_view(s)
  w, cfg = config.loss, config.cudfkd
  check_choice('cudfkd.curriculum', cfg.curriculum, _CURRICULA)
  check_choice('cudfkd.adv_type', cfg.adv_type, _ADV_TYPES)
  batch, kd_batch, kd_steps, teacher = config.synthesis_batch_size, config.batch_size, config.kd_steps, s.teacher.model
  generator = models.create(config.generator.arch, **config.generator.kwargs)
  nz_shape = models.input_shape(config.generator.arch, **config.generator.kwargs)
  tx_g = optim.torch_adam(config.optimizer_g.lr, config.optimizer_g.betas)
  kd_loss = common.kd_loss_fn(config.kd)
  curriculum = cfg.curriculum != 'none'
  ramp = dict(initial=w.adv, step=cfg.grad_adv if curriculum else 0.0, num_epochs=config.num_epochs,
              begin_fraction=cfg.begin_fraction, end_fraction=cfg.end_fraction)
  adversarial = w.adv > 0 or ramp['step'] > 0

  def init(key):
    init_key, reset_key = jax.random.split(key)
    variables = generator.init(init_key, jnp.zeros((2,) + nz_shape), train=False)
    params = reset_params(variables['params'], reset_key)
    return {'generator': params, 'batch_stats': variables['batch_stats'], 'opt': tx_g.init(params)}

  def draw(method_state, ctx, key):
    """The latents of the kd_steps student batches this call hands over (fresh samples)."""
    return {'sample_z': jax.lax.map(lambda k: common.latent(k, (kd_batch,) + nz_shape, mesh),
                                    jax.random.split(key, kd_steps))}

  def draw_step(method_state, ctx, key):
    """A generator step's fresh latents."""
    return {'z': common.latent(key, (batch,) + nz_shape, mesh)}

  def begin(method_state, ctx, drawn):
    return drawn

  def objective(params, batch_stats, ctx, z, adv):
    x, batch_stats = inversion_terms.generate(generator, params, batch_stats, z)
    view = data.normalize(x, config.dataset)
    t = common.teacher_view(teacher, ctx.teacher, view)
    terms = {'ent': losses.batch_mean_entropy(t.logits, temperature=cfg.entropy_temperature),
             'oh': losses.cross_entropy_onehot(t.logits), 'bn': losses.bn_statistics_loss(t.bn_moments, t.bn_running)}
    weights = {'ent': w.lmda_ent, 'oh': w.oh, 'bn': w.bn}
    trace = {'x': x, 't_logits': t.logits, 'loss_bn_per_hook': inversion_terms.bn_terms(t),
             'p_mean': jnp.mean(jax.nn.softmax(t.logits / cfg.entropy_temperature), axis=0)}
    if adversarial:
      s_logits = inversion_terms.student_logits(ctx, view)
      terms['adv'] = (losses.masked_adversarial_kl(s_logits, t.logits, 3.0) if cfg.adv_type == 'kl'
                      else losses.adi_competition_loss(s_logits, t.logits, 3.0))
      weights['adv'] = adv
      trace['s_logits'] = s_logits
    total = sum(weights[name] * value for name, value in terms.items())
    trace.update({f'loss_{name}': value for name, value in terms.items()})
    return total, (batch_stats, {f'train/loss_{name}': value for name, value in terms.items()}, trace)

  def step(carry, method_state, ctx, drawn):
    adv = adv_weight(ctx.epoch, **ramp)
    (loss, (batch_stats, metrics, trace)), grads = jax.value_and_grad(objective, has_aux=True)(
        method_state['generator'], method_state['batch_stats'], ctx, drawn['z'], adv)
    params, opt = optim.apply_step(tx_g, method_state['generator'], method_state['opt'], grads)
    metrics['train/adv_weight'] = jnp.asarray(adv, jnp.float32)
    trace['adv_weight'] = metrics['train/adv_weight']
    metrics.update({f'{TRACE}{name}': value for name, value in trace.items()})
    # No replay: nothing is kept from the iterates (an empty candidate).
    return inversion.Step(carry, {'generator': params, 'batch_stats': batch_stats, 'opt': opt}, loss, {}, metrics)

  def finish(carry, method_state, best, ctx):
    variables = {'params': method_state['generator'], 'batch_stats': method_state['batch_stats']}

    def sample(z):  # eval-mode BN, as the reference's ``sample()``
      return generator.apply(variables, z, train=False)

    images = jax.lax.map(sample, carry['sample_z'])
    return method_state, images.reshape((kd_steps * kd_batch,) + images.shape[2:])

  def student_loss(s_logits, t_logits, student_step):
    loss = kd_loss(s_logits, t_logits)
    if not curriculum:
      return loss
    lam = curriculum_lambda(student_step, lambda_0=cfg.lambda_0, alpha=cfg.lambda_alpha)
    return losses.curriculum_weight(loss, lam) * loss

  synthesizer = inversion.Synthesizer(init=init, begin=begin, draw=draw,
                                      stages=[inversion.Stage(config.g_steps, step, draw=draw_step)],
                                      finish=finish, kd_loss=student_loss)
  return inversion.make_job(config, mesh, s, synthesizer, pool_size=kd_steps * kd_batch)
