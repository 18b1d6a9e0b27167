"""The generator-adversarial engine shared by DAFL, ZSKT, DFAD and DFQ.

One outer iteration (one compiled program) is

  synth: ``g_steps`` generator updates; each takes a latent z ~ N(0, I), makes x = G(z) with
         train-mode BN, runs the frozen teacher (eval mode) and, for adversarial methods, the
         student on x, and descends the method's generator loss. The student runs in eval mode
         (``synth_student_bn='eval'``, the CMI framework, DFAD) or in train mode
         (``'train'``: batch statistics, its running statistics updated by the adversarial batch, as
         the original ZSKT, whose student never leaves train mode during training);
  kd:    ``kd_steps`` student updates (train mode) on the distillation loss against the teacher's
         logits, on ``student_batch``:
           'fresh':      new z and x = G(z) per step, G in eval mode (CMI framework) or train mode
                         (its BN statistics keep moving, as in the DFAD original);
           'reuse':      the last synth batch, made before the generator's update, with the teacher's
                         logits from the same forward pass (original DAFL's joint step);
           'regenerate': the last synth step's latent through the updated generator, x = G_{k+1}(z_k),
                         once for every student step (the original ZSKT's pseudo-batch: its loader
                         re-runs the generator on a fixed z; the synth steps of one iteration then
                         share that z too);
           'replay':     a uniform draw (with replacement) from a FIFO pool of the last
                         ``config.replay.capacity`` synth images (this iteration's included; a
                         fixed size, so that a run can be extended from its checkpoint),
                         with the teacher's logits computed when the batch is read. No reference
                         does this: a config choice (see the config that uses it).

A generator whose every path to its output is saturated (DAFL's Tanh at a large learning rate) has
a gradient of exactly 0 and never moves again. With ``config.generator.revive_when_dead`` (default
off; no reference does this), an iteration whose last generator step had a zero gradient marks the
generator dead, and the next iteration starts from freshly drawn parameters and BN statistics
(``train/generator_revived`` = 1 there); the optimiser state is kept, so its schedule continues and
the moments left by the dead steps only damp the first steps.

``config.generator.range_penalty`` (a weight, default 0; no reference does this) adds that weight
times ``losses.pixel_range_penalty`` of the generator's images in pixel units to the generator
loss (``train/loss_range``): the mass of pixels outside [0, 1], i.e. values no camera records. An
affine-free BatchNorm output (DAFL, DFAD, ZSKT generators) is zero-mean and unit-variance, so
MNIST-like sparse bright strokes on a black background (pixel 0 is -0.42 after normalisation) and
half-and-half blobs at about +0.9 / -1.3 satisfy it equally; the teacher tells them apart no
better, and a student distilled on the second mode leaves classes unlearnt. Only the teacher's
input normalisation, known to any user of the teacher, goes in.

The student's loss is ``config.kd`` (KL at a temperature, or L1) plus, when
``config.kd.attention_beta > 0``, ZSKT's attention transfer β · Σ_g AT(student_g, teacher_g) on the
outputs of the modules ``config.kd.attention_modules`` (same names in both networks).

Randomness (the replay seam, ``run.job.Phase``): the synth phase's draws are ``{'z': (g_steps, B,
*nz)}``, the kd phase's ``{'z': (kd_steps, B, *nz)}`` with 'fresh' batches, ``{'index': (kd_steps,
B)}`` pool slots with 'replay' and ``{}`` otherwise; with ``revive_when_dead`` the synth draws also
hold ``revived_generator``, fresh variables when the generator is dead (zeros otherwise).
``trace/...`` metrics (stacked per sub-step, dropped by the compiled iteration) hold what a replay
compares: every ``train/...`` metric of each step (losses and the method's loss terms), the
generator's raw output, the teacher's logits and penultimate features, the student's logits.

A method module supplies the generator loss (a function of the teacher's output and the student's
logits) and the config defaults; everything else lives here once.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from dfkd_jax import losses, models, optim
from dfkd_jax.engines import common
from dfkd_jax.errors import check_choice
from dfkd_jax.models import hooks
from dfkd_jax.run import parallel
from dfkd_jax.run.job import TRACE, Job, Phase
from dfkd_jax.synth import pool

# generator_loss(teacher_output, student_logits_or_None, images) -> (loss, metrics dict); metrics
# named ``trace/...`` are per-step intermediates for replays.
GeneratorLoss = Callable[[common.TeacherView, jax.Array | None, jax.Array], tuple[jax.Array, dict]]

STUDENT_BATCHES = ('fresh', 'reuse', 'regenerate', 'replay')


def _per_step(metrics: dict) -> dict:
  """Metrics stacked by a scan over steps: ``train/x`` the last step's value, plus every step's as
  ``trace/x`` for replays; ``trace/...`` ones as stacked."""
  out = {k: v for k, v in metrics.items() if k.startswith(TRACE)}
  for k, v in metrics.items():
    if k.startswith('train/'):
      out[k], out[TRACE + k.removeprefix('train/')] = v[-1], v
  return out


def make_job(config, mesh, generator_loss: GeneratorLoss, *, adversarial: bool, bn_taps: bool) -> Job:
  """Builds the loop job of a generator-adversarial method.

  adversarial: the generator loss reads the student's logits (the student runs in the synth step).
  bn_taps: the generator loss reads the teacher's BN-input statistics.
  """
  check_choice('student_batch', config.student_batch, STUDENT_BATCHES)
  synth_student_bn = config.get('synth_student_bn', 'eval')
  check_choice('synth_student_bn', synth_student_bn, ('eval', 'train'))
  s = common.setup(config, mesh)
  generator = models.create(config.generator.arch, **config.generator.kwargs)
  nz_shape = models.input_shape(config.generator.arch, **config.generator.kwargs)
  batch, g_steps, kd_steps = config.batch_size, config.g_steps, config.kd_steps
  student_batch = config.student_batch
  student_train_in_synth = adversarial and synth_student_bn == 'train'
  sample_train_mode = config.generator.get('sample_mode', 'eval') == 'train'
  revive = config.generator.get('revive_when_dead', False)
  range_penalty = config.generator.get('range_penalty', 0.0)
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
    if student_batch == 'reuse':  # the batch handed from the synth to the kd phase of the same iteration
      state['handoff'] = {'images': jnp.zeros((batch,) + s.student_input_shape),
                          'teacher_logits': jnp.zeros((batch, config.num_classes))}
    elif student_batch == 'regenerate':  # the pseudo-batch's latent, regenerated after the generator's update
      state['handoff'] = {'z': jnp.zeros((batch,) + nz_shape)}
    elif student_batch == 'replay':
      state['replay'] = pool.init(config.replay.capacity, s.student_input_shape)
    if revive:
      state['generator_dead'] = jnp.zeros((), bool)
    return state

  def fresh_generator(key):
    """Newly drawn generator variables (``params``, ``batch_stats``)."""
    return generator.init(key, jnp.zeros((2,) + nz_shape), train=True)

  def latents(key, steps):
    """``steps`` latent batches, one per split of ``key`` (as each step drew them from its own key)."""
    return jnp.stack([jax.random.normal(k, (batch,) + nz_shape) for k in jax.random.split(key, steps)])

  def synth_draw(key, state):
    z = latents(key, g_steps)
    if student_batch == 'regenerate':  # one pseudo-batch: every generator step sees the same z
      z = jnp.broadcast_to(z[0], z.shape)
    if not revive:
      return {'z': z}
    revive_key = jax.random.fold_in(key, 1)  # z keeps ``key``: the latents do not depend on the switch
    zeros = lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(fresh_generator, revive_key))
    return {'z': z, 'revived_generator': jax.lax.cond(state['generator_dead'], fresh_generator, lambda _: zeros(),
                                                      revive_key)}

  def generator_objective(params, g_state, student, tvars, z):
    raw, batch_stats = common.apply_train(g_state, params, z)
    x = s.to_teacher_input(raw)
    t = common.teacher_view(teacher.model, tvars, x, bn_taps=bn_taps, penultimate=True)
    student_stats, s_logits = student.batch_stats, None
    if student_train_in_synth:
      s_logits, student_stats = common.apply_train(student, student.params, x)
    elif adversarial:
      s_logits = student.apply_fn(student.variables, x, train=False)
    loss, metrics = generator_loss(t, s_logits, x)
    if range_penalty:
      metrics['train/loss_range'] = losses.pixel_range_penalty(s.to_unit(raw))
      loss = loss + range_penalty * metrics['train/loss_range']
    trace = {'trace/g_output': raw, 'trace/t_out': t.logits, 'trace/t_feat': t.penultimate}
    if s_logits is not None:
      trace['trace/s_out'] = s_logits
    return loss, (batch_stats, student_stats, dict(metrics, **trace), x, t.logits)

  def synth(state, frozen, draws, _):

    def g_step(carry, z):
      g_state, student, _, _ = carry
      z = jax.lax.with_sharding_constraint(z, parallel.data_sharded(mesh))
      (loss, (batch_stats, student_stats, metrics, x, t_logits)), grads = jax.value_and_grad(
          generator_objective, has_aux=True)(g_state.params, g_state, student, frozen['teacher'], z)
      g_state = g_state.apply_gradients(grads=grads, batch_stats=batch_stats)
      student = student.replace(batch_stats=student_stats)
      return (g_state, student, x, t_logits), dict(metrics, **{'train/generator_loss': loss,
                                                               'train/generator_grad_norm': optax.tree.norm(grads)})

    g_state = state['generator']
    if revive:
      g_state = jax.lax.cond(state['generator_dead'],
                             lambda g: g.replace(params=draws['revived_generator']['params'],
                                                 batch_stats=draws['revived_generator'].get('batch_stats', {})),
                             lambda g: g, g_state)
    carry0 = (g_state, state['student'], jnp.zeros((batch,) + s.student_input_shape),
              jnp.zeros((batch, config.num_classes)))
    # Unrolled: every config of this family takes 1 generator step, and a loop-free body avoids the
    # while-loop wrapper (it measured faster, within noisy timings, on the 2-core CPU).
    (g_state, student, x, t_logits), metrics = jax.lax.scan(g_step, carry0, draws['z'], unroll=True)
    new = dict(state, generator=g_state, student=student)
    if student_batch == 'reuse':
      new['handoff'] = {'images': jax.lax.stop_gradient(x), 'teacher_logits': jax.lax.stop_gradient(t_logits)}
    elif student_batch == 'regenerate':
      new['handoff'] = {'z': draws['z'][-1]}
    elif student_batch == 'replay':
      new['replay'] = pool.add(state['replay'], jax.lax.stop_gradient(x))
    metrics = _per_step(metrics)
    if revive:
      new['generator_dead'] = metrics['train/generator_grad_norm'] == 0
      metrics['train/generator_revived'] = state['generator_dead'].astype(jnp.float32)
    return new, metrics

  def sample(g_state, z):
    """A batch for the student from G on latent ``z`` (no gradient); returns (g_state, x in teacher space)."""
    z = jax.lax.with_sharding_constraint(z, parallel.data_sharded(mesh))
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

  def kd_draw(key, state):
    if student_batch == 'fresh':
      return {'z': latents(key, kd_steps)}
    if student_batch == 'replay':
      return {'index': pool.sample_indices(state['replay'], key, (kd_steps, batch))}
    return {}

  def kd(state, frozen, draws, _):
    tvars = frozen['teacher']
    g_state = state['generator']
    if student_batch == 'reuse':  # one batch for every student step: the teacher's targets are computed once
      x = state['handoff']['images']
      t_logits, t_maps = teacher_targets(tvars, x, None if beta else state['handoff']['teacher_logits'])
    elif student_batch == 'regenerate':
      g_state, x = sample(g_state, state['handoff']['z'])
      t_logits, t_maps = teacher_targets(tvars, x)

    def s_step(carry, draw):
      g_state, student = carry
      if student_batch == 'fresh':
        g_state, xs = sample(g_state, draw)
        tl, tm = teacher_targets(tvars, xs)
      elif student_batch == 'replay':
        xs = pool.read(state['replay'], jax.lax.with_sharding_constraint(draw, parallel.data_sharded(mesh)))
        tl, tm = teacher_targets(tvars, xs)
      else:
        xs, tl, tm = x, t_logits, t_maps
      s_logits, _ = common.apply_train(student, student.params, xs)  # the replay's trace only (dead code)
      student, loss = student_step(student, xs, tl, tm)
      return (g_state, student), {'train/student_loss': loss, 'trace/images': xs, 'trace/t_out': tl,
                                  'trace/s_out': s_logits}

    (g_state, student), metrics = jax.lax.scan(s_step, (g_state, state['student']),
                                               draws.get('z', draws.get('index')), length=kd_steps)
    return dict(state, generator=g_state, student=student), dict(
        _per_step(metrics), **{'train/lr_student': lr_s(student.step - 1)})

  def sample_images(state, key):
    g_state = state['generator']
    z = jax.random.normal(key, (64,) + nz_shape)
    return s.to_unit(g_state.apply_fn(g_state.variables, z, train=False))

  return Job(
      init=init, phases=[Phase('synth', synth, synth_draw), Phase('kd', kd, kd_draw)],
      frozen={'teacher': teacher.variables}, num_steps=num_steps, student=common.evaluated_student(s),
      teacher=common.evaluated_teacher(s), sample_images=sample_images, exports=[common.export_student(config)])
