"""The one training loop for every job (teacher training and every distillation method).

Resume-first: if ``WORKDIR/checkpoints`` holds a checkpoint, training continues from it;
otherwise the state is initialised. Each outer iteration is one compiled program (the job's
phases, e.g. a generator step then k student steps), with the state donated, the frozen teacher
variables passed in, and randomness ``fold_in(seed, step)`` so results do not depend on where a
run was resumed. The job contract is ``run.job``; the loop knows nothing of a method's internals;
a method knows nothing of files, logging or checkpoints: the loop logs a job's notes, runs its
evaluators, writes its exports and its report/results file (process 0), and returns its results
(what a next stage is built from, ``run.stages``).

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
import logging
import math
import os
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
from etils import epath

from dfkd_jax.convert import model_dir
from dfkd_jax.errors import UserError, check_choice
from dfkd_jax.run import cadence, lock, machine, numerics, outputs, parallel
from dfkd_jax.run import checkpoint as ckpt_lib
from dfkd_jax.run.job import (
  Job,
  compile_job,
  device_batch,
  frozen_sharding,
  frozen_variables,
)
from dfkd_jax.run.signals import StopSignals
from dfkd_jax.run.timing import phase_fractions

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Summary:
  """``values``: what ``summary.json`` holds; ``results``: the job's report and ``on_finish``
  results in full (arrays too; empty unless the job finished)."""
  values: dict
  stopped_by_signal: int | None = None
  results: dict = dataclasses.field(default_factory=dict)


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
  # Before the workdir is touched: missing evaluation data is a config error.
  evaluators = [(ev, prepared) for ev in job.evaluators if job.student is not None
                and (prepared := ev.prepare(config, mesh)) is not None]
  export_best = _export_choice(config, job, evaluators)
  for note in job.notes:
    log.info('%s', note)

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
  # Each evaluator's headline scalar: the student's at every evaluation so far, the teacher's once.
  records = outputs.read_metrics(workdir)
  scores = {ev.metric: [r[f'eval/student_{ev.metric}'] for r in records if f'eval/student_{ev.metric}' in r]
            for ev in job.evaluators}
  teacher_scores = {ev.metric: next((r[f'eval/teacher_{ev.metric}'] for r in records
                                     if f'eval/teacher_{ev.metric}' in r), None) for ev in job.evaluators}

  headline = job.evaluators[0].metric if export_best else None
  exported_step = _best_step(records, headline) if export_best else None

  def evaluate_now(step, state):
    nonlocal exported_step
    results = {}
    if not evaluators:
      return results
    variables = job.student.variables(state) if callable(job.student.variables) else job.student.variables
    for ev, prepared in evaluators:
      results.update({f'eval/student_{name}': value
                      for name, value in prepared.measure(job.student.apply_fn, variables).items()})
      scores[ev.metric].append(results[f'eval/student_{ev.metric}'])
    if export_best and scores[headline][-1] > max(scores[headline][:-1], default=-math.inf):
      _export(job, state, config, workdir, replace=True)  # the best so far, on disk at once
      exported_step = step
    return results

  if job.teacher is not None:
    teacher_record = {}
    for ev, prepared in evaluators:
      if teacher_scores[ev.metric] is None:
        measured = prepared.measure(job.teacher.apply_fn, frozen_variables(job.teacher, frozen))
        teacher_record.update({f'eval/teacher_{name}': value for name, value in measured.items()})
        teacher_scores[ev.metric] = measured[ev.metric]
        print(f'teacher {ev.title} on {prepared.data}: {ev.text(measured[ev.metric])}', flush=True)
    if teacher_record:
      writer.write(start, teacher_record)

  phase_fraction = (phase_fractions(job, state, frozen, timing_key, mesh, config, workdir, resumed=restored is not None)
                    if start < job.num_steps else {})
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
    stopping = signals.agreed()  # the same step in every process
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
    progress.update(step, _progress_info(job.evaluators, scores), force=last)
    if stopping is not None:
      stopped_by = stopping
      break
  progress.close()
  checkpointer.wait()  # the final checkpoint is complete before the outputs say so
  writer.close()
  finish_results = _finish(job, state, config, workdir, export=not export_best) if step >= job.num_steps else {}
  summary_path = os.path.join(workdir, 'summary.json')
  if start >= job.num_steps and epath.Path(summary_path).exists():
    # Nothing trained now: the finished run's summary (and timings) stands.
    return Summary(outputs.read_json(summary_path), stopped_by, finish_results)

  wall = elapsed_before + time.monotonic() - t_start
  train_wall = train_before + time.monotonic() - t_train
  values = {
      **{f'teacher_{metric}': value for metric, value in teacher_scores.items()},
      **{f'student_{metric}_best': max(seen) if seen else None for metric, seen in scores.items()},
      **{f'student_{metric}_final': seen[-1] if seen else None for metric, seen in scores.items()},
      **{f'student_{metric}_last3_mean': float(np.mean(seen[-3:])) if seen else None
         for metric, seen in scores.items()},
      'exported': 'best' if export_best else 'final',
      'exported_step': exported_step if export_best else step,
      'steps': step,
      'wall_s': wall,
      'train_s': train_wall,
      'peak_rss_mb': outputs.peak_rss_mb(),
      **{f'{name}_s': frac * train_wall for name, frac in phase_fraction.items()},
      'finished': step >= job.num_steps,
      'machine': machine.describe(),  # rounding, hence the trajectory, differs between CPUs and versions
  }
  # What the job reported and measured once trained (e.g. DFSR's PSNRs): a figure the loop has is not
  # replaced, one it lacks (None: no teacher evaluated during training) is filled in.
  values.update({k: v for k, v in _scalars(finish_results).items() if values.get(k) is None})
  if on_nonfinite == 'skip':
    values[numerics.SKIPPED] = int(jax.device_get(state[numerics.SKIPPED]))
  if outputs.is_writer():
    outputs.write_json(summary_path, values)
  return Summary(values, stopped_by, finish_results)


def _export_choice(config, job: Job, evaluators) -> bool:
  """Whether the run exports its best evaluation's model (``config.export``) rather than the final one."""
  choice = config.get('export', 'final')
  check_choice('export', choice, ('final', 'best'))
  if choice == 'best' and not (evaluators and job.exports):
    raise UserError('export=best exports the model of the best evaluation, but this run '
                    + ('exports no model' if not job.exports else 'evaluates nothing (set --config.eval.data)'))
  return choice == 'best'


def _best_step(records, metric: str) -> int | None:
  """The step of the first best ``eval/student_<metric>`` in the metrics so far (a resumed run's)."""
  seen = [(r[f'eval/student_{metric}'], -r['step']) for r in records if f'eval/student_{metric}' in r]
  return -max(seen)[1] if seen else None


def _export(job: Job, state, config, workdir: str, *, replace: bool = False) -> None:
  """Writes ``job.exports`` of ``state`` (``replace``: over the ones exported before)."""
  for export in job.exports:
    model_dir.save_trained(workdir, export.name, export.arch, export.variables(state), config,
                           dict(export.model_kwargs), dict(export.extra), replace=replace)


def _finish(job: Job, state, config, workdir: str, *, export: bool = True) -> dict:
  """What a finished job leaves: its exported models (unless ``export`` is False: exported at the
  best evaluation), its report and results (written to ``job.results_file``, its note logged);
  returns ``{**report, **results}``."""
  if export:
    _export(job, state, config, workdir)
  results = {**(job.report or {}), **(job.on_finish(state) if job.on_finish is not None else {})}
  if job.results_file is not None and outputs.is_writer():
    outputs.write_json(os.path.join(workdir, job.results_file), results)
  if job.results_note is not None:
    log.info('%s', job.results_note(results))
  return results


def _scalars(results: Mapping[str, Any]) -> dict[str, Any]:
  """The JSON-able scalars of ``results`` (numbers, strings, booleans) as plain Python values."""
  out = {}
  for key, value in results.items():
    if isinstance(value, (bool, str)):
      out[key] = value
    elif np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.number):
      out[key] = np.asarray(value).item()
  return out


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


def _progress_info(evaluators, scores) -> str:
  """The first evaluator's latest and best headline scalar, e.g. 'student 91.20% (best 92.00%)'."""
  values = scores[evaluators[0].metric] if evaluators else []
  text = evaluators[0].text if evaluators else str
  return f'student {text(values[-1])} (best {text(max(values))})' if values else ''


