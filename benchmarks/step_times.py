r"""Benchmark: each method's synthesis step (a generator step, or an inversion method's inner
step) and student (KD) step on the reference timing setting (WRN-40-2 teacher -> WRN-16-1 student,
CIFAR-10 shapes, batch 64, random weights), beside the CMI framework's PyTorch figures of
``shared/notes/reference_cpu_timings.md`` (measured on an AVX-512 machine, not this one; medians,
ms per synthesis step / per student step): DAFL 737 / 350, ZSKT 767 / 338, DFAD 763 / 333, DFQ
725 / 321, DeepInversion 596 / 288, CMI 3,456 (4,096 bank negatives) / 293, Fast (Fast-Datafree,
meta) 871 / 289; no reference figure for CuDFKD and NAYER). ``--torch`` adds a like-for-like
figure: PyTorch implementations of the reference steps timed on this machine in the same
interleaved rounds, for the selected methods that have one: DAFL (``torch_dafl_wrn.py``),
DeepInversion, CMI and Fast (``torch_inversion_wrn.py``); ``--torch-python PATH`` runs them in
another interpreter that has torch (``torch_worker.py``), for a jax environment without it.

  python benchmarks/step_times.py [--methods dafl,zskt,dfad,dfq,deepinv,cmi,fast,cudfkd,nayer] [--rounds 3]
      [--batch 64] [--g-steps 10] [--kd-steps 10] [--devices 1] [--matmul-size 2048] [--torch]
      [--torch-python /path/to/python-with-torch]
      [--out benchmarks/results/step_times.md]

(a quick check that it runs: ``--methods dafl --batch 2 --g-steps 1 --kd-steps 1 --rounds 1 --out /tmp/x.md``).

Each configuration is the method's CIFAR config (``configs/<method>_cifar.py``, CMI-framework
settings) at batch 64 with ``g_steps`` synthesis steps per call and ``kd_steps`` student steps.
The synth and kd phases are compiled separately (as ``run.timing.time_phases`` does) and timed over
interleaved rounds; a phase call is divided by its step count. The CMI memory bank is marked full,
so every step contrasts against 4,096 real negatives, as in the reference measurement. Warm-up
epochs are off (Fast, NAYER), so the kd phase runs. CuDFKD's synthesis call also samples the
kd_steps fresh student batches of its generator (its ``finish``), which the per-step figure
includes; likewise the student step of DFAD and DFQ (fresh samples) includes a generator forward
pass, as in the reference. Timings on a shared machine drift: the load average is printed with
the table, and the machine (``machine.py``: CPU, vector flags, cores, versions, commit) above it.

Distance to the physical limit: each step's FLOPs come from XLA's cost analysis of the compiled
phase, achieved GFLOP/s = FLOPs / median step time, and % of peak divides that by this machine's
float32 matmul throughput measured in the same run (a jitted ``--matmul-size``^3 matmul; with
``--torch`` also ``torch.mm``, and the higher of the two is the peak). A convolutional step cannot
reach the matmul peak, but the % is the number to push up; with ``--torch`` the PyTorch step's %
of the same peak, for the same FLOP count, stands beside it.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys

import machine
import torch_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ms per synthesis step / per student step of the CMI framework (reference_cpu_timings.md, median).
REFERENCE_MS = {'dafl': (737, 350), 'zskt': (767, 338), 'dfad': (763, 333), 'dfq': (725, 321),
                'deepinv': (596, 288), 'cmi': (3456, 293), 'fast': (871, 289)}


def load_config(method: str):
  spec = importlib.util.spec_from_file_location(method, os.path.join(ROOT, 'configs', f'{method}_cifar.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config('pair=wrn40_2-wrn16_1,runlocal')  # random teacher, no evaluation data


def make_job(method: str, batch: int, g_steps: int, kd_steps: int, mesh):
  """The method's CIFAR job at ``batch`` with ``g_steps`` synthesis / ``kd_steps`` student steps per call."""
  from dfkd_jax import methods
  config = load_config(method)
  config.batch_size = config.synthesis_batch_size = batch
  config.g_steps, config.kd_steps = g_steps, kd_steps
  if 'pool' in config:  # the inversion methods' replay pool
    config.pool.capacity = 1024
  if 'warmup_epochs' in config:
    config.warmup_epochs = 0
  if method == 'cmi':
    config.cmi.bank_size, config.cmi.negatives = 40960, 4096
  return methods.get(method).make_job(config, mesh)


def build(method: str, batch: int, g_steps: int, kd_steps: int, devices: int):
  """(calls, flops): calls = [synth phase, kd phase], each a no-argument callable running one compiled
  call; flops = [FLOPs of one synthesis step, of one student step] from XLA's cost analysis.

  XLA counts a ``lax.scan`` body once whatever its length, and the synthesis steps are unrolled in
  some engines and scanned in others, so the FLOPs of a step are those of the same phase compiled
  at one step per call (a second compilation, never run, unless the timed calls are single steps).
  A sharded program's cost analysis is one device's share: times ``devices`` for the machine's."""
  import jax
  import jax.numpy as jnp

  from dfkd_jax.run import parallel
  from dfkd_jax.run.job import without_trace
  mesh = parallel.make_mesh(devices)
  repl = parallel.replicated(mesh)
  key = jax.random.key(1)

  def compile_phases(job, state, frozen):
    # Without the replay's trace metrics, as the training loop compiles its iteration.
    run = lambda phase: (lambda s, f, k: (lambda out: (out[0], without_trace(out[1])))(phase(s, f, k, None)))
    return [jax.jit(run(phase)).lower(state, frozen, key).compile() for phase in job.phases]

  abstract_state = lambda job: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl),
                                            jax.eval_shape(job.init, jax.random.key(0)))
  job = make_job(method, batch, g_steps, kd_steps, mesh)
  state = jax.jit(job.init, out_shardings=jax.tree.map(lambda s: s.sharding, abstract_state(job)))(
      jax.random.key(0))
  mark_full = lambda ring: dict(ring, filled=jnp.full_like(ring['filled'], ring['items'].shape[0]))
  if 'pool' in state:
    state['pool'] = mark_full(state['pool'])
  if method == 'cmi':
    state['method'] = dict(state['method'], bank=mark_full(state['method']['bank']))
  frozen = jax.device_put(job.frozen, repl)
  compiled = compile_phases(job, state, frozen)
  calls = []
  for program in compiled:
    jax.block_until_ready(program(state, frozen, key))  # warm-up
    run = lambda program=program: jax.block_until_ready(program(state, frozen, key))
    calls.append(lambda run=run: torch_worker.seconds(run))
  if (g_steps, kd_steps) != (1, 1):
    one_step = make_job(method, batch, 1, 1, mesh)
    compiled = compile_phases(one_step, abstract_state(one_step), jax.device_put(one_step.frozen, repl))
  return calls, [devices * machine.compiled_flops(program) for program in compiled]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--methods', default='dafl,zskt,dfad,dfq,deepinv,cmi,fast,cudfkd,nayer')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--g-steps', type=int, default=10)
  parser.add_argument('--kd-steps', type=int, default=10)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--devices', type=int, default=1, help='fake CPU devices (data parallel)')
  parser.add_argument('--matmul-size', type=int, default=2048, help='side of the square matmul timing the peak')
  parser.add_argument('--torch', action='store_true',
                      help='also time the PyTorch steps of torch_dafl_wrn.py (dafl) and torch_inversion_wrn.py '
                      '(deepinv, cmi, fast) in the same rounds (needs torch here, or --torch-python)')
  parser.add_argument('--torch-python', default=None,
                      help='run the PyTorch steps in this interpreter (one with torch; implies --torch): '
                      'torch_worker.py')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results', 'step_times.md'))
  args = parser.parse_args()
  args.torch = args.torch or args.torch_python is not None
  flags = os.environ.get('XLA_FLAGS', '')
  os.environ['XLA_FLAGS'] = f'{flags} --xla_cpu_ftz=true --xla_force_host_platform_device_count={args.devices}'
  sys.path.insert(0, ROOT)
  names = args.methods.split(',')
  built = {m: build(m, args.batch, args.g_steps, args.kd_steps, args.devices) for m in names}
  phases = {m: calls for m, (calls, _) in built.items()}
  flops = {m: step_flops for m, (_, step_flops) in built.items()}
  peaks = {'XLA': machine.jax_matmul_peak_gflops(args.matmul_size)}
  if args.torch:
    peaks['PyTorch'] = torch_worker.matmul_peak_gflops(args.torch_python, args.matmul_size)
    torch_info = torch_worker.info(args.torch_python)
    torch_steps = {'dafl': ('torch_dafl_wrn', 'dafl_steps'), 'deepinv': ('torch_inversion_wrn', 'deepinv_steps'),
                   'cmi': ('torch_inversion_wrn', 'cmi_steps'), 'fast': ('torch_inversion_wrn', 'fast_steps')}
    for m in [m for m in names if m in torch_steps]:
      synthesis, student = torch_worker.steps(args.torch_python, *torch_steps[m], batch=args.batch)
      phases[f'PyTorch {m}'] = [lambda f=synthesis: f(args.g_steps), lambda f=student: f(args.kd_steps)]
  peak = max(peaks.values())
  times = {m: ([], []) for m in phases}
  for _ in range(args.rounds):
    for m, calls in phases.items():
      for i, (call, steps) in enumerate(zip(calls, (args.g_steps, args.kd_steps))):
        times[m][i].append(1000 * call() / steps)
  load = os.getloadavg()
  median = statistics.median
  fmt = lambda v: f'{median(v):.0f} [{min(v):.0f}–{max(v):.0f}]'
  ref = lambda r, v: (f'{r} | {r / median(v):.2f}x' if r else '– | –')
  same_run = lambda t, v: (f'{fmt(t)} | {median(t) / median(v):.2f}x' if t else '– | –')
  gflops_per_s = lambda step_flops, v: step_flops / median(v) / 1e6  # FLOPs per ms -> GFLOP/s
  of_peak = lambda step_flops, v: f'{100 * gflops_per_s(step_flops, v) / peak:.1f}%' if v else '–'
  columns = []
  for phase in ('synthesis', 'student'):
    columns += [f'{phase} step ms, dfkd_jax', f'{phase} step ms, CMI framework', 'speed-up']
    columns += [f'{phase} step ms, PyTorch (this run)', 'speed-up'] if args.torch else []
    columns += [f'{phase} GFLOP / step', 'GFLOP/s, dfkd_jax', '% of peak, dfkd_jax']
    columns += ['% of peak, PyTorch'] if args.torch else []
  rows = ['| method | ' + ' | '.join(columns) + ' |', '|---' * (len(columns) + 1) + '|']
  for m in names:
    cells = []
    for v, reference, torch_v, step_flops in zip(times[m], REFERENCE_MS.get(m, (None, None)),
                                                 times.get(f'PyTorch {m}', (None, None)), flops[m]):
      cells += [fmt(v), ref(reference, v)] + ([same_run(torch_v, v)] if args.torch else [])
      cells += [f'{step_flops / 1e9:.2f}', f'{gflops_per_s(step_flops, v):.1f}', of_peak(step_flops, v)]
      cells += [of_peak(step_flops, torch_v)] if args.torch else []
    rows.append(f'| {m} | ' + ' | '.join(cells) + ' |')
  torch_note = (f' The PyTorch columns time `benchmarks/torch_dafl_wrn.py` (DAFL) and `benchmarks/'
                f'torch_inversion_wrn.py` (DeepInversion, CMI, Fast), PyTorch implementations of the reference '
                f'steps, on this machine in the same interleaved rounds (torch {torch_info["torch"]}, '
                f'{torch_info["threads"]} threads'
                f'{", run by --torch-python " + args.torch_python if args.torch_python else ""}); '
                f'their % of peak counts the same FLOPs (the same arithmetic) over PyTorch\'s time.'
                if args.torch else '')
  peak_note = ', '.join(f'{name} {gflops:.0f}' for name, gflops in peaks.items()) + (
      '; the higher is the peak' if len(peaks) > 1 else '')
  text = (f'{machine.markdown(machine.describe())}\n\n'
          f'WRN-40-2 -> WRN-16-1, CIFAR-10 shapes, batch {args.batch}, {args.g_steps} synthesis steps per '
          f'call, {args.kd_steps} student steps per call, {args.devices} CPU device(s); median [min–max] over '
          f'{args.rounds} interleaved rounds; load average during the run {load[0]:.1f} / {load[1]:.1f} / '
          f'{load[2]:.1f}; speed-up = the preceding column\'s time / dfkd_jax\'s. The '
          f'CMI framework columns are ../shared/notes/reference_cpu_timings.md, measured on another (AVX-512) '
          f'machine: compare with `--torch`\'s same-run PyTorch figures. GFLOP / step: XLA\'s cost analysis of '
          f'the phase compiled at one step; GFLOP/s: that over the median time; % of peak: over this machine\'s '
          f'float32 matmul peak measured in this run ({args.matmul_size}^3 matmul, median of 5, GFLOP/s: '
          f'{peak_note}).{torch_note}\n'
          f'`python benchmarks/step_times.py {" ".join(sys.argv[1:])}`\n\n' + '\n'.join(rows) + '\n')
  print(text)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    f.write(text)

if __name__ == '__main__':
  main()
