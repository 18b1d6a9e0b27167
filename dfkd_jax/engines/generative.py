"""The generator-adversarial engine shared by DAFL, ZSKT, DFAD and DFQ.

One outer iteration (one compiled program) is

  synth: ``g_steps`` generator updates; each draws z ~ N(0, I), makes x = G(z) with train-mode BN,
         runs the frozen teacher (eval mode) and, for adversarial methods, the student (eval mode)
         on x, and descends the method's generator loss;
  kd:    ``kd_steps`` student updates (train mode) on the distillation loss against the teacher's
         logits, on either
           'fresh' samples: new z and x = G(z) per step, G in eval mode (CMI framework) or train
                   mode (its BN statistics keep moving, as in the DFAD original), or
           'reuse': the last synth batch, made before the generator's update, with the teacher's
                   logits from the same forward pass (original DAFL's joint step; ZSKT's pseudo-batch).

The student's loss is ``config.kd`` (KL at a temperature, or L1) plus, when
``config.kd.attention_beta > 0``, ZSKT's attention transfer β · Σ_g AT(student_g, teacher_g) on the
outputs of the modules ``config.kd.attention_modules`` (same names in both networks).

A method module supplies the generator loss (a function of the teacher's output and the student's
logits) and the config defaults; everything else lives here once.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dfkd_jax import losses, models, optim
from dfkd_jax.engines import common
from dfkd_jax.models import hooks
from dfkd_jax.run.job import Job, Phase

# generator_loss(teacher_output, student_logits_or_None, images) -> (loss, metrics dict)
GeneratorLoss = Callable[[common.TeacherView, jax.Array | None, jax.Array], tuple[jax.Array, dict]]


def make_job(config, mesh, generator_loss: GeneratorLoss, *, adversarial: bool, bn_taps: bool) -> Job:
  """Builds the loop job of a generator-adversarial method.

  adversarial: the generator loss reads the student's logits (the student runs in the synth step).
  bn_taps: the generator loss reads the teacher's BN-input statistics.
  """
  s = common.setup(config, mesh)
  generator = models.create(config.generator.arch, **config.generator.kwargs)
  nz_shape = models.input_shape(config.generator.arch, **config.generator.kwargs)
  batch, g_steps, kd_steps = config.batch_size, config.g_steps, config.kd_steps
  reuse = config.student_batch == 'reuse'
  sample_train_mode = config.generator.get('sample_mode', 'eval') == 'train'
  kd_loss = common.kd_loss_fn(config.kd)
  beta = config.kd.get('attention_beta', 0.0)
  at_modules = tuple(config.kd.get('attention_modules', ()))
  num_steps = config.num_epochs * config.iters_per_epoch
  tx_s, lr_s = common.student_optimizer(config, config.iters_per_epoch * kd_steps)
  lr_g = optim.make_schedule(config.optimizer_g, config.iters_per_epoch * g_steps, config.num_epochs)
  tx_g = optim.make_optimizer(config.optimizer_g, lr_g)
  teacher = s.teacher

  def init(key):
    kg, ks = jax.random.split(key)
    state = {'step': jnp.zeros((), jnp.int32),
             'generator': optim.init_state(generator, tx_g, kg, nz_shape),
             'student': optim.init_state(s.student, tx_s, ks, s.student_input_shape)}
    if reuse:  # the batch handed from the synth to the kd phase of the same iteration
      state['handoff'] = {'images': jnp.zeros((batch,) + s.student_input_shape),
                          'teacher_logits': jnp.zeros((batch, config.num_classes))}
    return state

  def generator_objective(params, g_state, student, tvars, z):
    x, batch_stats = common.apply_train(g_state, params, z)
    x = s.to_teacher_input(x)
    t = common.teacher_view(teacher.model, tvars, x, bn_taps=bn_taps, penultimate=True)
    s_logits = student.apply_fn(student.variables, x, train=False) if adversarial else None
    loss, metrics = generator_loss(t, s_logits, x)
    return loss, (batch_stats, metrics, x, t.logits)

  def synth(state, frozen, key, _):
    student = state['student']

    def g_step(carry, k):
      g_state, _, _ = carry
      z = common.latent(k, (batch,) + nz_shape, mesh)
      (loss, (batch_stats, metrics, x, t_logits)), grads = jax.value_and_grad(generator_objective, has_aux=True)(
          g_state.params, g_state, student, frozen['teacher'], z)
      g_state = g_state.apply_gradients(grads=grads, batch_stats=batch_stats)
      return (g_state, x, t_logits), dict(metrics, **{'train/generator_loss': loss})

    carry0 = (state['generator'], jnp.zeros((batch,) + s.student_input_shape), jnp.zeros((batch, config.num_classes)))
    # Unrolled: every config of this family takes 1 generator step, and a loop-free body avoids the
    # while-loop wrapper (it measured faster, within noisy timings, on the 2-core CPU).
    (g_state, x, t_logits), metrics = jax.lax.scan(g_step, carry0, jax.random.split(key, g_steps), unroll=True)
    new = dict(state, generator=g_state)
    if reuse:
      new['handoff'] = {'images': jax.lax.stop_gradient(x), 'teacher_logits': jax.lax.stop_gradient(t_logits)}
    return new, jax.tree.map(lambda m: m[-1], metrics)

  def sample(g_state, key):
    """A batch for the student from G (no gradient); returns (g_state, x in teacher space)."""
    z = common.latent(key, (batch,) + nz_shape, mesh)
    if sample_train_mode:
      x, batch_stats = common.apply_train(g_state, g_state.params, z)
      g_state = g_state.replace(batch_stats=batch_stats)
    else:
      x = g_state.apply_fn(g_state.variables, z, train=False)
    return g_state, jax.lax.stop_gradient(s.to_teacher_input(x))

  def teacher_targets(tvars, x, logits=None):
    """The teacher's logits (reused from the synth forward when given) and, for attention
    transfer, its module outputs on ``x``."""
    if not beta:
      return logits if logits is not None else teacher.model.apply(tvars, x, train=False), []
    t_logits, t_maps = hooks.apply_with_output_taps(teacher.model, tvars, x, at_modules, train=False)
    return t_logits, t_maps

  def student_step(student, x, t_logits, t_maps):
    if beta:
      loss_fn = lambda logits, maps: kd_loss(logits, t_logits) + beta * losses.attention_transfer(maps, t_maps)
      return common.student_update(student, x, loss_fn, at_modules)
    return common.student_update(student, x, lambda logits: kd_loss(logits, t_logits))

  def kd(state, frozen, key, _):
    tvars = frozen['teacher']
    if reuse:  # one batch for every student step: the teacher's targets are computed once
      x = state['handoff']['images']
      t_logits, t_maps = teacher_targets(tvars, x, None if beta else state['handoff']['teacher_logits'])

    def s_step(carry, k):
      g_state, student = carry
      if reuse:
        xs, tl, tm = x, t_logits, t_maps
      else:
        g_state, xs = sample(g_state, k)
        tl, tm = teacher_targets(tvars, xs)
      student, loss = student_step(student, xs, tl, tm)
      return (g_state, student), loss

    (g_state, student), step_losses = jax.lax.scan(s_step, (state['generator'], state['student']),
                                                   jax.random.split(key, kd_steps))
    return dict(state, generator=g_state, student=student), {
        'train/student_loss': step_losses[-1], 'train/lr_student': lr_s(student.step - 1)}

  def sample_images(state, key):
    g_state = state['generator']
    z = jax.random.normal(key, (64,) + nz_shape)
    return s.to_unit(g_state.apply_fn(g_state.variables, z, train=False))

  return Job(
      init=init, phases=[Phase('synth', synth), Phase('kd', kd)], frozen={'teacher': teacher.variables},
      num_steps=num_steps, student=common.evaluated_student(s), teacher=common.evaluated_teacher(s),
      sample_images=sample_images, exports=[common.export_student(config)])
