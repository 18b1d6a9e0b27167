r"""CuDFKD on CIFAR-10/100 with the reference settings (ljrprocc/DataFree ``scripts/cudfkd/*.sh``).

  python -m dfkd_jax.main --config configs/cudfkd_cifar.py:dataset=cifar10,pair=resnet34-resnet18 --workdir W \
      --config.teacher.checkpoint=checkpoints/pretrained/cifar10_resnet34.pth --config.data_dir=TFDS_DIR

Every script: ``DCGAN_Generator_CIFAR10`` (nz 512, depth 2) re-initialised once, Adam(1e-3, (0.9,
0.99)), one generator step per ``--kd_steps_interval 10`` student steps, ``--ep_steps 400`` (40
iterations per epoch), ``--lmda_ent -20 --oh 1 --bn 1 --adv_type kl``, the 'log' self-paced weight;
student SGD (momentum 0.9, wd 1e-4), CosineAnnealingLR(T_max = epochs), fresh samples, no replay.
Per script:
- ``dataset=cifar10`` ResNet-34 / VGG-11 teachers (``cudfkd_cifar10_resnet34_resnet18.sh``): batch 768,
  lr 0.05, 250 epochs, adv 0 + 0.5 per epoch between 25% and 75%, T 20, L1 loss, lambda_0 2;
- ``dataset=cifar10`` WRN-40-2 teacher (``cudfkd_cifar10_wrn402_wrn161.sh``): batch 1024, lr 0.1,
  250 epochs, adv 0.5 + 0.2 (the argparse default) per epoch between 25% and 75%, T 20, KL loss,
  lambda_0 2;
- ``dataset=cifar100`` (``cudfkd_cifar100_resnet34_resnet18.sh``, used for every pair): batch 768,
  lr 0.1, 300 epochs, adv 0 + 0.1 per epoch between 20% and 75%, T 5, L1 loss, lambda_0 1.
alpha (lambda's growth per student step) is 1e-4 on CIFAR-10 and 2e-5 otherwise (the notes' pinned
commit; a later ``datafree_kd.py`` reads 5e-5). README: 95.28 (r34/r18), 88.77 (w40-2/w16-1) on
CIFAR-10. ``runlocal`` for a smoke test (random teacher).
"""
from dfkd_jax import configlib


def get_config(arg=None):
  c, arg = configlib.cifar_distillation('cudfkd', arg)
  configlib.inversion_settings(c, crop_padding=0, flip=False)  # fresh samples, no augmentation
  c.pool.dtype = 'float32'
  c.generator = dict(arch='cudfkd_generator', kwargs=dict(nz=512, ngf=64, img_size=32, nc=3, d=2))
  c.g_steps, c.kd_steps = 1, 10
  c.optimizer_g = dict(lr=1e-3, betas=(0.9, 0.99))
  cudfkd = dict(adv_type='kl', curriculum='log', begin_fraction=0.25, end_fraction=0.75)
  if arg.dataset == 'cifar100':
    batch, lr, epochs, adv, t = 768, 0.1, 300, 0.0, 5.0
    cudfkd.update(grad_adv=0.1, begin_fraction=0.2, lambda_0=1.0, lambda_alpha=2e-5)
    kd_loss = 'l1'
  elif c.teacher.arch == 'wrn40_2':
    batch, lr, epochs, adv, t, kd_loss = 1024, 0.1, 250, 0.5, 20.0, 'kl'
    cudfkd.update(grad_adv=0.2, lambda_0=2.0, lambda_alpha=1e-4)
  else:
    batch, lr, epochs, adv, t, kd_loss = 768, 0.05, 250, 0.0, 20.0, 'l1'
    cudfkd.update(grad_adv=0.5, lambda_0=2.0, lambda_alpha=1e-4)
  c.batch_size = c.synthesis_batch_size = batch
  c.optimizer_s.lr = lr
  c.kd = dict(loss=kd_loss, temperature=t)
  c.loss = dict(lmda_ent=-20.0, adv=adv, oh=1.0, bn=1.0)
  c.cudfkd = dict(cudfkd, entropy_temperature=t)
  configlib.finish_cifar(c, arg, num_epochs=epochs)
  if arg.runlocal:
    c.synthesis_batch_size, c.kd_steps = 8, 2
  return c
