"""Run outputs, a contract other tools rely on. In the workdir:

- ``config.json``: the resolved config;
- ``metrics.jsonl``: one JSON object per logged step, ``{"step": s, "<group>/<name>": value, ...}``;
- ``summary.json``: written at the end (``teacher_top1``, ``student_top1_best``,
  ``student_top1_final``, ``steps``, ``wall_s``, ``peak_rss_mb``, ...);
- ``phase_fractions.json``: ``{phase: fraction of an iteration's time}``, measured when the run
  first starts (``run.timing``) and read back when it resumes;
- ``samples/step_XXXXXXX.png``: grids of synthetic samples.

Only process 0 writes. The workdir may be local or in an object store (``gs://bucket/run``, through
``etils.epath``; ``pip install gcsfs`` where TensorFlow is not installed). A progress line with rate
and ETA goes to the terminal; TensorBoard is an optional mirror (``report.tensorboard=True``, needs
the ``tensorboard`` extra).
"""
from __future__ import annotations

import io
import json
import math
import resource
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from dfkd_jax.run.lock import is_local


def is_writer() -> bool:
  return jax.process_index() == 0


def peak_rss_mb() -> float:
  """Peak resident memory of this process (Linux ru_maxrss is in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _jsonable(v):
  if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, 'dtype'):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()
  return v


def _write_text(path: epath.Path, text: str) -> None:
  """Writes atomically (a crash never leaves a half-written file): to a temporary file first, then
  renamed over ``path``. (Object-store uploads are atomic anyway.)"""
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(text)
  tmp.replace(path)


def write_json(path, obj: Any) -> None:
  _write_text(epath.Path(path), json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + '\n')


def read_json(path) -> Any:
  return json.loads(epath.Path(path).read_text())


class MetricWriter:
  """Appends JSON lines to ``metrics.jsonl`` (process 0 only), mirrors to TensorBoard if asked.

  An object store cannot append, so there the file is rewritten whole at each write (it holds a
  line per logged step: small).
  """

  def __init__(self, workdir, tensorboard: bool = False):
    self.active = is_writer()
    self.path = epath.Path(workdir) / 'metrics.jsonl'
    self._lines = None  # every line of the file, when it has to be rewritten to add one
    if self.active and not is_local(self.path):
      self._lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
    self._tb = None
    if self.active and tensorboard:
      from tensorboardX import (
        SummaryWriter,  # optional extra: pip install '.[tensorboard]'
      )
      self._tb = SummaryWriter(str(epath.Path(workdir) / 'tensorboard'))

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.active:
      return
    record = {'step': int(step), **{k: _jsonable(v) for k, v in scalars.items()}}
    line = json.dumps(record) + '\n'
    if self._lines is None:
      with self.path.open('a') as f:
        f.write(line)
    else:
      self._lines.append(line)
      _write_text(self.path, ''.join(self._lines))
    if self._tb is not None:
      for k, v in record.items():
        if k != 'step' and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir) -> list[dict]:
  """The records of ``WORKDIR/metrics.jsonl`` (none if there is no file), skipping a line cut by a
  crash mid-write."""
  path = epath.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except ValueError:
      continue
  return records


PHASE_FRACTIONS = 'phase_fractions.json'


def read_phase_fractions(workdir) -> dict[str, float] | None:
  """The phase fractions an earlier start of this run measured (None if there are none)."""
  path = epath.Path(workdir) / PHASE_FRACTIONS
  return read_json(path) if path.exists() else None


def write_phase_fractions(workdir, fractions: Mapping[str, float]) -> None:
  if is_writer():
    write_json(epath.Path(workdir) / PHASE_FRACTIONS, dict(fractions))


def read_history(workdir) -> dict:
  """What earlier runs on this workdir logged: accuracies, teacher accuracy, elapsed time."""
  hist = {'student_top1': [], 'elapsed_s': 0.0, 'train_s': 0.0}
  for rec in read_metrics(workdir):
    if 'eval/student_top1' in rec:
      hist['student_top1'].append(rec['eval/student_top1'])
    if 'eval/teacher_top1' in rec:
      hist['teacher_top1'] = rec['eval/teacher_top1']
    if 'time/elapsed_s' in rec:
      hist['elapsed_s'] = rec['time/elapsed_s']
    if 'time/train_s' in rec:
      hist['train_s'] = rec['time/train_s']
  return hist


def truncate_metrics(workdir, last_step: int) -> None:
  """Drops records after ``last_step`` (written by a run that died after its last checkpoint),
  so a resumed run's ``metrics.jsonl`` reads as one uninterrupted run."""
  path = epath.Path(workdir) / 'metrics.jsonl'
  if not (is_writer() and path.exists()):
    return
  lines = path.read_text().splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      if json.loads(line)['step'] <= last_step:
        kept.append(line)
    except (ValueError, KeyError):
      continue  # a line cut by a crash mid-write
  if len(kept) != len(lines):
    _write_text(path, ''.join(kept))


class Progress:
  """A one-line progress indicator with rate and ETA (a bar on a terminal, plain lines in logs)."""

  def __init__(self, total: int, start: int = 0, stream=None, min_interval_s: float = 0.5):
    self.total, self.start = total, start
    self.stream = stream or sys.stderr
    self.tty = self.stream.isatty()
    self.t0 = time.monotonic()
    self.last = 0.0
    self.min_interval_s = min_interval_s if self.tty else 30.0
    self.active = is_writer()

  def update(self, step: int, info: str = '', force: bool = False) -> None:
    now = time.monotonic()
    if not self.active or (not force and now - self.last < self.min_interval_s):
      return
    self.last = now
    done = step - self.start
    rate = done / max(now - self.t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else math.inf
    frac = step / max(self.total, 1)
    bar = '#' * int(frac * 24)
    line = (f'[{bar:<24}] {step}/{self.total} {rate:.2f} it/s '
            f'ETA {_fmt_s(eta)} {info}')
    if self.tty:
      self.stream.write('\r' + line[:160].ljust(160))
    else:
      self.stream.write(line + '\n')
    self.stream.flush()

  def close(self):
    if self.active and self.tty:
      self.stream.write('\n')
      self.stream.flush()


def _fmt_s(s: float) -> str:
  if not math.isfinite(s):
    return '--:--'
  s = int(s)
  return f'{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}' if s >= 3600 else f'{s // 60:02d}:{s % 60:02d}'


def save_image_grid(path, images: np.ndarray, ncol: int = 8) -> None:
  """Saves NHWC images in [0, 1] as one PNG grid (1 or 3 channels)."""
  from PIL import Image
  images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
  n, h, w, c = images.shape
  ncol = min(ncol, n)
  nrow = math.ceil(n / ncol)
  grid = np.ones((nrow * (h + 2) + 2, ncol * (w + 2) + 2, c), np.float32)
  for i in range(n):
    r, q = divmod(i, ncol)
    grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = images[i]
  pixels = (grid * 255).round().astype(np.uint8)
  png = io.BytesIO()
  Image.fromarray(pixels[..., 0] if c == 1 else pixels).save(png, format='PNG')
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(png.getvalue())
