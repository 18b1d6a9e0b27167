r"""SSD-KD on CIFAR-10/100 for the five teacher -> student pairs of the Fast scripts, from a small
synthetic set of ``data_budget`` images (default 5,000 = 10% of the 50,000 training images, the
paper's "10% data scale") kept balanced by φ in a replay buffer and read by priority sampling δ.

  python -m dfkd_jax.main --config configs/ssdkd_cifar.py:dataset=cifar100,pair=wrn40_2-wrn16_1 --workdir W \
      --config.teacher.checkpoint=checkpoints/pretrained/cifar100_wrn40_2.pth --config.data_dir=TFDS_DIR

Everything else is configs/fast_cifar.py (read from it) at ``steps`` 2 by default: SSD-KD's speed
reference is Fast-2 (g_steps 2, lr_z 0.015, lr_g 5e-3; ``steps=5`` or ``steps=10`` for the others),
with the pair's loss weights (``pair=resnet34-resnet18`` adv 1.33 / bn 10 / oh 0.5,
``pair=vgg11-resnet18`` 1.0 / 10 / 0.5, the WRN-40-2 pairs ``pair=wrn40_2-wrn16_1``,
``pair=wrn40_2-wrn16_2``, ``pair=wrn40_2-wrn40_1`` 1.1 / 10 / 0.4), FOMAML, bn_mmt 0.9, reset_l0
at epoch 120 + warm-up, synthesis batch 256, 220 epochs of one call and 400 student steps (batch
256, SGD 0.2, T 20), the first 20 synthesis-only, cosine T_max 200, and the student's crops drawn
when read. The paper's epochs and student steps are unknown; it claims 1.9-3.9x (CIFAR-10) and
3.3-10.2x (CIFAR-100) less total time than Fast-2, so it likely trained for fewer
(``--config.num_epochs``, ``--config.kd_steps``). ``dataset=cifar10`` (default) or
``dataset=cifar100``; ``data_budget=2500`` or any other number of images; ``runlocal`` for a smoke
test (random teacher).
"""
import os

from dfkd_jax import configlib
from dfkd_jax.methods import ssdkd

CIFAR_TRAIN_SIZE = 50000


def get_config(arg=None):
  arg = configlib.parse_arg(arg, dataset='cifar10', pair='wrn40_2-wrn16_1', steps=2, runlocal=False,
                            data_budget=CIFAR_TRAIN_SIZE // 10)
  fast_arg = f'dataset={arg.dataset},pair={arg.pair},steps={arg.steps}' + (',runlocal' if arg.runlocal else '')
  c = ssdkd.from_fast(os.path.join(os.path.dirname(__file__), 'fast_cifar.py'), fast_arg, data_budget=arg.data_budget)
  if arg.runlocal:  # 16 images: full after two calls of 8, then admission evicts
    c.data_budget = min(c.data_budget, 16)
  return c
