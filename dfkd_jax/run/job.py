"""The contract between the run machinery and a method: a ``Job`` of phases, and how its outer
iteration is compiled (one program with explicit shardings, the state donated).

A method's ``make_job(config, mesh)`` returns a ``Job``, or a ``run.stages.Stages`` sequence of jobs
(each built from the results of the one before, e.g. PU's selector, then its distillation);
``dfkd_jax.run.loop.run`` runs a job. Each outer iteration folds the step into the seed key, runs
the phases in order (each with its own key) and advances the step counter.

A method never touches the workdir, opens a file or prints: what it has to say comes back as data,
and the run machinery (``run.loop``, ``run.outputs``) writes it on process 0 and logs it:
  - ``notes``: lines known when the job is built (what a selection holds), logged when it starts;
  - ``evaluators``: what is measured at the evaluation cadence (``run.evaluation``), logged as
    ``eval/...`` in ``metrics.jsonl`` and summarised as best/final in ``summary.json``;
  - ``exports``: trained models, written as converted-model directories once the job is finished;
  - ``report`` (known when the job is built) and ``on_finish(final state) -> results`` (measured
    once trained): written together to ``WORKDIR/<results_file>`` (e.g. ``selection.json``,
    ``sr_eval.json``) when the job names one, their scalars merged into ``summary.json``, and
    ``results_note(results)`` logged; the full results (arrays too) are what a next stage is built from.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfkd_jax.errors import check_choice
from dfkd_jax.run import evaluation, numerics, parallel

State = Any  # a pytree (dict) holding at least 'step'

TRACE = 'trace/'  # metrics named trace/... are a replay's intermediates; an iteration drops them


def key_as_draws(key: jax.Array, state: State) -> jax.Array:
  """The draw of a phase that consumes its PRNG key directly (no recorded-draw replay)."""
  del state
  return key


class Phase(NamedTuple):
  """One phase of an outer iteration, split at its randomness (the replay seam).

  draw(key, state) -> draws: every random value the phase consumes (latents, targets, augmentation
    offsets and flips, sample orders, re-initialised weights, ...), a pytree of arrays made from the
    phase's key (and, where what is drawn depends on it, the state: e.g. the pool's fill).
  apply(state, frozen, draws, batch) -> (state, metrics): the phase's arithmetic, random only
    through ``draws``.
  An iteration runs ``apply(state, frozen, draw(key, state), batch)`` in one program;
  ``dfkd_jax.replay`` calls ``apply`` with draws recorded from the reference code instead. Metrics
  named ``TRACE``... hold per-sub-step intermediates (each loss term, images, logits) for the replay
  to compare; ``compose`` drops them, so the compiled iteration never computes them (dead code).
  """
  name: str
  apply: Callable[[State, Any, Any, Any], tuple[State, dict]]
  draw: Callable[[jax.Array, State], Any] = key_as_draws

  def __call__(self, state, frozen, key, batch):
    """The phase with its own draws: ``apply(state, frozen, draw(key, state), batch)``."""
    return self.apply(state, frozen, self.draw(key, state), batch)


def without_trace(metrics: dict) -> dict:
  """``metrics`` less the replay's ``TRACE`` intermediates."""
  return {k: v for k, v in metrics.items() if not k.startswith(TRACE)}


@dataclasses.dataclass
class Evaluated:
  """A classifier the loop evaluates: ``apply_fn(variables, x, train=False) -> logits``."""
  apply_fn: Callable
  variables: Callable[[State], Any] | Any  # a function of the state, or fixed variables


@dataclasses.dataclass
class Export:
  """A trained model the run machinery writes once the job is finished: the converted-model
  directory ``WORKDIR/<name>`` (``convert.model_dir.save_trained``; ``python -m dfkd_jax.convert
  export`` turns it into a torch .pth)."""
  name: str
  arch: str
  variables: Callable[[State], Any]  # the model's variables in the final state
  model_kwargs: Mapping[str, Any]
  extra: Mapping[str, Any]  # metadata: who trained it, from what


@dataclasses.dataclass
class Job:
  """What the loop runs.

  init: key -> state (a dict containing an int32 'step').
  phases: the outer iteration, a sequence of ``Phase`` (its randomness drawn apart from its
    arithmetic); compiled together into one program. Names 'synth' and 'kd' are timed separately
    for the summary (see ``run.timing.time_phases``).
  frozen: variables every step reads but never changes (the teacher): not donated, not
    checkpointed.
  num_steps: outer iterations in the whole run.
  next_batch: host batch for a step (deterministic in the step), or None for data-free jobs.
  student / teacher: the networks the evaluators measure (the teacher once per run); None: nothing
    to evaluate.
  evaluators: ``run.evaluation`` evaluators (top-1 for classifiers, PSNR for SR networks, ...).
  sample_images: (state, key) -> images in [0, 1] for the PNG grid, or None.
  exports: models written once the job is finished.
  on_finish: final state -> results (e.g. DFSR's PSNRs on its held-out images), or None.
  report: what the job reports from its construction (e.g. PU's selection), or None.
  results_file: the file the run machinery writes ``{**report, **results}`` to, or None.
  notes: lines logged when the job starts.
  results_note: results -> a line logged once ``on_finish`` has measured them, or None.
  """
  init: Callable[[jax.Array], State]
  phases: Sequence[Phase]
  frozen: Any
  num_steps: int
  student: Evaluated | None = None
  teacher: Evaluated | None = None
  evaluators: Sequence[evaluation.Evaluator] = (evaluation.Top1(),)
  next_batch: Callable[[int], Mapping[str, np.ndarray]] | None = None
  sample_images: Callable[[State, jax.Array], jax.Array] | None = None
  exports: Sequence[Export] = ()
  on_finish: Callable[[State], Mapping[str, Any]] | None = None
  report: Mapping[str, Any] | None = None
  results_file: str | None = None
  notes: Sequence[str] = ()
  results_note: Callable[[Mapping[str, Any]], str] | None = None


@dataclasses.dataclass
class Stage:
  """One stage of a multi-stage job (``run.stages``): ``build(results of the stage before, {} for
  the first) -> Job``. ``key`` says what an earlier stage's result depends on (the config fields it
  reads): a stage kept from an earlier run with another key is trained again."""
  name: str
  build: Callable[[Mapping[str, Any]], Job]
  key: str = ''


Stages = Sequence[Stage]


def compose(phases: Sequence[Phase], on_nonfinite: str) -> Callable:
  """One outer iteration: each phase gets its own key; the step counter advances by one; the
  phases' ``TRACE`` metrics are dropped. Adds
  ``finite/<part>`` flags to the metrics ('stop'), or keeps the previous state when the new one or
  a metric is non-finite and counts it ('skip'; a select, so no host sync)."""

  def iteration(state, frozen, seed_key, batch):
    key = jax.random.fold_in(seed_key, state['step'])
    new, metrics = state, {}
    for i, phase in enumerate(phases):
      new, m = phase(new, frozen, jax.random.fold_in(key, i), batch)
      metrics.update(without_trace(m))
    if on_nonfinite == 'skip':
      ok = numerics.all_finite(metrics) & numerics.all_finite([new[name] for name in numerics.parts(new)])
      new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
      new[numerics.SKIPPED] = state[numerics.SKIPPED] + jnp.where(ok, 0, 1).astype(state[numerics.SKIPPED].dtype)
      metrics[f'train/{numerics.SKIPPED}'] = new[numerics.SKIPPED]
    else:
      metrics.update({f'{numerics.FINITE}{name}': numerics.all_finite(new[name]) for name in numerics.parts(new)})
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
  check_choice('numerics.on_nonfinite', on_nonfinite, numerics.ON_NONFINITE)
  mesh_config = mesh_config or {}
  repl = parallel.replicated(mesh)
  init_fn = lambda key: dict(job.init(key), **{numerics.SKIPPED: jnp.zeros((), jnp.int32)})
  abstract = jax.eval_shape(init_fn, init_key)
  state_sharding = parallel.array_shardings(abstract, mesh, mesh_config.get('fsdp_min_mb', 0.0))
  init = jax.jit(init_fn, out_shardings=state_sharding)
  iteration = jax.jit(compose(phases_on(job, mesh, mesh_config), on_nonfinite), donate_argnums=(0,),
                      in_shardings=(state_sharding, frozen_sharding(job, mesh, mesh_config), repl,
                                    parallel.data_sharded(mesh)),
                      out_shardings=(state_sharding, repl))
  return init, iteration, state_sharding


def frozen_sharding(job: Job, mesh, mesh_config=None):
  """Where ``job.frozen`` lives: replicated, or split by ``mesh_config.fsdp_min_mb``."""
  return parallel.array_shardings(job.frozen, mesh, (mesh_config or {}).get('fsdp_min_mb', 0.0))


def phases_on(job: Job, mesh, mesh_config) -> list[Phase]:
  """``job.phases`` with train-mode BatchNorm statistics as ``mesh_config.batch_norm`` says."""
  groups = parallel.batch_norm_groups((mesh_config or {}).get('batch_norm', 'global'), mesh)
  return parallel.with_batch_norm(job.phases, groups)


def frozen_variables(evaluated: Evaluated, frozen):
  """The variables ``evaluated`` reads: a function of the frozen variables, or fixed ones."""
  return evaluated.variables(frozen) if callable(evaluated.variables) else evaluated.variables


def device_batch(job: Job, step: int, sharding):
  """The host batch of ``step`` as one global array per entry (every process gives its own part)."""
  if job.next_batch is None:
    return None
  local = job.next_batch(step)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
