"""The one training loop for every job (teacher training and every distillation method).

Resume-first: if ``WORKDIR/checkpoints`` holds a checkpoint, training continues from it;
otherwise the state is initialised. Each outer iteration is one compiled program (the job's
phases, e.g. a generator step then k student steps), with the state donated, the frozen teacher
variables passed in, and randomness ``fold_in(seed, step)`` so results do not depend on where a
run was resumed. The loop knows nothing of a method's internals; a method knows nothing of files,
logging or checkpoints.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from dfkd_jax import checkpoint as ckpt_lib
from dfkd_jax import evaluate, parallel, report
from dfkd_jax.errors import UserError

log = logging.getLogger(__name__)

State = Any  # a pytree (dict) holding at least 'step'
Phase = Callable[[State, Any, jax.Array, Any], tuple[State, dict]]


@dataclasses.dataclass
class Evaluated:
  """A classifier the loop evaluates: ``apply_fn(variables, x, train=False) -> logits``."""
  apply_fn: Callable
  variables: Callable[[State], Any] | Any  # a function of the state, or fixed variables


@dataclasses.dataclass
class Job:
  """What the loop runs.

  init: key -> state (a dict containing an int32 'step').
  phases: the outer iteration, ``[(name, fn)]`` with ``fn(state, frozen, key, batch) ->
    (state, metrics)``; compiled together into one program. Names 'synth' and 'kd' are timed
    separately for the summary (see ``Loop.time_phases``).
  frozen: variables every step reads but never changes (the teacher): not donated, not
    checkpointed.
  num_steps: outer iterations in the whole run.
  next_batch: host batch for a step (deterministic in the step), or None for data-free jobs.
  student / teacher: what evaluation measures.
  sample_images: (state, key) -> images in [0, 1] for the PNG grid, or None.
  on_finish: (final state, workdir) -> None, e.g. to export the trained model.
  """
  init: Callable[[jax.Array], State]
  phases: Sequence[tuple[str, Phase]]
  frozen: Any
  num_steps: int
  student: Evaluated
  teacher: Evaluated | None = None
  next_batch: Callable[[int], Mapping[str, np.ndarray]] | None = None
  sample_images: Callable[[State, jax.Array], jax.Array] | None = None
  steps_per_epoch: int = 1
  on_finish: Callable[[State, str], None] | None = None


class _StopSignals:
  """SIGTERM (preemption) and SIGINT (Ctrl-C) ask the loop to checkpoint and stop cleanly."""

  def __init__(self):
    self.received = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. some test runners): no handler
        pass
    return self

  def _handle(self, signum, frame):
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.received = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _compose(phases: Sequence[tuple[str, Phase]]) -> Callable:
  """One outer iteration: each phase gets its own key; the step counter advances by one."""

  def iteration(state, frozen, seed_key, batch):
    key = jax.random.fold_in(seed_key, state['step'])
    metrics = {}
    for i, (_, fn) in enumerate(phases):
      state, m = fn(state, frozen, jax.random.fold_in(key, i), batch)
      metrics.update(m)
    return dict(state, step=state['step'] + 1), metrics

  return iteration


def compile_job(job: Job, mesh, init_key) -> tuple[Callable, Callable, Any]:
  """(jitted init, jitted donated iteration, state sharding) of ``job`` on ``mesh``: the state
  and frozen variables replicated, outputs pinned to the same shardings so that every iteration
  reuses one compiled program."""
  repl = parallel.replicated(mesh)
  abstract = jax.eval_shape(job.init, init_key)
  state_sharding = jax.tree.map(lambda _: repl, abstract)
  init = jax.jit(job.init, out_shardings=state_sharding)
  iteration = jax.jit(_compose(job.phases), donate_argnums=(0,), out_shardings=(state_sharding, repl))
  return init, iteration, state_sharding


@dataclasses.dataclass
class Summary:
  values: dict
  stopped_by_signal: int | None = None


def run(job: Job, config, workdir: str, mesh) -> Summary:
  """Runs (or resumes) ``job`` on ``mesh`` to ``job.num_steps`` and returns the summary written
  to ``WORKDIR/summary.json``."""
  t_start = time.monotonic()
  if config.eval.get('data'):  # before any compile or file: a config error a user can fix
    parallel.check_batch(config.eval.batch_size, mesh, 'eval.batch_size')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f'cannot create the workdir {workdir!r}: {e.strerror or e}') from e
  if not os.access(workdir, os.W_OK):
    raise UserError(f'the workdir {workdir!r} is not writable')
  repl = parallel.replicated(mesh)
  # Independent streams: initialisation, training steps (folded with the step), sample grids, timing.
  init_key, seed_key, sample_key, timing_key = jax.random.split(jax.random.key(config.seed), 4)

  init, iteration, state_sharding = compile_job(job, mesh, init_key)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep,
                                       every_steps=config.checkpoint.every_steps,
                                       async_save=config.checkpoint.get('async_save', True))
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        jax.eval_shape(job.init, init_key), state_sharding)
  restored = checkpointer.restore_latest(target)
  if restored is not None:
    state, start = restored
    print(f'resuming from the checkpoint at step {start} in {workdir}', flush=True)
    report.truncate_metrics(workdir, start)
  else:
    state, start = init(init_key), 0
  if report.is_writer():
    report.write_json(os.path.join(workdir, 'config.json'), config.to_dict())

  frozen = jax.device_put(job.frozen, repl)
  batch_sharding = parallel.data_sharded(mesh)
  writer = report.MetricWriter(workdir, tensorboard=config.report.get('tensorboard', False))
  history = _history(workdir)
  eval_set = _eval_set(config, mesh)

  def evaluate_now(step, state):
    results = {}
    if eval_set is None:
      return results
    variables = job.student.variables(state) if callable(job.student.variables) else job.student.variables
    acc = evaluate.top1(job.student.apply_fn, variables, eval_set, mesh, config.eval.batch_size)
    results['eval/student_top1'] = acc
    history['student_top1'].append(acc)
    return results

  teacher_top1 = history.get('teacher_top1')
  if eval_set is not None and job.teacher is not None and teacher_top1 is None:
    teacher_top1 = evaluate.top1(job.teacher.apply_fn, frozen_variables(job.teacher, frozen), eval_set, mesh,
                                 config.eval.batch_size)
    writer.write(start, {'eval/teacher_top1': teacher_top1})
    print(f'teacher top-1 on {config.eval.data}[{config.eval.split}]: {100 * teacher_top1:.2f}%', flush=True)

  phase_fraction = time_phases(job, state, frozen, timing_key, mesh, config) if start < job.num_steps else {}
  progress = report.Progress(job.num_steps, start)
  elapsed_before, train_before = history['elapsed_s'], history['train_s']
  t_train = time.monotonic()
  step = start
  last_saved = start if restored is not None else None
  with _StopSignals() as signals:
    while step < job.num_steps:
      batch = _device_batch(job, step, batch_sharding)
      state, metrics = iteration(state, frozen, seed_key, batch)
      step += 1
      record = {}
      if step % config.log_every_steps == 0 or step == job.num_steps:
        record.update(_check_finite(jax.device_get(metrics), step))
      if config.eval.every_steps and (step % config.eval.every_steps == 0 or step == job.num_steps):
        record.update(evaluate_now(step, state))
        _save_samples(job, state, sample_key, step, workdir, config)
      if record:
        record['time/elapsed_s'] = elapsed_before + time.monotonic() - t_start
        record['time/train_s'] = train_before + time.monotonic() - t_train  # summed over resumed runs
        record['time/steps_per_s'] = (step - start) / max(time.monotonic() - t_train, 1e-9)
        writer.write(step, record)
      if checkpointer.save(step, state, config.to_dict(), force=step == job.num_steps):
        last_saved = step
      progress.update(step, _progress_info(record, history), force=step == job.num_steps)
      if signals.received is not None:
        break
  progress.close()
  if signals.received is not None and last_saved != step:
    checkpointer.save(step, state, config.to_dict(), force=True)
  checkpointer.close()
  writer.close()
  if step >= job.num_steps and job.on_finish is not None:
    job.on_finish(state, workdir)
  summary_path = os.path.join(workdir, 'summary.json')
  if start >= job.num_steps and os.path.exists(summary_path):
    with open(summary_path) as f:  # nothing trained now: the finished run's summary (and timings) stands
      return Summary(json.load(f), signals.received)

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
      'peak_rss_mb': report.peak_rss_mb(),
      **{f'{name}_s': frac * train_wall for name, frac in phase_fraction.items()},
      'finished': step >= job.num_steps,
  }
  if report.is_writer():
    report.write_json(summary_path, values)
  return Summary(values, signals.received)


def frozen_variables(evaluated: Evaluated, frozen):
  return evaluated.variables(frozen) if callable(evaluated.variables) else evaluated.variables


def _device_batch(job, step, sharding):
  if job.next_batch is None:
    return None
  local = job.next_batch(step)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def _check_finite(metrics: Mapping[str, Any], step: int) -> dict:
  out = {}
  for name, value in metrics.items():
    value = np.asarray(value)
    if not np.all(np.isfinite(value)):
      raise NumericalError(f'{name} became {value.item() if value.ndim == 0 else "non-finite"} at step {step}; '
                           f'the last good checkpoint is kept (lower the learning rate or check the teacher)')
    out[name] = value
  return out


class NumericalError(UserError):
  """A loss or metric became NaN/inf."""
  exit_code = 3


def _history(workdir: str) -> dict:
  """What earlier runs on this workdir logged: accuracies, teacher accuracy, elapsed time."""
  hist = {'student_top1': [], 'elapsed_s': 0.0, 'train_s': 0.0}
  path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          rec = json.loads(line)
        except ValueError:
          continue
        if 'eval/student_top1' in rec:
          hist['student_top1'].append(rec['eval/student_top1'])
        if 'eval/teacher_top1' in rec:
          hist['teacher_top1'] = rec['eval/teacher_top1']
        if 'time/elapsed_s' in rec:
          hist['elapsed_s'] = rec['time/elapsed_s']
        if 'time/train_s' in rec:
          hist['train_s'] = rec['time/train_s']
  return hist


def _eval_set(config, mesh):
  """The evaluation split, preprocessed for the teacher, this process's shard."""
  from dfkd_jax import data
  if not config.eval.get('data'):
    return None
  ds = data.load(config.eval.data, config.eval.split, data_dir=config.get('data_dir'),
                 process_index=jax.process_index(), process_count=jax.process_count())
  images = data.prepare_images(ds.images, config.dataset, config.image_size, config.in_channels)
  return evaluate.EvalSet.build(images, ds.labels, config.eval.batch_size // jax.process_count())


def _save_samples(job, state, sample_key, step, workdir, config):
  if job.sample_images is None or not config.report.get('sample_grid', True):
    return
  images = jax.device_get(job.sample_images(state, sample_key))
  if report.is_writer():
    report.save_image_grid(os.path.join(workdir, 'samples', f'step_{step:07d}.png'), images[:64])


def _progress_info(record, history) -> str:
  acc = history['student_top1']
  return f'student {100 * acc[-1]:.2f}% (best {100 * max(acc):.2f}%)' if acc else ''


def time_phases(job: Job, state, frozen, timing_key, mesh, config) -> dict[str, float]:
  """Fraction of an outer iteration's time spent in each named phase ('synth', 'kd', ...).

  Phases run fused in one program, so their share is measured once, before training, by timing
  each phase compiled on its own over a few repetitions on a copy of the state (results are
  discarded, so training is unaffected). The summary's ``synth_s``/``kd_s`` are these fractions
  of the training wall time.
  """
  reps = config.report.get('phase_timing_reps', 3)
  if reps <= 0 or len(job.phases) < 2:
    return {job.phases[0][0]: 1.0} if len(job.phases) == 1 else {}
  batch = _device_batch(job, 0, parallel.data_sharded(mesh))
  times = {}
  for i, (name, fn) in enumerate(job.phases):
    compiled = jax.jit(lambda s, f, k, b, fn=fn: fn(s, f, k, b))
    key = jax.random.fold_in(timing_key, i)
    jax.block_until_ready(compiled(state, frozen, key, batch))  # compile
    t0 = time.perf_counter()
    for _ in range(reps):
      jax.block_until_ready(compiled(state, frozen, key, batch))
    times[name] = times.get(name, 0.0) + (time.perf_counter() - t0)
  total = sum(times.values()) or 1.0
  return {name: t / total for name, t in times.items()}
