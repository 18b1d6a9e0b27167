"""Checkpoints: one Orbax ``CheckpointManager`` under ``WORKDIR/checkpoints``.

Each checkpoint holds the training state pytree (which includes its step) and the config. Saves
are asynchronous (the next steps run while the previous state is written); Orbax writes into a
temporary directory and renames it when complete, so a crash mid-save leaves the previous
checkpoints intact. A checkpoint that fails to restore is reported in one line, moved aside to
``checkpoints/corrupt/`` (never deleted) and the previous one is used.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from dfkd_jax.errors import UserError

log = logging.getLogger(__name__)


class Checkpointer:
  """Save/restore of ``(state, config)`` with fallback to the last good checkpoint."""

  def __init__(self, workdir: str, keep: int = 3, every_steps: int = 1000, async_save: bool = True):
    self.directory = epath.Path(workdir) / 'checkpoints'
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        save_interval_steps=1)  # the loop decides when to save
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, config_dict: dict, force: bool = False) -> bool:
    """Saves if ``step`` is a multiple of ``every_steps`` (or ``force``)."""
    if not force and step % self.every_steps:
      return False
    if step in self.manager.all_steps():
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_dict)), force=True)

  def restore_latest(self, abstract_state: Any) -> tuple[Any, int] | None:
    """Restores the newest checkpoint that restores cleanly into ``abstract_state`` (a pytree of
    ``jax.ShapeDtypeStruct`` with shardings); None if there is none."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
      except (ValueError, TypeError) as e:
        if _is_shape_mismatch(e):
          raise UserError(f'the checkpoint at step {step} in {self.directory} does not fit this config '
                          f'({_first_line(e)}); use a new --workdir or the config it was written with') from e
        self._quarantine(step, e)
        continue
      except Exception as e:  # noqa: BLE001 - any read failure means this checkpoint is unusable
        self._quarantine(step, e)
        continue
      return restored['state'], step
    return None

  def saved_config(self, step: int) -> dict | None:
    try:
      return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
    except Exception:  # noqa: BLE001 - an unreadable config is reported by restore_latest
      return None

  def _quarantine(self, step: int, error: Exception) -> None:
    src = self.directory / str(step)
    dst = self.directory / 'corrupt' / f'{step}.{int(time.time())}'
    log.warning('checkpoint at step %d is unreadable (%s); moved to %s, using the previous one',
                step, _first_line(error), dst)
    print(f'warning: checkpoint at step {step} is unreadable ({_first_line(error)}); '
          f'moved it to {dst} and resuming from the previous one', flush=True)
    if jax.process_index() == 0:
      dst.parent.mkdir(parents=True, exist_ok=True)
      os.rename(os.fspath(src), os.fspath(dst))
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return (text[0] if text else type(e).__name__)[:200]


def _is_shape_mismatch(e: Exception) -> bool:
  msg = str(e).lower()
  return 'shape' in msg and ('mismatch' in msg or 'does not match' in msg or 'incompatible' in msg)
