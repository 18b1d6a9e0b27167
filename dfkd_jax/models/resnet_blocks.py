"""Residual blocks and the ResNet trunk shared by the CIFAR (DAFL), tiny (RepDistiller) and ImageNet
(torchvision) ResNet families.

The three references build the same blocks: torch ``BasicBlock`` / ``Bottleneck`` with the stride
on the 3x3 conv and, where the shape changes, a projection ``Sequential(conv1x1 stride s, BN)``. They
differ only in the projection's name (``shortcut`` or ``downsample``), the stem, the stage widths, the
pooling, the head's name and the initialisation; these are fields of ``ResNet`` here.
"""
from __future__ import annotations

import functools
from typing import Callable, ClassVar, Sequence

import flax.linen as nn

from dfkd_jax.errors import UserError
from dfkd_jax.models.layers import BatchNorm, Conv2d, Linear, avg_pool, global_avg_pool, max_pool


def _shortcut(block: nn.Module, x, out_channels: int, train: bool):
  """The block input itself, or its projection ``<shortcut_name>.0`` (1x1 conv) + ``.1`` (BN) where
  the stride or the channel count changes. Called inside the block's compact ``__call__``."""
  if block.stride == 1 and x.shape[-1] == out_channels:
    return x
  x = Conv2d(out_channels, 1, block.stride, use_bias=False, kernel_init=block.conv_init,
             name=f'{block.shortcut_name}.0')(x)
  return BatchNorm(use_running_average=not train, name=f'{block.shortcut_name}.1')(x)


class _ResidualBlock(nn.Module):
  """The fields every residual block has: output ``planes`` (times ``expansion``), the stride of its
  strided convolution, the name of its projection shortcut and the conv kernel initialiser."""
  planes: int
  stride: int = 1
  shortcut_name: str = 'shortcut'
  conv_init: Callable | None = None


class BasicBlock(_ResidualBlock):
  """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); conv1 is 3x3 with ``stride``."""
  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(Conv2d, self.planes, use_bias=False, kernel_init=self.conv_init)
    bn = functools.partial(BatchNorm, use_running_average=not train)
    y = nn.relu(bn(name='bn1')(conv(3, self.stride, 1, name='conv1')(x)))
    y = bn(name='bn2')(conv(3, 1, 1, name='conv2')(y))
    return nn.relu(y + _shortcut(self, x, self.planes, train))


class Bottleneck(_ResidualBlock):
  """1x1 -> 3x3 (``stride``, the torchvision "v1.5" placement used by every reference) -> 1x1 to
  4*planes, BN after each, ReLU after the first two and after the residual sum."""
  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(Conv2d, use_bias=False, kernel_init=self.conv_init)
    bn = functools.partial(BatchNorm, use_running_average=not train)
    out_channels = self.planes * self.expansion
    y = nn.relu(bn(name='bn1')(conv(self.planes, 1, name='conv1')(x)))
    y = nn.relu(bn(name='bn2')(conv(self.planes, 3, self.stride, 1, name='conv2')(y)))
    y = bn(name='bn3')(conv(out_channels, 1, name='conv3')(y))
    return nn.relu(y + _shortcut(self, x, out_channels, train))


class ResNetStage(nn.Module):
  """torch ``_make_layer``: ``num_blocks`` blocks named ``0, 1, ...``; the first one has ``stride``.

  A module of its own (named ``layerN`` by ``ResNet``) so that its input can be tapped, as CMI does
  for its ResNet-34 features (``dfkd_jax.models.hooks.apply_with_input_taps``).
  """
  block: type[nn.Module]
  planes: int
  num_blocks: int
  stride: int = 1
  shortcut_name: str = 'shortcut'
  conv_init: Callable | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i in range(self.num_blocks):
      x = self.block(self.planes, self.stride if i == 0 else 1, self.shortcut_name, self.conv_init,
                     name=str(i))(x, train)
    return x


class ResNet(nn.Module):
  """stem -> ``layer1..layerK`` -> average pooling -> linear head ``head_name``.

  Stem: ``conv1`` (3x3 stride 1 pad 1, or with ``imagenet_stem`` 7x7 stride 2 pad 3) -> ``bn1`` ->
  ReLU (-> MaxPool 3/2/1 with ``imagenet_stem``). Stage ``k`` has ``widths[k]`` planes and stride 1
  for the first stage, 2 after. Pooling is global, or ``AvgPool2d(pool_window)`` when set (which
  then requires a ``pool_window`` x ``pool_window`` final map, as the reference's flatten does).
  Returns logits, or ``(logits, pooled features)`` with ``return_features``.
  """
  block: type[nn.Module]
  stage_sizes: Sequence[int]
  widths: Sequence[int]
  num_classes: int = 10
  stem_width: int = 64
  imagenet_stem: bool = False
  shortcut_name: str = 'shortcut'
  head_name: str = 'linear'
  pool_window: int | None = None
  conv_init: Callable | None = None

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    k, stride, pad = (7, 2, 3) if self.imagenet_stem else (3, 1, 1)
    x = Conv2d(self.stem_width, k, stride, pad, use_bias=False, kernel_init=self.conv_init, name='conv1')(x)
    x = nn.relu(BatchNorm(use_running_average=not train, name='bn1')(x))
    if self.imagenet_stem:
      x = max_pool(x, 3, 2, 1)
    for i, (num_blocks, planes) in enumerate(zip(self.stage_sizes, self.widths)):
      x = ResNetStage(self.block, planes, num_blocks, 1 if i == 0 else 2, self.shortcut_name, self.conv_init,
                      name=f'layer{i + 1}')(x, train)
    if self.pool_window is None:
      features = global_avg_pool(x)
    else:
      w = self.pool_window
      if x.shape[1:3] != (w, w):
        raise UserError(f'this ResNet ends with AvgPool2d({w}) and needs a {w}x{w} final feature map, got '
                        f'{x.shape[1]}x{x.shape[2]}; use 32x32 inputs')
      features = avg_pool(x, w).reshape(x.shape[0], -1)
    logits = Linear(self.num_classes, name=self.head_name)(features)
    return (logits, features) if return_features else logits
