"""One run per workdir: an exclusive ``flock`` on ``WORKDIR/.lock``.

The lock belongs to the open file, so the kernel releases it when the process ends in any way
(exit, crash, ``kill -9``): a dead run never leaves the workdir stuck. The file holds the owner's
pid, host and start time so that a refused run can name it; it stays behind after the run (the
lock, not the file, is what counts). Object-store workdirs (``gs://...``) cannot be locked this
way; there the launcher must start one run per workdir.

Holding is re-entrant within a process: the CLI claims the workdir before the slow start-up
(fast refusal), and ``loop.run`` claims it again for library callers.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time

from dfkd_jax.errors import UserError

LOCK_NAME = '.lock'
log = logging.getLogger(__name__)
_held: dict[str, list] = {}  # real path of the lock file -> [file descriptor, claim count]


def is_local(path) -> bool:
  """Local paths can be locked and appended to; object-store objects (``gs://...``) can only be
  rewritten. (Here, not in ``outputs``: this module is imported before jax, to lock early.)"""
  return '://' not in str(path)


def prepare(workdir: str) -> None:
  """Creates ``workdir`` if needed and checks that it can be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f'cannot create the workdir {workdir!r}: {e.strerror or e}') from e
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise UserError(f'the workdir {workdir!r} is not writable; use another --workdir or fix its permissions')


@contextlib.contextmanager
def claim(workdir: str, exclusive: bool = True):
  """Holds the workdir's lock for the ``with`` block; raises UserError naming the other process
  if another one holds it. Creates the (local) workdir first. ``exclusive=False`` only creates
  it: the other processes of a multi-host run share the lock of process 0."""
  if not is_local(workdir):
    yield
    return
  prepare(workdir)
  if not exclusive:
    yield
    return
  path = os.path.realpath(os.path.join(workdir, LOCK_NAME))
  if path in _held:
    _held[path][1] += 1
  else:
    _held[path] = [_acquire(path, workdir), 1]
  try:
    yield
  finally:
    _held[path][1] -= 1
    if not _held[path][1]:
      fd = _held.pop(path)[0]
      if fd is not None:
        os.close(fd)  # closing the file releases the lock


def _acquire(path: str, workdir: str) -> int | None:
  """The descriptor holding the lock (None where the filesystem cannot lock)."""
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # never truncated before the lock is ours
  except OSError as e:
    raise UserError(f'cannot create the lock file {path}: {e.strerror or e}') from e
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    owner = _describe_owner(fd)
    os.close(fd)
    raise UserError(f'the workdir {workdir} is in use by {owner}; wait for that run to end (or stop it), '
                    f'or use another --workdir') from None
  except OSError as e:  # a filesystem without locks (some NFS set-ups): run, but say so
    os.close(fd)
    log.warning('cannot lock %s (%s); make sure no other run uses this workdir', path, e.strerror or e)
    return None
  owner = {'pid': os.getpid(), 'host': socket.gethostname(),
           'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(owner) + '\n').encode(), 0)
  return fd


def _describe_owner(fd: int) -> str:
  """'process PID on host HOST (started ...)' from the lock file, as far as it can be read."""
  try:
    owner = json.loads(os.pread(fd, 4096, 0))
    return f"process {owner['pid']} on host {owner['host']} (started {owner['started']})"
  except (OSError, ValueError, KeyError, TypeError):  # the owner has not written it yet
    return 'another process'
