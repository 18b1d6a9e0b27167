"""Command line: ``python -m dfkd_jax.main --config configs/X.py[:arg] --workdir DIR [--config.a.b=v]``.

Re-running the same command on the same workdir resumes from the latest checkpoint. Errors a user
can fix are one line on stderr and a non-zero exit (``--verbose`` adds the traceback).
"""
from __future__ import annotations

import signal
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from dfkd_jax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (configs/X.py[:arg]).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics.jsonl, summary.json.')
flags.DEFINE_bool('jax_distributed', False,
                  'Call jax.distributed.initialize() (multi-host; auto-detects Cloud TPU and SLURM).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (when not auto-detected).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (when not auto-detected).')
flags.DEFINE_integer('process_id', None, 'This process index (when not auto-detected).')
flags.DEFINE_list('local_device_ids', None, 'Devices this process uses (SLURM, one process per node).')
flags.DEFINE_bool('verbose', False, 'Show tracebacks for errors.')


def _fail(message: str, code: int) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def main(argv) -> None:
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}', 2)
  if FLAGS.config is None or FLAGS.workdir is None:
    _fail('--config and --workdir are required', 2)
  # Library INFO logs (Orbax writes several lines per checkpoint) only with --verbose.
  logging.set_verbosity(logging.INFO if FLAGS.verbose else logging.WARNING)
  try:
    import jax
    if FLAGS.jax_distributed:
      kw = {k: getattr(FLAGS, k) for k in ('coordinator_address', 'num_processes', 'process_id')
            if getattr(FLAGS, k) is not None}
      if FLAGS.local_device_ids:
        kw['local_device_ids'] = [int(i) for i in FLAGS.local_device_ids]
      jax.distributed.initialize(**kw)
    from dfkd_jax.train import train_and_evaluate
    summary = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except UserError as e:
    if FLAGS.verbose:
      traceback.print_exc()
    _fail(str(e), e.exit_code)
  except KeyboardInterrupt:
    _fail('interrupted', 130)
  if summary.stopped_by_signal == signal.SIGINT:
    sys.exit(130)


def run():
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv):
  """absl parsing with one-line errors (unknown config keys, wrong types, missing files)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(_one_line(e), 2)


def _one_line(e: Exception) -> str:
  text = ' '.join(str(e).split())
  return text[:400]


if __name__ == '__main__':
  run()
