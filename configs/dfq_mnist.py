r"""DFQ (CMI framework semantics) on MNIST, LeNet-5 -> LeNet-5-half.

  python -m dfkd_jax.main --config configs/dfq_mnist.py --workdir workdirs/dfq_mnist

Generator loss bn·BN-stats + oh·CE(argmax) + adv·(−KL) + balance·Σp̄ ln p̄ (``--adv 1 --bn 1 --oh 1
--balance 20``), the CMI ``LargeGenerator`` (Sigmoid output through the MNIST normaliser), 10 student
steps on fresh samples per generator step. LeNet-5 has no BatchNorm, so the BN term is the empty
sum (0) with this teacher. Cut to about 10 minutes on a 2-core CPU: a half-width generator (ngf
32), batch 64 (256 in the CIFAR settings), 450 iterations, and Adam(2e-3) on a per-step cosine for
LeNet-5-half (which has no BatchNorm) instead of the framework's SGD(0.1): after 60 iterations
SGD gave 49.7% best / 40.5% final on the real test set, Adam 54.3%. ``:runlocal`` for a smoke run.
"""
from dfkd_jax import configlib


def get_config(arg=None):
  arg = configlib.parse_arg(arg, runlocal=False)
  c = configlib.mnist_distillation('dfq')
  c.generator = dict(arch='cmi_large_generator', kwargs=dict(nz=256, ngf=32, img_size=32, nc=1), output='unit',
                     sample_mode='eval')
  c.student_batch = 'fresh'
  c.g_steps, c.kd_steps = 1, 10
  c.batch_size = 64
  c.loss = dict(bn=1.0, oh=1.0, adv=1.0, balance=20.0)
  c.kd = dict(loss='kl', temperature=1.0, reference_temperature_bug=False)
  c.optimizer_g = dict(name='adam', lr=1e-3, betas=(0.5, 0.999))
  c.optimizer_s = dict(name='adam', lr=2e-3, schedule='cosine', per_step=True)
  configlib.set_schedule(c, num_epochs=15, iters_per_epoch=30, evals_per_run=9)
  if arg.runlocal:
    configlib.runlocal(c)
  return c
