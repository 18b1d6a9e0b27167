r"""Benchmark: one DAFL MNIST training iteration (generator step + student step, LeNet-5 ->
LeNet-5-half) in dfkd_jax versus a PyTorch implementation of the original DAFL loop
(``DAFL-train.py`` semantics: one combined backward, two Adam steps), same batch, same machine,
interleaved rounds; prints the machine (``machine.py``), then milliseconds per iteration and the ratio.

  python benchmarks/dafl_iteration_vs_torch.py [--batches 64,256] [--rounds 3] [--iters 5] [--devices 1]
      [--torch-python /path/to/python-with-torch]

(a quick check that it runs: ``--batches 2 --rounds 1 --iters 1``).

dfkd_jax runs ``configs/dafl_mnist.py:original`` with one student step per iteration (the reference
loop: both steps on one batch). Needs torch here (``pip install torch==2.13.0`` on Python 3.11) or
``--torch-python`` naming an interpreter that has it (``torch_worker.py``). Timings on a shared
machine drift: compare the ratio.
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


def jax_iteration(batch: int, devices: int):
  import jax

  from dfkd_jax import methods
  from dfkd_jax.run import parallel
  from dfkd_jax.run.job import compile_job
  spec = importlib.util.spec_from_file_location('dafl_mnist', os.path.join(ROOT, 'configs', 'dafl_mnist.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('original')  # DAFL's own loop: the two steps share one batch
  config.batch_size, config.kd_steps = batch, 1  # one generator step and one student step, as the reference
  mesh = parallel.make_mesh(devices)
  job = methods.get('dafl').make_job(config, mesh)
  init, iteration, _ = compile_job(job, mesh, jax.random.key(0))
  holder = {'state': init(jax.random.key(0))}
  frozen = jax.device_put(job.frozen, parallel.replicated(mesh))
  key = jax.random.key(1)

  def step():
    holder['state'], metrics = iteration(holder['state'], frozen, key, None)
    jax.block_until_ready(metrics)

  return step


def torch_iteration(batch: int):
  import torch
  import torch.nn.functional as F
  from torch import nn
  torch.set_num_threads(os.cpu_count() or 1)

  class Generator(nn.Module):  # DAFL-train.py's generator, MNIST setting
    def __init__(self, nz=100):
      super().__init__()
      self.l1 = nn.Sequential(nn.Linear(nz, 128 * 8 * 8))
      self.conv_blocks0 = nn.Sequential(nn.BatchNorm2d(128))
      self.conv_blocks1 = nn.Sequential(nn.Conv2d(128, 128, 3, 1, 1), nn.BatchNorm2d(128, 0.8), nn.LeakyReLU(0.2))
      self.conv_blocks2 = nn.Sequential(nn.Conv2d(128, 64, 3, 1, 1), nn.BatchNorm2d(64, 0.8), nn.LeakyReLU(0.2),
                                        nn.Conv2d(64, 1, 3, 1, 1), nn.Tanh(), nn.BatchNorm2d(1, affine=False))

    def forward(self, z):
      x = self.conv_blocks0(self.l1(z).view(z.shape[0], 128, 8, 8))
      x = self.conv_blocks1(F.interpolate(x, scale_factor=2))
      return self.conv_blocks2(F.interpolate(x, scale_factor=2))

  class LeNet(nn.Module):
    def __init__(self, w=1.0):
      super().__init__()
      c1, c2, c3, f = (int(round(v * w)) for v in (6, 16, 120, 84))
      self.conv1, self.conv2, self.conv3 = nn.Conv2d(1, c1, 5), nn.Conv2d(c1, c2, 5), nn.Conv2d(c2, c3, 5)
      self.fc1, self.fc2 = nn.Linear(c3, f), nn.Linear(f, 10)

    def forward(self, x):
      x = F.max_pool2d(F.relu(self.conv1(x)), 2)
      x = F.max_pool2d(F.relu(self.conv2(x)), 2)
      feat = F.relu(self.conv3(x)).flatten(1)
      return self.fc2(F.relu(self.fc1(feat))), feat

  g, teacher, student = Generator(), LeNet().eval(), LeNet(0.5)
  opt_g, opt_s = torch.optim.Adam(g.parameters(), 0.2), torch.optim.Adam(student.parameters(), 2e-3)

  def step():
    z = torch.randn(batch, 100)
    opt_g.zero_grad()
    opt_s.zero_grad()
    images = g(z)
    t_logits, t_feat = teacher(images)
    p = F.softmax(t_logits, 1).mean(0)
    loss = (F.cross_entropy(t_logits, t_logits.argmax(1)) + 5 * (p * torch.log10(p)).sum()
            - 0.1 * t_feat.abs().mean())
    s_logits, _ = student(images.detach())
    loss = loss + F.kl_div(F.log_softmax(s_logits, 1), F.softmax(t_logits.detach(), 1), reduction='sum') / batch
    loss.backward()
    opt_g.step()
    opt_s.step()

  return step


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batches', default='64,256')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--iters', type=int, default=5)
  parser.add_argument('--devices', type=int, default=1, help='fake CPU devices for the jax data-parallel mesh')
  parser.add_argument('--torch-python', default=None,
                      help='run the PyTorch loop in this interpreter (one with torch): torch_worker.py')
  args = parser.parse_args()
  if args.devices > 1:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={args.devices}').strip()
  if '--xla_cpu_ftz' not in os.environ.get('XLA_FLAGS', ''):  # as the CLI does
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_ftz=true').strip()
  sys.path.insert(0, ROOT)
  info = torch_worker.info(args.torch_python)
  print(machine.markdown(machine.describe()) + f'\nPyTorch side: torch {info["torch"]}, {info["threads"]} threads'
        + (f', run by {args.torch_python}' if args.torch_python else '') + '.\n')
  print('| batch | dfkd_jax ms/iter | torch ms/iter | speed-up (torch / dfkd_jax) |\n|---|---|---|---|')
  for batch in (int(b) for b in args.batches.split(',')):
    jax_step = jax_iteration(batch, args.devices)
    jax_step()  # compilation
    [torch_timer] = torch_worker.steps(args.torch_python, 'dafl_iteration_vs_torch', 'torch_iteration', batch=batch)
    jx, tt = [], []
    for _ in range(args.rounds):
      jx.append(1000 * torch_worker.seconds(jax_step, args.iters) / args.iters)
      tt.append(1000 * torch_timer(args.iters) / args.iters)
    j, t = statistics.median(jx), statistics.median(tt)
    print(f'| {batch} | {j:.0f} | {t:.0f} | {t / j:.2f}x |', flush=True)


if __name__ == '__main__':
  main()
