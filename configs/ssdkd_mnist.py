r"""SSD-KD on MNIST: the embedded BatchNorm teacher resnet8 -> LeNet-5-half, distilled from a small
synthetic set of ``data_budget`` digits (default 6,000 = 10% of MNIST's 60,000 training images)
kept balanced by the modulating function φ in a replay buffer and read by priority sampling δ.

  python -m dfkd_jax.main --config configs/ssdkd_mnist.py --workdir workdirs/ssdkd_mnist \
      --config.eval.data=idx:PATH/TO/mnist --config.eval.split=test

Everything else is configs/fast_mnist.py (read from it): the Fast-5 meta-generator (lr_g 1e-2,
oh 1.0, bn 10, adv 1.1, bn_mmt 0.9, reset_l0 after 9 epochs), two synthesis-only warm-up epochs,
92 synthesis calls of 256 digits each followed by 80 student steps (batch 128, Adam 2e-3), crop-pad
2 and no flips, and 4 stored crops of each digit with the teacher's logits on each (a student step
runs no teacher). So the two runs differ only in what SSD-KD adds: φ on the generator's per-digit
terms, on admission and on the student's loss; a class-balanced buffer of ``data_budget`` digits
in place of Fast's pool of the last 24 calls (6,144 digits); prioritised reads with importance
weights in place of a shuffled pass. The switches of ``config.ssdkd`` default to the
reconstruction of the paper's missing details (docs/ssdkd.md). ``:runlocal`` for a smoke test,
``:data_budget=1000`` for another budget (any number of images, at least one synthesis batch).
"""
import os

from dfkd_jax import configlib
from dfkd_jax.methods import ssdkd

MNIST_TRAIN_SIZE = 60000


def get_config(arg=None):
  arg = configlib.parse_arg(arg, runlocal=False, data_budget=MNIST_TRAIN_SIZE // 10)
  fast_arg = 'runlocal' if arg.runlocal else ''
  c = ssdkd.from_fast(os.path.join(os.path.dirname(__file__), 'fast_mnist.py'), fast_arg, data_budget=arg.data_budget)
  if arg.runlocal:  # 48 digits: full after two calls of 32, then admission evicts
    c.data_budget = min(c.data_budget, 48)
  return c
