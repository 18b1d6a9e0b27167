r"""DAFL on CIFAR-10/100 with the reference settings.

  python -m dfkd_jax.main --config configs/dafl_cifar.py:dataset=cifar10,pair=wrn40_2-wrn16_1 --workdir W \
      --config.teacher.checkpoint=checkpoints/pretrained/cifar10_wrn40_2.pth --config.data_dir=TFDS_DIR

``variant=cmi`` (default): the CMI framework script (``--kd_steps 5 --g_steps 1 --lr_g 1e-3 --oh 1
--act 0.001 --balance 20``, LargeGenerator nz 512, batch 256, lr 0.1, 200 epochs x 400 student steps).
``variant=huawei``: the original code's CIFAR command (``--n_epochs 2000 --batch_size 1024 --lr_G 0.02
--lr_S 0.1 --latent_dim 1000 --oh 0.05 --ie 5 --a 0.01``; CIFAR-100: oh 0.5, ie 20, a 0.1; student SGD
wd 5e-4 with lr x0.1 at epochs 800 and 1600; 120 iterations per epoch). On CIFAR-100 the original
normalises the test images with the CIFAR-10 constants (``DAFL-train.py:121-124``), and so does this
variant (dataset ``cifar100_huawei``; ``--config.dataset=cifar100`` evaluates with the CIFAR-100 ones).
For accelerators: a full run is hours on a GPU. ``runlocal`` for a smoke test (random teacher).
"""
from dfkd_jax import configlib


def get_config(arg=None):
  c, arg = configlib.cifar_distillation('dafl', arg, variant='cmi')
  c.variant = arg.variant
  c.kd = dict(loss='kl', temperature=20.0, reference_temperature_bug=False)
  if arg.variant == 'huawei':
    if arg.dataset == 'cifar100':
      c.dataset = 'cifar100_huawei'
    c.generator = dict(arch='dafl_generator', kwargs=dict(nz=1000, img_size=32, nc=3), output='normalized',
                       sample_mode='train')
    c.student_batch, c.g_steps, c.kd_steps = 'reuse', 1, 1
    c.batch_size = 1024
    c.loss = dict(oh=0.05, ie=5.0, a=0.01) if arg.dataset == 'cifar10' else dict(oh=0.5, ie=20.0, a=0.1)
    c.kd.temperature = 1.0
    c.optimizer_g = dict(name='adam', lr=0.02)
    c.optimizer_s = dict(name='sgd', lr=0.1, momentum=0.9, weight_decay=5e-4, schedule='multistep',
                         milestones=(800, 1600))
    configlib.finish_cifar(c, arg, num_epochs=2000, student_steps_per_epoch=120)
  else:
    configlib.cmi_generator_settings(c, nz=512)
    c.kd_steps = 5
    c.loss = dict(oh=1.0, ie=20.0, a=0.001)  # CMI-fw: --oh 1 --balance 20 --act 0.001 (natural log)
    configlib.finish_cifar(c, arg, num_epochs=200)
  return c
