r"""Benchmark: one convolution layer, dfkd_jax (``layers.conv2d`` under ``jax.jit``, XLA:CPU) versus
PyTorch (NCHW and channels_last), for every distinct 3x3 conv shape of WRN-40-2 (teacher) and
WRN-16-1 (student) at batch 64: the forward pass, and the backward pass alone for the input
gradient (what the teacher's backward does in a generator step) and for the input and kernel
gradients (what a student step's backward does). Prints
milliseconds (median over interleaved rounds) and the ratio dfkd_jax / best PyTorch, the sum over
the layers of each network, and the same passes through the whole networks (the teacher in eval
mode: forward, and forward + input gradient; the student in train mode: forward + parameter
gradients), which add BatchNorm, ReLU and the rest. Needs torch (``pip install -e '.[torch]'``).

  python benchmarks/conv_vs_torch.py [--rounds 5] [--reps 5] [--batch 64] [--out benchmarks/results/conv_vs_torch.md]

(a quick check that it runs: ``--batch 2 --rounds 1 --reps 1 --out /tmp/x.md``).

Why it exists: at WRN-40-2 -> WRN-16-1, batch 64, the step times (``step_times.py --torch``) are
almost all convolution time, so this table says how much of the gap to PyTorch the convolution
kernels themselves account for.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import machine  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dfkd_jax.models import layers, registry  # noqa: E402

sys.path[:0] = [os.path.join(ROOT, 'tests'), os.path.join(ROOT, 'tests', 'fixtures')]
from torch_classifiers import WideResNet  # noqa: E402  (the tests' PyTorch WRN, as step_times --torch)

# (size, c_in, c_out, stride): the 3x3 convs, padding 1, with how many times each network has them
# (the 1x1 shortcut convs, 2-3% of the FLOPs, are left out).
WRN40_2 = {(32, 3, 16, 1): 1, (32, 16, 32, 1): 1, (32, 32, 32, 1): 11, (32, 32, 64, 2): 1, (16, 64, 64, 1): 11,
           (16, 64, 128, 2): 1, (8, 128, 128, 1): 11}
WRN16_1 = {(32, 3, 16, 1): 1, (32, 16, 16, 1): 4, (32, 16, 32, 2): 1, (16, 32, 32, 1): 3, (16, 32, 64, 2): 1,
           (8, 64, 64, 1): 3}


def _median_ms(fn, reps):
  fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return 1000 * statistics.median(times)


def _jax_fns(x, k, stride):
  fwd = jax.jit(lambda x, k: layers.conv2d(x, k, stride, 1))
  dy = jax.numpy.ones_like(fwd(x, k))
  dx = jax.jit(lambda x, k, dy: jax.vjp(lambda x_: layers.conv2d(x_, k, stride, 1), x)[1](dy)[0])
  both = jax.jit(lambda x, k, dy: jax.vjp(lambda x_, k_: layers.conv2d(x_, k_, stride, 1), x, k)[1](dy))
  return {'forward': lambda: jax.block_until_ready(fwd(x, k)),
          'input grad': lambda: jax.block_until_ready(dx(x, k, dy)),
          'input+kernel grad': lambda: jax.block_until_ready(both(x, k, dy))}


def _torch_fns(x, k, stride, channels_last):
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
  k = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous(memory_format=fmt)
  conv = lambda x_, k_: torch.nn.functional.conv2d(x_, k_, stride=stride, padding=1)
  with torch.no_grad():
    dy = torch.ones_like(conv(x, k))

  def forward():
    with torch.no_grad():
      conv(x, k)

  # Backward passes alone, like the jitted VJPs (whose unused forward XLA removes): each graph is
  # built once and kept.
  xg, kg = x.detach().requires_grad_(True), k.detach().requires_grad_(True)
  y_input, y_both = conv(xg, k), conv(xg, kg)
  input_grad = lambda: torch.autograd.grad(y_input, (xg,), dy, retain_graph=True)
  both_grads = lambda: torch.autograd.grad(y_both, (xg, kg), dy, retain_graph=True)

  return {'forward': forward, 'input grad': input_grad, 'input+kernel grad': both_grads}


def _network_fns(rng, batch):
  """Whole-network passes on CIFAR shapes: {row name: {implementation: callable}}."""
  x = rng.standard_normal((batch, 32, 32, 3), np.float32)
  xj = jax.numpy.asarray(x)
  teacher, student = registry.create('wrn40_2', num_classes=10), registry.create('wrn16_1', num_classes=10)
  tv, sv = teacher.init(jax.random.key(0), xj), student.init(jax.random.key(0), xj)
  t_fwd = jax.jit(lambda x: teacher.apply(tv, x, train=False))
  t_grad = jax.jit(jax.grad(lambda x: teacher.apply(tv, x, train=False).sum()))
  s_grad = jax.jit(jax.grad(lambda p: student.apply({**sv, 'params': p}, xj, train=True,
                                                    mutable=['batch_stats'])[0].sum()))
  torch.manual_seed(0)
  t_torch, s_torch = WideResNet(40, 2, 10).eval(), WideResNet(16, 1, 10).train()
  for p in t_torch.parameters():
    p.requires_grad_(False)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

  def torch_teacher_forward():
    with torch.no_grad():
      t_torch(xt)

  def torch_teacher_input_grad():
    xg = xt.detach().requires_grad_(True)
    torch.autograd.grad(t_torch(xg)[0].sum(), (xg,))

  def torch_student_grads():
    torch.autograd.grad(s_torch(xt)[0].sum(), list(s_torch.parameters()))

  return {'WRN-40-2 teacher, eval forward': {'dfkd_jax': lambda: jax.block_until_ready(t_fwd(xj)),
                                             'torch': torch_teacher_forward},
          'WRN-40-2 teacher, forward + input gradient': {'dfkd_jax': lambda: jax.block_until_ready(t_grad(xj)),
                                                         'torch': torch_teacher_input_grad},
          'WRN-16-1 student, train forward + parameter gradients': {
              'dfkd_jax': lambda: jax.block_until_ready(s_grad(sv['params'])), 'torch': torch_student_grads}}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--reps', type=int, default=5, help='timed calls per round')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results', 'conv_vs_torch.md'))
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  shapes = sorted(set(WRN40_2) | set(WRN16_1), key=lambda s: (-s[0], s[1], s[2]))
  ops = ('forward', 'input grad', 'input+kernel grad')
  impls = ('dfkd_jax', 'torch NCHW', 'torch channels_last')
  rng = np.random.default_rng(0)
  fns = {}
  for shape in shapes:
    size, c_in, c_out, stride = shape
    x = rng.standard_normal((args.batch, size, size, c_in), np.float32)
    k = (rng.standard_normal((3, 3, c_in, c_out)) / np.sqrt(9 * c_in)).astype(np.float32)
    fns[shape] = {'dfkd_jax': _jax_fns(jax.numpy.asarray(x), jax.numpy.asarray(k), stride),
                  'torch NCHW': _torch_fns(x, k, stride, False), 'torch channels_last': _torch_fns(x, k, stride, True)}
  networks = _network_fns(rng, args.batch)
  samples = {(s, i, o): [] for s in shapes for i in impls for o in ops}
  net_samples = {(row, impl): [] for row, by_impl in networks.items() for impl in by_impl}
  for r in range(args.rounds):  # interleaved: machine drift hits every implementation alike
    for shape in shapes:
      for impl in impls:
        for op in ops:
          samples[shape, impl, op].append(_median_ms(fns[shape][impl][op], args.reps))
    for row, by_impl in networks.items():
      for impl, fn in by_impl.items():
        net_samples[row, impl].append(_median_ms(fn, args.reps))
    print(f'round {r + 1}/{args.rounds} done', flush=True)
  ms = {key: statistics.median(v) for key, v in samples.items()}
  net_ms = {key: statistics.median(v) for key, v in net_samples.items()}

  lines = [machine.markdown(machine.describe()), '',
           f'One 3x3 convolution (padding 1) at batch {args.batch}, float32; torch with {torch.get_num_threads()} '
           f'threads; median ms over {args.rounds} interleaved rounds of {args.reps} calls. Ratio: '
           'dfkd_jax / the faster PyTorch layout (> 1: dfkd_jax slower).',
           f'`python benchmarks/conv_vs_torch.py {" ".join(sys.argv[1:])}`', '',
           '| HxW, C_in -> C_out, stride | op | dfkd_jax | torch NCHW | torch channels_last | ratio |',
           '|---|---|---|---|---|---|']
  for shape in shapes:
    size, c_in, c_out, stride = shape
    for op in ops:
      j, t, tc = (ms[shape, i, op] for i in impls)
      lines.append(f'| {size}x{size}, {c_in} -> {c_out}, {stride} | {op} | {j:.1f} | {t:.1f} | {tc:.1f} | '
                   f'{j / min(t, tc):.2f} |')
  lines += ['', 'Summed over the layers of each network (each shape times its count):', '',
            '| network | op | dfkd_jax ms | best PyTorch layout ms | ratio |', '|---|---|---|---|---|']
  for name, counts in (('WRN-40-2', WRN40_2), ('WRN-16-1', WRN16_1)):
    for op in ops:
      j = sum(n * ms[s, 'dfkd_jax', op] for s, n in counts.items())
      best = min(sum(n * ms[s, impl, op] for s, n in counts.items()) for impl in impls[1:])
      lines.append(f'| {name} | {op} | {j:.0f} | {best:.0f} | {j / best:.2f} |')
  lines += ['', 'Whole networks (PyTorch NCHW, the layout of the reference code):', '',
            '| pass | dfkd_jax ms | PyTorch ms | ratio |', '|---|---|---|---|']
  for row in networks:
    j, t = net_ms[row, 'dfkd_jax'], net_ms[row, 'torch']
    lines.append(f'| {row} | {j:.0f} | {t:.0f} | {j / t:.2f} |')
  text = '\n'.join(lines) + '\n'
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text)


if __name__ == '__main__':
  main()
