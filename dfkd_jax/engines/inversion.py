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
With ``make_job(kd_once_per_epoch=True)`` (NAYER's reference epoch: all its batches, then the
student steps) the kd phase runs only in an epoch's last iteration, ``kd_steps`` steps per epoch.

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

Randomness (the replay seam, ``run.job.Phase``): each phase's ``draw(key, state)`` makes every
random value the phase consumes and its ``apply(state, frozen, draws, batch)`` is the arithmetic,
random only through ``draws``. The two pytrees:

  synth  ``{'begin': Synthesizer.draw(method_state, ctx, key)``: the call's fresh values (latents,
           targets, re-drawn weights, ...), given to ``begin``;
          ``'stages': [one per Stage: Stage.draw(method_state, ctx, key_k) for its steps k, stacked
           along a leading axis of length ``steps``]``: inner step k's values (augmentation
           parameters, bank rows, ...), given to ``step`` as its last argument;
          ``'views': [one per insert view: augment.draw_crop_flip of the call's images]`` (only with
           ``pool.insert_views`` > 0)}.
  kd     ``{'indices': (kd_steps, batch_size) int32 pool slots}`` each student step reads, and with
         read-time augmentation ``'augment': augment.draw_crop_flip`` stacked (kd_steps, batch_size, ...)
         (during the warm-up epochs, whose kd phase is skipped, zeros that nothing reads).

The method's draw hooks see ``ctx`` without the teacher (``ctx.teacher`` is None: what is drawn never
depends on it) and the persistent method state as the call starts (e.g. CMI's bank fill). Their
default, ``own_key``, draws the key itself: ``begin``/``step`` then receive a PRNG key and draw
inside, which runs but cannot be replayed. Randomness ``finish`` needs is drawn by
``Synthesizer.draw`` and passed through the carry. In production the draws are made in the same
compiled program (the stage draws with ``lax.map``, step by step as the scan would), from the keys
the engine always used, so the values are those drawn inside the steps before the seam existed.

Replay intermediates (``run.job.TRACE``, dropped by the iteration so never computed in
production): a step's ``trace/...`` metrics are stacked over its stage's steps (one stage: as
named; several: ``trace/stage<i>/...``), and the engine adds ``trace/loss`` (L_k) and
``trace/best_loss`` (the best after step k) per step and ``trace/kept`` (the images ``finish``
returned, clipped: what the pool received, before insert views); the kd phase adds per student step
``trace/images`` (the normalised batch), ``trace/t_out`` and ``trace/s_out`` (teacher and student
logits, the student in train mode before its update) and ``trace/loss``.

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
from dfkd_jax.run.job import TRACE, Job, Phase
from dfkd_jax.synth import augment
from dfkd_jax.synth import pool as pool_lib

_POOL_DTYPES = {'uint8': jnp.uint8, 'float32': jnp.float32}


class Context(NamedTuple):
  """What a synthesis step reads besides its own variables."""
  teacher: Any            # the frozen teacher's variables (None in the draw hooks)
  student: TrainState     # for adversarial terms (apply it in eval mode, as the references do)
  epoch: jax.Array        # int32 epoch of this outer iteration
  call: Any = None        # int32 index of this synthesis call from 0 (the outer iteration)


class Step(NamedTuple):
  """The result of one inner step."""
  carry: Any              # the call's variables and optimiser state after the update
  method_state: Any       # the persistent method state (e.g. CMI's projection head) after the step
  loss: jax.Array         # the total loss, evaluated before this step's update
  candidate: Any          # what ``loss`` was computed on; kept if it is the lowest so far
  metrics: dict           # scalars, the last step's reported; ``trace/...`` entries (any shape) stacked


DrawFn = Callable[[Any, Context, jax.Array], Any]  # (method_state, ctx, key) -> draws
StepFn = Callable[[Any, Any, Context, Any], Step]  # (carry, method_state, ctx, draws) -> Step


def own_key(method_state, ctx: Context, key: jax.Array) -> jax.Array:
  """The default draw hook: the key itself (the hook's consumer draws from it)."""
  del method_state, ctx
  return key


class Stage(NamedTuple):
  """``steps`` inner steps of ``step`` in one ``lax.scan``; ``enter(carry)`` runs first (e.g. a
  fresh optimiser at a new resolution in NVlabs DeepInversion's multi-resolution schedule);
  ``draw`` makes each step's random values (``step``'s ``draws``)."""
  steps: int
  step: StepFn
  enter: Callable[[Any], Any] | None = None
  draw: DrawFn = own_key


class Synthesizer(NamedTuple):
  """A method's synthesis.

  init: key -> the persistent method state (any pytree, ``{}`` if none).
  begin: (method_state, ctx, draws) -> carry, the call's fresh variables and optimiser state, from
    ``draw``'s values.
  stages: the inner optimisation, run in order.
  finish: (carry, method_state, best_candidate, ctx) -> (method_state, images (N, H, W, C) in
    [0, 1] for the pool; N = ``make_job``'s ``images_per_call``).
  kd_loss: optional (student_logits, teacher_logits, student_step) -> the student's loss, replacing
    ``config.kd`` (CuDFKD's self-paced weight depends on the step).
  draw: (method_state, ctx, key) -> the call's random values, ``begin``'s ``draws``.
  update_student: optional (carry, student) -> the student after the call, for a synthesis that
    changes it (NAYER's reference mode runs the student's adversarial forward in train mode, which
    moves its BN running statistics).
  """
  init: Callable[[jax.Array], Any]
  begin: Callable[[Any, Context, Any], Any]
  stages: Sequence[Stage]
  finish: Callable[[Any, Any, Any, Context], tuple[Any, jax.Array]]
  kd_loss: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None
  draw: DrawFn = own_key
  update_student: Callable[[Any, TrainState], TrainState] | None = None


def pool_capacity(config) -> int:
  """``config.pool.capacity``, or with 0 every image the run synthesises."""
  capacity = config.pool.capacity
  if capacity < 0:
    raise UserError(f'pool.capacity must be >= 0 (0: every synthesised image), got {capacity}')
  return capacity or config.synthesis_batch_size * config.num_epochs * config.iters_per_epoch


def make_job(config, mesh, s: common.Setup, synthesizer: Synthesizer, *,
             pool_size: int | None = None, kd_once_per_epoch: bool = False) -> Job:
  """The loop job of an inversion method: the ``synth`` then ``kd`` phases above. ``pool_size``
  replaces ``config.pool.capacity`` for a method whose pool holds exactly the images of one call
  (CuDFKD); otherwise a call adds ``synthesis_batch_size`` images. ``kd_once_per_epoch``: the kd
  phase runs in an epoch's last iteration only."""
  batch, kd_steps, iters_per_epoch = config.batch_size, config.kd_steps, config.iters_per_epoch
  parallel.check_batch(config.synthesis_batch_size, mesh, 'synthesis_batch_size')
  check_choice('pool.dtype', config.pool.dtype, _POOL_DTYPES)
  capacity = pool_capacity(config) if pool_size is None else pool_size
  images_per_call = config.synthesis_batch_size if pool_size is None else pool_size
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
  kd_iters_per_epoch = 1 if kd_once_per_epoch else iters_per_epoch
  tx_s, lr_s = common.student_optimizer(config, kd_iters_per_epoch * kd_steps)
  kd_gated = bool(warmup_epochs) or kd_iters_per_epoch < iters_per_epoch  # the kd phase is skipped sometimes
  kd_loss = common.kd_loss_fn(config.kd)
  teacher = s.teacher.model
  data_sharding = parallel.data_sharded(mesh)
  padding = config.kd_augment.crop_padding

  def draw_kd_view(key, num):
    """``config.kd_augment``'s parameters for ``num`` pool images (the standard CIFAR train transform)."""
    return augment.draw_crop_flip(*jax.random.split(key), num, padding=padding, flip=config.kd_augment.flip)

  def init(key):
    method_key, student_key = jax.random.split(key)
    state = {'step': jnp.zeros((), jnp.int32),
             'student': optim.init_state(s.student, tx_s, student_key, s.student_input_shape),
             'method': synthesizer.init(method_key),
             'pool': pool_lib.init(capacity, s.student_input_shape, _POOL_DTYPES[config.pool.dtype])}
    if cache_logits:  # a ring written in step with 'pool': slot i holds the logits of entry i
      state['pool_logits'] = pool_lib.init(capacity, (config.num_classes,), jnp.float32)
    return state

  def context(state, teacher_variables=None) -> Context:
    return Context(teacher_variables, state['student'], state['step'] // iters_per_epoch, state['step'])

  def synth_draw(key, state):
    method_state, ctx = state['method'], context(state)
    begin_key, key = jax.random.split(key)
    drawn = {'begin': synthesizer.draw(method_state, ctx, begin_key), 'stages': []}
    for i, stage in enumerate(synthesizer.stages):
      step_keys = jax.random.split(jax.random.fold_in(key, i), stage.steps)
      drawn['stages'].append(jax.lax.map(lambda k, stage=stage: stage.draw(method_state, ctx, k), step_keys))
    if views:  # an index no stage's key uses
      view_keys = jax.random.split(jax.random.fold_in(key, len(synthesizer.stages)), views)
      drawn['views'] = [draw_kd_view(k, images_per_call) for k in view_keys]
    return drawn

  def synthesize(state, frozen, drawn, _):
    ctx = context(state, frozen['teacher'])
    carry = synthesizer.begin(state['method'], ctx, drawn['begin'])
    method_state, best, metrics = state['method'], None, {}
    for i, (stage, stage_draws) in enumerate(zip(synthesizer.stages, drawn['stages'])):
      if stage.enter is not None:
        carry = stage.enter(carry)
      if best is None:  # zeros shaped like the candidate, and +inf
        first_draws = jax.tree.map(lambda a: a[0], stage_draws)
        candidate = jax.eval_shape(stage.step, carry, method_state, ctx, first_draws).candidate
        best = synth.init_best(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), candidate))

      def inner(c, step_draws, stage=stage):
        carry, method_state, best = c
        out = stage.step(carry, method_state, ctx, step_draws)
        best = synth.keep_best(best, out.loss, jax.lax.stop_gradient(out.candidate))
        return (out.carry, out.method_state, best), dict(out.metrics, **{
            'train/synthesis_loss': out.loss, f'{TRACE}loss': out.loss, f'{TRACE}best_loss': best[0]})

      (carry, method_state, best), stage_metrics = jax.lax.scan(inner, (carry, method_state, best), stage_draws)
      prefix = f'{TRACE}stage{i}/' if len(synthesizer.stages) > 1 else TRACE
      metrics.update({name.replace(TRACE, prefix, 1) if name.startswith(TRACE) else name:
                      value if name.startswith(TRACE) else value[-1] for name, value in stage_metrics.items()})
    method_state, images = synthesizer.finish(carry, method_state, best[1], ctx)
    if images.shape[0] != images_per_call:
      raise ValueError(f'finish returned {images.shape[0]} images; make_job expects {images_per_call} per call')
    images = jnp.clip(jax.lax.stop_gradient(images), 0.0, 1.0)
    metrics[f'{TRACE}kept'] = images
    if views:
      images = jnp.concatenate([augment.apply_crop_flip(images, d, padding=padding) for d in drawn['views']])
    new = dict(state, method=method_state, pool=pool_lib.add(state['pool'], images))
    if synthesizer.update_student is not None:
      new['student'] = synthesizer.update_student(carry, state['student'])
    if cache_logits:
      stored = data.normalize(pool_lib.round_trip(state['pool'], images), config.dataset)
      new['pool_logits'] = pool_lib.add(state['pool_logits'], teacher.apply(frozen['teacher'], stored, train=False))
    metrics.update({'train/best_synthesis_loss': best[0], 'train/pool_size': pool_lib.size(new['pool'])})
    return new, metrics

  def distils(state):
    """Whether this iteration's kd phase runs (not in a warm-up epoch; with ``kd_once_per_epoch``,
    the epoch's last iteration)."""
    runs = state['step'] // iters_per_epoch >= warmup_epochs
    if kd_once_per_epoch:
      runs &= state['step'] % iters_per_epoch == iters_per_epoch - 1
    return runs

  def kd_draw(key, state):
    order_key, augment_key = jax.random.split(key)

    def draw_all():
      drawn = {'indices': jax.lax.map(lambda i: pool_lib.epoch_indices(state['pool'], order_key, i * batch, batch),
                                      jnp.arange(kd_steps))}
      if read_augment is not None:
        drawn['augment'] = jax.vmap(lambda i: draw_kd_view(jax.random.fold_in(augment_key, i), batch))(
            jnp.arange(kd_steps))
      return drawn

    if not kd_gated:
      return draw_all()
    return jax.lax.cond(distils(state), draw_all,
                        lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(draw_all)))

  def distil(student, state, tvars, drawn):
    def kd_step(student, step_draws):
      indices = step_draws['indices']
      x = pool_lib.read(state['pool'], indices)
      if read_augment is not None:
        x = augment.apply_crop_flip(x, step_draws['augment'], padding=padding)
      x = jax.lax.with_sharding_constraint(data.normalize(x, config.dataset), data_sharding)
      if cache_logits:
        t_logits = jax.lax.with_sharding_constraint(pool_lib.read(state['pool_logits'], indices), data_sharding)
      else:
        t_logits = teacher.apply(tvars, x, train=False)
      if synthesizer.kd_loss is not None:
        loss_fn = lambda logits: synthesizer.kd_loss(logits, t_logits, student.step)
      else:
        loss_fn = lambda logits: kd_loss(logits, t_logits)
      updated, loss = common.student_update(student, x, loss_fn)
      trace = {'images': x, 't_out': t_logits, 's_out': common.apply_train(student, student.params, x)[0],
               'loss': loss}
      return updated, {f'{TRACE}{name}': value for name, value in trace.items()}

    return jax.lax.scan(kd_step, student, drawn)

  def kd(state, frozen, drawn, _):
    run = lambda student: distil(student, state, frozen['teacher'], drawn)
    if kd_gated:  # synthesis-only iterations: the student and its optimiser stay as they are
      skip = lambda student: (student, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                                    jax.eval_shape(run, student)[1]))
      student, trace = jax.lax.cond(distils(state), run, skip, state['student'])
    else:
      student, trace = run(state['student'])
    return dict(state, student=student), {'train/student_loss': trace[f'{TRACE}loss'][-1],
                                          'train/lr_student': lr_s(jnp.maximum(student.step - 1, 0)), **trace}

  def sample_images(state, key):
    return pool_lib.latest(state['pool'], min(64, config.synthesis_batch_size))

  return Job(
      init=init, phases=[Phase('synth', synthesize, synth_draw), Phase('kd', kd, kd_draw)],
      frozen={'teacher': s.teacher.variables}, num_steps=num_steps, student=common.evaluated_student(s),
      teacher=common.evaluated_teacher(s), sample_images=sample_images, exports=[common.export_student(config)])
