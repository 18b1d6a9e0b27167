"""The one training loop for every job (teacher training and every distillation method).

Resume-first: if ``WORKDIR/checkpoints`` holds a checkpoint, training continues from it;
otherwise the state is initialised. Each outer iteration is one compiled program (the job's
phases, e.g. a generator step then k student steps), with the state donated, the frozen teacher
variables passed in, and randomness ``fold_in(seed, step)`` so results do not depend on where a
run was resumed. The loop knows nothing of a method's internals; a method knows nothing of files,
logging or checkpoints.

Robustness (what a killed, preempted or diverging run does):
  - one run per workdir (``workdir_lock``); a second one is refused, naming the first;
  - SIGTERM/SIGINT before the first step stop at once (nothing new to save); during training they
    finish the step, checkpoint it and stop (exit 0 for SIGTERM, a preemption notice);
  - numerics (``config.numerics.on_nonfinite``): 'stop' checks every step's metrics and the
    finiteness of each part of the state (generator, student, ...) before anything derived from
    it is logged, evaluated, checkpointed or exported, and stops with a ``NumericalError`` naming
    the step, the loss terms and the parts; 'skip' keeps the previous state inside the compiled
    step when the new one or a metric is non-finite, and counts it (``train/skipped_updates``);
  - checkpoint restore and write failures: see ``checkpoint``.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from dfkd_jax.run import checkpoint as ckpt_lib
from dfkd_jax.run import evaluation
from dfkd_jax.run import parallel
from dfkd_jax.run import outputs
from dfkd_jax.run import lock
from dfkd_jax.errors import StopRequested, UserError

log = logging.getLogger(__name__)

State = Any  # a pytree (dict) holding at least 'step'
Phase = Callable[[State, Any, jax.Array, Any], tuple[State, dict]]

ON_NONFINITE = ('stop', 'skip')
SKIPPED = 'skipped_updates'  # state entry (and train/ metric) counting updates skipped as non-finite
_FINITE = 'finite/'  # per-step flags (is each part of the state finite) the loop checks, never logs


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
  on_finish: (final state, workdir) -> None or a dict of results (e.g. exports the trained model
    and measures it); the returned numbers are merged into ``summary.json``.
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
  on_finish: Callable[[State, str], Mapping[str, Any] | None] | None = None


class _StopSignals:
  """SIGTERM (preemption) and SIGINT (Ctrl-C). Until ``training`` is set they stop the run at once
  (``StopRequested`` / ``KeyboardInterrupt``: nothing new exists to save); then they ask the loop
  to checkpoint the current step and stop."""

  def __init__(self):
    self.received = None
    self.training = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. some test runners): no handler
        pass
    return self

  def _handle(self, signum, frame):
    if not self.training:
      raise KeyboardInterrupt if signum == signal.SIGINT else StopRequested(signum)
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.received = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _all_finite(tree) -> jax.Array:
  """True if every floating-point value in ``tree`` is finite."""
  checks = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(checks).all() if checks else jnp.array(True)


def _parts(state) -> list[str]:
  """The named parts of a state whose finiteness is checked: 'generator', 'student', 'model'..."""
  return [name for name in state if name not in ('step', SKIPPED)]


def _compose(phases: Sequence[tuple[str, Phase]], on_nonfinite: str) -> Callable:
  """One outer iteration: each phase gets its own key; the step counter advances by one. Adds
  ``finite/<part>`` flags to the metrics ('stop'), or keeps the previous state when the new one or
  a metric is non-finite and counts it ('skip'; a select, so no host sync)."""

  def iteration(state, frozen, seed_key, batch):
    key = jax.random.fold_in(seed_key, state['step'])
    new, metrics = state, {}
    for i, (_, fn) in enumerate(phases):
      new, m = fn(new, frozen, jax.random.fold_in(key, i), batch)
      metrics.update(m)
    if on_nonfinite == 'skip':
      ok = _all_finite(metrics) & _all_finite([new[name] for name in _parts(new)])
      new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
      new[SKIPPED] = state[SKIPPED] + jnp.where(ok, 0, 1).astype(state[SKIPPED].dtype)
      metrics[f'train/{SKIPPED}'] = new[SKIPPED]
    else:
      metrics.update({f'{_FINITE}{name}': _all_finite(new[name]) for name in _parts(new)})
    return dict(new, step=state['step'] + 1), metrics

  return iteration


def compile_job(job: Job, mesh, init_key, on_nonfinite: str = 'stop',
                mesh_config=None) -> tuple[Callable, Callable, Any]:
  """(jitted init, jitted donated iteration, state sharding) of ``job`` on ``mesh``, every input
  and output with an explicit sharding (``dfkd_jax.run.parallel``): the state and frozen variables
  replicated, or split by ``mesh_config.fsdp_min_mb``; the batch split over the devices; outputs
  pinned to the input shardings so that every iteration reuses one compiled program. Train-mode
  BatchNorm follows ``mesh_config.batch_norm`` (``config.mesh``; None: the defaults). The state
  gets a ``skipped_updates`` counter in every mode, so that a run can switch modes when it resumes."""
  if on_nonfinite not in ON_NONFINITE:
    raise UserError(f"numerics.on_nonfinite must be one of {', '.join(ON_NONFINITE)}, not {on_nonfinite!r}")
  mesh_config = mesh_config or {}
  repl = parallel.replicated(mesh)
  init_fn = lambda key: dict(job.init(key), **{SKIPPED: jnp.zeros((), jnp.int32)})
  abstract = jax.eval_shape(init_fn, init_key)
  state_sharding = parallel.array_shardings(abstract, mesh, mesh_config.get('fsdp_min_mb', 0.0))
  init = jax.jit(init_fn, out_shardings=state_sharding)
  iteration = jax.jit(_compose(_phases_on(job, mesh, mesh_config), on_nonfinite), donate_argnums=(0,),
                      in_shardings=(state_sharding, frozen_sharding(job, mesh, mesh_config), repl,
                                    parallel.data_sharded(mesh)),
                      out_shardings=(state_sharding, repl))
  return init, iteration, state_sharding


def frozen_sharding(job: Job, mesh, mesh_config=None):
  """Where ``job.frozen`` lives: replicated, or split by ``mesh_config.fsdp_min_mb``."""
  return parallel.array_shardings(job.frozen, mesh, (mesh_config or {}).get('fsdp_min_mb', 0.0))


def _phases_on(job: Job, mesh, mesh_config) -> list[tuple[str, Phase]]:
  """``job.phases`` with train-mode BatchNorm statistics as ``mesh_config.batch_norm`` says."""
  groups = parallel.batch_norm_groups((mesh_config or {}).get('batch_norm', 'global'), mesh)
  return parallel.with_batch_norm(job.phases, groups)


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
  with _StopSignals() as signals, lock.claim(workdir, exclusive=outputs.is_writer()):
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep,
                                         every_steps=config.checkpoint.every_steps,
                                         async_save=config.checkpoint.get('async_save', True))
    try:
      return _train(job, config, workdir, mesh, checkpointer, signals, t_start)
    finally:
      checkpointer.close()


def _train(job: Job, config, workdir: str, mesh, checkpointer: ckpt_lib.Checkpointer, signals: _StopSignals,
           t_start: float) -> Summary:
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
  history = _history(workdir)

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
  guard = _FiniteGuard(check=on_nonfinite == 'stop')
  t_train = time.monotonic()
  step = start
  last_saved = start if restored is not None else None
  stopped_by = None
  signals.training = True  # from here a stop signal ends the current step with a checkpoint
  while step < job.num_steps:
    batch = _device_batch(job, step, batch_sharding)
    state, metrics = iteration(state, frozen, seed_key, batch)
    step += 1
    guard.add(step, metrics)
    stopping = signals.received
    last = step == job.num_steps
    log_now = step % config.log_every_steps == 0 or last
    eval_now = bool(config.eval.every_steps) and (step % config.eval.every_steps == 0 or last)
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
    values[SKIPPED] = int(jax.device_get(state[SKIPPED]))
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


def frozen_variables(evaluated: Evaluated, frozen):
  return evaluated.variables(frozen) if callable(evaluated.variables) else evaluated.variables


def _device_batch(job, step, sharding):
  if job.next_batch is None:
    return None
  local = job.next_batch(step)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


class NumericalError(UserError):
  """A loss, metric or part of the state became NaN/inf."""
  exit_code = 3


class _FiniteGuard:
  """Holds each step's metrics as device values (no host sync per step) until something derived
  from that step's state is about to be kept; ``verify`` then fetches them all and, when checking
  ('stop' mode), raises NumericalError at the first step with a non-finite metric or state part."""

  def __init__(self, check: bool):
    self.check = check
    self.pending = []  # [(step, metrics)], oldest first

  def add(self, step: int, metrics: dict) -> None:
    if not self.check:
      self.pending.clear()  # only the latest metrics are logged
    self.pending.append((step, metrics))

  def verify(self, last_saved: int | None) -> dict:
    """The latest step's metrics on the host (without the ``finite/`` flags)."""
    steps = [step for step, _ in self.pending]
    fetched = jax.device_get([metrics for _, metrics in self.pending])
    self.pending.clear()
    if self.check:
      for step, metrics in zip(steps, fetched):
        _raise_if_nonfinite(step, metrics, last_saved)
    return {name: value for name, value in fetched[-1].items() if not name.startswith(_FINITE)}


def _raise_if_nonfinite(step: int, metrics: Mapping[str, Any], last_saved: int | None) -> None:
  terms = [f'{name}={_show(value)}' for name, value in metrics.items()
           if not name.startswith(_FINITE) and not np.isfinite(value).all()]
  parts = [name[len(_FINITE):] for name, finite in metrics.items() if name.startswith(_FINITE) and not finite]
  if not (terms or parts):
    return
  kept = (f'the last good checkpoint (step {last_saved}) is kept' if last_saved is not None else
          'no checkpoint had been saved yet')
  raise NumericalError(
      f"numerical failure at step {step}: {', '.join(terms) if terms else 'every loss is finite'}; "
      f"{'non-finite values in: ' + ', '.join(parts) if parts else 'the state is still finite'}; "
      f'the run stopped without keeping anything of this step and {kept}; lower the learning rate, or '
      f'set --config.numerics.on_nonfinite=skip to skip such updates')


def _show(value) -> str:
  value = np.asarray(value)
  return str(value.item()) if value.ndim == 0 else 'non-finite'


def _history(workdir: str) -> dict:
  """What earlier runs on this workdir logged: accuracies, teacher accuracy, elapsed time."""
  hist = {'student_top1': [], 'elapsed_s': 0.0, 'train_s': 0.0}
  for rec in outputs.read_metrics(workdir):
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


def time_phases(job: Job, state, frozen, timing_key, mesh, config) -> dict[str, float]:
  """Fraction of an outer iteration's time spent in each named phase ('synth', 'kd', ...).

  Phases run fused in one program, so their share is measured once, before training, by timing
  each phase compiled on its own over a few repetitions on a copy of the state with the step
  counter set to the run's middle iteration, each phase on the state the phase before it returned
  (as in an iteration: a student phase times reads of a pool the synthesis phase has filled, not
  of an empty one). Results are discarded, so training is unaffected. The summary's
  ``synth_s``/``kd_s`` are these fractions of the training wall time.
  """
  reps = config.report.get('phase_timing_reps', 3)
  if reps <= 0 or len(job.phases) < 2:
    return {job.phases[0][0]: 1.0} if len(job.phases) == 1 else {}
  batch = _device_batch(job, 0, parallel.data_sharded(mesh))
  # Timed at the run's middle iteration, not the first: a method may skip a phase during warm-up
  # epochs (Fast's synthesis-only start) or grow it over the run (DFSR's depth).
  state = dict(state, step=state['step'] * 0 + job.num_steps // 2)
  times = {}
  for i, (name, fn) in enumerate(_phases_on(job, mesh, config.mesh)):
    key = jax.random.fold_in(timing_key, i)
    # Compiled ahead of time, not by a first call: a synthesis phase can take a minute to run.
    compiled = jax.jit(lambda s, f, k, b, fn=fn: fn(s, f, k, b)).lower(state, frozen, key, batch).compile()
    t0 = time.perf_counter()
    next_state, _ = jax.block_until_ready(compiled(state, frozen, key, batch))
    for _ in range(reps - 1):  # the repeats' outputs are dropped at once: a pool copy each
      jax.block_until_ready(compiled(state, frozen, key, batch))
    times[name] = times.get(name, 0.0) + (time.perf_counter() - t0)
    state = next_state
  total = sum(times.values()) or 1.0
  return {name: t / total for name, t in times.items()}
