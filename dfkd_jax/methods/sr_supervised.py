"""Supervised training of a super-resolution network (VDSR) on HR photographs: how SR teachers
are made.

Each step takes ``batch_size`` random HR luma patches (``sr_eval.random_patches``, drawn with a
generator fixed by (seed, step), so a resumed run sees the same patches), one scale s drawn
uniformly from ``sr_data.scales`` (multi-scale VDSR), the network input x = bicubic(bicubic(HR, 1/s), s)
(MATLAB-compatible, ``sr_ops.imresize``), and minimises the mean squared error ‖net(x) − HR‖²
(mean over pixels). At the evaluation cadence its PSNR on ``sr_eval`` (mean over the scales) is
logged as ``eval/student_psnr``. At the end the model is exported as ``WORKDIR/model`` (the format
that ``--config.teacher.checkpoint`` accepts) and evaluated on ``sr_eval`` (PSNR/SSIM per scale, in
``WORKDIR/sr_eval.json``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dfkd_jax import models, optim
from dfkd_jax.run import evaluation, parallel
from dfkd_jax.run.job import Evaluated, Export, Job, Phase
from dfkd_jax.sr import evaluation as sr_eval
from dfkd_jax.sr import ops as sr_ops


def make_job(config, mesh) -> Job:
  model = models.create(config.model.arch, **config.model.get('kwargs', {}))
  train = [sr_eval.luma01(im) for im in sr_eval.load_images(config.sr_data.train).values()]
  parallel.check_batch(config.batch_size, mesh, 'batch_size')
  local_batch = config.batch_size // jax.process_count()
  schedule = optim.make_schedule(config.optimizer, 1, config.num_steps)
  tx = optim.make_optimizer(config.optimizer, schedule)
  size, scales = config.sr_data.patch_size, tuple(config.sr_data.scales)

  def init(key):
    return {'step': jnp.zeros((), jnp.int32),
            'model': optim.init_state(model, tx, key, (size, size, 1), train_init=False)}

  def train_phase(state, frozen, key, batch):
    hr = batch['hr']
    x = sr_ops.scale_switch(key, scales, lambda s: sr_eval.bicubic_input(hr, s))
    m = state['model']

    def loss_fn(params):
      return jnp.mean(jnp.square(m.apply_fn({'params': params}, x) - hr))

    loss, grads = jax.value_and_grad(loss_fn)(m.params)
    return dict(state, model=m.apply_gradients(grads=grads)), {'train/loss': loss, 'train/lr': schedule(m.step)}

  def next_batch(step):
    rng = np.random.default_rng([config.seed, step, jax.process_index()])
    return {'hr': sr_eval.random_patches(train, local_batch, size, rng)}

  variables = lambda state: state['model'].variables
  return Job(
      init=init, phases=[Phase('train', train_phase)], frozen={}, num_steps=config.num_steps,
      student=Evaluated(model.apply, variables), next_batch=next_batch,
      evaluators=(evaluation.PSNR(config.sr_eval.data, tuple(config.sr_eval.scales), config.sr_eval.crop),),
      exports=[Export('model', config.model.arch, variables, config.model.get('kwargs', {}),
                      {'trained_by': 'dfkd_jax.methods.sr_supervised', 'seed': config.seed})],
      on_finish=lambda state: sr_eval.evaluate_scales(model.apply, variables(state), config.sr_eval),
      results_file='sr_eval.json',
      results_note=lambda results: 'sr eval: ' + ', '.join(f'{k}={v:.4f}' for k, v in results.items()))
