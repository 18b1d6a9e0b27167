"""Supervised training of a classifier on labelled data: how teachers are made.

Minimises the cross-entropy of ``model(augment(x))`` over the training split with the
references' optimisers and per-epoch schedules. Batches are drawn without replacement from a
permutation fixed by (seed, epoch), so a resumed run sees exactly the same batches. At the end the
model is exported as a converted-model directory ``WORKDIR/model`` that
``--config.teacher.checkpoint`` accepts.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dfkd_jax import data, models, optim
from dfkd_jax.optim import TrainState
from dfkd_jax.run import parallel
from dfkd_jax.run.job import Evaluated, Export, Job, Phase
from dfkd_jax.synth import augment


def classifier_step(state: TrainState, images, labels):
  """One SGD/Adam step on the mean cross-entropy; returns (state, loss, accuracy)."""

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state.batch_stats} if state.batch_stats else {'params': params}
    logits, updates = state.apply_fn(variables, images, train=True, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, updates.get('batch_stats', {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, loss, jnp.mean(jnp.argmax(logits, -1) == labels)


def make_job(config, mesh) -> Job:
  model = models.create(config.model.arch, num_classes=config.num_classes, **config.model.get('kwargs', {}))
  train = data.load(config.train_data.source, config.train_data.split, data_dir=config.get('data_dir'),
                    process_index=jax.process_index(), process_count=jax.process_count())
  # Pixels in [0, 1] at model resolution; normalisation happens after augmentation, on device.
  images01 = data.prepare_images(train.images, 'none', config.image_size, config.in_channels)
  labels = train.labels
  parallel.check_batch(config.batch_size, mesh, 'batch_size')
  local_batch = config.batch_size // jax.process_count()
  steps_per_epoch = len(images01) // local_batch
  num_steps = steps_per_epoch * config.num_epochs
  schedule = optim.make_schedule(config.optimizer, steps_per_epoch, config.num_epochs)
  tx = optim.make_optimizer(config.optimizer, schedule)
  input_shape = (config.image_size, config.image_size, config.in_channels)

  def init(key):
    return {'step': jnp.zeros((), jnp.int32), 'model': optim.init_state(model, tx, key, input_shape, train_init=False)}

  def train_phase(state, frozen, key, batch):
    x = augment.crop_flip(*jax.random.split(key), batch['images'], padding=config.augment.crop_padding,
                          flip=config.augment.flip)
    new, loss, acc = classifier_step(state['model'], data.normalize(x, config.dataset), batch['labels'])
    return dict(state, model=new), {'train/loss': loss, 'train/accuracy': acc,
                                    'train/lr': schedule(state['model'].step)}

  def next_batch(step):
    epoch, i = divmod(step, steps_per_epoch)
    order = np.random.default_rng([config.seed, epoch]).permutation(len(images01))
    idx = order[i * local_batch:(i + 1) * local_batch]
    return {'images': images01[idx], 'labels': labels[idx]}

  export = Export('model', config.model.arch, lambda s: s['model'].variables, config.model.get('kwargs', {}),
                  {'trained_by': 'dfkd_jax.methods.supervised', 'seed': config.seed})
  return Job(
      init=init, phases=[Phase('train', train_phase)], frozen={}, num_steps=num_steps,
      student=Evaluated(model.apply, lambda s: s['model'].variables), next_batch=next_batch, exports=[export])
