"""What every distillation method shares: the frozen teacher, the student and generator train
states, the teacher's forward pass with the taps a loss needs, the student's KD update, latent
noise drawn on device already sharded, and the evaluation/sample hooks of the loop.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from dfkd_jax import data, losses, models, optim
from dfkd_jax.convert import teachers
from dfkd_jax.errors import UserError, check_choice
from dfkd_jax.models import hooks
from dfkd_jax.optim import TrainState
from dfkd_jax.run import parallel
from dfkd_jax.run.job import Evaluated, Export


class TeacherView(NamedTuple):
  """The frozen teacher (eval mode) on one input: its logits and what the losses read from the
  same forward pass (empty lists and None where not asked for)."""
  logits: jax.Array
  bn: list                       # hooks.LayerInput of every BatchNorm's input, in call order
  bn_running: list               # the matching running (mean, var), the BN-statistics loss's targets
  named: list                    # hooks.LayerInput of the modules named by ``feature_layers`` (CMI)
  penultimate: jax.Array | None  # the penultimate features (DAFL's activation loss)

  @property
  def bn_moments(self) -> list:
    """[(μ, σ²)] of every BN input, for ``losses.bn_statistics_loss(moments, bn_running)``."""
    return [(t.mean, t.var) for t in self.bn]


def teacher_view(model, variables, x, *, bn_taps: bool = True, feature_layers: Sequence[str] = (),
                 penultimate: bool = False) -> TeacherView:
  """One forward of the teacher ``model`` on ``x`` (its normalised input space) in eval mode (running
  BN statistics), as every reference runs it, with BatchNorm-input taps if ``bn_taps`` (always with
  ``feature_layers``), taps on the inputs of the ``feature_layers`` modules, and the penultimate
  features if ``penultimate``."""
  kw = {'train': False, 'return_features': True} if penultimate else {'train': False}
  named = []
  if feature_layers:
    out, bn, named = hooks.apply_with_bn_and_input_taps(model, variables, x, feature_layers, **kw)
  elif bn_taps:
    out, bn = hooks.apply_with_bn_taps(model, variables, x, **kw)
  else:
    out, bn = model.apply(variables, x, **kw), []
  logits, features = out if penultimate else (out, None)
  return TeacherView(logits, bn, hooks.running_stats(variables, bn), named, features)


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
  student KD silently runs at T=1 whatever ``--T`` says
  (``docs/reference_semantics.md#gan-baselines-in-the-cmi-framework``). Off by default.
  """
  check_choice('kd.loss', kd_cfg.loss, ('kl', 'l1'))
  if kd_cfg.loss == 'l1':
    return losses.l1_logits
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
    raise UserError(f"teacher {config.teacher.checkpoint} takes inputs of shape "
                    f"{tuple(teacher.metadata['input_shape'])} "
                    f"but the config has image_size={config.image_size}, in_channels={config.in_channels}")
  parallel.check_batch(config.batch_size, mesh, 'batch_size')
  if config.get('generator', None) is not None and config.generator.get('output') == 'unit':
    to_teacher, to_unit = (lambda x: data.normalize(x, config.dataset)), (lambda x: x)
  else:  # the generator already produces the teacher's normalised input space (DAFL, ZSKT, DFAD originals)
    to_teacher, to_unit = (lambda x: x), (lambda x: data.to_unit_range(x, config.dataset))
  return Setup(teacher, student, shape, to_teacher, to_unit)


def abstract_view(s: Setup, feature_layers: Sequence[str] = ()) -> TeacherView:
  """The shapes of ``teacher_view`` (BN taps on) on this job's inputs; a teacher without BatchNorm
  layers is a ``UserError`` (every inversion method matches BN statistics, as the references assert)."""
  view = jax.eval_shape(lambda x: teacher_view(s.teacher.model, s.teacher.variables, x, feature_layers=feature_layers),
                        jnp.zeros((2,) + tuple(s.student_input_shape)))
  if not view.bn:
    raise UserError(f'teacher {s.teacher.metadata.get("arch", "")!r} has no BatchNorm layer, whose statistics '
                    'inversion methods match; use a BN teacher (e.g. embedded:resnet8_mnist)')
  return view


def latent(key, shape, mesh) -> jax.Array:
  """N(0, I) noise of ``shape`` drawn on device, split over the mesh's data axis."""
  return jax.lax.with_sharding_constraint(jax.random.normal(key, shape), parallel.data_sharded(mesh))


def evaluated_student(s: Setup) -> Evaluated:
  return Evaluated(s.student.apply, lambda state: state['student'].variables)


def evaluated_teacher(s: Setup) -> Evaluated:
  return Evaluated(s.teacher.model.apply, lambda frozen: frozen['teacher'])


def export_student(config) -> Export:
  """The final student, exported by the run machinery as the converted-model directory ``WORKDIR/student``."""
  return Export('student', config.student.arch, lambda state: state['student'].variables,
                config.student.get('kwargs', {}),
                {'trained_by': f'dfkd_jax.methods.{config.method}', 'teacher': config.teacher.checkpoint})


def student_optimizer(config, steps_per_epoch: int):
  """The student's optimiser and its per-epoch schedule (counted in student steps)."""
  schedule = optim.make_schedule(config.optimizer_s, steps_per_epoch, config.num_epochs)
  return optim.make_optimizer(config.optimizer_s, schedule), schedule
