r"""Benchmark: SSD-KD's three claims (issue #21), tested on MNIST from the embedded BatchNorm teacher
resnet8_mnist, every student evaluated on the real 10,000-image MNIST test set.

  python benchmarks/ssdkd_claims.py --mnist ../shared/data/mnist [--claims budget,balance,time]
      [--seeds 0,1,2] [--budgets 500,1000,5000] [--override key=value ...] [--ssdkd-override key=value ...]
      [--out benchmarks/results/ssdkd_claims.json]

1. ``budget`` -- small synthetic vs small real: at each budget N, the LeNet-5-half student distilled
   (a) on N real digits (a class-balanced subset of the 5,000 embedded real MNIST training digits;
   plain KD from the teacher, KL at T = 20, with the synthetic runs' optimiser, batch, crops and
   number of student steps: ``engines/selected_kd.py``), (b) by SSD-KD with ``data_budget`` N,
   (c) by Fast with a pool of the last N synthesised digits (``pool.capacity`` N). Test top-1,
   ``--seeds`` seeds each.
2. ``balance`` -- the final buffer's class histogram and teacher-confidence histogram with and
   without φ (``ssdkd.phi_in_generator/buffer/kd`` off and FIFO eviction: the class quota is φ's
   diversity part at the set level), and the ablation: SSD-KD, without φ, without δ (uniform reads,
   ``ssdkd.sampler=uniform``), without both. Default budget (6,000).
3. ``time`` -- accuracy against wall time of ``configs/ssdkd_mnist.py`` and ``configs/fast_mnist.py``
   with their defaults, run one after the other in this process's benchmark run on this machine
   (evaluated every 2 synthesis calls): the wall time at which each first reaches 85% and 90%, and the
   issue's bar (per seed: SSD-KD's final >= 90% with a budget <= 6,000, its whole run in at most half
   the time Fast needs to reach that final accuracy). By default SSD-KD keeps Fast's schedule (the
   paper's is unknown); ``--ssdkd-override num_epochs=12`` (say) tests a shorter one.

Writes ``--out`` (.json: machine, argv, every run's config/summary/curve and buffer histograms, the
answers) and beside it the .md tables and PNGs (``ssdkd_claims_budget.png``, ``_balance.png``,
``_time.png``). Each run is a fresh process in its own workdir under ``benchmarks/runs/ssdkd_claims/``
(a run whose workdir already holds a finished summary is not trained again). Tables and accuracy
curves come from ``dfkd_jax.compare``; the machine from ``dfkd_jax.run.machine.describe()``.

A quick check that it runs (a few iterations, written aside; its numbers mean nothing):
``--seeds 0 --budgets 500 --override num_epochs=2 --override iters_per_epoch=2 --override warmup_epochs=1
--override kd_steps=4 --out /tmp/ssdkd_claims/ssdkd_claims.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from dfkd_jax import compare
from dfkd_jax.run import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLAIMS = ('budget', 'balance', 'time')
THRESHOLDS = (0.85, 0.90)
DEFAULT_BUDGET = 6000  # configs/ssdkd_mnist.py: 10% of MNIST's training set
# The ablation arms of claim 2: SSD-KD's overrides.
NO_PHI = ('ssdkd.phi_in_generator=False', 'ssdkd.phi_in_buffer=False', 'ssdkd.phi_in_kd=False', 'ssdkd.eviction=fifo')
NO_DELTA = ('ssdkd.sampler=uniform',)
ABLATION = {'ssdkd': (), 'ssdkd_no_phi': NO_PHI, 'ssdkd_no_delta': NO_DELTA, 'ssdkd_no_phi_no_delta': NO_PHI + NO_DELTA}


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------

def _finished(workdir: str) -> bool:
  path = os.path.join(workdir, 'summary.json')
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return bool(json.load(f).get('finished'))


def train(name: str, config_arg: str, seed: int, overrides: list[str], args) -> dict:
  """A ``python -m dfkd_jax.main`` run of ``configs/<config_arg>`` (or, for ``real_kd:N``, this
  script's real-digit distillation) in its own workdir; returns its record (``compare.Run`` and
  the buffer histograms of an SSD-KD run)."""
  workdir = os.path.join(args.runs_dir, f'{name}_seed{seed}')
  if not _finished(workdir):
    if config_arg.startswith('real_kd:'):
      cmd = [sys.executable, os.path.abspath(__file__), '--mnist', args.mnist, '--real-kd-run',
             f"{config_arg.split(':')[1]},{seed},{workdir}"] + [f'--override={o}' for o in overrides]
    else:
      cmd = [sys.executable, '-m', 'dfkd_jax.main', '--config', os.path.join(ROOT, 'configs', config_arg),
             '--workdir', workdir, f'--config.seed={seed}', f'--config.eval.data=idx:{args.mnist}',
             '--config.eval.split=test'] + [f'--config.{o}' for o in overrides]
    print('$', ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
  record = {'name': name, 'seed': seed, 'run': compare.load_run(workdir).to_record()}
  buffer_path = os.path.join(workdir, 'buffer.json')
  if os.path.exists(buffer_path):
    with open(buffer_path) as f:
      record['buffer'] = json.load(f)
  return record


def real_kd_run(budget: int, seed: int, workdir: str, mnist: str, overrides: list[str]) -> None:
  """Plain KD on ``budget`` real digits (``budget`` / 10 per class of the 5,000 embedded ones) with
  the SSD-KD MNIST config's student, optimiser, batch, crops, temperature and number of student
  steps (``--override``s applied to that config first)."""
  import ml_collections

  from dfkd_jax import losses
  from dfkd_jax.data import unlabelled
  from dfkd_jax.engines import common, selected_kd
  from dfkd_jax.methods import ssdkd
  from dfkd_jax.run import parallel, stages

  config = ssdkd.from_fast(os.path.join(ROOT, 'configs', 'fast_mnist.py'), '', data_budget=budget)
  for override in overrides:  # as --config.KEY=VALUE sets them
    key, value = override.split('=', 1)
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value.lower() in ('true', '1') if isinstance(node[leaf], bool) else type(node[leaf])(value)
  student_steps = (config.num_epochs - config.warmup_epochs) * config.iters_per_epoch * config.kd_steps
  steps_per_epoch = max(1, budget // config.batch_size)
  config.method = 'real_kd'
  config.seed = seed
  config.num_epochs = max(1, -(-student_steps // steps_per_epoch))
  config.augment = ml_collections.ConfigDict({'crop_padding': config.kd_augment.crop_padding,
                                              'flip': config.kd_augment.flip})
  config.eval.update(data=f'idx:{mnist}', split='test', every_epochs=0.0, every_steps=0, per_run=20)
  config.checkpoint.update(every_epochs=0.0, every_steps=0, per_run=2)
  mesh = parallel.make_mesh(config.mesh.num_devices)
  s = common.setup(config, mesh)
  digits = unlabelled.labelled_subset('embedded_mnist', 'all', budget // config.num_classes, config.num_classes, seed)
  images = selected_kd.to_model_resolution(digits.images, config)
  temperature = config.kd.temperature
  job = selected_kd.make_job(config, mesh, s, images, lambda s_logits, t_logits, _: (
      losses.kd_kl(s_logits, t_logits, temperature), {}))
  stages.run(job, config, workdir, mesh)


# ------------------------------------------------------------------------------------------------
# Answers
# ------------------------------------------------------------------------------------------------

def _runs(records: list[dict]) -> list[compare.Run]:
  return [compare.Run.from_record(r['run']) for r in records]


def time_to(run: compare.Run, threshold: float):
  """Wall time (s, ``time/elapsed_s`` of the evaluation) at which the student first reaches
  ``threshold``, or None."""
  for _, elapsed, value in run.curve:
    if value >= threshold:
      return elapsed
  return None


def _fmt(value, fmt='.0f') -> str:
  return '-' if value is None else format(value, fmt)


def _mean_std(values: list) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return '-'
  std = np.std(values, ddof=1) if len(values) > 1 else 0.0
  return f'{100 * np.mean(values):.2f} ± {100 * std:.2f}'


def budget_answer(records: dict, budgets: list[int]) -> tuple[str, dict]:
  rows = ['| N | real digits (plain KD) | SSD-KD synthetic | Fast synthetic |', '|---|---|---|---|']
  answer = {}
  for n in budgets:
    finals = {source: [compare.Run.from_record(r['run']).final for r in records.get(f'{source}_n{n}', [])]
              for source in ('real_kd', 'ssdkd', 'fast')}
    answer[n] = finals
    rows.append(f'| {n} | ' + ' | '.join(_mean_std(finals[source]) for source in ('real_kd', 'ssdkd', 'fast')) + ' |')
  return '\n'.join(rows), answer


def balance_answer(records: dict) -> tuple[str, dict]:
  rows = ['| arm | φ | δ | final top-1 (mean ± std) | buffer: largest class share | empty classes '
          '| mean teacher confidence |', '|---|---|---|---|---|---|---|']
  answer = {}
  for arm, overrides in ABLATION.items():
    group = records.get(arm, [])
    finals = [compare.Run.from_record(r['run']).final for r in group]
    counts = [r['buffer']['buffer_class_counts'] for r in group if 'buffer' in r]
    largest = [max(c) / max(sum(c), 1) for c in counts]
    empty = [sum(1 for n in c if n == 0) for c in counts]
    confidence = [r['buffer']['buffer_confidence_mean'] for r in group if 'buffer' in r]
    answer[arm] = {'finals': finals, 'class_counts': counts, 'confidence_mean': confidence}
    rows.append(f"| {arm} | {'off' if set(NO_PHI) <= set(overrides) else 'on'} "
                f"| {'off' if set(NO_DELTA) <= set(overrides) else 'on'} | {_mean_std(finals)} "
                f"| {_fmt(100 * np.mean(largest) if largest else None, '.1f')}% "
                f"| {_fmt(np.mean(empty) if empty else None, '.1f')} "
                f"| {_fmt(np.mean(confidence) if confidence else None, '.3f')} |")
  return '\n'.join(rows), answer


def time_answer(records: dict) -> tuple[str, dict]:
  head = '| method | seed | final | wall (s) | ' + ' | '.join(f'time to {int(100 * t)}% (s)' for t in THRESHOLDS) + ' |'
  rows = [head, '|' + '---|' * (head.count('|') - 1)]
  answer = {'runs': {}, 'bar': []}
  for method in ('ssdkd', 'fast'):
    for record in records.get(f'time_{method}', []):
      run = compare.Run.from_record(record['run'])
      times = [time_to(run, t) for t in THRESHOLDS]
      answer['runs'][f"{method}_seed{record['seed']}"] = {'final': run.final, 'wall_s': run.summary.get('wall_s'),
                                                          'time_to': dict(zip(map(str, THRESHOLDS), times))}
      rows.append(f"| {method} | {record['seed']} | {100 * run.final:.2f} | {_fmt(run.summary.get('wall_s'))} | "
                  + ' | '.join(_fmt(t) for t in times) + ' |')
  # The bar, per seed: SSD-KD final >= 90% within half the time Fast needs to reach it.
  fast_runs = {r['seed']: compare.Run.from_record(r['run']) for r in records.get('time_fast', [])}
  bar = ['', '| seed | SSD-KD final | SSD-KD wall (s) | Fast time to that accuracy (s) | bar met |',
         '|---|---|---|---|---|']
  for record in records.get('time_ssdkd', []):
    run, fast_run = compare.Run.from_record(record['run']), fast_runs.get(record['seed'])
    fast_time = time_to(fast_run, run.final) if fast_run else None
    wall = run.summary.get('wall_s')
    met = bool(run.final >= 0.90 and wall is not None and fast_time is not None and wall <= fast_time / 2)
    answer['bar'].append({'seed': record['seed'], 'ssdkd_final': run.final, 'ssdkd_wall_s': wall,
                          'fast_time_to_ssdkd_final_s': fast_time, 'met': met})
    bar.append(f"| {record['seed']} | {100 * run.final:.2f} | {_fmt(wall)} | "
               f"{_fmt(fast_time) if fast_time is not None else 'never reached'} | {'yes' if met else 'no'} |")
  return '\n'.join(rows + bar), answer


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------

def plot_budget(answer: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axis = plt.subplots(figsize=(6, 4.5))
  budgets = sorted(answer)
  for source, label in (('real_kd', 'N real digits (plain KD)'), ('ssdkd', 'SSD-KD, budget N'),
                        ('fast', 'Fast, pool of N')):
    means = [100 * np.mean(answer[n][source]) if answer[n][source] else np.nan for n in budgets]
    spread = [100 * np.std(answer[n][source]) if answer[n][source] else 0 for n in budgets]
    axis.errorbar(budgets, means, yerr=spread, marker='o', capsize=3, label=label)
  axis.set_xscale('log')
  axis.set_xlabel('images N')
  axis.set_ylabel('student final top-1 (%), real MNIST test set')
  axis.grid(alpha=0.3)
  axis.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_balance(records: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, (classes, confidence) = plt.subplots(1, 2, figsize=(12, 4.5))
  for offset, arm in ((-0.2, 'ssdkd'), (0.2, 'ssdkd_no_phi')):
    buffers = [r['buffer'] for r in records.get(arm, []) if 'buffer' in r]
    if not buffers:
      continue
    label = 'with φ' if arm == 'ssdkd' else 'without φ (FIFO)'
    counts = np.mean([b['buffer_class_counts'] for b in buffers], axis=0)
    classes.bar(np.arange(len(counts)) + offset, counts, width=0.4, label=label)
    histogram = np.mean([b['buffer_confidence_histogram'] for b in buffers], axis=0)
    edges = np.linspace(0, 1, len(histogram) + 1)
    confidence.bar(edges[:-1] + (0.5 + offset) * (edges[1] - edges[0]), histogram, width=0.4 * (edges[1] - edges[0]),
                   label=label)
  classes.set_xlabel('teacher-predicted class')
  classes.set_ylabel('final buffer entries (mean over seeds)')
  confidence.set_xlabel('teacher confidence max p_T')
  confidence.set_ylabel('final buffer entries (mean over seeds)')
  for axis in (classes, confidence):
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ------------------------------------------------------------------------------------------------

def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--mnist', required=True, help='folder of the real MNIST test set (IDX files)')
  parser.add_argument('--claims', default=','.join(CLAIMS))
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--budgets', default='500,1000,5000')
  parser.add_argument('--override', action='append', default=[], help='key=value for every run (smoke tests)')
  parser.add_argument('--ssdkd-override', action='append', default=[],
                      help='key=value for the SSD-KD runs only (e.g. a shorter schedule: num_epochs=12)')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results', 'ssdkd_claims.json'))
  parser.add_argument('--runs-dir', default=None, help='default: benchmarks/runs/ssdkd_claims (beside --out for /tmp)')
  parser.add_argument('--real-kd-run', help=argparse.SUPPRESS)  # N,SEED,WORKDIR: one real-digit run (internal)
  args = parser.parse_args()
  if args.real_kd_run:
    budget, seed, workdir = args.real_kd_run.split(',', 2)
    real_kd_run(int(budget), int(seed), workdir, args.mnist, args.override)
    return
  claims = args.claims.split(',')
  unknown = set(claims) - set(CLAIMS)
  if unknown:
    parser.error(f"unknown claims {sorted(unknown)}; choose from {', '.join(CLAIMS)}")
  seeds = [int(s) for s in args.seeds.split(',')]
  budgets = [int(n) for n in args.budgets.split(',')]
  out_dir = os.path.dirname(os.path.abspath(args.out))
  args.runs_dir = args.runs_dir or (os.path.join(ROOT, 'benchmarks', 'runs', 'ssdkd_claims')
                                    if out_dir == os.path.join(ROOT, 'benchmarks', 'results')
                                    else os.path.join(out_dir, 'runs'))
  os.makedirs(out_dir, exist_ok=True)
  where = machine.describe()
  print(machine.markdown(where), flush=True)
  base = list(args.override)
  records: dict[str, list] = {}

  def add(name, config_arg, extra=()):
    own = list(args.ssdkd_override) if config_arg.startswith('ssdkd') else []
    records[name] = [train(name, config_arg, seed, base + own + list(extra), args) for seed in seeds]

  # Claim 3's runs first: SSD-KD and Fast one after the other, on the same machine state.
  if 'time' in claims or 'balance' in claims:
    add('time_ssdkd', 'ssdkd_mnist.py', ['eval.every_steps=2'])
  if 'time' in claims:
    add('time_fast', 'fast_mnist.py', ['eval.every_steps=2'])
  if 'balance' in claims:
    records['ssdkd'] = records['time_ssdkd']
    for arm, overrides in ABLATION.items():
      if overrides:
        add(arm, 'ssdkd_mnist.py', overrides)
  if 'budget' in claims:
    for n in budgets:
      add(f'real_kd_n{n}', f'real_kd:{n}')
      add(f'ssdkd_n{n}', f'ssdkd_mnist.py:data_budget={n}')
      add(f'fast_n{n}', 'fast_mnist.py', [f'pool.capacity={n}'])

  stem = os.path.splitext(args.out)[0]
  sections = ['# SSD-KD claims on MNIST (issue #21)', '', machine.markdown(where), '',
              f"Command: `{' '.join(sys.argv)}`", '']
  answers = {}
  if 'budget' in claims:
    table, answers['budget'] = budget_answer(records, budgets)
    plot_budget(answers['budget'], f'{stem}_budget.png')
    sections += ['## 1. Small synthetic vs small real (final top-1, mean ± std over seeds)', '', table, '',
                 f'![budget]({os.path.basename(stem)}_budget.png)', '']
  if 'balance' in claims:
    table, answers['balance'] = balance_answer(records)
    plot_balance(records, f'{stem}_balance.png')
    sections += ['## 2. Balance: the final buffer with and without φ, and the φ/δ ablation', '', table, '',
                 f'![balance]({os.path.basename(stem)}_balance.png)', '']
  if 'time' in claims:
    table, answers['time'] = time_answer(records)
    compare.plot(_runs(records['time_ssdkd'] + records['time_fast']), f'{stem}_time.png')
    sections += ['## 3. Accuracy against wall time, SSD-KD and Fast', '', table, '',
                 compare.seed_table(_runs(records['time_ssdkd'] + records['time_fast']), min_seeds=1), '',
                 f'![time]({os.path.basename(stem)}_time.png)', '']
  every = {r['run']['workdir']: r for rs in records.values() for r in rs}  # claim 2 reuses claim 3's SSD-KD runs
  sections += ['## Every run', '', compare.run_table(_runs(list(every.values()))), '']
  with open(args.out, 'w') as f:
    json.dump({'machine': where, 'argv': sys.argv, 'records': records, 'answers': answers}, f, indent=1, default=str)
  with open(f'{stem}.md', 'w') as f:
    f.write('\n'.join(sections))
  print('\n'.join(sections))


if __name__ == '__main__':
  main()
