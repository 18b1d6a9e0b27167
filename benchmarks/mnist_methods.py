r"""Benchmark: each generator-adversarial method on MNIST from the embedded LeNet-5 teacher,
evaluated on the real 10,000-image MNIST test set. Prints a table and writes a results file.

  python benchmarks/mnist_methods.py --mnist ../shared/data/mnist [--methods dafl,zskt] [--seeds 0,1,2]
      [--override key=value ...] [--out benchmarks/results/mnist_methods.json]

Methods: dafl, zskt, dfad, dfq (LeNet-5 teacher) and deepinv, cmi, fast, cudfkd, nayer (the
embedded BatchNorm teacher resnet8_mnist) -- any ``configs/{method}_mnist.py``. The results file
keeps every method's latest runs on every machine: benchmarking one method replaces that method's rows
measured on this machine only (``machine.machine_key``: CPU model, vector flags, cores, Python and library
versions), and the table of all of them, one section per machine, is printed and written beside it as
``.md``. Rows of different machines are never merged or averaged together. Each row records its machine,
commit, date and argv in the .json. A quick check that it runs (a few iterations, written aside):
``--methods dafl --override num_epochs=1 --override iters_per_epoch=2 --out /tmp/mnist_methods.json``.

Each run is a fresh ``python -m dfkd_jax.main`` process (so peak RSS is per run) in its own
workdir under ``benchmarks/runs/``. Columns: teacher top-1, student best/final top-1 (mean ± std
over seeds), wall time, the synthesis/KD split of training time, iterations per second, peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNRECORDED = 'not recorded (rows measured before results files named their machine)'


def run(method: str, seed: int, mnist: str, overrides: list[str], runs_dir: str) -> dict:
  workdir = os.path.join(runs_dir, f'{method}_seed{seed}_{int(time.time())}')
  cmd = [sys.executable, '-m', 'dfkd_jax.main', '--config', os.path.join(ROOT, 'configs', f'{method}_mnist.py'),
         '--workdir', workdir, f'--config.seed={seed}', f'--config.eval.data=idx:{mnist}',
         '--config.eval.split=test'] + [f'--config.{o}' for o in overrides]
  print('$', ' '.join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT)
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  summary['workdir'] = workdir
  return summary


def mean_std(values):
  values = [v for v in values if v is not None]
  if not values:
    return 'n/a'
  if len(values) == 1:
    return f'{100 * values[0]:.2f}'
  return f'{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}'


def method_row(method: str, runs: list[dict]) -> str:
  mean = lambda k: statistics.mean(r.get(k) or 0.0 for r in runs)
  stamps = ', '.join(sorted({f"{r['commit']} ({r['date_utc']})" for r in runs if r.get('commit')})) or '–'
  return (f"| {method} | {len(runs)} | {mean_std([r['teacher_top1'] for r in runs])} | "
          f"{mean_std([r['student_top1_best'] for r in runs])} | "
          f"{mean_std([r['student_top1_final'] for r in runs])} | "
          f"{mean('wall_s'):.0f} | {mean('synth_s'):.0f} | {mean('kd_s'):.0f} | "
          f"{statistics.mean(r['steps'] / r['train_s'] for r in runs):.2f} | "
          f"{max(r['peak_rss_mb'] for r in runs):.0f} | {stamps} |")


def table(results: dict) -> str:
  """One section per machine (in order of first appearance), each a table of its methods' rows."""
  header = ('| method | seeds | teacher top-1 | student best | student final | wall s | synth s | kd s | it/s | '
            'peak RSS MB | commit (date) |\n|---|---|---|---|---|---|---|---|---|---|---|')
  machines = list(dict.fromkeys(r['machine'] for runs in results.values() for r in runs))
  sections = []
  for key in machines:
    rows = [method_row(method, [r for r in runs if r['machine'] == key]) for method, runs in results.items()
            if any(r['machine'] == key for r in runs)]
    sections.append('\n'.join([f'Machine: {key}', '', header] + rows))
  return '\n\n'.join(sections)


def load(path: str) -> dict:
  """{method: [rows]} of the results file; rows written before machine records are kept under
  ``UNRECORDED`` with their method's argv."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    previous = json.load(f)
  old_argv = previous.get('argv', {})
  for method, runs in previous['results'].items():
    for r in runs:
      r.setdefault('machine', UNRECORDED)
      r.setdefault('argv', old_argv.get(method))
  return previous['results']


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--mnist', required=True, help='directory with the real MNIST t10k IDX files')
  parser.add_argument('--methods', default='dafl,zskt,dfad,dfq')
  parser.add_argument('--seeds', default='0')
  parser.add_argument('--override', action='append', default=[], help='config override key=value (all runs)')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results', 'mnist_methods.json'))
  parser.add_argument('--runs-dir', default=os.path.join(ROOT, 'benchmarks', 'runs'))
  args = parser.parse_args()
  results = load(args.out)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  for method in args.methods.split(','):
    where = machine.describe()
    key = machine.machine_key(where)
    stamp = {'machine': key, 'commit': where['commit'], 'date_utc': where['date_utc'], 'argv': sys.argv[1:]}
    runs = [dict(run(method, int(s), args.mnist, args.override, args.runs_dir), **stamp)
            for s in args.seeds.split(',')]
    results[method] = [r for r in results.get(method, []) if r['machine'] != key] + runs
    text = table(results)
    # Written after every method, so a long benchmark interrupted part-way keeps what it measured.
    with open(args.out, 'w') as f:
      json.dump({'results': results, 'table': text}, f, indent=2)
    with open(os.path.splitext(args.out)[0] + '.md', 'w') as f:
      f.write('Written by `python benchmarks/mnist_methods.py` (see its docstring); machine, commit and argv of '
              'every run in the .json.\n\n' + text + '\n')
  print(text)

if __name__ == '__main__':
  main()
