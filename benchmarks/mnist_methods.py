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
workdir under ``benchmarks/runs/``. Columns (``dfkd_jax.compare.seed_table``): teacher top-1, the
student's final, last-3-evaluations mean and best top-1 as mean ± std [worst seed, best seed], wall
time, iterations per second, peak RSS. Each row keeps its run's config, summary and accuracy curve.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import machine

from dfkd_jax import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNRECORDED = 'not recorded (rows measured before results files named their machine)'


def run(method: str, seed: int, mnist: str, overrides: list[str], runs_dir: str) -> compare.Run:
  workdir = os.path.join(runs_dir, f'{method}_seed{seed}_{int(time.time())}')
  cmd = [sys.executable, '-m', 'dfkd_jax.main', '--config', os.path.join(ROOT, 'configs', f'{method}_mnist.py'),
         '--workdir', workdir, f'--config.seed={seed}', f'--config.eval.data=idx:{mnist}',
         '--config.eval.split=test'] + [f'--config.{o}' for o in overrides]
  print('$', ' '.join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT)
  return compare.load_run(workdir)


def table(results: dict) -> str:
  """One section per machine (in order of first appearance), each one row per method: final,
  last-3 mean and best as mean ± std [worst, best seed] (``dfkd_jax.compare.seed_table``)."""
  machines = list(dict.fromkeys(r['machine'] for runs in results.values() for r in runs))
  sections = []
  for key in machines:
    runs = [compare.Run.from_record(r['run']) for rows in results.values() for r in rows if r['machine'] == key]
    stamps = sorted({f"{r['commit']} ({r['date_utc']})" for rows in results.values() for r in rows
                     if r['machine'] == key and r.get('commit')})
    sections.append('\n'.join([f'Machine: {key}', '', compare.seed_table(runs, min_seeds=1), '',
                               f"Commits: {', '.join(stamps) or 'not recorded'}"]))
  return '\n\n'.join(sections)


def _legacy(method: str, row: dict) -> dict:
  """A row written before rows kept their run (a summary only) as a current row."""
  summary = {k: v for k, v in row.items() if k not in ('machine', 'commit', 'date_utc', 'argv', 'workdir')}
  run = compare.Run(row.get('workdir', ''), {'method': method, 'seed': row.get('seed', '?')}, summary, [], 'top1')
  return {'machine': row.get('machine', UNRECORDED), 'commit': row.get('commit'), 'date_utc': row.get('date_utc'),
          'argv': row.get('argv'), 'run': run.to_record()}


def load(path: str) -> dict:
  """{method: [rows]} of the results file (rows of earlier formats converted)."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    previous = json.load(f)
  old_argv = previous.get('argv', {})
  return {method: [r if 'run' in r else _legacy(method, dict(r, argv=r.get('argv', old_argv.get(method))))
                   for r in rows] for method, rows in previous['results'].items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--mnist', required=True, help='directory with the real MNIST t10k IDX files')
  parser.add_argument('--methods', default='dafl,zskt,dfad,dfq')
  parser.add_argument('--seeds', default='0')
  parser.add_argument('--override', action='append', default=[], help='config override key=value (all runs)')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results', 'mnist_methods.json'))
  parser.add_argument('--runs-dir', default=os.path.join(ROOT, 'benchmarks', 'runs'))
  parser.add_argument('--png', help="also plot each method's runs (accuracy vs step and wall time): PNG_<method>.png")
  args = parser.parse_args()
  results = load(args.out)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  for method in args.methods.split(','):
    where = machine.describe()
    key = machine.machine_key(where)
    stamp = {'machine': key, 'commit': where['commit'], 'date_utc': where['date_utc'], 'argv': sys.argv[1:]}
    runs = [run(method, int(s), args.mnist, args.override, args.runs_dir) for s in args.seeds.split(',')]
    if args.png:
      compare.plot(runs, os.path.splitext(args.png)[0] + f'_{method}.png')
    results[method] = [r for r in results.get(method, []) if r['machine'] != key] + [
        dict(stamp, run=r.to_record()) for r in runs]
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
