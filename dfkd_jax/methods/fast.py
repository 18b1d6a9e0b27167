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
from dfkd_jax.models.generators import draw_reset_l0, replace_params
from dfkd_jax.run.job import TRACE
from dfkd_jax.synth import meta


def reset_l0_call(config) -> int:
  """The 0-based synthesis call at which ``reset_l0`` fires: the reference's 1-based call counter
  ``ep == reset_l0_epoch + warmup`` with one call per epoch."""
  return (config.fast.reset_l0_epoch + config.warmup_epochs) * config.iters_per_epoch - 1


def adversarial(call, config):
  """Whether synthesis call ``call`` (from 0) has the adversarial term: the reference's 1-based
  counter ``ep >= warmup``, one call before the student starts."""
  return call + 1 >= config.warmup_epochs * config.iters_per_epoch


def make_job(config, mesh):
  s = common.setup(config, mesh)
  view_shapes = common.abstract_view(s)
  w, cfg = config.loss, config.fast
  check_choice('fast.meta', cfg.meta, meta.RULES)
  batch, teacher, g_steps = config.synthesis_batch_size, s.teacher.model, config.g_steps
  generator = models.create(config.generator.arch, **config.generator.kwargs)
  nz_shape = models.input_shape(config.generator.arch, **config.generator.kwargs)
  _, stats_template = inversion_terms.generator_template(generator, nz_shape)
  betas = config.optimizer_g.betas
  tx_inner = optim.torch_adam_groups({'generator': config.optimizer_g.lr, 'z': cfg.lr_z}, betas)
  tx_meta = optim.torch_adam(config.optimizer_g.lr * g_steps, betas)
  reset_call = reset_l0_call(config)

  def init(key):
    params = generator.init(key, jnp.zeros((2,) + nz_shape), train=False)['params']
    return {'generator': params, 'meta_opt': tx_meta.init(params), 'bn_ema': inversion_terms.bn_ema_init(view_shapes)}

  def draw(method_state, ctx, key):
    """The call's latents, its (unsorted) targets and, at the reset call, ``reset_l0``'s new values
    (zeros otherwise: nothing reads them)."""
    reset_key, z_key, target_key = jax.random.split(key, 3)
    drawn = {'z': common.latent(z_key, (batch,) + nz_shape, mesh),
             'targets': inversion_terms.draw_targets(target_key, batch, config.num_classes)}
    if cfg.reset_l0:
      params = method_state['generator']
      drawn['reset_l0'] = jax.lax.cond(
          ctx.call == reset_call, lambda: draw_reset_l0(params, reset_key),
          lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(draw_reset_l0, params, reset_key)))
    return drawn

  def begin(method_state, ctx, drawn):
    params = method_state['generator']
    if cfg.reset_l0:
      params = jax.lax.cond(ctx.call == reset_call, lambda p: replace_params(p, drawn['reset_l0']), lambda p: p, params)
    variables = {'generator': params, 'z': drawn['z']}
    carry = {'meta': params, 'variables': variables, 'opt': tx_inner.init(variables), 'targets': drawn['targets'],
             'moments': inversion_terms.bn_ema_moments(method_state['bn_ema'])}
    if cfg.meta == 'fomaml':
      carry['meta_grad'] = jax.tree.map(jnp.zeros_like, params)
    return carry

  def step(carry, method_state, ctx, view_draws):
    def objective(variables, view_draws):
      x, _ = inversion_terms.generate(generator, variables['generator'], stats_template, variables['z'])
      terms, moments, trace = inversion_terms.blended_bn_terms(
          teacher, ctx, x, view_draws, carry['targets'], method_state['bn_ema'], cfg, config.dataset,
          adversarial=adversarial(ctx.call, config))
      total = sum(w[name] * value for name, value in terms.items())
      trace.update({'x': x, 'z': variables['z'], **{f'loss_{n}': v for n, v in terms.items()}})
      metrics = {f'train/loss_{n}': v for n, v in terms.items()}
      metrics.update({f'{TRACE}{n}': v for n, v in trace.items()})
      return total, (x, moments, metrics)

    carry, loss, (x, moments, metrics) = meta.inner_step(objective, carry, view_draws, tx_inner, cfg.meta)
    return inversion.Step(dict(carry, moments=moments), method_state, loss, x, metrics)

  def finish(carry, method_state, best, ctx):
    return inversion_terms.meta_generator_update(tx_meta, carry, method_state, rule=cfg.meta,
                                                 reptile_scale=cfg.reptile_scale, bn_mmt=cfg.bn_mmt), best

  draw_step = lambda method_state, ctx, key: inversion_terms.draw_view(key, batch, cfg)
  synthesizer = inversion.Synthesizer(init=init, begin=begin, draw=draw, finish=finish,
                                      stages=[inversion.Stage(g_steps, step, draw=draw_step)])
  return inversion.make_job(config, mesh, s, synthesizer)
