"""Checkpoints: one Orbax ``CheckpointManager`` under ``WORKDIR/checkpoints``.

Each checkpoint holds the training state pytree (which includes its step), the config, and a
fingerprint of the state (a wrapping sum of the bits of each array). Saves are asynchronous (the
next steps run while the previous state is written); Orbax writes into a temporary directory and
renames it when complete, so a crash mid-save leaves the previous checkpoints intact (the
temporary directory is removed on the next start). Older checkpoints are deleted (beyond
``keep``) only after a newer one is complete.

Restoring takes the newest checkpoint that reads back cleanly:
  - a checkpoint whose layout (array paths, shapes, dtypes) differs from the current state was
    written with another config: a UserError naming the arrays and config fields that differ;
  - one that cannot be read, or whose arrays do not match their fingerprint (a truncated,
    half-copied or damaged checkpoint), is reported in one line and moved to
    ``checkpoints/corrupt/`` (never deleted); the previous one is tried.
A save that fails (a full disk, a quota) is a ``CheckpointWriteError`` naming the step and the
checkpoint that is still intact.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from dfkd_jax.errors import UserError

# How many differing arrays / config fields a mismatch message names.
_NAMED = 4

log = logging.getLogger(__name__)


class CheckpointWriteError(UserError):
  """A checkpoint could not be written (disk full, quota, permissions)."""


class Checkpointer:
  """Save/restore of ``(state, config)`` with fallback to the last good checkpoint."""

  def __init__(self, workdir: str, keep: int = 3, every_steps: int = 1000, async_save: bool = True):
    self.directory = epath.Path(workdir) / 'checkpoints'
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # what a killed save left behind is incomplete by definition
        save_interval_steps=1)  # the loop decides when to save
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
        'state': ocp.StandardCheckpointHandler(), 'config': ocp.JsonCheckpointHandler(),
        'fingerprint': ocp.JsonCheckpointHandler()})
    self._writing = None  # the step of the save that may still be running in the background
    self._echoes = _SaveFailureEchoes()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def is_due(self, step: int, force: bool = False) -> bool:
    """Whether ``save(step, ...)`` would write: every ``every_steps`` steps (or ``force``), once."""
    return (force or step % self.every_steps == 0) and step not in self.manager.all_steps()

  def save(self, step: int, state: Any, config_dict: dict, force: bool = False) -> bool:
    """Saves if ``step`` is a multiple of ``every_steps`` (or ``force``); returns whether it did.
    Raises CheckpointWriteError if this save, or the previous one still being written, fails."""
    if not self.is_due(step, force):
      return False
    fingerprint = fingerprint_of(state)
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_dict),
          fingerprint=ocp.args.JsonSave(fingerprint)), force=True)
    except Exception as e:  # noqa: BLE001 - an earlier async save's failure surfaces here too
      earlier_failed = self._writing is not None and self._writing not in self.manager.all_steps()
      raise self._write_error(self._writing if earlier_failed else step, e) from e
    self._writing = step
    return saved

  def restore_latest(self, abstract_state: Any, config_dict: dict | None = None) -> tuple[Any, int] | None:
    """Restores the newest good checkpoint into ``abstract_state`` (a pytree of
    ``jax.ShapeDtypeStruct`` with shardings); None if there is none. ``config_dict`` (the current
    config) is compared with the saved one to name the fields that differ when the layouts do."""
    expected = _layout(abstract_state)
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        saved = _layout(self.manager.item_metadata(step)['state'])
      except Exception as e:  # noqa: BLE001 - missing or damaged metadata
        self._quarantine(step, f'its metadata cannot be read: {_first_line(e)}')
        continue
      if saved != expected:
        raise UserError(self._mismatch(step, saved, expected, config_dict))
      try:
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))['state']
        damaged = _fingerprint_mismatch(state, self._read_json(step, 'fingerprint'))
      except Exception as e:  # noqa: BLE001 - any read failure means this checkpoint is unusable
        self._quarantine(step, _first_line(e))
        continue
      if damaged:
        self._quarantine(step, f'{damaged} does not match the fingerprint saved with it')
        continue
      return state, step
    return None

  def saved_config(self, step: int) -> dict | None:
    """The config saved with checkpoint ``step`` (None if it cannot be read)."""
    try:
      return self._read_json(step, 'config')
    except Exception:  # noqa: BLE001 - only used to explain a mismatch
      return None

  def _read_json(self, step: int, item: str) -> Any:
    """A JSON item of checkpoint ``step``; None if the checkpoint has no such item (older format)."""
    if not (self.directory / str(step) / item).exists():
      return None
    return self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]

  def _mismatch(self, step: int, saved: dict, expected: dict, config_dict: dict | None) -> str:
    """One line: which arrays differ between the checkpoint and this config, and which config
    fields changed since it was written."""
    differences = [f'{path} missing now' for path in saved.keys() - expected.keys()]
    differences += [f'{path} new' for path in expected.keys() - saved.keys()]
    differences += [f'{path} {_describe(saved[path])} -> {_describe(expected[path])}'
                    for path in saved.keys() & expected.keys() if saved[path] != expected[path]]
    differences.sort(key=lambda text: ('opt_state' in text, text))  # parameters first
    arrays = ', '.join(differences[:_NAMED]) + (f' and {len(differences) - _NAMED} more'
                                                if len(differences) > _NAMED else '')
    changed = _config_changes(self.saved_config(step), config_dict)
    fields = (f'config fields changed since then: {changed}' if changed else
              'the config is unchanged, so the code that builds the state changed')
    return (f'the checkpoint at step {step} in {self.directory} does not fit this config: the state '
            f'differs ({arrays}); {fields}; resume with the original config, or use a new --workdir')

  def _quarantine(self, step: int, reason: str) -> None:
    src = self.directory / str(step)
    dst = self.directory / 'corrupt' / f'{step}.{int(time.time())}'
    log.warning('checkpoint at step %d is unreadable (%s); moved it to %s and resuming from the previous one',
                step, reason, dst)
    if jax.process_index() == 0:
      dst.parent.mkdir(parents=True, exist_ok=True)
      os.rename(os.fspath(src), os.fspath(dst))
    self.manager.reload()

  def _write_error(self, step: int, error: Exception) -> CheckpointWriteError:
    intact = [s for s in self.manager.all_steps() if s < step]
    previous = (f'the checkpoint at step {max(intact)} is intact' if intact else
                'no earlier checkpoint exists')
    return CheckpointWriteError(
        f'could not write the checkpoint at step {step} in {self.directory} ({_os_reason(error)}); '
        f'{previous}. Free disk space (or raise the quota) and re-run the same command to resume')

  def wait(self) -> None:
    """Waits for a background save; raises CheckpointWriteError if it failed."""
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001 - see save()
      raise self._write_error(self._writing, e) from e

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()
      self._echoes.remove()


class _SaveFailureEchoes(logging.Filter):
  """While a Checkpointer is open, drops the echoes of a failed save, which reaches the caller as
  one ``CheckpointWriteError`` line: Orbax's ERROR records (a traceback from each of its background
  threads) and the "Event loop is closed" errors of TensorStore callbacks that outlive Orbax's
  event loop. Everything else passes; with ``--verbosity=0`` (library notes on) Orbax's records do too."""

  def __init__(self):
    super().__init__()
    logging.getLogger('absl').addFilter(self)  # Orbax logs through absl
    self._previous_hook = sys.unraisablehook
    sys.unraisablehook = self._unraisable

  def filter(self, record: logging.LogRecord) -> bool:
    return (record.levelno < logging.ERROR or f'{os.sep}orbax{os.sep}' not in record.pathname
            or logging.getLogger().isEnabledFor(logging.INFO))

  def _unraisable(self, unraisable) -> None:
    if not (type(unraisable.exc_value) is RuntimeError and str(unraisable.exc_value) == 'Event loop is closed'):
      self._previous_hook(unraisable)

  def remove(self) -> None:
    logging.getLogger('absl').removeFilter(self)
    if sys.unraisablehook == self._unraisable:
      sys.unraisablehook = self._previous_hook


@jax.jit
def _bit_sums(state) -> Any:
  """Per array, the sum of its elements' bit patterns as uint32 (wrapping; exact in any order)."""

  def bit_sum(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
      x = x.astype(jnp.uint8)
    if x.dtype.itemsize >= 4:  # 8-byte elements become two uint32 words
      words = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
      words = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]).astype(jnp.uint32)
    return jnp.sum(words, dtype=jnp.uint32)

  return jax.tree.map(bit_sum, state)


def fingerprint_of(state: Any) -> dict[str, int]:
  """``{array path: bit sum}``: any flipped bit, truncation or zeroed block changes a sum."""
  sums = jax.device_get(_bit_sums(state))
  return {jax.tree_util.keystr(path): int(s) for path, s in jax.tree_util.tree_flatten_with_path(sums)[0]}


def _fingerprint_mismatch(state: Any, saved: dict | None) -> str | None:
  """The first array of ``state`` whose bit sum differs from ``saved`` (None if all match or the
  checkpoint predates fingerprints)."""
  if saved is None:
    return None
  for path, value in fingerprint_of(state).items():
    if saved.get(path) != value:
      return f'array {path}'
  return None


def _key_name(key) -> str:
  for attr in ('key', 'name', 'idx'):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _layout(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{'a.b.0.c': (shape, dtype)}`` of a state, abstract state or Orbax metadata tree (dicts,
  dataclasses and tuples saved as lists all give the same paths)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'.'.join(_key_name(k) for k in path): _shape_dtype(leaf) for path, leaf in flat}


def _shape_dtype(leaf) -> tuple[tuple[int, ...], str]:
  if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # saved as its key data (uint32[..., 2])
    leaf = jax.eval_shape(jax.random.key_data, leaf)
  return tuple(leaf.shape), str(leaf.dtype)


def _describe(shape_dtype: tuple) -> str:
  shape, dtype = shape_dtype
  return f"{dtype}[{','.join(map(str, shape))}]"


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f'{prefix}{key}.').items()}
  return {prefix[:-1]: tree}


def _config_changes(saved: dict | None, current: dict | None) -> str:
  """'a.b: old -> new, ...' for the config fields that differ (JSON-normalised: tuples = lists)."""
  if saved is None or current is None:
    return ''
  saved, current = _flatten(saved), _flatten(json.loads(json.dumps(current, default=str)))
  show = lambda flat, key: repr(flat[key]) if key in flat else 'absent'
  changed = sorted(k for k in saved.keys() | current.keys() if show(saved, k) != show(current, k))
  text = ', '.join(f'{k}: {show(saved, k)} -> {show(current, k)}' for k in changed[:_NAMED])
  return text + (f' and {len(changed) - _NAMED} more' if len(changed) > _NAMED else '')


def _os_reason(error: Exception) -> str:
  """'No space left on device' from an OSError or from TensorStore's text ([os_error_code='28'])."""
  if isinstance(error, OSError) and error.errno:
    return os.strerror(error.errno)
  code = re.search(r"os_error_code='(\d+)'", str(error))
  return os.strerror(int(code.group(1))) if code else _first_line(error)


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return (text[0] if text else type(e).__name__)[:200]
