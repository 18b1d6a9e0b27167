r"""Trains the embedded BatchNorm teacher for MNIST: resnet8 (RepDistiller's CIFAR ResNet, 1-channel
32x32 input, 9 BatchNorm layers) on the 4,500 embedded real MNIST training digits.

  python -m dfkd_jax.main --config configs/teacher_resnet8_mnist.py --workdir workdirs/teacher_resnet8

The inversion methods (DeepInversion, CMI, ...) match the teacher's BatchNorm statistics, which
LeNet-5 lacks. A few minutes on a 2-core CPU. Evaluates on the real 10,000-image MNIST test set
when it is available (``--config.eval.data=idx:PATH --config.eval.split=test``; default: the 500
held-out embedded digits). The trained model is exported to ``WORKDIR/model`` (the format of
``dfkd_jax/assets/teachers/resnet8_mnist``). Variants: ``:runlocal`` (a few steps, for smoke tests).
"""
from dfkd_jax import configlib


def get_config(arg=None):
  arg = configlib.parse_arg(arg, runlocal=False)
  c = configlib.base(method='supervised', dataset='mnist', num_classes=10, image_size=32, in_channels=1,
                     eval_data='embedded_mnist', eval_split='heldout')
  c.model = dict(arch='resnet8', kwargs={'in_channels': 1})
  c.train_data = dict(source='embedded_mnist', split='train')
  c.batch_size = 64
  c.num_epochs = 30
  # SGD with a per-epoch cosine, as the reference zoo trains its CIFAR teachers; random 2-px shifts
  # make up for the 4,500 digits.
  c.optimizer = dict(name='sgd', lr=0.1, momentum=0.9, weight_decay=5e-4, schedule='cosine')
  c.augment = dict(crop_padding=2, flip=False)
  for cadence in (c.eval, c.checkpoint):
    cadence.update(configlib.cadence(every_epochs=10))
  if arg.runlocal:
    c.num_epochs = 1
    for cadence in (c.eval, c.checkpoint):
      cadence.update(configlib.cadence(every_epochs=0.5))
    c.log.every_steps = 10
  return c
