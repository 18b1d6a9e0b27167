"""VGG-8/11/13/16/19 with BatchNorm (RepDistiller ``vgg.py`` as in CMI-fw; ``vggN`` means ``vggN_bn``).

Five blocks ``block0..4`` of conv3x3 (pad 1, with bias) + BN; inside a block the Sequential indices
are conv ``3j``, BN ``3j + 1`` (the ReLU at ``3j + 2`` is a parameter-free module; the block's last
ReLU is dropped from the Sequential and applied by the network). MaxPool 2 after blocks 0-2, after
block 3 only when the input is 64 pixels high, then global average pooling and ``classifier``.
Initialisation as the reference: convs N(0, sqrt(2 / (k*k*out))) with bias 0, BN (1, 0),
``classifier`` N(0, 0.01) with bias 0.
"""
from __future__ import annotations

import functools

import flax.linen as nn

from dfkd_jax.models.layers import BatchNorm, Conv2d, Linear, global_avg_pool, kaiming_normal_fan_out, max_pool
from dfkd_jax.models.registry import register

# Output channels of each conv, per block (the reference's cfg S, A, B, D, E).
_CONFIGS = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


class VGGBlock(nn.Module):
  """conv-BN pairs with ReLUs between them; returns the last BN's output (pre-ReLU)."""
  widths: tuple[int, ...]

  @nn.compact
  def __call__(self, x, train: bool = False):
    for j, width in enumerate(self.widths):
      if j:
        x = nn.relu(x)
      x = Conv2d(width, 3, padding=1, kernel_init=kaiming_normal_fan_out, bias_init=nn.initializers.zeros,
                 name=str(3 * j))(x)
      x = BatchNorm(use_running_average=not train, name=str(3 * j + 1))(x)
    return x


class VGG(nn.Module):
  """Returns logits, or ``(logits, pooled features)`` with ``return_features``."""
  blocks: tuple[tuple[int, ...], ...]
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    height = x.shape[1]
    for k, widths in enumerate(self.blocks):
      x = nn.relu(VGGBlock(widths, name=f'block{k}')(x, train))
      if k < 3 or (k == 3 and height == 64):
        x = max_pool(x, 2)
    features = global_avg_pool(x)
    logits = Linear(self.num_classes, kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros,
                    name='classifier')(features)
    return (logits, features) if return_features else logits


def vgg(depth: int, num_classes=10, **_):
  return VGG(_CONFIGS[depth], num_classes)


for _depth in _CONFIGS:
  register(f'vgg{_depth}', aliases=(f'vgg{_depth}_bn',))(functools.partial(vgg, _depth))
