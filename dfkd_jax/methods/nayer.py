"""NAYER: Noisy Layer Generation for data-free KD (Tran et al., CVPR 2024; tmtuan1307/NAYER
``datafree/synthesis/nayer.py``).

The generator (``NLGenerator``, ``models.generators.NoisyLayerGenerator``) maps the **label
embedding** e_y of each sample's class through BatchNorm1d, a "noisy layer" Linear(le_size, 1000)
per chunk of ``num_classes`` samples, and the CMI decoder (Sigmoid output). It persists across
batches; per synthesis batch (one engine synthesis call)

  1. every noisy layer is re-drawn N(0, 1) (bias 0) and a fresh Adam(lr_g, (0.5, 0.999)) is built
     over all generator parameters; the labels are balanced, y = [0, 1, .., C−1] repeated (plus
     random labels for a remainder), with one-hot targets;
  2. ``g_steps`` steps on x = G(e_y) ∈ [0, 1] through v = normalise(RandomCrop(size, padding 4) +
     flip)(x), per image:

       L = bn · Σ_l (‖σ²_run,l − σ̃²_l‖₂ + ‖μ_run,l − μ̃_l‖₂) + oh · CE_soft(T(v), onehot(y))
         + adv · (−(1/N) Σ_n [argmax S(v) = argmax T(v)]_n · KL(p_T ‖ p_S)_n)   (T = 1, S eval mode)

     with the ``bn_mmt`` blend (μ̃, σ̃²) = 0.1·(μ, σ²) + 0.9·EMA, the EMA updated after every batch
     with its last step's statistics (as Fast; ``inversion_terms.bn_ema_*``); the adversarial term only
     after the warm-up epochs;
  3. the lowest-loss pre-augmentation x (before its update) joins the replay pool; the generator
     keeps its final parameters for the next batch.

Epochs (the reference's): ``nayer.warmup_g_loops`` (10) batches per warm-up epoch, without KD,
then ``iters_per_epoch`` (``--g_loops``, 2) batches per epoch and then ``kd_steps`` (400) student
steps (``nayer.kd_every_batch=False``, the reference's order: the kd phase runs after the epoch's
last batch, ``inversion.make_job(kd_once_per_epoch=True)``); ``kd_every_batch=True`` takes
``kd_steps`` steps after every batch instead. The engine counts epochs of ``iters_per_epoch``
calls, so the reference's W warm-up epochs are ``warmup_epochs`` = W · warmup_g_loops /
iters_per_epoch engine epochs (20 · 10 / 2 = 100) and ``num_epochs`` = that + the KD epochs. The
whole generator is re-created (``generator.reinit()``; here a fresh ``init`` from the call's key)
at the first batch of every reference epoch e with (e − W) mod g_life = 0 or e mod g_life = 0
(g_life 10).

The student's adversarial forward runs in eval mode. The reference sets ``student.eval()`` when an
epoch's synthesis starts but ``student.train()`` after each batch, so from its second batch on the
forward uses batch statistics and moves the student's running ones;
``nayer.reference_student_train_mode=True`` reproduces that (``student_train_mode``).

**Label embeddings** (``nayer.label_embedding``): NAYER feeds CLIP ViT-B/32 text features of
"a image of {class}" (its ``label_embedding/*_le.pickle``). Here they are an input file the user
provides, never downloaded: a NumPy ``.npy`` array of shape [num_classes, le_size] (float, row c =
class c's embedding, in the dataset's label order; ``le_size`` = ``generator.kwargs.le_size``, 512
for CLIP), read with ``allow_pickle=False``. A missing or malformed file is a one-line error.
With ``label_embedding=''`` the fallback is a fixed embedding drawn from ``config.seed``: the rows
of a random orthonormal [num_classes, le_size] matrix (QR of a Gaussian draw; unit-norm, mutually
orthogonal class codes, needing le_size ≥ num_classes).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from dfkd_jax import models, optim
from dfkd_jax.engines import common, inversion, inversion_terms
from dfkd_jax.errors import UserError
from dfkd_jax.models.generators import draw_noisy_layers, replace_params
from dfkd_jax.run.job import TRACE


def load_label_embedding(path: str, num_classes: int, dim: int, seed: int) -> np.ndarray:
  """The [num_classes, dim] float32 label embeddings: the ``.npy`` file at ``path``, or the
  seeded orthonormal fallback when ``path`` is empty."""
  if not path:
    if dim < num_classes:
      raise UserError(f'the fallback label embedding needs generator.kwargs.le_size >= num_classes '
                      f'({dim} < {num_classes}); give nayer.label_embedding=FILE.npy')
    gaussian = np.random.default_rng(seed).standard_normal((dim, num_classes))
    q, _ = np.linalg.qr(gaussian)  # (dim, num_classes), orthonormal columns
    return np.ascontiguousarray(q.T, dtype=np.float32)
  if not os.path.isfile(path):
    raise UserError(f'nayer.label_embedding: no such file {path!r} (a .npy array [num_classes, le_size])')
  try:
    table = np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise UserError(f'nayer.label_embedding {path!r} is not a .npy array file ({e})') from None
  if table.shape != (num_classes, dim) or not np.issubdtype(table.dtype, np.floating):
    raise UserError(f'nayer.label_embedding {path!r} holds {table.dtype}{list(table.shape)}; expected a float '
                    f'array [num_classes, le_size] = [{num_classes}, {dim}]')
  if not np.isfinite(table).all():
    raise UserError(f'nayer.label_embedding {path!r} has non-finite values')
  return table.astype(np.float32)


def draw_remainder(key, num: int, num_classes: int) -> jax.Array:
  """NAYER ``generate_ys``' random part: num % C labels uniform over the classes."""
  return jax.random.randint(key, (num % num_classes,), 0, num_classes)


def balanced_targets(remainder, num: int, num_classes: int) -> jax.Array:
  """NAYER ``generate_ys``: [0 .. C−1] repeated num // C times, then the ``draw_remainder`` labels."""
  return jnp.concatenate([jnp.tile(jnp.arange(num_classes), num // num_classes), jnp.asarray(remainder)])


class Schedule:
  """The reference's epochs in engine synthesis calls: W = ``warmup`` epochs of ``warmup_loops``
  batches, then ``loops`` batches per epoch."""

  def __init__(self, warmup_calls: int, warmup_loops: int, loops: int, g_life: int):
    if warmup_calls % warmup_loops:
      raise UserError(f'warmup_epochs x iters_per_epoch = {warmup_calls} warm-up batches is not a whole number '
                      f'of reference epochs of nayer.warmup_g_loops={warmup_loops} batches')
    self.warmup_calls, self.warmup_loops, self.loops, self.g_life = warmup_calls, warmup_loops, loops, g_life
    self.warmup = warmup_calls // warmup_loops

  def epoch(self, call):
    """The reference epoch of synthesis call ``call`` (both from 0)."""
    return jnp.where(call < self.warmup_calls, call // self.warmup_loops,
                     self.warmup + (call - self.warmup_calls) // self.loops)

  def recreate(self, call):
    """Whether ``call`` re-creates the generator: the first batch of an epoch e with
    (e − W) mod g_life = 0 or e mod g_life = 0."""
    first = jnp.where(call < self.warmup_calls, call % self.warmup_loops == 0,
                      (call - self.warmup_calls) % self.loops == 0)
    e = self.epoch(call)
    return first & ((jnp.remainder(e - self.warmup, self.g_life) == 0) | (jnp.remainder(e, self.g_life) == 0))


  def calls_of_epoch(self, epoch: int) -> list[int]:
    """The synthesis calls (from 0) of reference epoch ``epoch``."""
    if epoch < self.warmup:
      return list(range(epoch * self.warmup_loops, (epoch + 1) * self.warmup_loops))
    first = self.warmup_calls + (epoch - self.warmup) * self.loops
    return list(range(first, first + self.loops))


def schedule_of(config) -> Schedule:
  return Schedule(config.warmup_epochs * config.iters_per_epoch, config.nayer.warmup_g_loops, config.iters_per_epoch,
                  config.nayer.g_life)


def student_train_mode(call, config):
  """Whether the student's adversarial forward of synthesis call ``call`` runs in train mode:
  with ``nayer.reference_student_train_mode``, every batch after an epoch's first (the reference
  calls ``student.train()`` after each batch, ``student.eval()`` only when the epoch starts)."""
  if not config.nayer.reference_student_train_mode:
    return False
  schedule = schedule_of(config)
  return (call >= schedule.warmup_calls) & ((call - schedule.warmup_calls) % schedule.loops != 0)


def make_job(config, mesh):
  s = common.setup(config, mesh)
  view_shapes = common.abstract_view(s)
  w, cfg = config.loss, config.nayer
  batch, teacher, num_classes = config.synthesis_batch_size, s.teacher.model, config.num_classes
  kwargs = dict(config.generator.kwargs, nl=num_classes, sbz=batch)
  generator = models.create(config.generator.arch, **kwargs)
  le_size = models.input_shape(config.generator.arch, **kwargs)
  table = jnp.asarray(load_label_embedding(cfg.label_embedding, num_classes, le_size[0], config.seed))
  schedule = schedule_of(config)
  _, stats_template = inversion_terms.generator_template(generator, le_size)
  tx_g = optim.torch_adam(config.optimizer_g.lr, config.optimizer_g.betas)
  train_mode_student = cfg.reference_student_train_mode

  def fresh_generator(key):
    return generator.init(key, jnp.zeros((batch,) + le_size), train=False)['params']

  def init(key):
    return {'generator': fresh_generator(key), 'bn_ema': inversion_terms.bn_ema_init(view_shapes)}

  def draw(method_state, ctx, key):
    """The batch's random values: a re-created generator (zeros when it is kept: nothing reads
    them), its noisy layers and the remainder labels."""
    recreate_key, noise_key, target_key = jax.random.split(key, 3)
    template = method_state['generator']
    return {'generator': jax.lax.cond(schedule.recreate(ctx.call), lambda: fresh_generator(recreate_key),
                                      lambda: jax.tree.map(jnp.zeros_like, template)),
            'noisy': draw_noisy_layers(template, noise_key),
            'remainder': draw_remainder(target_key, batch, num_classes)}

  def begin(method_state, ctx, drawn):
    params = jax.lax.cond(schedule.recreate(ctx.call), lambda: drawn['generator'], lambda: method_state['generator'])
    params = replace_params(params, drawn['noisy'])
    carry = {'generator': params, 'opt': tx_g.init(params),
             'targets': balanced_targets(drawn['remainder'], batch, num_classes),
             'moments': inversion_terms.bn_ema_moments(method_state['bn_ema'])}
    if train_mode_student:
      carry['student_stats'] = ctx.student.batch_stats
    return carry

  def student_context(carry, ctx):
    """``ctx`` with the reference's student mode for this call: eval, or with
    ``reference_student_train_mode`` train mode (batch statistics) after the epoch's first batch."""
    if not train_mode_student:
      return ctx
    student = ctx.student.replace(batch_stats=carry['student_stats'])
    in_train_mode = student_train_mode(ctx.call, config)

    def apply(variables, x, train=False):  # student_logits asks for eval mode; the call's mode decides
      del train
      return jax.lax.cond(in_train_mode, lambda: common.apply_train(student, variables['params'], x)[0],
                          lambda: student.apply_fn(variables, x, train=False))

    return ctx._replace(student=student.replace(apply_fn=apply))

  def step(carry, method_state, ctx, view_draws):
    adversarial = ctx.call >= schedule.warmup_calls
    student = ctx.student
    ctx = student_context(carry, ctx)

    def objective(params):
      x, _ = inversion_terms.generate(generator, params, stats_template, table[carry['targets']])
      terms, moments, trace = inversion_terms.blended_bn_terms(
          teacher, ctx, x, view_draws, carry['targets'], method_state['bn_ema'], cfg, config.dataset,
          adversarial=adversarial)
      total = sum(w[name] * value for name, value in terms.items())
      trace.update({'x': x, **{f'loss_{n}': v for n, v in terms.items()}})
      metrics = {f'train/loss_{n}': v for n, v in terms.items()}
      metrics.update({f'{TRACE}{n}': v for n, v in trace.items()})
      return total, (x, moments, metrics)

    (loss, (x, moments, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(carry['generator'])
    params, opt = optim.apply_step(tx_g, carry['generator'], carry['opt'], grads)
    carry = dict(carry, generator=params, opt=opt, moments=moments)
    if train_mode_student:  # the train-mode forward moved the student's running statistics
      view = jax.lax.stop_gradient(metrics[f'{TRACE}view'])
      moved = lambda: common.apply_train(student.replace(batch_stats=carry['student_stats']), student.params, view)[1]
      carry['student_stats'] = jax.lax.cond(adversarial & student_train_mode(ctx.call, config), moved,
                                            lambda: carry['student_stats'])
    return inversion.Step(carry, method_state, loss, x, metrics)

  def finish(carry, method_state, best, ctx):
    bn_ema = inversion_terms.bn_ema_update(method_state['bn_ema'], carry['moments'], cfg.bn_mmt)
    return {'generator': carry['generator'], 'bn_ema': bn_ema}, best

  draw_step = lambda method_state, ctx, key: inversion_terms.draw_view(key, batch, cfg)
  synthesizer = inversion.Synthesizer(
      init=init, begin=begin, draw=draw, finish=finish, stages=[inversion.Stage(config.g_steps, step, draw=draw_step)],
      update_student=(lambda carry, student: student.replace(batch_stats=carry['student_stats']))
      if train_mode_student else None)
  return inversion.make_job(config, mesh, s, synthesizer, kd_once_per_epoch=not cfg.kd_every_batch)
