"""The inversion engine shared by DeepInversion, CMI, Fast and NAYER: every synthesis call optimises
a new batch against the frozen teacher (its pixels, or a re-initialised or cloned generator and its
latents), keeps the best iterate in an on-device replay pool, and the student distils from the pool.
CuDFKD (no replay) runs on it too: its ``finish`` fills a pool of exactly ``kd_steps`` fresh
batches (``make_job(pool_size=...)``) and its ``Synthesizer.kd_loss`` weights the student's loss.

One outer iteration is one compiled program (the state donated, the teacher frozen):

  synth  one synthesis call. ``Synthesizer.begin`` draws the call's fresh variables and optimiser
         state; each ``Stage`` then runs its ``steps`` inner steps as one ``lax.scan``. Inner step
         k evaluates the method's total loss L_k on the current variables and updates them; the
         candidate of the step with the lowest L_k is kept (L_k < best so far: ties keep the
         earlier step, NaN never wins), the references' ``if best_cost > loss``. The candidate is
         what L_k was computed on (pre-augmentation images in [0, 1], plus e.g. CMI's features).
         ``Synthesizer.finish`` turns it into the images appended to the pool and updates what the
         method keeps across calls (CMI's memory bank, Fast's meta-generator, ...).
  kd     ``kd_steps`` student updates (train mode) on pool batches of ``batch_size``. The pool is
         read in a fresh random order per synthesis call, without replacement within a pass (the
         references' ``DataLoader(shuffle=True)`` re-created after every call), through the train
         augmentation ``kd_augment`` (zero-padded random crop, horizontal flip), normalised; the
         loss is ``config.kd`` (KL(p_T ‖ p_S)·T²) against the teacher (eval mode) on the same batch.

Step accounting (docs/reference_semantics.md#step-accounting): one epoch is ``iters_per_epoch`` = ep_steps // kd_steps
outer iterations, each one synthesis call and ``kd_steps`` student steps; the student's learning
rate is a per-epoch schedule of its own step count. During the first ``warmup_epochs`` epochs the
kd phase is skipped (Fast, NAYER: synthesis only), so the student's schedule starts after warm-up.

State: ``{'step', 'student', 'method' (the method's persistent state), 'pool'}``, all checkpointed,
so a resumed run continues exactly as an uninterrupted one.

Pool (``config.pool``): ``capacity`` images, 0 for every image the run will synthesise (the
references' pool grows without bound: synthesis batch × outer iterations; e.g. 51,200 CIFAR images,
157 MB as uint8, replicated on each device); a smaller capacity keeps the most recent images.
``dtype`` 'uint8' reproduces the references' 8-bit PNG round trip, 'float32' keeps images as they
are (clipped to [0, 1], as the PNG writer clamps).

Two options trade the references' read-time augmentation for a student step without a teacher
forward (for a small student, most of its cost). ``insert_views`` K > 0 augments when an image is
added instead of when it is read: the pool holds K views of each image, each drawn once through
``kd_augment``, and reads take them as they are (``capacity`` still counts images; the pool holds
K times as many entries, which ``train/pool_size`` counts). ``teacher_logits`` True stores beside
each entry the teacher's logits on it as the student reads it (after the round trip), computed
once when it is added; it needs unaugmented reads (``insert_views`` > 0, or ``kd_augment`` off).
The student's targets are then the very numbers a teacher forward per student step would give.
With it the state also holds 'pool_logits', a ring written in step with 'pool'.

A method module builds a ``Synthesizer`` (from the pieces of ``engines.inversion_terms``) and calls
``make_job``.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from dfkd_jax import data, optim, synth
from dfkd_jax.engines import common
from dfkd_jax.errors import UserError, check_choice
from dfkd_jax.optim import TrainState
from dfkd_jax.run import parallel
from dfkd_jax.run.job import Job, Phase
from dfkd_jax.synth import augment
from dfkd_jax.synth import pool as pool_lib

_POOL_DTYPES = {'uint8': jnp.uint8, 'float32': jnp.float32}


class Context(NamedTuple):
  """What a synthesis step reads besides its own variables."""
  teacher: Any            # the frozen teacher's variables
  student: TrainState     # for adversarial terms (apply it in eval mode, as the references do)
  epoch: jax.Array        # int32 epoch of this outer iteration
  call: Any = None        # int32 index of this synthesis call from 0 (the outer iteration)


class Step(NamedTuple):
  """The result of one inner step."""
  carry: Any              # the call's variables and optimiser state after the update
  method_state: Any       # the persistent method state (e.g. CMI's projection head) after the step
  loss: jax.Array         # the total loss, evaluated before this step's update
  candidate: Any          # what ``loss`` was computed on; kept if it is the lowest so far
  metrics: dict           # scalars; the last step's are reported


StepFn = Callable[[Any, Any, Context, jax.Array], Step]  # (carry, method_state, ctx, key) -> Step


class Stage(NamedTuple):
  """``steps`` inner steps of ``step`` in one ``lax.scan``; ``enter(carry)`` runs first (e.g. a
  fresh optimiser at a new resolution in NVlabs DeepInversion's multi-resolution schedule)."""
  steps: int
  step: StepFn
  enter: Callable[[Any], Any] | None = None


class Synthesizer(NamedTuple):
  """A method's synthesis.

  init: key -> the persistent method state (any pytree, ``{}`` if none).
  begin: (method_state, ctx, key) -> carry, the call's fresh variables and optimiser state.
  stages: the inner optimisation, run in order.
  finish: (carry, method_state, best_candidate, ctx) -> (method_state, images (N, H, W, C) in
    [0, 1] for the pool).
  kd_loss: optional (student_logits, teacher_logits, student_step) -> the student's loss, replacing
    ``config.kd`` (CuDFKD's self-paced weight depends on the step).
  """
  init: Callable[[jax.Array], Any]
  begin: Callable[[Any, Context, jax.Array], Any]
  stages: Sequence[Stage]
  finish: Callable[[Any, Any, Any, Context], tuple[Any, jax.Array]]
  kd_loss: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None


def pool_capacity(config) -> int:
  """``config.pool.capacity``, or with 0 every image the run synthesises."""
  capacity = config.pool.capacity
  if capacity < 0:
    raise UserError(f'pool.capacity must be >= 0 (0: every synthesised image), got {capacity}')
  return capacity or config.synthesis_batch_size * config.num_epochs * config.iters_per_epoch


def make_job(config, mesh, s: common.Setup, synthesizer: Synthesizer, *,
             pool_size: int | None = None) -> Job:
  """The loop job of an inversion method: the ``synth`` then ``kd`` phases above. ``pool_size``
  replaces ``config.pool.capacity`` for a method whose pool is not a replay history (CuDFKD)."""
  batch, kd_steps, iters_per_epoch = config.batch_size, config.kd_steps, config.iters_per_epoch
  parallel.check_batch(config.synthesis_batch_size, mesh, 'synthesis_batch_size')
  check_choice('pool.dtype', config.pool.dtype, _POOL_DTYPES)
  capacity = pool_capacity(config) if pool_size is None else pool_size
  views, cache_logits = config.pool.insert_views, config.pool.teacher_logits
  if views < 0:
    raise UserError(f'pool.insert_views must be >= 0 (0: augment when read), got {views}')
  read_augment = None if views else config.kd_augment
  if cache_logits and read_augment is not None and (read_augment.crop_padding or read_augment.flip):
    raise UserError('pool.teacher_logits caches the teacher on the pool entries as stored, which the student '
                    'only sees without read-time augmentation: set pool.insert_views > 0 (augment when '
                    'added), or kd_augment.crop_padding=0 and kd_augment.flip=False, or pool.teacher_logits=False')
  capacity *= max(views, 1)
  warmup_epochs = config.get('warmup_epochs', 0)
  num_steps = config.num_epochs * iters_per_epoch
  tx_s, lr_s = common.student_optimizer(config, iters_per_epoch * kd_steps)
  kd_loss = common.kd_loss_fn(config.kd)
  teacher = s.teacher.model
  data_sharding = parallel.data_sharded(mesh)

  def kd_view(key, images):
    """``config.kd_augment`` on pool images in [0, 1] (the standard CIFAR train transform)."""
    return augment.crop_flip(*jax.random.split(key), images, padding=config.kd_augment.crop_padding,
                             flip=config.kd_augment.flip)

  def init(key):
    method_key, student_key = jax.random.split(key)
    state = {'step': jnp.zeros((), jnp.int32),
             'student': optim.init_state(s.student, tx_s, student_key, s.student_input_shape),
             'method': synthesizer.init(method_key),
             'pool': pool_lib.init(capacity, s.student_input_shape, _POOL_DTYPES[config.pool.dtype])}
    if cache_logits:  # a ring written in step with 'pool': slot i holds the logits of entry i
      state['pool_logits'] = pool_lib.init(capacity, (config.num_classes,), jnp.float32)
    return state

  def synthesize(state, frozen, key, _):
    ctx = Context(frozen['teacher'], state['student'], state['step'] // iters_per_epoch, state['step'])
    begin_key, key = jax.random.split(key)
    carry = synthesizer.begin(state['method'], ctx, begin_key)
    method_state, best, metrics = state['method'], None, {}
    for i, stage in enumerate(synthesizer.stages):
      if stage.enter is not None:
        carry = stage.enter(carry)
      if best is None:  # zeros shaped like the candidate, and +inf
        candidate = jax.eval_shape(stage.step, carry, method_state, ctx, key).candidate
        best = synth.init_best(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), candidate))

      def inner(c, k, stage=stage):
        carry, method_state, best = c
        out = stage.step(carry, method_state, ctx, k)
        best = synth.keep_best(best, out.loss, jax.lax.stop_gradient(out.candidate))
        return (out.carry, out.method_state, best), dict(out.metrics, **{'train/synthesis_loss': out.loss})

      (carry, method_state, best), stage_metrics = jax.lax.scan(
          inner, (carry, method_state, best), jax.random.split(jax.random.fold_in(key, i), stage.steps))
      metrics = jax.tree.map(lambda m: m[-1], stage_metrics)
    method_state, images = synthesizer.finish(carry, method_state, best[1], ctx)
    images = jnp.clip(jax.lax.stop_gradient(images), 0.0, 1.0)
    if views:  # an index no stage's key uses
      view_keys = jax.random.split(jax.random.fold_in(key, len(synthesizer.stages)), views)
      images = jnp.concatenate([kd_view(k, images) for k in view_keys])
    new = dict(state, method=method_state, pool=pool_lib.add(state['pool'], images))
    if cache_logits:
      stored = data.normalize(pool_lib.round_trip(state['pool'], images), config.dataset)
      new['pool_logits'] = pool_lib.add(state['pool_logits'], teacher.apply(frozen['teacher'], stored, train=False))
    metrics.update({'train/best_synthesis_loss': best[0], 'train/pool_size': pool_lib.size(new['pool'])})
    return new, metrics

  def distil(student, state, tvars, key):
    order_key, augment_key = jax.random.split(key)

    def kd_step(student, i):
      indices = pool_lib.epoch_indices(state['pool'], order_key, i * batch, batch)
      x = pool_lib.read(state['pool'], indices)
      if read_augment is not None:
        x = kd_view(jax.random.fold_in(augment_key, i), x)
      x = jax.lax.with_sharding_constraint(data.normalize(x, config.dataset), data_sharding)
      if cache_logits:
        t_logits = jax.lax.with_sharding_constraint(pool_lib.read(state['pool_logits'], indices), data_sharding)
      else:
        t_logits = teacher.apply(tvars, x, train=False)
      if synthesizer.kd_loss is not None:
        return common.student_update(student, x, lambda logits: synthesizer.kd_loss(logits, t_logits, student.step))
      return common.student_update(student, x, lambda logits: kd_loss(logits, t_logits))

    return jax.lax.scan(kd_step, student, jnp.arange(kd_steps))

  def kd(state, frozen, key, _):
    run = lambda student: distil(student, state, frozen['teacher'], key)
    if warmup_epochs:  # synthesis-only epochs: the student and its optimiser stay as they are
      skip = lambda student: (student, jnp.zeros((kd_steps,)))
      student, step_losses = jax.lax.cond(state['step'] // iters_per_epoch >= warmup_epochs, run, skip,
                                          state['student'])
    else:
      student, step_losses = run(state['student'])
    return dict(state, student=student), {'train/student_loss': step_losses[-1],
                                          'train/lr_student': lr_s(jnp.maximum(student.step - 1, 0))}

  def sample_images(state, key):
    return pool_lib.latest(state['pool'], min(64, config.synthesis_batch_size))

  return Job(
      init=init, phases=[Phase('synth', synthesize), Phase('kd', kd)], frozen={'teacher': s.teacher.variables},
      num_steps=num_steps, student=common.evaluated_student(s), teacher=common.evaluated_teacher(s),
      sample_images=sample_images, exports=[common.export_student(config)])
