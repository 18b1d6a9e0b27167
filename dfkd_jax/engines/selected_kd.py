"""What PU compression and DFND share: scoring an unlabelled pool with a network, reporting what a
selection contains, and distilling the student on the selected real images.

The selected images live on the host as uint8 at model resolution; each step's batch is drawn
without replacement from a permutation fixed by (seed, epoch) (so a resumed run sees the same
batches), augmented on device (``config.augment``: random crop with zero padding, horizontal flip;
the crop offsets and flips are the phase's draws), normalised (``normalization``), and fed to the
frozen teacher (eval mode) and the student (train mode). A method supplies the loss
``loss_fn(student_logits, teacher_logits, aux_params) -> (loss, metrics)`` and, optionally,
auxiliary parameters trained jointly with the student by their own optimiser (DFND's
noise-adaptation matrix).

``config.pool_normalization`` (default 'teacher': ``config.dataset``'s constants, the input space
the teacher was trained in) names the dataset whose mean and std normalise the unlabelled images,
for scoring and distillation alike; DFND's reference normalises its ImageNet pool with the ImageNet
constants ('imagenet').
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dfkd_jax import data, optim
from dfkd_jax.data import preprocess, unlabelled
from dfkd_jax.engines import common
from dfkd_jax.run import parallel
from dfkd_jax.run.job import Job, Phase
from dfkd_jax.synth import augment

LossFn = Callable[[jax.Array, jax.Array, object], tuple[jax.Array, dict]]


class Aux(NamedTuple):
  """Parameters trained with the student: initial value and optimiser."""
  params: object
  tx: optax.GradientTransformation


def to_model_resolution(images: np.ndarray, config) -> np.ndarray:
  """uint8 N,H,W[,C] -> uint8 NHWC at ``config.image_size`` with ``config.in_channels``."""
  images = images if images.ndim == 4 else images[..., None]
  if images.shape[-1] == 1 and config.in_channels == 3:
    images = np.repeat(images, 3, axis=-1)
  elif images.shape[-1] == 3 and config.in_channels == 1:
    images = np.round(images @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None]
  return preprocess.resize_uint8(images, config.image_size)


def normalization(config) -> str:
  """The dataset whose constants normalise the unlabelled images (``config.pool_normalization``)."""
  name = config.get('pool_normalization', 'teacher')
  return config.dataset if name == 'teacher' else name


def to_input(images_u8: jax.Array, dataset: str) -> jax.Array:
  """uint8 images -> ``dataset``'s normalised input space, bit for bit as torchvision's
  ``ToTensor`` + ``Normalize`` compute it: (x / 255 − mean) / std in float32 with true divisions.

  A uint8 channel value has 256 possible inputs, so the map is a (256, channels) table computed
  once by numpy (IEEE float32) and gathered: compiled code does no arithmetic that XLA could
  rewrite (reciprocal multiplies, approximate divisions differ by CPU and jax version, one ulp off;
  the reference trajectories pass close enough to ReLU kinks that one ulp in an input moves a
  gradient by 1e-3)."""
  mean, std = (np.asarray(c, np.float32) for c in data.NORMALIZATION[dataset])
  levels = np.arange(256, dtype=np.float32)[:, None]
  table = (levels / np.float32(255.0) - mean) / std
  return jnp.asarray(table)[images_u8.astype(jnp.int32), jnp.arange(table.shape[1])]


def map_batches(fn: Callable[[jax.Array], jax.Array], images_u8: np.ndarray, config, mesh) -> np.ndarray:
  """``fn(normalised images)`` over uint8 images in global batches of ``config.eval.batch_size``
  split over the mesh (the last batch padded); returns the concatenated outputs on the host."""
  batch = config.eval.batch_size
  parallel.check_batch(batch, mesh, 'eval.batch_size')
  sharding = parallel.data_sharded(mesh)
  dataset = normalization(config)
  jitted = jax.jit(lambda x: fn(to_input(x, dataset)))
  outputs = []
  for start in range(0, len(images_u8), batch):
    chunk = images_u8[start:start + batch]
    pad = batch - len(chunk)
    chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)]) if pad else chunk
    outputs.append(np.asarray(jax.device_get(jitted(jax.device_put(chunk, sharding))))[:batch - pad])
  return np.concatenate(outputs)


def teacher_logits(s: common.Setup, images_u8: np.ndarray, config, mesh) -> np.ndarray:
  """The frozen teacher's logits (eval mode) on every image."""
  return map_batches(lambda x: s.teacher.model.apply(s.teacher.variables, x, train=False), images_u8, config, mesh)


def selection_report(pool: unlabelled.Pool, selected: np.ndarray, **extra) -> dict:
  """What a selection (boolean mask over the pool) holds: counts per kind and, when the pool
  records its true digits (kind 0), precision and recall of the selection for them."""
  out = {'pool': pool.name, 'pool_size': len(selected), 'pool_composition': pool.composition(),
         'selected': int(selected.sum()),
         'selected_composition': unlabelled.composition(pool.kinds[selected]),
         **extra}
  if np.any(pool.kinds >= 0):
    true = pool.kinds == 0
    hits = int(np.sum(selected & true))
    out.update(selected_true_digits=hits, precision=hits / max(int(selected.sum()), 1),
               recall=hits / max(int(true.sum()), 1))
  return out


def selection_note(method: str, rep: dict) -> str:
  """One line on a selection report, for the job's notes."""
  line = f"{method}: selected {rep['selected']} of {rep['pool_size']} unlabelled images ({rep['pool']})"
  if 'selected_true_digits' in rep:
    line += (f"; {rep['selected_true_digits']} are true digits (precision {100 * rep['precision']:.1f}%, "
             f"recall {100 * rep['recall']:.1f}%)")
  return line


def make_job(config, mesh, s: common.Setup, images_u8: np.ndarray, loss_fn: LossFn, *,
             aux: Aux | None = None, report: dict | None = None, notes: Sequence[str] = ()) -> Job:
  """The loop job distilling the student on ``images_u8`` (uint8 NHWC at model resolution).

  ``config``: ``batch_size``, ``num_epochs``, ``optimizer_s`` (per-epoch schedule), ``augment``.
  ``report`` (the selection report) goes to ``WORKDIR/selection.json`` when the job is finished;
  ``notes`` are logged when it starts. The phase 'kd' traces the normalised images and both
  networks' logits (with the loss's own ``trace/`` metrics).
  """
  parallel.check_batch(config.batch_size, mesh, 'batch_size')
  local_batch = config.batch_size // jax.process_count()
  steps_per_epoch = max(1, len(images_u8) // config.batch_size)
  tx_s, lr_s = common.student_optimizer(config, steps_per_epoch)
  teacher, dataset, padding = s.teacher, normalization(config), config.augment.crop_padding

  def init(key):
    state = {'step': jnp.zeros((), jnp.int32),
             'student': optim.init_state(s.student, tx_s, key, s.student_input_shape)}
    if aux is not None:
      state['aux'] = optim.create_state(aux.tx, aux.params)
    return state

  def draw(key, state):
    del state
    return augment.draw_crop_flip(*jax.random.split(key), config.batch_size, padding=padding, flip=config.augment.flip)

  def kd(state, frozen, drawn, batch):
    x = to_input(augment.apply_crop_flip(batch['images'], drawn, padding=padding), dataset)
    t_logits = teacher.model.apply(frozen['teacher'], x, train=False)
    student = state['student']
    aux_params = state['aux'].params if aux is not None else None

    def objective(params, aux_params):
      logits, batch_stats = common.apply_train(student, params, x)
      loss, metrics = loss_fn(logits, t_logits, aux_params)
      return loss, (batch_stats, metrics, logits)

    value_and_grad = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
    (loss, (batch_stats, metrics, logits)), (grads, aux_grads) = value_and_grad(student.params, aux_params)
    new = dict(state, student=student.apply_gradients(grads=grads, batch_stats=batch_stats))
    if aux is not None:
      new['aux'] = state['aux'].apply_gradients(grads=aux_grads)
    return new, dict(metrics, **{'train/student_loss': loss, 'train/lr_student': lr_s(student.step),
                                 'trace/images': x, 'trace/student_logits': logits, 'trace/teacher_logits': t_logits})

  def next_batch(step):
    epoch, i = divmod(step, steps_per_epoch)
    order = np.random.default_rng([config.seed, epoch]).permutation(len(images_u8))
    start = i * config.batch_size + jax.process_index() * local_batch
    return {'images': images_u8[order[start:start + local_batch]]}

  return Job(
      init=init, phases=[Phase('kd', kd, draw)], frozen={'teacher': teacher.variables},
      num_steps=steps_per_epoch * config.num_epochs, student=common.evaluated_student(s),
      teacher=common.evaluated_teacher(s), next_batch=next_batch, exports=[common.export_student(config)],
      report=report, results_file='selection.json' if report is not None else None, notes=tuple(notes))
