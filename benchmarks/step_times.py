r"""Benchmark: the inversion methods' synthesis inner step and student (KD) step on the reference
timing setting (WRN-40-2 teacher -> WRN-16-1 student, CIFAR-10 shapes, batch 64, random weights),
beside the CMI framework's PyTorch figures measured on this machine class
(``shared/notes/reference_cpu_timings.md``: DeepInversion 596 ms, CMI 3,456 ms per inner step with
4,096 bank negatives, Fast (Fast-Datafree, meta) 871 ms; student step 288 / 293 / 289 ms; no
reference figure for CuDFKD and NAYER).

  python benchmarks/inversion_steps.py [--methods deepinv,cmi,fast,cudfkd,nayer] [--rounds 3] [--g-steps 10] [--kd-steps 10]
      [--devices 1] [--out benchmarks/results/inversion_steps.md]

Each configuration is the method's CIFAR config (``configs/<method>_cifar.py``, CMI-framework
settings) at batch 64 with ``g_steps`` inner steps per synthesis call. The synth and kd phases are
compiled separately (as ``loop.time_phases`` does) and timed over interleaved rounds; a phase call
is divided by its step count. The CMI memory bank is marked full, so every step contrasts against
4,096 real negatives, as in the reference measurement. Warm-up epochs are off (Fast, NAYER), so the
kd phase runs. CuDFKD's synthesis call also samples the kd_steps fresh student batches of its
generator (its ``finish``), which the per-inner-step figure includes. Timings on a shared machine drift: the
load average is printed with the table.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ms per inner step / per student step of the CMI framework on this machine class (median).
REFERENCE_MS = {'deepinv': (596, 288), 'cmi': (3456, 293), 'fast': (871, 289)}


def load_config(method: str):
  spec = importlib.util.spec_from_file_location(method, os.path.join(ROOT, 'configs', f'{method}_cifar.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config('pair=wrn40_2-wrn16_1,runlocal')  # random teacher, no evaluation data


def build(method: str, batch: int, g_steps: int, kd_steps: int, devices: int):
  """(synth phase, kd phase), each a no-argument callable running one compiled call."""
  import jax
  import jax.numpy as jnp
  from dfkd_jax import methods, parallel
  config = load_config(method)
  config.batch_size = config.synthesis_batch_size = batch
  config.g_steps, config.kd_steps = g_steps, kd_steps
  config.pool.capacity = 1024
  config.warmup_epochs = 0
  if method == 'cmi':
    config.cmi.bank_size, config.cmi.negatives = 40960, 4096
  mesh = parallel.make_mesh(devices)
  job = methods.get(method).make_job(config, mesh)
  repl = parallel.replicated(mesh)
  state = jax.jit(job.init, out_shardings=jax.tree.map(lambda _: repl, jax.eval_shape(job.init, jax.random.key(0))))(
      jax.random.key(0))
  mark_full = lambda ring: dict(ring, filled=jnp.full_like(ring['filled'], ring['items'].shape[0]))
  state['pool'] = mark_full(state['pool'])
  if method == 'cmi':
    state['method'] = dict(state['method'], bank=mark_full(state['method']['bank']))
  frozen = jax.device_put(job.frozen, repl)
  key = jax.random.key(1)
  calls = []
  for _, phase in job.phases:
    compiled = jax.jit(lambda s, f, k, phase=phase: phase(s, f, k, None))
    jax.block_until_ready(compiled(state, frozen, key))  # compile and warm up
    calls.append(lambda compiled=compiled: jax.block_until_ready(compiled(state, frozen, key)))
  return calls


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--methods', default='deepinv,cmi,fast,cudfkd,nayer')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--g-steps', type=int, default=10)
  parser.add_argument('--kd-steps', type=int, default=10)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--devices', type=int, default=1, help='fake CPU devices (data parallel)')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results', 'inversion_steps.md'))
  args = parser.parse_args()
  flags = os.environ.get('XLA_FLAGS', '')
  os.environ['XLA_FLAGS'] = f'{flags} --xla_cpu_ftz=true --xla_force_host_platform_device_count={args.devices}'
  sys.path.insert(0, ROOT)
  names = args.methods.split(',')
  phases = {m: build(m, args.batch, args.g_steps, args.kd_steps, args.devices) for m in names}
  times = {m: ([], []) for m in names}
  for _ in range(args.rounds):
    for m in names:
      for i, (call, steps) in enumerate(zip(phases[m], (args.g_steps, args.kd_steps))):
        t0 = time.perf_counter()
        call()
        times[m][i].append(1000 * (time.perf_counter() - t0) / steps)
  load = os.getloadavg()
  rows = ['| method | inner step ms, dfkd_jax | inner step ms, CMI framework | speed-up | student step ms, dfkd_jax '
          '| student step ms, CMI framework | speed-up |', '|---|---|---|---|---|---|---|']
  for m in names:
    (synth, kd), (ref_synth, ref_kd) = times[m], REFERENCE_MS.get(m, (None, None))
    fmt = lambda v: f'{statistics.median(v):.0f} [{min(v):.0f}–{max(v):.0f}]'
    ref = lambda r, v: (f'{r} | {r / statistics.median(v):.2f}x' if r else '– | –')
    rows.append(f'| {m} | {fmt(synth)} | {ref(ref_synth, synth)} | {fmt(kd)} | {ref(ref_kd, kd)} |')
  text = (f'WRN-40-2 -> WRN-16-1, CIFAR-10 shapes, batch {args.batch}, {args.g_steps} inner steps per synthesis '
          f'call, {args.kd_steps} student steps per call, {args.devices} CPU device(s); median [min–max] over '
          f'{args.rounds} interleaved rounds; load average during the run {load[0]:.1f} / {load[1]:.1f} / '
          f'{load[2]:.1f} on {os.cpu_count()} cores.\n`python benchmarks/inversion_steps.py '
          f'{" ".join(sys.argv[1:])}`\n\n' + '\n'.join(rows) + '\n')
  print(text)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    f.write(text)


if __name__ == '__main__':
  main()
