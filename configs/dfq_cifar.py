r"""DFQ on CIFAR-10/100 with the CMI framework's settings (zju-vipa/CMI ``scripts/dfq/*.sh``:
``--kd_steps 10 --adv 1 --bn 1 --oh 1 --balance 20``, LargeGenerator nz 256, batch 256, lr 0.1,
200 epochs x 400 student steps). Student KD at the scripts' ``--T 20`` (the framework's criterion
bug, which runs it at T = 1, is ``kd.reference_temperature_bug=True``), except resnet34-resnet18 on
CIFAR-100, whose script (``dfq_cifar10_res34_res18.sh``, the CIFAR-100 run) passes ``--T 1`` and
``--lr 0.05``.

  python -m dfkd_jax.main --config configs/dfq_cifar.py:dataset=cifar100,pair=resnet34-resnet18 --workdir W \
      --config.teacher.checkpoint=checkpoints/pretrained/cifar100_resnet34.pth --config.data_dir=TFDS_DIR

``runlocal`` for a smoke test (random teacher).
"""
from dfkd_jax import configlib


def get_config(arg=None):
  c, arg = configlib.cifar_distillation('dfq', arg)
  configlib.cmi_generator_settings(c, nz=256)
  c.kd_steps = 10
  c.loss = dict(bn=1.0, oh=1.0, adv=1.0, balance=20.0)
  c.kd = dict(loss='kl', temperature=20.0, reference_temperature_bug=False)
  if arg.dataset == 'cifar100' and arg.pair == 'resnet34-resnet18':
    c.optimizer_s.lr = 0.05
    c.kd.temperature = 1.0
  configlib.finish_cifar(c, arg, num_epochs=200)
  return c
