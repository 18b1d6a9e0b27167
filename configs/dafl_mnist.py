r"""DAFL on MNIST, LeNet-5 -> LeNet-5-half, with the original code's semantics (``DAFL-train.py``).

  python -m dfkd_jax.main --config configs/dafl_mnist.py --workdir workdirs/dafl_mnist

Teacher: the embedded LeNet-5 (98.29% on the real MNIST test set). Variants (``:arg``):
``runlocal`` (a few iterations), ``paper`` (200 epochs x 120 iterations at batch 512, the paper's
schedule: about 13 hours in the reference code on a 2-core CPU). The default is cut to finish in
under 10 minutes on a 2-core CPU: 600 iterations at batch 64, each one generator step and ten
student steps on that iteration's batch (the student step is ~10x cheaper than the generator's),
both learning rates annealed by a cosine over the run (measured on the real MNIST test set: see
docs/results.md and benchmarks/results/mnist_methods.md).
"""
from dfkd_jax import configlib


def get_config(arg=None):
  arg = configlib.parse_arg(arg, runlocal=False, paper=False)
  c = configlib.mnist_distillation('dafl')
  c.variant = 'huawei'
  c.generator = dict(arch='dafl_generator', kwargs=dict(nz=100, img_size=32, nc=1), output='normalized',
                     sample_mode='train')
  c.student_batch = 'reuse'  # the generator and student steps share one batch, as in the original
  c.replay = dict(capacity=6400)  # student_batch='replay': the last 100 iterations' images
  c.g_steps, c.kd_steps = 1, 1  # the paper's; the default below takes 10 student steps
  c.loss = dict(oh=1.0, ie=5.0, a=0.1, adv=0.0)  # adv > 0: minus adv x KL(p_T || p_S) (not in DAFL)
  c.kd = dict(loss='kl', temperature=1.0, reduction='batchmean')
  c.optimizer_g = dict(name='adam', lr=0.2, schedule='constant', per_step=False)
  c.optimizer_s = dict(name='adam', lr=2e-3, schedule='constant', per_step=False)
  if arg.paper:
    c.batch_size = 512
    configlib.set_schedule(c, num_epochs=200, iters_per_epoch=120)
  else:
    c.batch_size = 64
    c.kd_steps = 10
    # Both learning rates annealed by a cosine over the run: with a constant lr_G the generator
    # keeps moving and the student's accuracy swings by 10-30 points between evaluations.
    c.optimizer_g.update(schedule='cosine', per_step=True)
    c.optimizer_s.update(schedule='cosine', per_step=True)
    configlib.set_schedule(c, num_epochs=6, iters_per_epoch=100, evals_per_run=12)
  if arg.runlocal:
    configlib.runlocal(c)
  return c
