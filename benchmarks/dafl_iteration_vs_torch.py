r"""Benchmark: one DAFL MNIST training iteration (generator step + student step, LeNet-5 ->
LeNet-5-half) in dfkd_jax versus a PyTorch implementation of the original DAFL loop
(``DAFL-train.py`` semantics: one combined backward, two Adam steps), same batch, same machine,
interleaved rounds; prints the machine (``machine.py``), then milliseconds per iteration and the ratio.

  python benchmarks/dafl_iteration_vs_torch.py [--batches 64,256] [--rounds 3] [--iters 5] [--devices 1]

(a quick check that it runs: ``--batches 2 --rounds 1 --iters 1``).

Needs torch (``pip install torch==2.13.0``). Timings on a shared machine drift: compare the ratio.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jax_iteration(batch: int, devices: int):
  import jax

  from dfkd_jax import methods
  from dfkd_jax.run import parallel
  from dfkd_jax.run.job import compile_job
  spec = importlib.util.spec_from_file_location('dafl_mnist', os.path.join(ROOT, 'configs', 'dafl_mnist.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.batch_size = batch
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


def timed(step, iters):
  step()  # warm-up (compilation for jax)
  t0 = time.perf_counter()
  for _ in range(iters):
    step()
  return (time.perf_counter() - t0) / iters * 1000


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batches', default='64,256')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--iters', type=int, default=5)
  parser.add_argument('--devices', type=int, default=1, help='fake CPU devices for the jax data-parallel mesh')
  args = parser.parse_args()
  if args.devices > 1:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={args.devices}').strip()
  if '--xla_cpu_ftz' not in os.environ.get('XLA_FLAGS', ''):  # as the CLI does
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_ftz=true').strip()
  sys.path.insert(0, ROOT)
  print(machine.markdown(machine.describe()) + '\n')
  print('| batch | dfkd_jax ms/iter | torch ms/iter | jax / torch |\n|---|---|---|---|')
  for batch in (int(b) for b in args.batches.split(',')):
    jax_step, torch_step = jax_iteration(batch, args.devices), torch_iteration(batch)
    jx, tt = [], []
    for _ in range(args.rounds):
      jx.append(timed(jax_step, args.iters))
      tt.append(timed(torch_step, args.iters))
    j, t = statistics.median(jx), statistics.median(tt)
    print(f'| {batch} | {j:.0f} | {t:.0f} | {j / t:.2f} |', flush=True)


if __name__ == '__main__':
  main()
