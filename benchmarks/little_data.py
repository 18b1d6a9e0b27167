r"""Benchmark: the little-data methods on MNIST (PU compression, DFND; DAFL from the same teacher for
comparison) and DFSR on held-out photographs. Prints a table and writes a results file.

  python benchmarks/little_data.py --mnist ../shared/data/mnist [--runs pu,dfnd,dafl,dfsr] [--seed 0]
      [--override key=value ...] [--out benchmarks/results/little_data.json]

A quick check that it runs (a few iterations, written aside): ``--runs dafl --override num_epochs=1
--override iters_per_epoch=2 --out /tmp/little_data.json``. The machine (``machine.py``) is printed above
the table and stored in the .json.

Each run is a fresh ``python -m dfkd_jax.main`` process in its own workdir under ``benchmarks/runs/``.
MNIST runs are evaluated on the real 10,000-image test set; their rows give the selection (selected
images, how many are real digits) and the student's best/final top-1. ``dfsr`` first trains the local
VDSR teacher (``configs/teacher_vdsr_local.py``), then distils (``configs/dfsr_vdsr_local.py``); its row
gives bicubic, teacher and student PSNR on the held-out photographs, averaged over x2, x3, x4.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(config: str, workdir: str, overrides: list[str]) -> dict:
  cmd = [sys.executable, '-m', 'dfkd_jax.main', '--config', os.path.join(ROOT, 'configs', config),
         '--workdir', workdir] + [f'--config.{o}' for o in overrides]
  print('$', ' '.join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT)
  out = {'workdir': workdir}
  for name in ('summary', 'selection', 'sr_eval'):
    path = os.path.join(workdir, f'{name}.json')
    if os.path.exists(path):
      with open(path) as f:
        out[name] = json.load(f)
  return out


def mnist_row(name: str, r: dict) -> str:
  s, sel = r['summary'], r.get('selection')
  picked = f"{sel['selected']} ({sel['selected_true_digits']} digits, {100 * sel['precision']:.1f}%)" if sel else '–'
  return (f"| {name} | {picked} | {100 * s['teacher_top1']:.2f} | {100 * s['student_top1_best']:.2f} | "
          f"{100 * s['student_top1_final']:.2f} | {s['wall_s']:.0f} |")


def table(results: dict) -> str:
  rows = ['| MNIST method | selected (real digits, precision) | teacher top-1 | student best | student final '
          '| wall s |', '|---|---|---|---|---|---|']
  rows += [mnist_row(name, r) for name, r in results.items() if name != 'dfsr']
  if 'dfsr' in results:
    e = results['dfsr']['sr_eval']
    rows += ['', '| DFSR (held-out photos) | bicubic PSNR | teacher PSNR | student PSNR | student − bicubic | '
                 'bicubic / teacher / student SSIM |', '|---|---|---|---|---|---|']
    for scale in ('x2/', 'x3/', 'x4/', ''):
      v = {k: e[scale + k] for k in ('bicubic_psnr', 'teacher_psnr', 'student_psnr', 'student_minus_bicubic_psnr',
                                     'bicubic_ssim', 'teacher_ssim', 'student_ssim')}
      rows.append(f"| {scale.rstrip('/') or 'mean'} | {v['bicubic_psnr']:.2f} | {v['teacher_psnr']:.2f} | "
                  f"{v['student_psnr']:.2f} | {v['student_minus_bicubic_psnr']:+.2f} | "
                  f"{v['bicubic_ssim']:.4f} / {v['teacher_ssim']:.4f} / {v['student_ssim']:.4f} |")
  return '\n'.join(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--mnist', required=True, help='directory with the real MNIST t10k IDX files')
  parser.add_argument('--runs', default='pu,dfnd,dafl,dfsr')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--override', action='append', default=[],
                      help='config override key=value (every distillation run; not the DFSR teacher)')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results', 'little_data.json'))
  parser.add_argument('--runs-dir', default=os.path.join(ROOT, 'benchmarks', 'runs'))
  args = parser.parse_args()
  stamp = int(time.time())
  where = machine.describe()
  mnist_eval = [f'eval.data=idx:{os.path.abspath(args.mnist)}', 'eval.split=test', f'seed={args.seed}']
  results = {}
  for name in args.runs.split(','):
    workdir = os.path.join(args.runs_dir, f'{name}_seed{args.seed}_{stamp}')
    if name == 'dfsr':
      teacher = run('teacher_vdsr_local.py', workdir + '_teacher', [f'seed={args.seed}'])
      results[name] = run('dfsr_vdsr_local.py', workdir, [f'seed={args.seed}',
                                                          f"teacher.checkpoint={teacher['workdir']}/model"]
                          + args.override)
    else:
      results[name] = run(f'{name}_mnist.py', workdir, mnist_eval + args.override)
  text = machine.markdown(where) + '\n\n' + table(results)
  print(text)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'machine': where, 'results': results, 'table': text, 'argv': sys.argv[1:]}, f, indent=2)


if __name__ == '__main__':
  main()
