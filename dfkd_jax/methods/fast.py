"""Fast / FastMeta: "Up to 100x Faster Data-free Knowledge Distillation" (Fang et al., AAAI 2022;
zju-vipa/Fast-Datafree ``datafree/synthesis/fast_meta.py``).

A persistent meta-generator G_θ (the CMI ``Generator``, Sigmoid output) is learned across
synthesis calls. Each call

  1. clones it, θ' = θ, draws latents z ~ N(0, I) and random labels y (**not** sorted), and builds
     a fresh inner Adam over [θ' (lr_g), z (``fast.lr_z``)], betas (0.5, 0.999);
  2. takes ``g_steps`` (2, 5 or 10) inner steps on x = G_θ'(z) ∈ [0, 1] through the view
     v = normalise(RandomCrop(size, padding 4) + flip)(x), per image:

       L = bn · Σ_l (‖σ²_run,l − σ̃²_l‖₂ + ‖μ_run,l − μ̃_l‖₂) + oh · CE(T(v), y)
         + adv · (−(1/N) Σ_n [argmax S(v) = argmax T(v)]_n · KL(p_T ‖ p_S)_n)   (T = 1, S eval mode)

     where (μ̃, σ̃²) = (1 − m)·(μ, σ²) + m·EMA with m = ``fast.bn_mmt`` (0.9): the EMA, over calls,
     of each BN input's statistics at the last inner step of every call (initialised with the
     first call's; the first call compares the batch statistics themselves). The adversarial term
     is off during warm-up: on from the reference's 1-based call counter ``ep >= warmup`` (0-based
     call index ≥ warmup_epochs · iters_per_epoch − 1, one call before the student starts);
  3. keeps the lowest-loss pre-augmentation x (evaluated before its update) for the replay pool;
  4. takes one meta step on θ with Adam(lr_g × g_steps, (0.5, 0.999)):
       FOMAML (``fast.meta='fomaml'``, every script): gradient Σ_k ∇_θ' L_k, the inner gradients of
         the fast generator summed over the call's steps, each evaluated before its inner update;
       Reptile (``fast.meta='reptile'``): gradient (θ − θ'_final) · ``fast.reptile_scale`` (67).

``fast.reset_l0``: at the reference's call ``ep == reset_l0_epoch + warmup`` (1-based, i.e. 0-based
call (reset_l0_epoch + warmup_epochs) · iters_per_epoch − 1 with one call per epoch as in every
script) θ's ``l1.0`` Linear is re-drawn N(0, 0.02) with bias 0, and its first BatchNorm
``conv_blocks.0`` gets scale N(0, 0.02) (not N(1, ·)) and bias 0, before cloning. The meta
optimiser's state is kept. The generator's running BN statistics are never read (synthesis runs
train mode, the student reads the pool), so they are not kept.

The student distils from the pool (KL at T = 20, ``engines/inversion.py``) except during the
``warmup_epochs`` synthesis-only epochs; its cosine (T_max 200, eta_min 2e-4) starts after them.

The adversarial term sees the real student: Fast-Datafree builds ``FastMetaSynthesizer`` with it
(``datafree_kd.py:308``). Its ``student=teacher`` bug (zju-vipa/Fast-Datafree#11,
``datafree_kd.py:270``) is in the GAN baselines' ``GenerativeSynthesizer`` only, not in FastMeta.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dfkd_jax import models, optim
from dfkd_jax.engines import common, inversion, inversion_terms
from dfkd_jax.errors import check_choice
from dfkd_jax.models.generators import reset_l0

_META_RULES = ('fomaml', 'reptile')


def inner_step(objective, carry, key, tx, rule: str):
  """One inner step of a synthesis call on ``carry['variables'] = {'generator': θ', 'z': z}``:
  the loss and its gradients before the update, FOMAML's running sum of the θ' gradients
  (``carry['meta_grad']``), then one step of the inner Adam ``tx`` (a parameter group each for θ'
  and z, ``optim.torch_adam_groups``). ``objective(variables, key) -> (loss, aux)``. Returns
  (carry, loss, aux)."""
  variables = carry['variables']
  (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(variables, key)
  if rule == 'fomaml':
    carry = dict(carry, meta_grad=jax.tree.map(jnp.add, carry['meta_grad'], grads['generator']))
  variables, opt = optim.apply_step(tx, variables, carry['opt'], grads)
  return dict(carry, variables=variables, opt=opt), loss, aux


def meta_gradient(meta_params, carry, rule: str, reptile_scale: float):
  """The gradient of the call's single meta step: FOMAML's summed inner gradients, or Reptile's
  (θ − θ'_final) · scale."""
  if rule == 'fomaml':
    return carry['meta_grad']
  return jax.tree.map(lambda meta, fast: (meta - fast) * reptile_scale, meta_params, carry['variables']['generator'])


def make_job(config, mesh):
  s = common.setup(config, mesh)
  view_shapes = common.abstract_view(s)
  w, cfg = config.loss, config.fast
  check_choice('fast.meta', cfg.meta, _META_RULES)
  batch, teacher, g_steps = config.synthesis_batch_size, s.teacher.model, config.g_steps
  generator = models.create(config.generator.arch, **config.generator.kwargs)
  nz_shape = models.input_shape(config.generator.arch, **config.generator.kwargs)
  _, stats_template = inversion_terms.generator_template(generator, nz_shape)
  betas = config.optimizer_g.betas
  tx_inner = optim.torch_adam_groups({'generator': config.optimizer_g.lr, 'z': cfg.lr_z}, betas)
  tx_meta = optim.torch_adam(config.optimizer_g.lr * g_steps, betas)
  warmup_calls = config.warmup_epochs * config.iters_per_epoch
  reset_call = (cfg.reset_l0_epoch + config.warmup_epochs) * config.iters_per_epoch - 1

  def init(key):
    params = generator.init(key, jnp.zeros((2,) + nz_shape), train=False)['params']
    return {'generator': params, 'meta_opt': tx_meta.init(params), 'bn_ema': inversion_terms.bn_ema_init(view_shapes)}

  def begin(method_state, ctx, key):
    reset_key, z_key, target_key = jax.random.split(key, 3)
    meta = method_state['generator']
    if cfg.reset_l0:
      meta = jax.lax.cond(ctx.call == reset_call, lambda p: reset_l0(p, reset_key), lambda p: p, meta)
    variables = {'generator': meta, 'z': common.latent(z_key, (batch,) + nz_shape, mesh)}
    carry = {'meta': meta, 'variables': variables, 'opt': tx_inner.init(variables),
             'targets': inversion_terms.random_targets(target_key, batch, config.num_classes, sort=False),
             'moments': inversion_terms.bn_ema_moments(method_state['bn_ema'])}
    if cfg.meta == 'fomaml':
      carry['meta_grad'] = jax.tree.map(jnp.zeros_like, meta)
    return carry

  def step(carry, method_state, ctx, key):
    adversarial = ctx.call + 1 >= warmup_calls

    def objective(variables, key):
      x, _ = inversion_terms.generate(generator, variables['generator'], stats_template, variables['z'])
      terms, moments = inversion_terms.blended_bn_terms(
          teacher, ctx, x, key, carry['targets'], method_state['bn_ema'], cfg, config.dataset, adversarial=adversarial)
      total = sum(w[name] * value for name, value in terms.items())
      return total, (x, moments, {f'train/loss_{n}': v for n, v in terms.items()})

    carry, loss, (x, moments, metrics) = inner_step(objective, carry, key, tx_inner, cfg.meta)
    return inversion.Step(dict(carry, moments=moments), method_state, loss, x, metrics)

  def finish(carry, method_state, best, ctx):
    grads = meta_gradient(carry['meta'], carry, cfg.meta, cfg.reptile_scale)
    meta, meta_opt = optim.apply_step(tx_meta, carry['meta'], method_state['meta_opt'], grads)
    bn_ema = inversion_terms.bn_ema_update(method_state['bn_ema'], carry['moments'], cfg.bn_mmt)
    return {'generator': meta, 'meta_opt': meta_opt, 'bn_ema': bn_ema}, best

  synthesizer = inversion.Synthesizer(init=init, begin=begin, stages=[inversion.Stage(g_steps, step)], finish=finish)
  return inversion.make_job(config, mesh, s, synthesizer)
