"""``train_and_evaluate(config, workdir)``: builds the configured job and runs the loop.

No flags, no globals: the CLI (``dfkd_jax.main``) and tests call this directly.
"""
from __future__ import annotations

import inspect
import logging

import jax

from dfkd_jax import methods
from dfkd_jax.run import loop
from dfkd_jax.run import parallel

log = logging.getLogger(__name__)


def train_and_evaluate(config, workdir: str) -> loop.Summary:
  """Runs (or resumes) the job ``config.method`` in ``workdir``; returns its summary."""
  log.info('process %d/%d, %d local / %d global devices', jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
  mesh = parallel.make_mesh(config.mesh.num_devices)
  make_job = methods.get(config.method).make_job
  # A method with costly work before its loop (PU's selector) keeps that work's result in the workdir.
  kwargs = {'workdir': workdir} if 'workdir' in inspect.signature(make_job).parameters else {}
  job = make_job(config, mesh, **kwargs)
  summary = loop.run(job, config, workdir, mesh)
  v = summary.values
  if summary.stopped_by_signal is not None:
    print(f'stopped at step {v["steps"]} (checkpoint saved); re-run the same command to resume', flush=True)
  else:
    parts = [f'{k}={100 * v[k]:.2f}%' for k in ('teacher_top1', 'student_top1_best', 'student_top1_final')
             if v.get(k) is not None]
    print(f'done: {v["steps"]} steps in {v["wall_s"]:.1f}s; ' + ', '.join(parts), flush=True)
  return summary
