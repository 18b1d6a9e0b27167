r"""DFAD on CIFAR-10/100 with the CMI framework's settings (``--kd_steps 5 --adv 1 --T 1``: L1 on
logits for both players, LargeGenerator nz 256, batch 256, lr 0.1, 200 epochs x 400 student steps).

  python -m dfkd_jax.main --config configs/dfad_cifar.py:dataset=cifar10,pair=resnet34-resnet18 --workdir W \
      --config.teacher.checkpoint=checkpoints/pretrained/cifar10_resnet34.pth --config.data_dir=TFDS_DIR

``runlocal`` for a smoke test (random teacher).
"""
from dfkd_jax import configlib


def get_config(arg=None):
  c, arg = configlib.cifar_distillation('dfad', arg)
  configlib.cmi_generator_settings(c, nz=256)
  c.kd_steps = 5
  c.loss = dict(adv=1.0)
  c.kd = dict(loss='l1')
  configlib.finish_cifar(c, arg, num_epochs=200)
  return c
