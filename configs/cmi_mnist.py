r"""CMI (contrastive model inversion) on MNIST: the embedded BatchNorm teacher resnet8 ->
LeNet-5-half, distilled from a pool of digits made by a generator re-initialised for every batch.

  python -m dfkd_jax.main --config configs/cmi_mnist.py --workdir workdirs/cmi_mnist \
      --config.eval.data=idx:PATH/TO/mnist --config.eval.split=test

The CMI loss (bn·BN-statistics + oh·CE + adv·masked-KL + cr·contrastive over BN-input features
with a 40,960-row memory bank) with the scratch script's weights, a 1-channel CMI generator, and
MNIST-sized schedules (docs/results.md has what is measured); digits are not flipped
in any view. ``:runlocal`` for a smoke test.
"""
from dfkd_jax import configlib


def get_config(arg=None):
  arg = configlib.parse_arg(arg, runlocal=False)
  c = configlib.mnist_distillation('cmi')
  c.teacher.checkpoint = 'embedded:resnet8_mnist'
  configlib.inversion_settings(c, crop_padding=2, flip=False)
  # LeNet-5-half has no BatchNorm: SGD at lr 0.1 with the T=20 gradients (x T) kills it; Adam as DAFL.
  c.optimizer_s = dict(name='adam', lr=1e-3, schedule='cosine')
  c.generator = dict(arch='cmi_generator', kwargs=dict(nz=256, ngf=64, img_size=32, nc=1))
  c.batch_size = 128
  c.synthesis_batch_size = 256
  c.g_steps = 100
  c.kd_steps = 50
  c.optimizer_g = dict(lr=1e-3, betas=(0.5, 0.999))
  c.loss = dict(bn=1.0, oh=1.0, adv=0.5, cr=0.8)
  c.cmi = dict(cr_temperature=0.1, bank_size=40960, negatives=4096, head_dim=256, feature_layers=(),
               crop_padding=2, local_scale=(0.25, 1.0), flip=False)
  configlib.set_schedule(c, num_epochs=16, iters_per_epoch=4)
  c.report.phase_timing_reps = 1
  if arg.runlocal:
    configlib.runlocal(c)
    c.synthesis_batch_size, c.g_steps, c.kd_steps = 32, 3, 2
    c.cmi.bank_size, c.cmi.negatives = 256, 64
  return c
