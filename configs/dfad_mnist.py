r"""DFAD on MNIST, LeNet-5 -> LeNet-5-half: the L1 min-max game of the original
(VainF/Data-Free-Adversarial-Distillation) with its ``GeneratorA`` (Tanh -> affine-free BN).

  python -m dfkd_jax.main --config configs/dfad_mnist.py --workdir workdirs/dfad_mnist

Per iteration: one generator step (−L1), then 10 student steps (L1) on fresh samples of the
generator in train mode. The original's optimisers (student SGD(0.1, momentum 0.9, wd 5e-4),
generator Adam(1e-3), batch 256, 500 x 50 iterations) leave LeNet-5-half predicting one class on
MNIST (10.1% after 100 iterations: the L1 gradient is sign(.)/(B·C), so SGD barely moves the
student while the generator drives the teacher's logits up). The default is cut to about 10
minutes on a 2-core CPU: a generator of half width (ngf 32, 4x cheaper), batch 64, Adam for both
(student 2e-3, generator 2e-4) on a cosine over 600 iterations. ``:runlocal`` for a smoke run.
"""
from dfkd_jax import configlib


def get_config(arg=None):
  arg = configlib.parse_arg(arg, runlocal=False)
  c = configlib.mnist_distillation('dfad')
  c.generator = dict(arch='dfad_generator', kwargs=dict(nz=256, ngf=32, img_size=32, nc=1), output='normalized',
                     sample_mode='train')
  c.student_batch = 'fresh'
  c.g_steps, c.kd_steps = 1, 10
  c.batch_size = 64
  c.loss = dict(adv=1.0)
  c.kd = dict(loss='l1')
  c.optimizer_g = dict(name='adam', lr=2e-4, schedule='cosine', per_step=True)
  c.optimizer_s = dict(name='adam', lr=2e-3, schedule='cosine', per_step=True)
  configlib.set_schedule(c, num_epochs=12, iters_per_epoch=50, evals_per_run=12)
  if arg.runlocal:
    configlib.runlocal(c)
  return c
