"""Evaluation during training: the evaluators a job names (``Top1`` for classifiers, ``PSNR`` for
super-resolution networks), and top-1 accuracy over a whole split, in padded batches with a mask,
so no example is dropped.

Each process holds its own shard of the split (``dfkd_jax.data.load(..., process_index=...)``);
each global batch is assembled from the processes' local batches with
``jax.make_array_from_process_local_data`` (split over the mesh's ``data`` axis), and the counts
are summed over the global batch inside the compiled step, so every process gets the same
accuracy. The requested batch size is rounded up to a multiple of the device count.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from dfkd_jax.run import parallel


class EvalSet(NamedTuple):
  """This process's share of a split, preprocessed (float32 NHWC in the teacher's input space),
  padded to whole batches; ``mask`` is 0 on padding."""
  images: np.ndarray
  labels: np.ndarray
  mask: np.ndarray
  size: int  # real examples in this process's share

  @classmethod
  def build(cls, images: np.ndarray, labels: np.ndarray, local_batch: int) -> 'EvalSet':
    """Pads to whole local batches; every process gets as many batches as the largest share
    needs (the shares differ by an example or so), since each batch is a collective step."""
    n = len(images)
    largest = int(multihost_utils.process_allgather(np.int32(n)).max()) if jax.process_count() > 1 else n
    padded = -(-max(largest, 1) // local_batch) * local_batch
    pad = padded - n
    return cls(np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)]),
               np.concatenate([labels, np.zeros((pad,), labels.dtype)]),
               np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)]), n)


def local_batch_size(requested: int, mesh) -> int:
  """This process's part of the global evaluation batch: ``requested`` rounded up to a multiple of
  the device count (so that it splits over the devices), divided by the process count."""
  return parallel.round_up_batch(requested, mesh) // jax.process_count()


@functools.lru_cache(maxsize=None)
def _class_counts_fn(apply_fn: Callable, mesh) -> Callable:
  def count(variables, images, labels, mask):
    logits = apply_fn(variables, images, train=False)
    in_class = jax.nn.one_hot(labels, logits.shape[-1]) * mask[:, None]
    correct = (jnp.argmax(logits, -1) == labels) * mask
    return jnp.sum(in_class * correct[:, None], 0), jnp.sum(in_class, 0), jnp.sum(correct), jnp.sum(mask)
  repl = parallel.replicated(mesh)
  return jax.jit(count, out_shardings=(repl,) * 4)


def accuracies(apply_fn: Callable, variables: Any, eval_set: EvalSet, mesh, batch_size: int) -> dict:
  """``top1``: top-1 accuracy (in [0, 1]) of ``apply_fn(variables, x, train=False)`` on the whole
  split, in global batches of ``batch_size`` rounded up to a multiple of the device count;
  ``worst_class_top1``: the lowest per-class accuracy (recall) over the classes the split holds, which
  shows a student that maps the real images onto a few classes even when its overall accuracy
  looks middling."""
  local_batch = local_batch_size(batch_size, mesh)
  data_sharding = parallel.data_sharded(mesh)
  count = _class_counts_fn(apply_fn, mesh)
  counts = []
  for start in range(0, len(eval_set.images), local_batch):
    sl = slice(start, start + local_batch)
    batch = [jax.make_array_from_process_local_data(data_sharding, a[sl])
             for a in (eval_set.images, eval_set.labels, eval_set.mask)]
    counts.append(count(variables, *batch))
  # (EvalSet.build makes at least one batch.)
  class_correct, class_total, correct, total = (np.sum(c, axis=0, dtype=np.float64)
                                                for c in zip(*jax.device_get(counts)))
  present = class_total > 0
  worst = float(np.min(class_correct[present] / class_total[present])) if present.any() else 0.0
  return {'top1': float(correct) / max(float(total), 1.0), 'worst_class_top1': worst}


# --- Evaluators: what a job measures at the evaluation cadence ------------------------------------

Measure = Callable[[Callable, Any], dict]  # (apply_fn, variables) -> {name: scalar}, the headline one included


class Prepared(NamedTuple):
  """An evaluator with its data loaded: ``measure`` scores a network; ``data`` names the data in messages."""
  measure: Measure
  data: str


class Evaluator(Protocol):
  """Scores a network at the evaluation cadence (higher is better). ``metric`` names the headline
  scalar: the run machinery logs ``eval/student_<name>`` for every scalar ``measure`` returns (and
  ``eval/teacher_<name>`` once per run when the job has a teacher), and summarises the headline one
  as ``student_<metric>_best``, ``student_<metric>_final`` and ``teacher_<metric>``. ``prepare`` runs
  once, before the workdir is touched (missing data is a config error), and returns None when the
  config gives nothing to evaluate on."""
  metric: str
  title: str  # the metric in messages: 'top-1', 'PSNR'

  def prepare(self, config, mesh) -> Prepared | None: ...

  def text(self, value: float) -> str: ...


@dataclasses.dataclass(frozen=True)
class Top1:
  """Top-1 accuracy, and the worst class's (``accuracies``), of a classifier on ``config.eval``
  (``data``, ``split``, ``batch_size``), this process's shard (see the module docstring); nothing to
  evaluate when ``config.eval.data`` is empty."""
  metric = 'top1'
  title = 'top-1'

  def prepare(self, config, mesh) -> Prepared | None:
    from dfkd_jax import data
    if not config.eval.get('data'):
      return None
    ds = data.load(config.eval.data, config.eval.split, data_dir=config.get('data_dir'),
                   process_index=jax.process_index(), process_count=jax.process_count())
    images = data.prepare_images(ds.images, config.dataset, config.image_size, config.in_channels)
    eval_set = EvalSet.build(images, ds.labels, local_batch_size(config.eval.batch_size, mesh))
    return Prepared(lambda apply_fn, variables: accuracies(apply_fn, variables, eval_set, mesh, config.eval.batch_size),
                    f'{config.eval.data}[{config.eval.split}]')

  def text(self, value: float) -> str:
    return f'{100 * value:.2f}%'


@dataclasses.dataclass(frozen=True)
class PSNR:
  """Super-resolution PSNR (dB, on Y with the scale shaved, ``sr.evaluation.evaluate``) of a
  luma-in, luma-out network, averaged over ``scales`` and over the first ``max_images`` images of
  ``data`` (an ``sr.evaluation.load_images`` spec, centre-cropped to ``crop``; 0: every image).
  Each process scores the whole (small) set."""
  data: str
  scales: tuple[int, ...]
  crop: int = 0
  max_images: int = 0
  metric = 'psnr'
  title = 'PSNR'

  def prepare(self, config, mesh) -> Prepared | None:
    from dfkd_jax.sr import evaluation as sr_evaluation
    images = sr_evaluation.load_images(self.data, self.crop)
    names = list(images)[:self.max_images or None]
    images = {name: images[name] for name in names}

    def measure(apply_fn, variables):
      psnr = [sr_evaluation.evaluate(apply_fn, variables, images, scale)['psnr'] for scale in self.scales]
      return {'psnr': sum(psnr) / len(psnr)}

    return Prepared(measure, f"{','.join(names)} x{','.join(map(str, self.scales))}")

  def text(self, value: float) -> str:
    return f'{value:.2f} dB'
