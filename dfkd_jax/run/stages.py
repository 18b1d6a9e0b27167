"""Multi-stage jobs: a method whose training has several stages (PU: its selector, then the
distillation on what the selector chose) returns ``Stages`` (a sequence of ``run.job.Stage``) from
``make_job``, and ``run`` runs them in order with the one loop (``run.loop.run``), so that every
stage gets checkpoints, preemption handling and outputs.

Stage i < last runs in ``WORKDIR/<name>``, resume-first like any run; the last stage runs in
``WORKDIR`` itself. Each stage's job is built from the results of the stage before it (the
``on_finish`` results of its final state, arrays included; ``{}`` for the first stage). Re-running
the command:
  - a finished earlier stage is not trained again: its loop restores the final checkpoint, trains
    nothing, and its ``on_finish`` measures the results again from that state;
  - an earlier stage whose ``key`` (what its result depends on: the config fields it reads) differs
    from the one kept in ``WORKDIR/<name>/stage.json`` is cleared and trained again;
  - a stop signal during a stage checkpoints it and ends the sequence there (its summary is
    returned); the next run resumes that stage.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax
from etils import epath
from jax.experimental import multihost_utils

from dfkd_jax.run import lock, loop, outputs
from dfkd_jax.run.job import Job, Stage, Stages

log = logging.getLogger(__name__)

KEY_FILE = 'stage.json'


def run(stages: Job | Stages, config, workdir: str, mesh) -> loop.Summary:
  """Runs (or resumes) a job, or each stage of a sequence in turn (see the module docstring);
  returns the summary of the last stage run."""
  if isinstance(stages, Job):
    return loop.run(stages, config, workdir, mesh)
  with lock.claim(workdir, exclusive=outputs.is_writer()):  # one run of the whole sequence per workdir
    results: Mapping[str, Any] = {}
    for i, stage in enumerate(stages):
      last = i == len(stages) - 1
      stage_dir = workdir if last else os.path.join(workdir, stage.name)
      if not last:
        _claim_stage_dir(stage, stage_dir)
      summary = loop.run(stage.build(results), config, stage_dir, mesh)
      if not last and (summary.stopped_by_signal is not None or not summary.values['finished']):
        log.info('stage %s stopped at step %d; re-run the same command to resume it', stage.name,
                 summary.values['steps'])
        return summary
      results = summary.results
    return summary


def _claim_stage_dir(stage: Stage, stage_dir: str) -> None:
  """Keeps ``stage_dir`` when it was made for ``stage.key`` (or is new), clears it otherwise."""
  path = epath.Path(stage_dir) / KEY_FILE
  if outputs.is_writer():
    if path.exists() and outputs.read_json(path).get('key') != stage.key:
      log.info('stage %s: %s was made with other settings; training it again', stage.name, stage_dir)
      epath.Path(stage_dir).rmtree()
    if not path.exists():
      path.parent.mkdir(parents=True, exist_ok=True)
      outputs.write_json(path, {'stage': stage.name, 'key': stage.key})
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'dfkd_jax stage {stage.name}: directory ready')
