"""The one training loop for every job (teacher training and every distillation method).

Resume-first: if ``WORKDIR/checkpoints`` holds a checkpoint, training continues from it;
otherwise the state is initialised. Each outer iteration is one compiled program (the job's
phases, e.g. a generator step then k student steps), with the state donated, the frozen teacher
variables passed in, and randomness ``fold_in(seed, step)`` so results do not depend on where a
run was resumed. The job contract is ``run.job``; the loop knows nothing of a method's internals; a method knows nothing of files,
logging or checkpoints.

Robustness (what a killed, preempted or diverging run does):
  - one run per workdir (``run.lock``); a second one is refused, naming the first;
  - SIGTERM/SIGINT before the first step stop at once (nothing new to save); during training they
    finish the step, checkpoint it and stop (exit 0 for SIGTERM, a preemption notice);
  - numerics (``config.numerics.on_nonfinite``): 'stop' checks every step's metrics and the
    finiteness of each part of the state (generator, student, ...) before anything derived from
    it is logged, evaluated, checkpointed or exported, and stops with a ``NumericalError`` naming
    the step, the loss terms and the parts; 'skip' keeps the previous state inside the compiled
    step when the new one or a metric is non-finite, and counts it (``train/skipped_updates``);
  - checkpoint restore and write failures: see ``run.checkpoint``.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
from etils import epath

from dfkd_jax.run import cadence
from dfkd_jax.run import checkpoint as ckpt_lib
from dfkd_jax.run import evaluation, lock, numerics, outputs, parallel
from dfkd_jax.run.job import (
  Job,
  compile_job,
  device_batch,
  frozen_sharding,
  frozen_variables,
)
from dfkd_jax.run.signals import StopSignals
from dfkd_jax.run.timing import time_phases


@dataclasses.dataclass
class Summary:
  values: dict
  stopped_by_signal: int | None = None


def run(job: Job, config, workdir: str, mesh) -> Summary:
  """Runs (or resumes) ``job`` on ``mesh`` to ``job.num_steps`` and returns the summary written
  to ``WORKDIR/summary.json``.

  Raises UserError for what a user can fix (a workdir in use, a checkpoint written with another
  config, a full disk), NumericalError when the state or a metric becomes non-finite in 'stop'
  mode, StopRequested when SIGTERM arrives before the first step.
  """
  t_start = time.monotonic()
  every = cadence.resolve(config, num_steps=job.num_steps)
  with StopSignals() as signals, lock.claim(workdir, exclusive=outputs.is_writer()):
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep, every_steps=every.checkpoint,
                                         async_save=config.checkpoint.get('async_save', True))
    try:
      return _train(job, config, workdir, mesh, checkpointer, signals, t_start, every)
    finally:
      checkpointer.close()


def _train(job: Job, config, workdir: str, mesh, checkpointer: ckpt_lib.Checkpointer, signals: StopSignals,
           t_start: float, every: cadence.Cadences) -> Summary:
  on_nonfinite = config.get('numerics', {}).get('on_nonfinite', 'stop')
  # Independent streams: initialisation, training steps (folded with the step), sample grids, timing.
  init_key, seed_key, sample_key, timing_key = jax.random.split(jax.random.key(config.seed), 4)
  eval_set = _eval_set(config, mesh)  # before the workdir is touched: a missing dataset is a config error

  init, iteration, state_sharding = compile_job(job, mesh, init_key, on_nonfinite, config.mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        jax.eval_shape(init, init_key), state_sharding)
  restored = checkpointer.restore_latest(target, config.to_dict())
  if restored is not None:
    state, start = restored
    print(f'resuming from the checkpoint at step {start} in {workdir}', flush=True)
    outputs.truncate_metrics(workdir, start)
  else:
    state, start = init(init_key), 0
  if outputs.is_writer():
    outputs.write_json(os.path.join(workdir, 'config.json'), config.to_dict())

  frozen = jax.device_put(job.frozen, frozen_sharding(job, mesh, config.mesh))
  batch_sharding = parallel.data_sharded(mesh)
  writer = outputs.MetricWriter(workdir, tensorboard=config.report.get('tensorboard', False))
  history = outputs.read_history(workdir)

  def evaluate_now(step, state):
    results = {}
    if eval_set is None:
      return results
    variables = job.student.variables(state) if callable(job.student.variables) else job.student.variables
    acc = evaluation.top1(job.student.apply_fn, variables, eval_set, mesh, config.eval.batch_size)
    results['eval/student_top1'] = acc
    history['student_top1'].append(acc)
    return results

  teacher_top1 = history.get('teacher_top1')
  if eval_set is not None and job.teacher is not None and teacher_top1 is None:
    teacher_top1 = evaluation.top1(job.teacher.apply_fn, frozen_variables(job.teacher, frozen), eval_set, mesh,
                                 config.eval.batch_size)
    writer.write(start, {'eval/teacher_top1': teacher_top1})
    print(f'teacher top-1 on {config.eval.data}[{config.eval.split}]: {100 * teacher_top1:.2f}%', flush=True)

  phase_fraction = time_phases(job, state, frozen, timing_key, mesh, config) if start < job.num_steps else {}
  progress = outputs.Progress(job.num_steps, start)
  elapsed_before, train_before = history['elapsed_s'], history['train_s']
  guard = numerics.FiniteGuard(check=on_nonfinite == 'stop')
  t_train = time.monotonic()
  step = start
  last_saved = start if restored is not None else None
  stopped_by = None
  signals.training = True  # from here a stop signal ends the current step with a checkpoint
  while step < job.num_steps:
    batch = device_batch(job, step, batch_sharding)
    state, metrics = iteration(state, frozen, seed_key, batch)
    step += 1
    guard.add(step, metrics)
    stopping = signals.received
    last = step == job.num_steps
    log_now = cadence.is_due(step, every.log, job.num_steps)
    eval_now = cadence.is_due(step, every.eval, job.num_steps)
    save_now = checkpointer.is_due(step, force=last or stopping is not None)
    record = {}
    if log_now or eval_now or save_now:  # nothing derived from a non-finite state is ever kept
      logged = guard.verify(last_saved)
      if log_now:
        record.update(logged)
    if eval_now:
      record.update(evaluate_now(step, state))
      _save_samples(job, state, sample_key, step, workdir, config, mesh)
    if record:
      record['time/elapsed_s'] = elapsed_before + time.monotonic() - t_start
      record['time/train_s'] = train_before + time.monotonic() - t_train  # summed over resumed runs
      record['time/steps_per_s'] = (step - start) / max(time.monotonic() - t_train, 1e-9)
      writer.write(step, record)
    if save_now:
      checkpointer.save(step, state, config.to_dict(), force=True)
      last_saved = step
    progress.update(step, _progress_info(record, history), force=last)
    if stopping is not None:
      stopped_by = stopping
      break
  progress.close()
  checkpointer.wait()  # the final checkpoint is complete before the outputs say so
  writer.close()
  finish_results = {}
  if step >= job.num_steps and job.on_finish is not None:
    finish_results = job.on_finish(state, workdir) or {}
  summary_path = os.path.join(workdir, 'summary.json')
  if start >= job.num_steps and epath.Path(summary_path).exists():
    # Nothing trained now: the finished run's summary (and timings) stands.
    return Summary(outputs.read_json(summary_path), stopped_by)

  wall = elapsed_before + time.monotonic() - t_start
  train_wall = train_before + time.monotonic() - t_train
  accs = history['student_top1']
  values = {
      'teacher_top1': teacher_top1,
      'student_top1_best': max(accs) if accs else None,
      'student_top1_final': accs[-1] if accs else None,
      'steps': step,
      'wall_s': wall,
      'train_s': train_wall,
      'peak_rss_mb': outputs.peak_rss_mb(),
      **{f'{name}_s': frac * train_wall for name, frac in phase_fraction.items()},
      'finished': step >= job.num_steps,
      # What the job measured once trained (e.g. DFSR's PSNRs); a key the loop owns is not replaced.
      **{k: v for k, v in _scalars(finish_results).items() if k not in _LOOP_SUMMARY_KEYS},
  }
  if on_nonfinite == 'skip':
    values[numerics.SKIPPED] = int(jax.device_get(state[numerics.SKIPPED]))
  if outputs.is_writer():
    outputs.write_json(summary_path, values)
  return Summary(values, stopped_by)


_LOOP_SUMMARY_KEYS = frozenset({'teacher_top1', 'student_top1_best', 'student_top1_final', 'steps', 'wall_s',
                                 'train_s', 'peak_rss_mb', 'finished'})


def _scalars(results: Mapping[str, Any]) -> dict[str, Any]:
  """The JSON-able scalars of ``results`` (numbers, strings, booleans) as plain Python values."""
  out = {}
  for key, value in results.items():
    if isinstance(value, (bool, str)):
      out[key] = value
    elif np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.number):
      out[key] = np.asarray(value).item()
  return out


def _eval_set(config, mesh):
  """The evaluation split, preprocessed for the teacher, this process's shard."""
  from dfkd_jax import data
  if not config.eval.get('data'):
    return None
  ds = data.load(config.eval.data, config.eval.split, data_dir=config.get('data_dir'),
                 process_index=jax.process_index(), process_count=jax.process_count())
  images = data.prepare_images(ds.images, config.dataset, config.image_size, config.in_channels)
  return evaluation.EvalSet.build(images, ds.labels, evaluation.local_batch_size(config.eval.batch_size, mesh))


def _save_samples(job, state, sample_key, step, workdir, config, mesh):
  if job.sample_images is None or not config.report.get('sample_grid', True):
    return
  # Compiled with a replicated output, so that every process holds the whole grid (multi-host).
  images = jax.device_get(_sampler(job.sample_images, mesh)(state, sample_key))
  if outputs.is_writer():
    outputs.save_image_grid(os.path.join(workdir, 'samples', f'step_{step:07d}.png'), images[:64])


@functools.lru_cache(maxsize=None)
def _sampler(sample_images: Callable, mesh) -> Callable:
  return jax.jit(sample_images, out_shardings=parallel.replicated(mesh))


def _progress_info(record, history) -> str:
  acc = history['student_top1']
  return f'student {100 * acc[-1]:.2f}% (best {100 * max(acc):.2f}%)' if acc else ''


