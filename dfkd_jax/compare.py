"""Command line: ``python -m dfkd_jax.compare W1 W2 ... [--png FILE] [--metric top1]``.

Compares finished or running training workdirs (paths or globs). Prints one table row per run --
method, seed, teacher, the student's best, final and last-3-evaluations mean, wall time, outer
iterations per second, the synthesis/distillation split of the training time, peak RSS and the
machine -- and, for runs whose configs differ only in the seed, one row per config with mean ± std,
the worst and the best seed of final, last-3 mean and best. Final accuracy leads: a user ships the final
student, not a hand-picked evaluation. ``--png`` writes the student's accuracy against step and
against wall time, one line per run, or per config the mean over seeds with a min-max band when
seeds repeat.

A folder without ``config.json`` and ``metrics.jsonl`` is a one-line error (exit 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys

import numpy as np

from dfkd_jax.errors import UserError
from dfkd_jax.run import outputs

PROG = 'python -m dfkd_jax.compare'
# Config fields that do not make two runs different configurations.
RUN_ONLY_FIELDS = ('seed', 'data_dir')


@dataclasses.dataclass
class Run:
  workdir: str
  config: dict
  summary: dict               # summary.json ({} while the run is unfinished)
  curve: list                 # [(step, elapsed_s, value)] of the student's evaluations
  metric: str

  @property
  def values(self) -> list[float]:
    return [v for _, _, v in self.curve]

  def _summarised(self, name: str, from_curve):
    """``summary.json``'s ``student_<metric>_<name>``, else computed from the curve (a running run)."""
    value = self.summary.get(f'student_{self.metric}_{name}')
    return value if value is not None else (from_curve(self.values) if self.values else None)

  @property
  def best(self):
    return self._summarised('best', max)

  @property
  def final(self):
    return self._summarised('final', lambda v: v[-1])

  @property
  def last3_mean(self):
    return self._summarised('last3_mean', lambda v: float(np.mean(v[-3:])))

  def to_record(self) -> dict:
    """What a results file keeps of the run (``from_record`` rebuilds it)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_record(cls, record: dict) -> 'Run':
    return cls(record['workdir'], record['config'], record['summary'], [tuple(p) for p in record['curve']],
               record.get('metric', 'top1'))

  @property
  def config_key(self) -> str:
    """The config without the fields that only name a run (seed), as a canonical string."""
    return json.dumps({k: v for k, v in self.config.items() if k not in RUN_ONLY_FIELDS}, sort_keys=True)

  @property
  def label(self) -> str:
    return f"{self.config.get('method', '?')} seed {self.config.get('seed', '?')} ({os.path.basename(self.workdir)})"


def expand(patterns: list[str]) -> list[str]:
  """Workdirs from paths and globs, in the order given (each once)."""
  found = []
  for pattern in patterns:
    matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not matches:
      raise UserError(f'{pattern} matches no workdir')
    found += [m for m in matches if m not in found]
  return found


def load_run(workdir: str, metric: str = 'top1') -> Run:
  """A training workdir's config, summary and evaluation curve."""
  if not os.path.isfile(os.path.join(workdir, 'config.json')):
    raise UserError(f'{workdir} is not a training workdir (no config.json)')
  records = outputs.read_metrics(workdir)
  if not records:
    raise UserError(f'{workdir} is not a training workdir with metrics (no metrics.jsonl records)')
  name = f'eval/student_{metric}'
  curve = [(r['step'], r.get('time/elapsed_s', float('nan')), r[name]) for r in records if name in r]
  summary_path = os.path.join(workdir, 'summary.json')
  summary = outputs.read_json(summary_path) if os.path.isfile(summary_path) else {}
  return Run(workdir, outputs.read_json(os.path.join(workdir, 'config.json')), summary, curve, metric)


def _percent(value) -> str:
  return '-' if value is None else f'{100 * value:.2f}'


def _machine(summary: dict) -> str:
  where = summary.get('machine')
  if not where:
    return '-'
  flags = '+'.join(f for f in where.get('vector_flags', []) if f in ('avx2', 'avx512f', 'amx_tile')) or 'no-avx2'
  return f"{where.get('cpu', '?')} ({flags}), jax {where.get('jax', '?')}"


def _iterations_per_s(run: Run):
  steps, train_s = run.summary.get('steps'), run.summary.get('train_s')
  if steps and train_s:
    return steps / train_s
  return None


def _split(run: Run) -> str:
  synth, kd = run.summary.get('synth_s'), run.summary.get('kd_s')
  if synth is None or kd is None or synth + kd <= 0:
    return '-'
  return f'{100 * synth / (synth + kd):.0f}/{100 * kd / (synth + kd):.0f}'


def _teacher(run: Run) -> str:
  teacher = run.config.get('teacher') or {}
  return os.path.basename(str(teacher.get('checkpoint', '-'))) if isinstance(teacher, dict) else str(teacher)


def run_table(runs: list[Run]) -> str:
  """One markdown row per run."""
  head = ('| method | seed | teacher | final | last-3 mean | best | wall (s) | it/s | synth/kd % | peak RSS (MB) '
          '| machine | workdir |')
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for run in runs:
    wall = run.summary.get('wall_s', run.curve[-1][1] if run.curve else None)
    ips = _iterations_per_s(run)
    rss = run.summary.get('peak_rss_mb')
    lines.append(
        f"| {run.config.get('method', '-')} | {run.config.get('seed', '-')} | {_teacher(run)} "
        f"| {_percent(run.final)} | {_percent(run.last3_mean)} | {_percent(run.best)} "
        f"| {'-' if wall is None else f'{wall:.0f}'} | {'-' if ips is None else f'{ips:.2f}'} | {_split(run)} "
        f"| {'-' if rss is None else f'{rss:.0f}'} | {_machine(run.summary)} | {run.workdir} |")
  return '\n'.join(lines)


def groups(runs: list[Run]) -> list[list[Run]]:
  """Runs grouped by config (seed aside), in order of first appearance."""
  by_key: dict[str, list[Run]] = {}
  for run in runs:
    by_key.setdefault(run.config_key, []).append(run)
  return list(by_key.values())


def _stats(values: list) -> str:
  """'mean ± std [min, max]' in percent (the sample standard deviation; the min is the worst seed)."""
  values = [v for v in values if v is not None]
  if not values:
    return '-'
  std = np.std(values, ddof=1) if len(values) > 1 else 0.0
  return (f'{100 * np.mean(values):.2f} ± {100 * std:.2f} '
          f'[{100 * min(values):.2f}, {100 * max(values):.2f}]')


def _mean(values: list, fmt: str) -> str:
  values = [v for v in values if v is not None]
  return format(float(np.mean(values)), fmt) if values else '-'


def seed_table(runs: list[Run], min_seeds: int = 2) -> str:
  """One markdown row per config run with at least ``min_seeds`` seeds: final, last-3 mean and best
  as mean ± std [worst seed, best seed], the teacher's score, and the means of wall time, iterations
  per second and peak RSS."""
  rows = [g for g in groups(runs) if len(g) >= min_seeds]
  if not rows:
    return ''
  lines = ['| method | seeds | teacher | final | last-3 mean | best | wall (s) | it/s | peak RSS (MB) |',
           '|---|---|---|---|---|---|---|---|---|']
  for group in rows:
    teacher = [r.summary.get(f'teacher_{r.metric}') for r in group]
    lines.append(f"| {group[0].config.get('method', '-')} | {', '.join(str(r.config.get('seed')) for r in group)} "
                 f"| {_mean([100 * t if t is not None else None for t in teacher], '.2f')} "
                 f"| {_stats([r.final for r in group])} | {_stats([r.last3_mean for r in group])} "
                 f"| {_stats([r.best for r in group])} | {_mean([r.summary.get('wall_s') for r in group], '.0f')} "
                 f"| {_mean([_iterations_per_s(r) for r in group], '.2f')} "
                 f"| {_mean([r.summary.get('peak_rss_mb') for r in group], '.0f')} |")
  return '\n'.join(lines)


def plot(runs: list[Run], path: str) -> None:
  """The student's accuracy against step and against wall time (PNG at ``path``): one line per run,
  or the mean over seeds with a min-max band for a config run with several seeds."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for group in groups(runs):
    label = group[0].label if len(group) == 1 else f"{group[0].config.get('method', '?')} ({len(group)} seeds)"
    for axis, column in zip(axes, (0, 1)):
      if len(group) == 1:
        curve = np.array([(point[column], point[2]) for point in group[0].curve])
        if len(curve):
          axis.plot(curve[:, 0], 100 * curve[:, 1], label=label)
        continue
      # Seeds share the evaluation steps; wall times differ, so the time axis is their mean.
      length = min(len(r.curve) for r in group)
      if not length:
        continue
      x = np.mean([[point[column] for point in r.curve[:length]] for r in group], axis=0)
      y = 100 * np.array([[point[2] for point in r.curve[:length]] for r in group])
      line, = axis.plot(x, y.mean(0), label=label)
      axis.fill_between(x, y.min(0), y.max(0), alpha=0.2, color=line.get_color())
  for axis, xlabel in zip(axes, ('step (outer iteration)', 'wall time (s)')):
    axis.set_xlabel(xlabel)
    axis.set_ylabel(f'student {runs[0].metric} (%)')
    axis.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[1])
  parser.add_argument('workdirs', nargs='+', metavar='WORKDIR', help='training workdirs, or globs')
  parser.add_argument('--png', help='write the accuracy curves to this PNG file')
  parser.add_argument('--metric', default='top1', help="the evaluator's headline metric (default top1)")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
  try:
    runs = [load_run(w, args.metric) for w in expand(args.workdirs)]
    text = run_table(runs)
    seeds = seed_table(runs)
    print(text + ('\n\n' + seeds if seeds else ''), flush=True)
    if args.png:
      plot(runs, args.png)
      print(f'wrote {args.png}')
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return e.exit_code
  return 0


if __name__ == '__main__':
  sys.exit(main())
