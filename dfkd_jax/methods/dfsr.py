"""DFSR: Data-Free Knowledge Distillation for Image Super-Resolution (Zhang et al., CVPR 2021).

A VDSR teacher T (luma in, luma out, global residual) and its half-width student S; no images.
One generator G_s per scale s in ``dfsr.scales`` (``dfsr_generator`` = the reference's
``GeneratorINE1``: affine InstanceNorm, eps 0.8 in the two inner norms, (tanh + 1)/2 output)
makes low-resolution images of side input_size / s from z ~ N(0, I) (``dfsr.latent``), and
x = clamp(bicubic↑s(G_s(z)), 0, 1) is the network input (MATLAB bicubic, ``sr_ops.imresize``).

One outer iteration (one compiled program) is

  kd:    ``kd_steps`` student steps, each on a fresh batch at a scale drawn uniformly:
           L_S = Σ (S(x) − T(x))²                        (MSE with reduction 'sum')
         SGD with gradient-norm clipping (0.4), weight decay and a per-epoch step schedule;
  synth: one step of all generators at one drawn scale s:
           L_G = gw · (−log(1 + Σ (S(x) − T(x))²)) + reconw · Σ (G_s(z) − clamp(bicubic↓s(T(x)), 0, 1))²
         (the adversarial term drives G towards inputs where the student still differs from the
         teacher; the reconstruction term keeps G_s(z) a plausible low-resolution view of T's output).
         One Adam over the three generators' parameters: the generators not drawn get zero
         gradients and still move with their Adam moments, as the reference steps all three
         optimisers every iteration.

Progressive distillation (``dfsr.inc_num`` > 1): training is split into ``inc_num`` stages of
``inc_step`` epochs; in stage k the student uses its first min(B, (k+1)·B // inc_num) residual
blocks (B = its ``num_blocks``), the later blocks passing their input through and keeping their
initial weights until their stage (the reference rebuilds a deeper student and warm-starts it with
``load_state_dict(strict=False)``: the same network). Here the optimiser and its schedule continue
across stages, where the reference starts a new SGD and StepLR per stage; and the depth follows the
stage index, where the reference's ``epoch * 18 // inc_num`` uses the epoch (equal when inc_step = 1).
``inc_num = 1`` (the reference README's setting) is plain distillation of the full student.

During training, at the evaluation cadence, the student's PSNR on the first
``EVAL_IMAGES_DURING_TRAINING`` ``sr_eval`` images (mean over ``sr_eval.scales``) is logged as
``eval/student_psnr`` (``summary.json``: ``student_psnr_best`` / ``_final``). At the end, teacher,
student and bicubic are evaluated on all the held-out ``sr_eval`` images (PSNR and SSIM on Y with
the scale shaved): ``WORKDIR/sr_eval.json`` holds ``bicubic_psnr``, ``teacher_psnr``,
``student_psnr``, ``student_minus_bicubic_psnr`` (means over ``sr_eval.scales``), the same per scale
(``x2/...``) and the SSIMs.

Reference (huawei ``DEMC/DFSR/distillation.py``, ``docs/reference_semantics.md#dfsr``) quirks, reproducible by
flag: its bicubic (``bicubic.py``) clamps out-of-range taps to the border (``dfsr.boundary``:
'replicate', the default here; MATLAB's 'symmetric' is the alternative) and rounds every result to
1/255 with ``torch.round``, whose gradient is zero, so in the reference the generator receives no
gradient through the upsampled image or the teacher's down-sampled output and learns from the
direct reconstruction term alone. ``dfsr.reference_rounding=True`` reproduces that rounding (and
its zero gradient); by default resizing is not rounded and the paper's losses reach the generator.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from dfkd_jax import models, optim
from dfkd_jax.engines import common
from dfkd_jax.errors import UserError
from dfkd_jax.run import evaluation
from dfkd_jax.run.job import Evaluated, Job, Phase
from dfkd_jax.sr import evaluation as sr_evaluation
from dfkd_jax.sr import ops as sr_ops

EVAL_IMAGES_DURING_TRAINING = 2


def sum_squares(a, b):
  """Σ (a − b)²: ``nn.MSELoss(reduction='sum')``."""
  return jnp.sum(jnp.square(a - b))


def stage_depth(epoch, num_blocks: int, inc_num: int, inc_step: int):
  """Active student blocks in (0-based, traced) ``epoch``: min(B, (k+1)·B // inc_num) with stage
  k = min(inc_num − 1, epoch // inc_step)."""
  stage = jnp.minimum(inc_num - 1, epoch // max(inc_step, 1))
  return jnp.minimum(num_blocks, (stage + 1) * num_blocks // inc_num)


def keep_inactive_blocks(new_params, old_params, depth):
  """``new_params`` with the residual blocks i >= depth reset to ``old_params`` (not yet trained)."""
  flat_new, flat_old = traverse_util.flatten_dict(new_params), traverse_util.flatten_dict(old_params)

  def pick(path, value):
    name = path[0]
    if name.startswith('residual_layer.'):
      return jnp.where(int(name.split('.')[1]) < depth, value, flat_old[path])
    return value

  return traverse_util.unflatten_dict({p: pick(p, v) for p, v in flat_new.items()})


def make_job(config, mesh) -> Job:
  cfg = config.dfsr
  size, batch, scales = config.image_size, config.batch_size, tuple(cfg.scales)
  generators = {}
  for scale in scales:
    lr_size = size // scale
    if size % scale or lr_size % 4:
      raise UserError(f'image_size={size} must be a multiple of 4*{scale} for the x{scale} generator '
                      f'(48 serves scales 2, 3 and 4)')
    generators[f'x{scale}'] = models.create('dfsr_generator', nz=cfg.latent, img_size=lr_size, nc=1)
  s = common.setup(config, mesh)
  num_blocks = config.student.get('kwargs', {}).get('num_blocks', 18)
  progressive = cfg.inc_num > 1
  tx_s, lr_s = common.student_optimizer(config, config.iters_per_epoch * config.kd_steps)
  lr_g = optim.make_schedule(config.optimizer_g, config.iters_per_epoch, config.num_epochs)
  tx_g = optim.make_optimizer(config.optimizer_g, lr_g)
  teacher = s.teacher

  def resize(x, scale):
    x = sr_ops.imresize(x, scale, boundary=cfg.boundary)
    return jnp.round(x * 255.0) / 255.0 if cfg.reference_rounding else x

  def generate(g_params, key, scale):
    """(G_s(z), clamp(bicubic↑s(G_s(z)), 0, 1)) for a batch of z."""
    z = common.latent(key, (batch, cfg.latent), mesh)
    low = generators[f'x{scale}'].apply({'params': g_params[f'x{scale}']}, z)
    return low, jnp.clip(resize(low, scale), 0.0, 1.0)

  def init(key):
    ks, *kg = jax.random.split(key, 1 + len(scales))
    g_params = {name: g.init(k, jnp.zeros((2, cfg.latent)))['params'] for (name, g), k in zip(generators.items(), kg)}
    return {'step': jnp.zeros((), jnp.int32),
            'student': optim.init_state(s.student, tx_s, ks, s.student_input_shape, train_init=False),
            'generators': optim.create_state(tx_g, g_params)}

  def depth_of(state):
    if not progressive:
      return None
    return stage_depth(state['step'] // config.iters_per_epoch, num_blocks, cfg.inc_num, cfg.inc_step)

  def kd(state, frozen, key, _):
    g_params, depth = state['generators'].params, depth_of(state)

    def s_step(student, k):
      k_scale, k_z = jax.random.split(k)
      x = sr_ops.scale_switch(k_scale, scales, lambda scale: generate(g_params, k_z, scale)[1])
      x = jax.lax.stop_gradient(x)
      target = teacher.model.apply(frozen['teacher'], x)
      loss, grads = jax.value_and_grad(
          lambda p: sum_squares(student.apply_fn({'params': p}, x, depth=depth), target))(student.params)
      new = student.apply_gradients(grads=grads)
      if progressive:
        new = new.replace(params=keep_inactive_blocks(new.params, student.params, depth))
      return new, loss

    student, step_losses = jax.lax.scan(s_step, state['student'], jax.random.split(key, config.kd_steps))
    metrics = {'train/student_loss': step_losses[-1], 'train/lr_student': lr_s(student.step - 1)}
    if progressive:
      metrics['train/student_depth'] = depth
    return dict(state, student=student), metrics

  def synth(state, frozen, key, _):
    student, g_state, depth = state['student'], state['generators'], depth_of(state)
    k_scale, k_z = jax.random.split(key)

    def objective(g_params):
      def at_scale(scale):
        low, x = generate(g_params, k_z, scale)
        t_out = teacher.model.apply(frozen['teacher'], x)
        adversarial = -jnp.log1p(sum_squares(student.apply_fn(student.variables, x, depth=depth), t_out))
        recon = sum_squares(low, jnp.clip(resize(t_out, 1.0 / scale), 0.0, 1.0))
        return jnp.stack([adversarial, recon])

      terms = sr_ops.scale_switch(k_scale, scales, at_scale)
      return cfg.gw * terms[0] + cfg.reconw * terms[1], terms

    (loss, terms), grads = jax.value_and_grad(objective, has_aux=True)(g_state.params)
    return dict(state, generators=g_state.apply_gradients(grads=grads)), {
        'train/generator_loss': loss, 'train/loss_gen_kd': terms[0], 'train/loss_recon': terms[1]}

  def sample_images(state, key):
    return generate(state['generators'].params, key, scales[0])[1][:64]

  def on_finish(state):
    return evaluate(config, teacher, s.student, frozen_teacher=teacher.variables,
                    student_variables=state['student'].variables)

  return Job(
      init=init, phases=[Phase('kd', kd), Phase('synth', synth)], frozen={'teacher': teacher.variables},
      num_steps=config.num_epochs * config.iters_per_epoch,
      student=Evaluated(s.student.apply, lambda st: st['student'].variables),
      evaluators=(evaluation.PSNR(config.sr_eval.data, tuple(config.sr_eval.scales), config.sr_eval.crop,
                                  max_images=EVAL_IMAGES_DURING_TRAINING),),
      sample_images=sample_images, exports=[common.export_student(config)], on_finish=on_finish,
      results_file='sr_eval.json',
      results_note=lambda results: 'dfsr: ' + ', '.join(f'{k}={v:.3f}' for k, v in results.items() if '/' not in k))


def evaluate(config, teacher, student_model, *, frozen_teacher, student_variables) -> dict[str, float]:
  """Bicubic, teacher and student PSNR/SSIM on ``config.sr_eval`` per scale (``x{s}/...``) and
  their means over the scales (``bicubic_psnr``, ``teacher_psnr``, ``student_psnr``,
  ``student_minus_bicubic_psnr`` and the ``_ssim`` counterparts)."""
  t = sr_evaluation.evaluate_scales(teacher.model.apply, frozen_teacher, config.sr_eval)
  st = sr_evaluation.evaluate_scales(student_model.apply, student_variables, config.sr_eval)
  out = {}
  for scale in config.sr_eval.scales:
    p = f'x{scale}/'
    out.update({p + 'bicubic_psnr': t[p + 'bicubic_psnr'], p + 'bicubic_ssim': t[p + 'bicubic_ssim'],
                p + 'teacher_psnr': t[p + 'psnr'], p + 'teacher_ssim': t[p + 'ssim'],
                p + 'student_psnr': st[p + 'psnr'], p + 'student_ssim': st[p + 'ssim']})
    out[p + 'student_minus_bicubic_psnr'] = out[p + 'student_psnr'] - out[p + 'bicubic_psnr']
  for name in ('bicubic_psnr', 'teacher_psnr', 'student_psnr', 'student_minus_bicubic_psnr',
               'bicubic_ssim', 'teacher_ssim', 'student_ssim'):
    out[name] = sum(out[f'x{scale}/{name}'] for scale in config.sr_eval.scales) / len(config.sr_eval.scales)
  return out
