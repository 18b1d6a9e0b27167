"""What every distillation method shares: the frozen teacher, the student and generator train
states, the teacher's forward pass with the taps a loss needs, the student's KD update, latent
noise drawn on device already sharded, and the evaluation/sample hooks of the loop.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from dfkd_jax import data, losses, models, optim
from dfkd_jax.run.job import Evaluated
from dfkd_jax.run import parallel
from dfkd_jax.models import hooks
from dfkd_jax.convert import teachers
from dfkd_jax.convert import model_dir
from dfkd_jax.errors import UserError
from dfkd_jax.optim import TrainState


class TeacherOutput(NamedTuple):
  """Teacher logits and what the losses read from the same forward pass."""
  logits: jax.Array
  features: jax.Array           # penultimate features (DAFL's activation loss)
  bn_batch: list                # [(mean, var)] of every BN layer's input, if asked for
  bn_running: list              # the matching running statistics


def teacher_forward(teacher: teachers.Teacher, variables, x, *, bn_taps: bool = False) -> TeacherOutput:
  """The teacher in eval mode (running BN statistics), as every reference runs it."""
  if bn_taps:
    (logits, feats), tapped = hooks.apply_with_bn_taps(teacher.model, variables, x, train=False,
                                                      return_features=True)
    return TeacherOutput(logits, feats, [(t.mean, t.var) for t in tapped], hooks.running_stats(variables, tapped))
  logits, feats = teacher.model.apply(variables, x, train=False, return_features=True)
  return TeacherOutput(logits, feats, [], [])


def bn_loss(t: TeacherOutput, first_multiplier: float = 1.0):
  return losses.bn_statistics_loss(t.bn_batch, t.bn_running, first_multiplier=first_multiplier)


def create_state(model, tx, key, input_shape, train_init: bool = True) -> TrainState:
  """A TrainState for ``model`` initialised from ``key`` on a dummy batch of ``input_shape``."""
  variables = model.init(key, jnp.zeros((2,) + tuple(input_shape)), train=train_init)
  return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                           batch_stats=variables.get('batch_stats', {}))


def apply_train(state: TrainState, params, x, **kw):
  """``state.apply_fn`` in train mode with ``params``; returns (outputs, new batch_stats)."""
  if not state.batch_stats:
    return state.apply_fn({'params': params}, x, train=True, **kw), state.batch_stats
  out, upd = state.apply_fn({'params': params, 'batch_stats': state.batch_stats}, x, train=True,
                            mutable=['batch_stats'], **kw)
  return out, upd['batch_stats']


def student_update(state: TrainState, x, loss_fn: Callable, output_modules=()) -> tuple[TrainState, jax.Array]:
  """One optimiser step of the student (train mode) on ``loss_fn(student_logits)``, or on
  ``loss_fn(student_logits, [outputs of output_modules])`` when ``output_modules`` is given."""

  def objective(params):
    if not output_modules:
      logits, batch_stats = apply_train(state, params, x)
      return loss_fn(logits), batch_stats
    variables = {'params': params, 'batch_stats': state.batch_stats} if state.batch_stats else {'params': params}
    # A TrainState keeps the bound ``Module.apply``: its ``__self__`` is the module to tap.
    (logits, maps), upd = hooks.apply_with_output_taps(state.apply_fn.__self__, variables, x, output_modules,
                                                      train=True, mutable=['batch_stats'])
    return loss_fn(logits, maps), upd.get('batch_stats', state.batch_stats)

  (loss, batch_stats), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss


def kd_loss_fn(kd_cfg) -> Callable:
  """The student's distillation loss from ``config.kd``: 'kl' at ``temperature`` (reduction
  'batchmean', or 'mean' as the original ZSKT) or 'l1' on logits (DFAD).

  ``kd.reference_temperature_bug=True`` reproduces the CMI-framework bug for zskt/dafl/dfq: their
  student KD silently runs at T=1 whatever ``--T`` says (reference_semantics §2.2). Off by default.
  """
  if kd_cfg.loss == 'l1':
    return losses.l1_logits
  if kd_cfg.loss != 'kl':
    raise UserError(f"kd.loss must be 'kl' or 'l1', not {kd_cfg.loss!r}")
  temperature = 1.0 if kd_cfg.get('reference_temperature_bug', False) else kd_cfg.temperature
  reduction = kd_cfg.get('reduction', 'batchmean')
  return lambda s, t: losses.kd_kl(s, t, temperature, reduction=reduction)


class Setup(NamedTuple):
  teacher: teachers.Teacher
  student: Any
  student_input_shape: tuple
  to_teacher_input: Callable   # generator output -> teacher input space
  to_unit: Callable            # generator output -> [0, 1] for image grids


def setup(config, mesh) -> Setup:
  """Loads the teacher and builds the student; checks batch sizes against the mesh."""
  teacher = teachers.load(config.teacher, config.num_classes, config.dataset)
  student = models.create(config.student.arch, num_classes=config.num_classes, **config.student.get('kwargs', {}))
  shape = (config.image_size, config.image_size, config.in_channels)
  if tuple(teacher.metadata.get('input_shape', shape)) != shape:
    raise UserError(f"teacher {config.teacher.checkpoint} takes inputs of shape {tuple(teacher.metadata['input_shape'])} "
                    f"but the config has image_size={config.image_size}, in_channels={config.in_channels}")
  parallel.check_batch(config.batch_size, mesh, 'batch_size')
  if config.get('generator', None) is not None and config.generator.get('output') == 'unit':
    to_teacher, to_unit = (lambda x: data.normalize(x, config.dataset)), (lambda x: x)
  else:  # the generator already produces the teacher's normalised input space (DAFL, ZSKT, DFAD originals)
    to_teacher, to_unit = (lambda x: x), (lambda x: data.to_unit_range(x, config.dataset))
  return Setup(teacher, student, shape, to_teacher, to_unit)


def latent(key, shape, mesh) -> jax.Array:
  """N(0, I) noise of ``shape`` drawn on device, split over the mesh's data axis."""
  return jax.lax.with_sharding_constraint(jax.random.normal(key, shape), parallel.data_sharded(mesh))


def evaluated_student(s: Setup) -> Evaluated:
  return Evaluated(s.student.apply, lambda state: state['student'].variables)


def evaluated_teacher(s: Setup) -> Evaluated:
  return Evaluated(s.teacher.model.apply, lambda frozen: frozen['teacher'])


def export_student(config) -> Callable:
  """A loop ``on_finish`` hook writing the final student as a converted-model directory
  ``WORKDIR/student`` (``python -m dfkd_jax.convert export`` turns it into a torch .pth)."""
  return lambda state, workdir: model_dir.save_trained(
      workdir, 'student', config.student.arch, state['student'].variables, config, config.student.get('kwargs', {}),
      {'trained_by': f'dfkd_jax.methods.{config.method}', 'teacher': config.teacher.checkpoint})


def student_optimizer(config, steps_per_epoch: int):
  """The student's optimiser and its per-epoch schedule (counted in student steps)."""
  schedule = optim.make_schedule(config.optimizer_s, steps_per_epoch, config.num_epochs)
  return optim.make_optimizer(config.optimizer_s, schedule), schedule
