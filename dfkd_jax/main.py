"""Command line: ``python -m dfkd_jax.main --config configs/X.py[:arg] --workdir DIR [--config.a.b=v]``
(installed as ``dfkd-jax``).

Re-running the same command on the same workdir resumes from the latest checkpoint. Errors a user
can fix are one line on stderr and a non-zero exit (``--verbose`` adds the traceback): 2 for bad
input, 3 for a numerical failure, 130 for Ctrl-C. SIGTERM exits 0: during training after
checkpointing the current step, before it at once.

Logging (absl's handler, on stderr): modules log through ``logging.getLogger(__name__)``. Their
notes (INFO) show on process 0, warnings and errors on every process. Libraries log through absl
too, and Orbax alone writes dozens of INFO lines per checkpoint, so without ``--verbosity`` their
threshold is WARNING; an explicit ``--verbosity`` sets one threshold for everything (``0`` adds the
libraries' notes, ``-1`` keeps warnings only).
"""
from __future__ import annotations

import contextlib
import errno
import logging as py_logging
import os
import re
import signal
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from dfkd_jax.errors import StopRequested, UserError
from dfkd_jax.run import lock

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
  if not FLAGS.is_parsed() or not FLAGS.verbose:
    _drop_abandoned_orbax_work()
  sys.exit(code)


def _drop_abandoned_orbax_work() -> None:
  """The process is exiting on an error it has reported in one line. Work that Orbax abandoned on
  the way repeats that error when it is collected at exit: "Exception ignored in: <coroutine ...>"
  from the reader coroutines of a truncated model directory (seen with Python 3.12), asyncio's
  "... exception was never retrieved" (tasks, gathering futures) from the writers of a checkpoint
  that hit a full disk (now and then), and "RuntimeError: Event loop is closed" from asyncio's
  ``call_soon_threadsafe``, printed without a header when a reader that Orbax abandoned completes
  after its event loop has closed (a truncated model directory, 1 run in several on Python 3.12).
  Those, and only those, are dropped (``--verbose`` keeps them)."""
  orbax_code = f'{os.sep}orbax{os.sep}'
  previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

  def closed_loop_echo(error) -> bool:
    if not isinstance(error, RuntimeError) or str(error) != 'Event loop is closed':
      return False
    frames = []
    traceback_ = error.__traceback__
    while traceback_ is not None:
      frames.append(traceback_.tb_frame.f_code)
      traceback_ = traceback_.tb_next
    last = frames[-1] if frames else None
    return last is not None and last.co_name == '_check_closed' and f'{os.sep}asyncio{os.sep}' in last.co_filename

  def unraisable_hook(unraisable) -> None:
    code = getattr(unraisable.object, 'cr_code', None)
    if not (code is not None and orbax_code in code.co_filename) and not closed_loop_echo(unraisable.exc_value):
      previous_unraisable(unraisable)

  def except_hook(kind, error, traceback_) -> None:
    if not closed_loop_echo(error):
      previous_except(kind, error, traceback_)

  def from_orbax(record: py_logging.LogRecord) -> bool:
    if orbax_code in record.getMessage():
      return True
    traceback_ = record.exc_info[1].__traceback__ if record.exc_info and record.exc_info[1] else None
    while traceback_ is not None:
      if orbax_code in traceback_.tb_frame.f_code.co_filename:
        return True
      traceback_ = traceback_.tb_next
    return False

  def keep(record: py_logging.LogRecord) -> bool:
    return not ('exception was never retrieved' in record.getMessage() and from_orbax(record))

  sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook
  py_logging.getLogger('asyncio').addFilter(keep)


def _flush_denormals_on_cpu() -> None:
  """Generator gradients often underflow to denormals, which the CPU handles ~2x slower; this
  XLA:CPU option flushes them to zero (it has no effect on GPU/TPU). Set before jax starts."""
  flags_env = os.environ.get('XLA_FLAGS', '')
  if '--xla_cpu_ftz' not in flags_env:
    os.environ['XLA_FLAGS'] = f'{flags_env} --xla_cpu_ftz=true'.strip()


def _no_compilation_cache_across_cpu_processes(jax) -> None:
  """With several processes on CPU, programs that jax 0.12.1 reads back from the persistent
  compilation cache hang in their cross-process collectives (a resumed two-process run stopped in
  its first evaluation; the same run without the cache finishes; jax 0.10.2 is fine). Such runs
  compile afresh instead: only jax versions known to work keep the cache there."""
  cache_dir = jax.config.jax_compilation_cache_dir
  if (cache_dir and jax.process_count() > 1 and jax.default_backend() == 'cpu'
      and jax.__version_info__[:2] > (0, 10)):
    jax.config.update('jax_enable_compilation_cache', False)
    log.warning('the persistent compilation cache (%s) is off for this multi-process CPU run: with jax %s its '
                'programs hang in cross-process collectives', cache_dir, jax.__version__)


# OS errors that are the environment's, not a bug: one line instead of a traceback.
_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


def _stop_now(signum, frame):
  raise StopRequested(signum)


log = py_logging.getLogger('dfkd_jax.main')  # not __name__: that is '__main__' under ``python -m``


def _set_up_logging(process_index: int) -> None:
  """Notes of the ``dfkd_jax`` loggers on process 0 only; warnings and errors of every logger on
  every process (see the module docstring). An explicit ``--verbosity`` is left as it is."""
  if FLAGS['verbosity'].present:
    return
  logging.set_verbosity(logging.WARNING)
  py_logging.getLogger('dfkd_jax').setLevel(py_logging.INFO if process_index == 0 else py_logging.WARNING)


def main(argv) -> None:
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}', 2)
  if FLAGS.config is None or FLAGS.workdir is None:
    _fail('--config and --workdir are required', 2)
  _set_up_logging(process_index=0)  # a multi-host process learns its index below
  _flush_denormals_on_cpu()
  try:
    # Refuse a busy workdir before the slow start-up (multi-host: process 0 locks it in the loop).
    with contextlib.nullcontext() if FLAGS.jax_distributed else lock.claim(FLAGS.workdir):
      import jax
      if FLAGS.jax_distributed:
        kw = {k: getattr(FLAGS, k) for k in ('coordinator_address', 'num_processes', 'process_id')
              if getattr(FLAGS, k) is not None}
        if FLAGS.local_device_ids:
          kw['local_device_ids'] = [int(i) for i in FLAGS.local_device_ids]
        jax.distributed.initialize(**kw)
        _set_up_logging(jax.process_index())
        _no_compilation_cache_across_cpu_processes(jax)
      from dfkd_jax.train import train_and_evaluate
      summary = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except UserError as e:
    if FLAGS.verbose:
      traceback.print_exc()
    _fail(str(e), e.exit_code)
  except OSError as e:
    if e.errno not in _ENVIRONMENT_ERRNOS:
      raise
    if FLAGS.verbose:
      traceback.print_exc()
    _fail(f'{e.strerror}: {e.filename or FLAGS.workdir}; free disk space or fix the permissions, then '
          f're-run the same command (it resumes from the last checkpoint)', 2)
  except KeyboardInterrupt:
    _fail('interrupted', 130)
  if summary.stopped_by_signal == signal.SIGINT:
    sys.exit(130)


def run() -> None:
  """The ``dfkd-jax`` console script: absl start-up (flags, logging) around ``main``."""
  # A preemption notice during start-up (config, imports, teacher, compilation) stops at once:
  # nothing new exists to save. The loop replaces this handler when training starts.
  signal.signal(signal.SIGTERM, _stop_now)
  flags.mark_flags_as_required(['config', 'workdir'])
  try:
    app.run(main, flags_parser=_parse_flags)
  except StopRequested as e:
    log.info('stopped by %s before the first training step; nothing was changed; re-run the same command '
             'to continue', signal.Signals(e.signum).name)
    sys.exit(0)


# Help flags: --helpfull lists every module's flags, the others this module's.
_HELP_FLAGS = {'--help': False, '-?': False, '--helpshort': False, '--helpfull': True}


def _parse_flags(argv):
  """absl parsing with one-line errors (unknown config keys, wrong types, missing files, bad
  ``:arg``s); ``--verbose`` adds the traceback. Help is printed here, with exit status 0 (absl's
  exits 1, and lists no flags when the program is the ``dfkd-jax`` script rather than this module)."""
  full_help = [_HELP_FLAGS[a] for a in argv[1:] if a in _HELP_FLAGS]
  if full_help:
    flags_help = FLAGS.get_help() if any(full_help) else FLAGS.module_help(FLAGS.find_module_defining_flag('workdir'))
    print(f'{__doc__}\nflags:\n{flags_help}')
    sys.exit(0)
  try:
    rest = FLAGS(argv)
    FLAGS.config.get('method')  # a config file that failed to load raises only when first read
    return rest
  except Exception as e:  # noqa: BLE001 - every parse failure becomes one line
    if any(a in ('--verbose', '--verbose=true', '--verbose=1') for a in argv):
      traceback.print_exc()
    if isinstance(e, UserError):  # from get_config (e.g. an unknown ``:arg``)
      _fail(str(e), e.exit_code)
    if isinstance(e, (AttributeError, KeyError)):  # --config.<key> the config does not have
      _fail(_unknown_key(e, argv), 2)
    if isinstance(e, OSError):  # ml_collections reports a missing/unreadable config file so
      _fail(f'cannot load the config file: {str(e).strip().splitlines()[-1].strip()}', 2)
    if isinstance(e, flags.Error):
      _fail(_one_line(e), 2)
    raise


def _unknown_key(e: Exception, argv) -> str:
  """ml_collections' nested-repr KeyError text -> 'unknown config key ...' with its flag."""
  text = str(e).replace('\\n', ' ').replace('\\', '')
  key = re.search(r"'(\w+)'", text)
  key = key.group(1) if key else _one_line(e)
  hint = re.search(r'Did you mean "([\w.]+)"', text)
  given = [a.split('=')[0] for a in argv if a.startswith('--config.') and key in a.split('=')[0]]
  return (f'unknown config key {key!r}' + (f' in {given[0]}' if given else '') +
          (f'; did you mean {hint.group(1)!r}?' if hint else '; see the config file for the keys it has'))


def _one_line(e: Exception) -> str:
  text = ' '.join(str(e).split())
  return text[:400]


if __name__ == '__main__':
  run()
