r"""SSD-KD: "Small Scale Data-Free Knowledge Distillation" (Liu, Wang, Liu, Sun, Yao; CVPR 2024,
arXiv 2406.07876). The authors have published no code and the full text was not available: what
follows is the known outline with every missing piece reconstructed, each behind a config switch
(``config.ssdkd``) whose default is the reconstruction; docs/ssdkd.md says which is which.

Known: the student distils from a *small* synthetic set (about 10% of the original training set,
``config.data_budget``) kept balanced in class diversity and difficulty by a modulating function φ,
in a replay buffer that is updated partially, from which a priority sampling function δ, driven by
the teacher–student discrepancy with importance-sampling weights, picks the student's samples:
min_S max_G E_{x = δ∘G(z)} [D(T(x), S(x))]. Built here on Fast's meta-generator (``synth.meta``)
and the inversion engine (``engines/inversion.py``), whose synthesis phase runs unchanged; the
student's phase is SSD-KD's own (prioritised reads).

One outer iteration:

  synth  one Fast synthesis call (θ' = θ, fresh z and labels y, ``g_steps`` inner Adam steps, the
         lowest-loss batch kept, one FOMAML meta step), with the per-image terms weighted by φ
         (``phi_in_generator``):

           L_G = bn · L_BN + (1/S) Σ_i φ_i · (oh · CE(T(v_i), y_i) + adv · ℓ_adv,i)          (E1')

         ℓ_adv,i = −[argmax S(v_i) = argmax T(v_i)] · KL(p_T ‖ p_S)(v_i) after warm-up (Fast's
         gate); v = normalise(crop + flip of x). Then the kept batch is *admitted* into the buffer
         (``synth.priority``, capacity ``data_budget``): ordered by φ (highest first, when
         ``phi_in_buffer``) and placed by ``eviction``: 'balanced' (a class quota; inside a full
         class the easiest entry, lowest φ_dif, gives way to a harder one) or 'fifo'. New entries
         start at the buffer's largest priority.
  kd     ``kd_steps`` student steps, each on ``batch_size`` entries drawn by δ:

           P(i) = π_i^α / Σ_k π_k^α,  w_i = (n·P(i))^(−β) / max_j (n·P(j))^(−β)              (E8, E9)
           L_S = (1/B) Σ_i w_i · φ_i · T² KL(p_T^T ‖ p_S^T)(A(x_i))                       (E10)

         (φ_i only with ``phi_in_kd``; the max over the buffer, or over the batch with
         ``is_normaliser='batch'``); β anneals from ``beta0`` to 1 over the student's steps and
         each drawn entry's priority becomes its loss in that step (+ ε), as PER's TD errors.

The modulating function, on the teacher's softmax p_T(x) (no gradient unless ``phi_grad``):

  φ(x) = φ_div(x) · φ_dif(x), then divided by its batch mean                                 (E4)
  φ_dif = (1 − max_c p_T(c|x))^γ ('confidence'), or (H(p_T)/log C)^γ ('entropy')              (E5)
  φ_div = min(n̄ / (n_ŷ + 1), φ_max),  n_c = entries of predicted class c in buffer ∪ batch,
          n̄ = (|B| + S) / C  ('inverse_count'); 'penalty' instead adds
          div · Σ_c (mean_i p_T(c|x_i))² to L_G and sets φ_div = 1                          (E6)

``budget_mode``: 'capacity' (the buffer of ``data_budget`` images is refreshed by every call) or
'total' (synthesis stops once ``data_budget`` images have been made). ``views`` K > 0 stores K
augmented views of each admitted image with the teacher's logits on each (a student step then runs
no teacher, as ``pool.insert_views``/``pool.teacher_logits`` of Fast's MNIST config); 0 augments at
read time. ``targets``: the generator's labels uniform (Fast) or ∝ 1/(n_c + 1).

State: the engine's, with the method state ``{'generator', 'meta_opt', 'bn_ema', 'buffer'}``; the
buffer (images, classes, confidences, priorities) and the annealing (a function of the student's
step) are checkpointed, so a resumed run equals an uninterrupted one. The final buffer's class and
confidence histograms are written to ``WORKDIR/buffer.json``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dfkd_jax import data, losses, models, optim
from dfkd_jax.engines import common, inversion, inversion_terms
from dfkd_jax.errors import UserError, check_choice
from dfkd_jax.models import generators
from dfkd_jax.run import parallel
from dfkd_jax.run.job import Phase
from dfkd_jax.synth import augment, meta
from dfkd_jax.synth import pool as pool_lib
from dfkd_jax.synth import priority as buffer_lib

DIFFICULTY = ('confidence', 'entropy')
DIVERSITY = ('inverse_count', 'penalty')
BUDGET_MODES = ('capacity', 'total')
TARGETS = ('uniform', 'inverse_count')
PRIORITIES = ('kd_loss', 'kl')
_STORAGE = {'uint8': jnp.uint8, 'float32': jnp.float32}
CONFIDENCE_BINS = 10


# ------------------------------------------------------------------------------------------------
# The modulating function φ
# ------------------------------------------------------------------------------------------------

def difficulty(teacher_logits: jax.Array, rule: str, gamma: float) -> jax.Array:
  """φ_dif per image: (1 − κ)^γ with κ the teacher's top probability, or (H(p_T)/log C)^γ."""
  probs = jax.nn.softmax(teacher_logits, axis=-1)
  if rule == 'confidence':
    hardness = 1.0 - jnp.max(probs, axis=-1)
  else:
    hardness = -jnp.sum(probs * jax.nn.log_softmax(teacher_logits, axis=-1), axis=-1) / math.log(probs.shape[-1])
  return jnp.power(jnp.clip(hardness, 0.0, 1.0), gamma)


def diversity(predicted: jax.Array, counts: jax.Array, total: jax.Array, phi_max: float) -> jax.Array:
  """φ_div per image: min(n̄ / (n_ŷ + 1), φ_max) with n̄ = total / C and ``counts`` (C,) the
  predicted-class histogram of buffer ∪ batch."""
  mean_count = total / counts.shape[0]
  return jnp.minimum(mean_count / (counts[predicted] + 1.0), phi_max)


def normalised(phi: jax.Array) -> jax.Array:
  """φ / mean(φ): an average weight of 1 keeps the loss weights' meaning."""
  return phi / jnp.maximum(jnp.mean(phi), jnp.finfo(jnp.float32).tiny)


def collision_penalty(teacher_logits: jax.Array) -> jax.Array:
  """Σ_c (mean_i p_T(c|x_i))²: 1/C for a batch spread evenly over the classes, 1 for one class."""
  return jnp.sum(jnp.mean(jax.nn.softmax(teacher_logits, axis=-1), axis=0) ** 2)


def cross_entropy_per_example(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0]


def settings(**fast) -> ml_collections.ConfigDict:
  """``config.ssdkd``: the reconstruction's switches at their defaults (docs/ssdkd.md), plus
  ``fast``, the Fast synthesis settings of the config (``lr_z``, ``reset_l0_epoch``, ``crop_padding``,
  ``flip``, ``views``, ...), which replace the defaults below."""
  c = ml_collections.ConfigDict({
      # Fast's meta-generator (configs/fast_*.py): FOMAML, bn_mmt EMA, reset_l0; the synthesis view.
      'meta': 'fomaml', 'reptile_scale': 67.0, 'lr_z': 0.01, 'bn_mmt': 0.9, 'reset_l0': True, 'reset_l0_epoch': 120,
      'crop_padding': 4, 'flip': True,
      # φ (E4-E6): focal exponent γ (Lin et al.'s 2), difficulty measure, diversity form, cap, gradient.
      'gamma': 2.0, 'difficulty': 'confidence', 'diversity': 'inverse_count', 'phi_max': 5.0, 'div_weight': 1.0,
      'phi_grad': False,
      # Where φ acts: the generator's per-image terms, the order and eviction of admission, the KD loss.
      'phi_in_generator': True, 'phi_in_buffer': True, 'phi_in_kd': True,
      # The buffer: eviction policy, what data_budget bounds, stored views (0: augment at read),
      # the generator's target labels.
      'eviction': 'balanced', 'budget_mode': 'capacity', 'views': 0, 'targets': 'uniform',
      # δ (E7-E9), PER's: sampler, α, β₀ (annealed to 1), ε, new entries' priority, the discrepancy,
      # the importance weights' normaliser.
      'sampler': 'stratified', 'alpha': 0.6, 'beta0': 0.4, 'eps': 1e-6, 'new_priority': 'max', 'priority': 'kd_loss',
      'is_normaliser': 'buffer',
  })
  for name, value in fast.items():
    if name not in c:
      raise UserError(f'ssdkd has no setting {name!r}')
    c[name] = value
  return c


def from_fast(fast_config_file: str, arg: str, *, data_budget: int) -> ml_collections.ConfigDict:
  """SSD-KD's config made from a Fast config file's ``get_config(arg)`` (``configs/fast_*.py``):
  the same teacher, student, generator, synthesis, losses and schedule, with ``config.fast``'s
  settings carried into ``config.ssdkd`` (the pool's stored views become the buffer's) and the
  buffer of ``data_budget`` images in place of the pool. The two runs differ only in what SSD-KD adds."""
  spec = importlib.util.spec_from_file_location(f'fast_{os.path.basename(fast_config_file)[:-3]}', fast_config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.method = 'ssdkd'
  c.ssdkd = settings(**c.fast.to_dict(), views=c.pool.insert_views)
  del c['fast']
  c.pool.update(capacity=0, insert_views=0, teacher_logits=False)  # the engine's pool: the last call only
  c.data_budget = data_budget
  return c


def _check(config, cfg) -> None:
  check_choice('ssdkd.difficulty', cfg.difficulty, DIFFICULTY)
  check_choice('ssdkd.diversity', cfg.diversity, DIVERSITY)
  check_choice('ssdkd.eviction', cfg.eviction, buffer_lib.POLICIES)
  check_choice('ssdkd.budget_mode', cfg.budget_mode, BUDGET_MODES)
  check_choice('ssdkd.sampler', cfg.sampler, buffer_lib.SAMPLERS)
  check_choice('ssdkd.new_priority', cfg.new_priority, buffer_lib.NEW_PRIORITIES)
  check_choice('ssdkd.is_normaliser', cfg.is_normaliser, buffer_lib.NORMALISERS)
  check_choice('ssdkd.targets', cfg.targets, TARGETS)
  check_choice('ssdkd.priority', cfg.priority, PRIORITIES)
  check_choice('ssdkd.meta', cfg.meta, meta.RULES)
  check_choice('pool.dtype', config.pool.dtype, _STORAGE)
  if config.data_budget < config.synthesis_batch_size:
    raise UserError(f'data_budget ({config.data_budget}) must hold at least one synthesis batch '
                    f'({config.synthesis_batch_size})')
  if cfg.views < 0:
    raise UserError(f'ssdkd.views must be >= 0 (0: augment when read), got {cfg.views}')
  if config.pool.insert_views or config.pool.teacher_logits:
    raise UserError('SSD-KD reads its own buffer: set ssdkd.views (stored views with the teacher\'s logits) '
                    'instead of pool.insert_views / pool.teacher_logits')
  if config.kd.loss != 'kl':
    raise UserError(f"SSD-KD weights a per-image KL: kd.loss must be 'kl', not {config.kd.loss!r}")


def make_job(config, mesh):
  s = common.setup(config, mesh)
  cfg = config.ssdkd
  _check(config, cfg)
  weights = dict(config.loss, div=cfg.div_weight)
  view_shapes = common.abstract_view(s)
  batch, synth_batch, kd_steps = config.batch_size, config.synthesis_batch_size, config.kd_steps
  num_classes, shape, teacher = config.num_classes, s.student_input_shape, s.teacher.model
  generator = models.create(config.generator.arch, **config.generator.kwargs)
  nz_shape = models.input_shape(config.generator.arch, **config.generator.kwargs)
  _, stats_template = inversion_terms.generator_template(generator, nz_shape)
  betas = config.optimizer_g.betas
  tx_inner = optim.torch_adam_groups({'generator': config.optimizer_g.lr, 'z': cfg.lr_z}, betas)
  tx_meta = optim.torch_adam(config.optimizer_g.lr * config.g_steps, betas)
  iters, warmup_epochs = config.iters_per_epoch, config.warmup_epochs
  warmup_calls = warmup_epochs * iters
  reset_call = (cfg.reset_l0_epoch + warmup_epochs) * iters - 1
  views = max(cfg.views, 1)
  cached_logits = cfg.views > 0
  storage = _STORAGE[config.pool.dtype]
  student_steps = max((config.num_epochs - warmup_epochs) * iters * kd_steps, 1)
  _, lr_s = common.student_optimizer(config, iters * kd_steps)
  kd_temperature = config.kd.temperature
  data_sharding = parallel.data_sharded(mesh)
  entry = {'images': jax.ShapeDtypeStruct((views,) + tuple(shape), storage),
           'confidence': jax.ShapeDtypeStruct((), jnp.float32), 'difficulty': jax.ShapeDtypeStruct((), jnp.float32)}
  if cached_logits:
    entry['logits'] = jax.ShapeDtypeStruct((views, num_classes), jnp.float32)

  def draw_kd_view(key, num):
    """``config.kd_augment``'s crop and flip parameters for ``num`` images."""
    return augment.draw_crop_flip(*jax.random.split(key), num, padding=config.kd_augment.crop_padding,
                                  flip=config.kd_augment.flip)

  def teacher_logits(tvars, images):
    return teacher.apply(tvars, data.normalize(images, config.dataset), train=False)

  def phi_weights(logits, predicted, counts, total):
    """φ of (E4) for a batch: the difficulty of ``logits`` times the diversity of ``predicted``."""
    phi = difficulty(logits, cfg.difficulty, cfg.gamma)
    if cfg.diversity == 'inverse_count':
      phi = phi * diversity(predicted, counts, total, cfg.phi_max)
    return normalised(phi)

  # ---- synthesis: Fast's meta-generator, φ-weighted (E1') ------------------------------------------

  def init(key):
    params = generator.init(key, jnp.zeros((2,) + nz_shape), train=False)['params']
    return {'generator': params, 'meta_opt': tx_meta.init(params), 'bn_ema': inversion_terms.bn_ema_init(view_shapes),
            'buffer': buffer_lib.init(config.data_budget, entry)}

  def draw(method_state, ctx, key):
    reset_key, z_key, target_key, view_key = jax.random.split(key, 4)
    params = method_state['generator']
    drawn = {'z': common.latent(z_key, (synth_batch,) + nz_shape, mesh)}
    if cfg.targets == 'uniform':
      drawn['targets'] = inversion_terms.draw_targets(target_key, synth_batch, num_classes)
    else:  # fewer buffered entries of a class: more of its targets
      counts = buffer_lib.class_counts(method_state['buffer'], num_classes)
      drawn['targets'] = jax.random.categorical(target_key, -jnp.log(counts + 1.0), shape=(synth_batch,))
    if cfg.reset_l0:  # drawn at the reset call only (zeros otherwise, never read)
      fresh = lambda: generators.draw_reset_l0(params, reset_key)
      drawn['reset_l0'] = jax.lax.cond(ctx.call == reset_call, fresh, lambda: jax.tree.map(
          lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(fresh)))
    if cached_logits:
      drawn['views'] = [draw_kd_view(k, synth_batch) for k in jax.random.split(view_key, cfg.views)]
    return drawn

  def begin(method_state, ctx, drawn):
    params = method_state['generator']
    if cfg.reset_l0:
      params = jax.lax.cond(ctx.call == reset_call, lambda: generators.replace_params(params, drawn['reset_l0']),
                            lambda: params)
    variables = {'generator': params, 'z': drawn['z']}
    carry = {'meta': params, 'variables': variables, 'opt': tx_inner.init(variables), 'targets': drawn['targets'],
             'moments': inversion_terms.bn_ema_moments(method_state['bn_ema']), 'views': drawn.get('views', [])}
    if cfg.meta == 'fomaml':
      carry['meta_grad'] = jax.tree.map(jnp.zeros_like, params)
    return carry

  def step_draw(method_state, ctx, key):
    return inversion_terms.draw_view(key, synth_batch, cfg)

  def step(carry, method_state, ctx, drawn):
    adversarial = ctx.call + 1 >= warmup_calls
    buffer = method_state['buffer']

    def objective(variables, drawn):
      x, _ = inversion_terms.generate(generator, variables['generator'], stats_template, variables['z'])
      view = data.normalize(augment.apply_crop_flip(x, drawn, padding=cfg.crop_padding), config.dataset)
      t = common.teacher_view(teacher, ctx.teacher, view)
      moments = t.bn_moments
      bn = losses.bn_statistics_loss(inversion_terms.bn_ema_blend(method_state['bn_ema'], moments, cfg.bn_mmt),
                                     t.bn_running)
      ce = cross_entropy_per_example(t.logits, carry['targets'])

      def adversarial_term():  # ℓ_adv per image; the student runs only when the gate is on
        s_logits = inversion_terms.student_logits(ctx, view)
        agree = jnp.argmax(s_logits, -1) == jnp.argmax(t.logits, -1)
        return -losses.kl_per_example(s_logits, t.logits, 1.0) * agree

      adv = jax.lax.cond(adversarial, adversarial_term, lambda: jnp.zeros((synth_batch,), jnp.float32))
      if cfg.phi_in_generator:
        predicted = jnp.argmax(t.logits, -1)
        counts = buffer_lib.class_counts(buffer, num_classes) + jnp.bincount(predicted, length=num_classes)
        phi = phi_weights(t.logits, predicted, counts, buffer_lib.size(buffer) + synth_batch)
        phi = phi if cfg.phi_grad else jax.lax.stop_gradient(phi)
      else:
        phi = jnp.ones((synth_batch,), jnp.float32)
      terms = {'bn': bn, 'oh': jnp.mean(phi * ce), 'adv': jnp.mean(phi * adv)}
      if cfg.diversity == 'penalty':
        terms['div'] = collision_penalty(t.logits)
      total = sum(weights[name] * value for name, value in terms.items())
      metrics = {f'train/loss_{n}': v for n, v in terms.items()}
      metrics['train/phi_max'] = jnp.max(phi)
      return total, (x, jax.lax.stop_gradient(moments), metrics)

    carry, loss, (x, moments, metrics) = meta.inner_step(objective, carry, drawn, tx_inner, cfg.meta)
    return inversion.Step(dict(carry, moments=moments), method_state, loss, x, metrics)

  def finish(carry, method_state, best, ctx):
    updated = inversion_terms.meta_generator_update(tx_meta, carry, method_state, rule=cfg.meta,
                                                    reptile_scale=cfg.reptile_scale, bn_mmt=cfg.bn_mmt)
    buffer = admit(method_state['buffer'], jnp.clip(best, 0.0, 1.0), carry['views'], ctx)
    return dict(updated, buffer=buffer), best

  # ---- the buffer: partial, φ-ordered admission ------------------------------------------------------

  def encode(images):
    """Images in [0, 1] as the buffer stores them (``pool.dtype``; uint8: the references' PNG codes)."""
    return pool_lib.quantize(images) if storage == jnp.uint8 else images.astype(storage)

  def decode(stored):
    return pool_lib.dequantize(stored) if stored.dtype == jnp.uint8 else stored

  def admit(buffer, images, view_draws, ctx):
    """The call's kept images into the buffer (module docstring), stored as the student reads them:
    the image itself, or its ``views`` crops (drawn from the image, as the pool's insert views)
    with the teacher's logits on each as stored."""
    stored = encode(images)
    logits = teacher_logits(ctx.teacher, decode(stored))
    predicted = jnp.argmax(logits, -1)
    hardness = difficulty(logits, cfg.difficulty, cfg.gamma)
    if cfg.phi_in_buffer:  # highest φ first; inside a class the hardest stay
      counts = buffer_lib.class_counts(buffer, num_classes) + jnp.bincount(predicted, length=num_classes)
      order = jnp.argsort(-phi_weights(logits, predicted, counts, buffer_lib.size(buffer) + synth_batch), stable=True)
      scores = hardness
    else:  # batch order; inside a class the oldest give way
      order, scores = jnp.arange(synth_batch), jnp.zeros((synth_batch,), jnp.float32)
    items = {'confidence': jnp.max(jax.nn.softmax(logits, -1), -1), 'difficulty': hardness}
    if cached_logits:
      crops = [encode(augment.apply_crop_flip(images, d, padding=config.kd_augment.crop_padding)) for d in view_draws]
      items['images'] = jnp.stack(crops, axis=1)
      items['logits'] = jnp.stack([teacher_logits(ctx.teacher, decode(c)) for c in crops], axis=1)
    else:
      items['images'] = stored[:, None]
    items = jax.tree.map(lambda a: a[order], items)
    slots = buffer_lib.admission_slots(buffer, predicted[order], scores[order], num_classes=num_classes,
                                       policy=cfg.eviction)
    if cfg.budget_mode == 'total':  # the budget counts every image made; nothing after it is admitted
      slots = jnp.where(ctx.call * synth_batch + jnp.arange(synth_batch) < config.data_budget, slots, -1)
    new_priority = buffer_lib.new_priority(buffer, cfg.new_priority)
    return buffer_lib.write(buffer, slots, items, predicted[order], scores[order], new_priority)

  # ---- distillation: priority sampling δ with importance weights (E8-E10) -------------------------

  def read(buffer, entries, view_index):
    return decode(buffer['items']['images'][entries, view_index])

  def kd_draw(key, state):
    uniform_key, view_key, augment_key = jax.random.split(key, 3)
    drawn = {'uniforms': jax.random.uniform(uniform_key, (kd_steps, batch))}
    if views > 1:
      drawn['views'] = jax.random.randint(view_key, (kd_steps, batch), 0, views)
    if not cached_logits:
      drawn['augment'] = jax.vmap(lambda i: draw_kd_view(jax.random.fold_in(augment_key, i), batch))(
          jnp.arange(kd_steps))
    return drawn

  def distil(student, buffer, tvars, drawn):
    alpha = 0.0 if cfg.sampler == 'uniform' else cfg.alpha
    counts = buffer_lib.class_counts(buffer, num_classes)

    def kd_step(carry, d):
      student, priority = carry
      probs = buffer_lib.probabilities(priority, buffer['valid'], alpha)
      entries = buffer_lib.indices(probs, d['uniforms'], cfg.sampler)
      beta = buffer_lib.annealed_beta(cfg.beta0, student.step / student_steps)
      weights = buffer_lib.importance_weights(probs, buffer['valid'], entries, beta, normaliser=cfg.is_normaliser)
      view_index = d.get('views', jnp.zeros((batch,), jnp.int32))
      x = read(buffer, entries, view_index)
      if not cached_logits:
        x = augment.apply_crop_flip(x, d['augment'], padding=config.kd_augment.crop_padding)
      x = jax.lax.with_sharding_constraint(data.normalize(x, config.dataset), data_sharding)
      if cached_logits:
        t_logits = buffer['items']['logits'][entries, view_index]
      else:
        t_logits = teacher.apply(tvars, x, train=False)
      if cfg.phi_in_kd:
        phi = buffer['items']['difficulty'][entries]
        if cfg.diversity == 'inverse_count':
          phi = phi * diversity(buffer['label'][entries], counts, buffer_lib.size(buffer), cfg.phi_max)
        weights = weights * normalised(phi)

      def objective(params):
        logits, batch_stats = common.apply_train(student, params, x)
        per_image = losses.kl_per_example(logits, t_logits, kd_temperature)
        return jnp.mean(weights * per_image), (batch_stats, per_image, logits)

      (loss, (batch_stats, per_image, logits)), grads = jax.value_and_grad(objective, has_aux=True)(student.params)
      student = student.apply_gradients(grads=grads, batch_stats=batch_stats)
      discrepancy = per_image if cfg.priority == 'kd_loss' else losses.kl_per_example(logits, t_logits, 1.0)
      priority = buffer_lib.update_priorities(priority, entries, jax.lax.stop_gradient(discrepancy), cfg.eps)
      return (student, priority), {'loss': loss, 'beta': beta, 'weight_min': jnp.min(weights)}

    (student, priority), out = jax.lax.scan(kd_step, (student, buffer['priority']), drawn)
    return student, priority, jax.tree.map(lambda a: a[-1], out)

  def kd(state, frozen, drawn, _):
    buffer = state['method']['buffer']
    run = lambda student: distil(student, buffer, frozen['teacher'], drawn)
    skip = lambda student: (student, buffer['priority'], jax.tree.map(
        lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(run, student)[2]))
    distils = state['step'] // iters >= warmup_epochs
    student, priority, out = jax.lax.cond(distils, run, skip, state['student'])
    method = dict(state['method'], buffer=dict(buffer, priority=priority))
    counts = buffer_lib.class_counts(buffer, num_classes)
    size = buffer_lib.size(buffer)
    metrics = {'train/student_loss': out['loss'], 'train/lr_student': lr_s(jnp.maximum(student.step - 1, 0)),
               'train/beta': out['beta'], 'train/is_weight_min': out['weight_min'], 'train/buffer_size': size,
               'train/buffer_largest_class': jnp.max(counts) / jnp.maximum(size, 1),
               'train/priority_max': jnp.max(jnp.where(buffer['valid'], priority, 0.0))}
    return dict(state, student=student, method=method), metrics

  # ---- the job: the engine's synthesis phase, SSD-KD's student phase -------------------------------

  stages = [inversion.Stage(config.g_steps, step, draw=step_draw)]
  synthesizer = inversion.Synthesizer(init=init, begin=begin, stages=stages, finish=finish, draw=draw)
  # The engine's pool holds only the last call's images: the student reads the buffer.
  job = inversion.make_job(config, mesh, s, synthesizer, pool_size=synth_batch)
  synth = job.phases[0]
  if cfg.budget_mode == 'total':
    synth = Phase('synth', generating_only(synth.apply, -(-config.data_budget // synth_batch)), synth.draw)

  def sample_images(state, key):
    return read(state['method']['buffer'], jnp.arange(min(64, config.data_budget)), jnp.zeros((), jnp.int32))

  def on_finish(state):
    buffer = jax.device_get(state['method']['buffer'])
    valid = np.asarray(buffer['valid'])
    classes = np.bincount(np.asarray(buffer['label'])[valid], minlength=num_classes)
    confidence = np.histogram(np.asarray(buffer['items']['confidence'])[valid], bins=CONFIDENCE_BINS, range=(0, 1))[0]
    return {'buffer_size': int(valid.sum()), 'buffer_admitted': int(buffer['admitted']),
            'buffer_class_counts': classes.tolist(), 'buffer_confidence_histogram': confidence.tolist(),
            'buffer_confidence_mean': float(np.asarray(buffer['items']['confidence'])[valid].mean()) if valid.any()
            else 0.0}

  return dataclasses.replace(
      job, phases=[synth, Phase('kd', kd, kd_draw)], sample_images=sample_images, on_finish=on_finish,
      results_file='buffer.json',
      results_note=lambda r: f"ssdkd buffer: {r['buffer_size']} images, classes {r['buffer_class_counts']}")


def generating_only(apply, calls: int):
  """A synthesis phase that runs its first ``calls`` outer iterations only (``budget_mode='total'``:
  the budget is made, then the generator rests); later iterations keep the state as it is."""

  def guarded(state, frozen, drawn, batch):
    run = lambda: apply(state, frozen, drawn, batch)
    skip = lambda: (state, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(run)[1]))
    return jax.lax.cond(state['step'] < calls, run, skip)

  return guarded
