"""RepDistiller's CIFAR ResNets (CMI-fw ``resnet_tiny.py``): resnet8/14/20/32/44/56/110 with widths
16-16-32-64 and resnet8x4/32x4 with 32-64-128-256.

3x3 stride-1 stem, (depth - 2) / 6 basic blocks per stage in three stages (strides 1, 2, 2),
projections ``layerN.0.downsample.0`` (conv) / ``.1`` (BN) where the shape changes, ``AvgPool2d(8)``
(so 32x32 inputs), head ``fc``. Convs are initialised kaiming-normal (fan_out), as the reference does.
"""
from __future__ import annotations

import functools

from dfkd_jax.errors import UserError
from dfkd_jax.models.layers import kaiming_normal_fan_out
from dfkd_jax.models.registry import register
from dfkd_jax.models.resnet_blocks import BasicBlock, ResNet

_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def resnet_tiny(depth: int, filters=_NARROW, num_classes=10, **_):
  """RepDistiller ``ResNet(depth, filters, 'basicblock')``: stem width ``filters[0]``, stages ``filters[1:]``."""
  if depth < 8 or (depth - 2) % 6:
    raise UserError(f'resnet_tiny depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {depth}')
  n = (depth - 2) // 6
  return ResNet(BasicBlock, (n, n, n), tuple(filters[1:]), num_classes=num_classes, stem_width=filters[0],
                shortcut_name='downsample', head_name='fc', pool_window=8, conv_init=kaiming_normal_fan_out)


for _depth in (8, 14, 20, 32, 44, 56, 110):
  register(f'resnet{_depth}')(functools.partial(resnet_tiny, _depth, _NARROW))
for _depth in (8, 32):
  register(f'resnet{_depth}x4')(functools.partial(resnet_tiny, _depth, _WIDE))
