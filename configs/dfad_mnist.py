r"""DFAD on MNIST, LeNet-5 -> LeNet-5-half: the L1 min-max game of the original
(VainF/Data-Free-Adversarial-Distillation) with its ``GeneratorA`` (Tanh -> affine-free BN).

  python -m dfkd_jax.main --config configs/dfad_mnist.py --workdir workdirs/dfad_mnist

Per iteration: one generator step (−L1), then 5 student steps (L1) on fresh samples of the
generator in train mode; student SGD(0.1, momentum 0.9, wd 5e-4), generator Adam(1e-3).
``:runlocal`` for a smoke run.
"""
from dfkd_jax import configlib


def get_config(arg=None):
  arg = configlib.parse_arg(arg, runlocal=False)
  c = configlib.mnist_distillation('dfad')
  c.generator = dict(arch='dfad_generator', kwargs=dict(nz=256, img_size=32, nc=1), output='normalized',
                     sample_mode='train')
  c.student_batch = 'fresh'
  c.g_steps, c.kd_steps = 1, 5
  c.batch_size = 256
  c.loss = dict(adv=1.0)
  c.kd = dict(loss='l1')
  c.optimizer_g = dict(name='adam', lr=1e-3)
  c.optimizer_s = dict(name='sgd', lr=0.1, momentum=0.9, weight_decay=5e-4)
  configlib.set_schedule(c, num_epochs=20, iters_per_epoch=50)
  if arg.runlocal:
    configlib.runlocal(c)
  return c
