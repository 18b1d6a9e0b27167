"""How an outer iteration's time splits between its phases (synthesis vs distillation)."""
from __future__ import annotations

import time

import jax

from dfkd_jax.run import outputs, parallel
from dfkd_jax.run.job import Job, device_batch, phases_on, without_trace


def phase_fractions(job: Job, state, frozen, timing_key, mesh, config, workdir: str, *,
                    resumed: bool) -> dict[str, float]:
  """``time_phases``, once per run: measured when the run first starts and kept in the workdir
  (``outputs.PHASE_FRACTIONS``); a resumed run reads them back instead of compiling and timing every
  phase again (a minute or more for a synthesis phase)."""
  saved = outputs.read_phase_fractions(workdir) if resumed else None
  if saved is not None:
    return saved
  fractions = time_phases(job, state, frozen, timing_key, mesh, config)
  outputs.write_phase_fractions(workdir, fractions)
  return fractions


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
    return {job.phases[0].name: 1.0} if len(job.phases) == 1 else {}
  batch = device_batch(job, 0, parallel.data_sharded(mesh))
  # Timed at the run's middle iteration, not the first: a method may skip a phase during warm-up
  # epochs (Fast's synthesis-only start) or grow it over the run (DFSR's depth).
  state = dict(state, step=state['step'] * 0 + job.num_steps // 2)
  times = {}
  for i, phase in enumerate(phases_on(job, mesh, config.mesh)):
    name, key = phase.name, jax.random.fold_in(timing_key, i)
    # Compiled ahead of time, not by a first call: a synthesis phase can take a minute to run.
    run = lambda s, f, k, b, phase=phase: (lambda out: (out[0], without_trace(out[1])))(phase(s, f, k, b))
    compiled = jax.jit(run).lower(state, frozen, key, batch).compile()
    t0 = time.perf_counter()
    next_state, _ = jax.block_until_ready(compiled(state, frozen, key, batch))
    for _ in range(reps - 1):  # the repeats' outputs are dropped at once: a pool copy each
      jax.block_until_ready(compiled(state, frozen, key, batch))
    times[name] = times.get(name, 0.0) + (time.perf_counter() - t0)
    state = next_state
  total = sum(times.values()) or 1.0
  return {name: t / total for name, t in times.items()}
