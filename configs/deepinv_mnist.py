r"""DeepInversion (CMI-framework semantics) on MNIST: the embedded BatchNorm teacher resnet8 ->
LeNet-5-half, distilled from a pool of inverted digits.

  python -m dfkd_jax.main --config configs/deepinv_mnist.py --workdir workdirs/deepinv_mnist \
      --config.eval.data=idx:PATH/TO/mnist --config.eval.split=test

The CMI framework's DeepInversion loss (bn·BN-statistics + oh·CE + adv·(−JS) + tv·TV-L1) and
Adam(0.5, 0.99) on the pixels, with MNIST-sized schedules: 64 synthesis calls of 256 digits x 200
pixel steps, each followed by 50 student steps on the pool (batch 128; crop-pad 2, no flips for
digits). docs/results.md has what is measured. ``:runlocal`` for a smoke test.
"""
from dfkd_jax import configlib


def get_config(arg=None):
  arg = configlib.parse_arg(arg, runlocal=False)
  c = configlib.mnist_distillation('deepinv')
  c.teacher.checkpoint = 'embedded:resnet8_mnist'
  configlib.inversion_settings(c, crop_padding=2, flip=False)
  # LeNet-5-half has no BatchNorm: SGD at lr 0.1 with the T=20 gradients (x T) kills it; Adam as DAFL.
  c.optimizer_s = dict(name='adam', lr=1e-3, schedule='cosine')
  c.batch_size = 128
  c.synthesis_batch_size = 256
  c.g_steps = 200
  c.kd_steps = 50
  c.optimizer_g = dict(lr=0.1, betas=(0.5, 0.99), schedule='constant', warmup_steps=100)
  c.loss = dict(bn=10.0, first_bn_multiplier=1.0, oh=1.0, adv=1.0, adv_form='neg_js', tv_l1=1e-3, tv_l2=0.0,
                l2=0.0, l2_per_example=False)
  c.deepinv = dict(jitter=4, flip=False, clip=True, prior_on='inputs', targets='random_sorted', low_res_steps=0,
                   best='lowest_loss')
  configlib.set_schedule(c, num_epochs=16, iters_per_epoch=4)
  c.report.phase_timing_reps = 1
  if arg.runlocal:
    configlib.runlocal(c)
    c.synthesis_batch_size, c.g_steps, c.kd_steps = 32, 3, 2
  return c
