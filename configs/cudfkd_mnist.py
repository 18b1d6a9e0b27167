r"""CuDFKD (curriculum data-free KD) on MNIST: the embedded BatchNorm teacher resnet8 ->
LeNet-5-half, the student trained on fresh samples of a persistent generator with a self-paced
weight while the generator's adversarial weight ramps up.

  python -m dfkd_jax.main --config configs/cudfkd_mnist.py --workdir workdirs/cudfkd_mnist \
      --config.eval.data=idx:PATH/TO/mnist --config.eval.split=test

The reference's CIFAR-10 ResNet recipe (``lmda_ent -20``, oh 1, bn 1, masked KL adversary at T=3
from adv 0, +grad_adv per epoch between 25% and 75% of the epochs, L1 student loss with the 'log'
self-paced weight from lambda_0 2, alpha 1e-4; one generator step per 10 student steps) with a
1-channel ``DCGAN_Generator_CIFAR10`` of half width (nz 512, ngf 32: at ngf 64, drawing the 1,280
fresh digits that each iteration's ten student steps read took most of the time, and the run
reached 28.7% in 200 iterations and 1216 s), 35 epochs of 10 iterations at batch 128, a smaller ramp for the short run
(grad_adv 0.05: the adversarial weight ends at 0.85), lambda_0 40 instead of 2 (the self-paced weight
v = (1 + e^-λ)/(1 + e^(ℓ-λ)) is ~e^-32 at λ 2 for this teacher, whose logits make the initial L1 loss
ℓ ≈ 34: the student would not learn), and an Adam student as the other MNIST configs.
``:runlocal`` for a smoke test.
"""
from dfkd_jax import configlib


def get_config(arg=None):
  arg = configlib.parse_arg(arg, runlocal=False)
  c = configlib.mnist_distillation('cudfkd')
  c.teacher.checkpoint = 'embedded:resnet8_mnist'
  configlib.inversion_settings(c, crop_padding=0, flip=False)  # fresh samples, no augmentation
  c.pool.dtype = 'float32'  # no PNG round trip: the pool only hands fresh samples to the student
  c.kd = dict(loss='l1', temperature=20.0)
  c.optimizer_s = dict(name='adam', lr=1e-3, schedule='cosine')
  c.generator = dict(arch='cudfkd_generator', kwargs=dict(nz=512, ngf=32, img_size=32, nc=1, d=2))
  c.batch_size = c.synthesis_batch_size = 128
  c.g_steps, c.kd_steps = 1, 10
  c.optimizer_g = dict(lr=1e-3, betas=(0.9, 0.99))
  c.loss = dict(lmda_ent=-20.0, adv=0.0, oh=1.0, bn=1.0)
  c.cudfkd = dict(adv_type='kl', entropy_temperature=20.0, grad_adv=0.05, begin_fraction=0.25, end_fraction=0.75,
                  curriculum='log', lambda_0=40.0, lambda_alpha=1e-4)
  configlib.set_schedule(c, num_epochs=35, iters_per_epoch=10)
  c.report.phase_timing_reps = 1
  if arg.runlocal:
    configlib.runlocal(c)
    c.synthesis_batch_size, c.kd_steps = 32, 2
    c.loss.adv = 0.5  # the adversarial term is on from the start
  return c
