"""``train_and_evaluate(config, workdir)``: builds the configured job (or its stages) and runs it.

No flags, no globals: the CLI (``dfkd_jax.main``) and tests call this directly.
"""
from __future__ import annotations

import logging

import jax

from dfkd_jax import methods
from dfkd_jax.run import loop, parallel, stages

log = logging.getLogger(__name__)

# The summary's headline figures in the final line, and how each is shown.
_HEADLINE = {'teacher_top1': lambda v: f'{100 * v:.2f}%', 'student_top1_best': lambda v: f'{100 * v:.2f}%',
             'student_top1_final': lambda v: f'{100 * v:.2f}%', 'student_psnr_best': lambda v: f'{v:.2f}dB',
             'student_psnr_final': lambda v: f'{v:.2f}dB'}


def train_and_evaluate(config, workdir: str) -> loop.Summary:
  """Runs (or resumes) the job ``config.method`` in ``workdir``; returns its summary."""
  log.info('process %d/%d, %d local / %d global devices', jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
  mesh = parallel.make_mesh(config.mesh.num_devices)
  summary = stages.run(methods.get(config.method).make_job(config, mesh), config, workdir, mesh)
  v = summary.values
  if summary.stopped_by_signal is not None:
    print(f'stopped at step {v["steps"]} (checkpoint saved); re-run the same command to resume', flush=True)
  else:
    parts = [f'{k}={show(v[k])}' for k, show in _HEADLINE.items() if v.get(k) is not None]
    print(f'done: {v["steps"]} steps in {v["wall_s"]:.1f}s; ' + ', '.join(parts), flush=True)
  return summary
