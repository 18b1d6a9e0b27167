r"""Benchmark: DAFL MNIST iterations per second versus the number of (fake) CPU devices.

One DAFL iteration (``configs/dafl_mnist.py``: generator step + student step, LeNet-5 ->
LeNet-5-half) runs data-parallel on a mesh of 1, 2, 4, ... devices; on a CPU the devices are
``--xla_force_host_platform_device_count`` slices of the same cores, each running its share of
the batch on its own thread. The device count is fixed when JAX starts, so each measurement is a
subprocess; the counts are interleaved round by round (rotating their order) so that a shared
machine's drift hits them alike, and the table reports the median over rounds. Compilation is
paid once per count: a persistent compilation cache serves the later rounds.

  python benchmarks/devices.py [--devices 1,2,4] [--batches 64,256] [--rounds 3] [--iters 10]

Prints the machine (``machine.py``) and a Markdown table (devices, ms per iteration, iterations per
second, speed-up over 1 device). A quick check that it runs: ``--devices 1,2 --batches 4 --rounds 1 --iters 1``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(batch: int, iters: int) -> float:
  """Milliseconds per DAFL iteration on a mesh of every device of this process."""
  sys.path.insert(0, ROOT)
  import jax

  from dfkd_jax import methods
  from dfkd_jax.run import parallel
  from dfkd_jax.run.job import compile_job, frozen_sharding
  spec = importlib.util.spec_from_file_location('dafl_mnist', os.path.join(ROOT, 'configs', 'dafl_mnist.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.batch_size = batch
  mesh = parallel.make_mesh(-1)
  job = methods.get(config.method).make_job(config, mesh)
  init, iteration, _ = compile_job(job, mesh, jax.random.key(0), mesh_config=config.mesh)
  state = init(jax.random.key(0))
  frozen = jax.device_put(job.frozen, frozen_sharding(job, mesh, config.mesh))
  key = jax.random.key(1)
  for _ in range(2):  # compilation, then one more warm-up step
    state, metrics = iteration(state, frozen, key, None)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(iters):
    state, metrics = iteration(state, frozen, key, None)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - t0) / iters * 1000


def run_worker(devices: int, batch: int, iters: int, cache_dir: str) -> float:
  """``measure`` in a fresh process with ``devices`` CPU devices (flags as the CLI sets them)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} --xla_cpu_ftz=true')
  out = subprocess.run([sys.executable, __file__, '--worker', '--batches', str(batch), '--iters', str(iters)],
                       env=env, capture_output=True, text=True, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])['ms']


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--devices', default='1,2,4', help='device counts to compare')
  parser.add_argument('--batches', default='64,256', help='global batch sizes (multiples of every count)')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--iters', type=int, default=10, help='timed iterations per measurement')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps({'ms': measure(int(args.batches), args.iters)}))
    return
  counts = [int(d) for d in args.devices.split(',')]
  print(machine.markdown(machine.describe()) + '\n')
  print(f'Median of {args.rounds} interleaved rounds of {args.iters} iterations\n')
  print('| batch | devices | ms / iteration | iterations / s | speed-up over 1 device | rounds (ms) |\n'
        '|---|---|---|---|---|---|')
  with tempfile.TemporaryDirectory() as cache_dir:
    for batch in (int(b) for b in args.batches.split(',')):
      times = {n: [] for n in counts}
      for r in range(args.rounds):
        for n in counts[r % len(counts):] + counts[:r % len(counts)]:
          times[n].append(run_worker(n, batch, args.iters, cache_dir))
      base = statistics.median(times[counts[0]]) if counts[0] == 1 else None
      for n in counts:
        ms = statistics.median(times[n])
        speedup = f'{base / ms:.2f}' if base else ''
        rounds = ', '.join(f'{t:.0f}' for t in times[n])
        print(f'| {batch} | {n} | {ms:.0f} | {1000 / ms:.2f} | {speedup} | {rounds} |', flush=True)


if __name__ == '__main__':
  main()
