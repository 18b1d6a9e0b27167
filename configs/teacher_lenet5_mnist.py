r"""Trains the embedded default teacher: LeNet-5 on the 4,500 embedded real MNIST training digits.

  python -m dfkd_jax.main --config configs/teacher_lenet5_mnist.py --workdir workdirs/teacher_lenet5

About 2 minutes on a 2-core CPU. Evaluates on the real 10,000-image MNIST test set when it is
available (``--config.eval.data=idx:PATH``; default: the 500 held-out embedded digits). The trained
model is exported to ``WORKDIR/model`` (the format of ``dfkd_jax/assets/teachers/lenet5_mnist``).
Variants: ``:runlocal`` (a few steps, for smoke tests).
"""
from dfkd_jax import configlib


def get_config(arg=None):
  arg = configlib.parse_arg(arg, runlocal=False)
  c = configlib.base(method='supervised', dataset='mnist', num_classes=10, image_size=32, in_channels=1,
                     eval_data='embedded_mnist', eval_split='heldout')
  c.model = dict(arch='lenet5', kwargs={})
  c.train_data = dict(source='embedded_mnist', split='train')
  c.batch_size = 64
  c.num_epochs = 40
  # The DAFL teacher recipe is Adam 1e-3; a step decay and random 2-px shifts make up for the
  # 4,500 digits (the reference trains on 60,000).
  c.optimizer = dict(name='adam', lr=1e-3, schedule='multistep', milestones=(25, 35), gamma=0.2)
  c.augment = dict(crop_padding=2, flip=False)
  for cadence in (c.eval, c.checkpoint):
    cadence.update(configlib.cadence(every_epochs=10))
  if arg.runlocal:
    c.num_epochs = 1
    for cadence in (c.eval, c.checkpoint):
      cadence.update(configlib.cadence(every_epochs=0.5))
    c.log.every_steps = 10
  return c
