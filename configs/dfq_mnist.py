r"""DFQ (CMI framework semantics) on MNIST, LeNet-5 -> LeNet-5-half.

  python -m dfkd_jax.main --config configs/dfq_mnist.py --workdir workdirs/dfq_mnist

Generator loss bn·BN-stats + oh·CE(argmax) + adv·(−KL) + balance·Σp̄ ln p̄ (``--adv 1 --bn 1 --oh 1
--balance 20``), the CMI ``LargeGenerator`` (Sigmoid output through the MNIST normaliser), 10 student
steps on fresh samples per generator step. LeNet-5 has no BatchNorm, so the BN term is the empty
sum (0) with this teacher. ``:runlocal`` for a smoke run.
"""
from dfkd_jax import configlib


def get_config(arg=None):
  arg = configlib.parse_arg(arg, runlocal=False)
  c = configlib.mnist_distillation('dfq')
  c.generator = dict(arch='cmi_large_generator', kwargs=dict(nz=256, img_size=32, nc=1), output='unit',
                     sample_mode='eval')
  c.student_batch = 'fresh'
  c.g_steps, c.kd_steps = 1, 10
  c.batch_size = 256
  c.loss = dict(bn=1.0, oh=1.0, adv=1.0, balance=20.0)
  c.kd = dict(loss='kl', temperature=1.0, reference_temperature_bug=False)
  c.optimizer_g = dict(name='adam', lr=1e-3, betas=(0.5, 0.999))
  c.optimizer_s = dict(name='sgd', lr=0.1, momentum=0.9, weight_decay=1e-4, schedule='cosine')
  configlib.set_schedule(c, num_epochs=20, iters_per_epoch=20)
  if arg.runlocal:
    configlib.runlocal(c)
  return c
