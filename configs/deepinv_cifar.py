r"""DeepInversion on CIFAR-10/100 with the reference settings.

  python -m dfkd_jax.main --config configs/deepinv_cifar.py:dataset=cifar10,pair=wrn40_2-wrn16_1 --workdir W \
      --config.teacher.checkpoint=checkpoints/pretrained/cifar10_wrn40_2.pth --config.data_dir=TFDS_DIR

``variant=cmi`` (default): the CMI framework's ``scripts/deepinv_cifar10.sh`` (``--g_steps 1000 --lr_g 0.1
--bn 10 --oh 1 --adv 1 --T 20 --batch_size 256 --kd_steps 400 --ep_steps 400 --epochs 200``, tv 1e-3,
l2 0; Adam (0.5, 0.99) on the pixels, jitter ±4 with flips, clipped to the valid range): one batch of
256 images per epoch, 51,200 in all; student SGD lr 0.1, cosine over 200 epochs.
``variant=nvlabs``: the pixel optimisation of NVlabs ``cifar10/deepinversion_cifar10.py`` with the
paper's parameters (``--bs 256 --r_feature_weight 10 --di_lr 0.05``, TV-L2 2.5e-5 and the l2 prior on
the jittered view, 2,000 Adam (0.9, 0.999) steps, jitter ±2, no flip, no clip, targets 0..9 repeated;
the ADI competition 1 − clamp(JS) is off as in the script: ``--config.loss.adv=0.2`` turns it on),
with the CMI framework's student schedule (NVlabs ships no KD code).

Which iterate is kept: ``--config.deepinv.best=lowest_loss`` (default: the lowest-loss iterate, a
deliberate deviation), ``last`` (the final iterate, what both references keep through tensor aliasing;
``methods/deepinv.py``). A full run is hours on a GPU. ``runlocal``
for a smoke test (random teacher).
"""
from dfkd_jax import configlib
from dfkd_jax.errors import UserError


def get_config(arg=None):
  c, arg = configlib.cifar_distillation('deepinv', arg, variant='cmi')
  configlib.inversion_settings(c)
  c.batch_size = c.synthesis_batch_size = 256
  c.kd_steps = 400
  c.deepinv = dict(jitter=4, flip=True, clip=True, prior_on='inputs', targets='random_sorted', low_res_steps=0,
                   best='lowest_loss')
  if arg.variant == 'nvlabs':
    c.g_steps = 2000
    c.optimizer_g = dict(lr=0.05, betas=(0.9, 0.999), schedule='constant', warmup_steps=100)
    c.loss = dict(bn=10.0, first_bn_multiplier=1.0, oh=1.0, adv=0.0, adv_form='adi', tv_l1=0.0, tv_l2=2.5e-5,
                  l2=0.0, l2_per_example=False)
    c.deepinv.update(jitter=2, flip=False, clip=False, prior_on='augmented', targets='cycle')
  elif arg.variant == 'cmi':
    c.g_steps = 1000
    c.optimizer_g = dict(lr=0.1, betas=(0.5, 0.99), schedule='constant', warmup_steps=100)
    c.loss = dict(bn=10.0, first_bn_multiplier=1.0, oh=1.0, adv=1.0, adv_form='neg_js', tv_l1=1e-3, tv_l2=0.0,
                  l2=0.0, l2_per_example=False)
  else:
    raise UserError(f"variant must be cmi or nvlabs, not {arg.variant!r}")
  configlib.finish_cifar(c, arg, num_epochs=200)
  if arg.runlocal:  # one synthesis call per epoch, as the default
    configlib.set_schedule(c, num_epochs=4, iters_per_epoch=1, checkpoints_per_run=2)
    c.synthesis_batch_size, c.g_steps, c.kd_steps = 8, 2, 2
  return c
