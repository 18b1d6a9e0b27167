"""MobileNetV2 (the torchvision copy in CMI-fw ``mobilenetv2.py``), used unchanged on CIFAR.

``features.0`` ConvBNReLU6 (3x3, stride 2: a 32x32 input ends at 1x1), ``features.1..17`` inverted
residual blocks, ``features.18`` ConvBNReLU6 (1x1, 1280), global average, ``classifier.0`` Dropout(0.2)
(off in eval, needs a ``'dropout'`` rng in train mode), ``classifier.1`` Linear. Initialisation as
the reference: convs kaiming-normal (fan_out), BN (1, 0), Linear N(0, 0.01) with bias 0.
"""
from __future__ import annotations

import flax.linen as nn

from dfkd_jax.models.layers import BatchNorm, Conv2d, Linear, global_avg_pool, kaiming_normal_fan_out
from dfkd_jax.models.registry import register

# (expansion t, output channels c, repeats n, first stride s) per stage.
_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
           (6, 320, 1, 1))


def make_divisible(value: float, divisor: int = 8) -> int:
  """Nearest multiple of ``divisor`` (at least ``divisor``), never more than 10% below ``value``."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNReLU6(nn.Module):
  """torchvision ``ConvBNActivation``: conv ``0`` (no bias, padding (k-1)//2), BN ``1``, ReLU6."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  groups: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Conv2d(self.features, self.kernel_size, self.stride, (self.kernel_size - 1) // 2, use_bias=False,
               groups=self.groups, kernel_init=kaiming_normal_fan_out, name='0')(x)
    return nn.relu6(BatchNorm(use_running_average=not train, name='1')(x))


class InvertedResidual(nn.Module):
  """``conv.*``: [1x1 expansion ConvBNReLU6 if t != 1] -> 3x3 depthwise ConvBNReLU6 (``stride``) ->
  1x1 linear conv -> BN; plus the input when the stride is 1 and the channel count is kept."""
  out_channels: int
  stride: int
  expand_ratio: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    hidden = int(round(x.shape[-1] * self.expand_ratio))
    y, first = x, 0  # Sequential index of the depthwise layer
    if self.expand_ratio != 1:
      y = ConvBNReLU6(hidden, 1, name='conv.0')(y, train)
      first = 1
    y = ConvBNReLU6(hidden, 3, self.stride, hidden, name=f'conv.{first}')(y, train)
    y = Conv2d(self.out_channels, 1, use_bias=False, kernel_init=kaiming_normal_fan_out,
               name=f'conv.{first + 1}')(y)
    y = BatchNorm(use_running_average=not train, name=f'conv.{first + 2}')(y)
    return x + y if self.stride == 1 and x.shape[-1] == self.out_channels else y


class MobileNetV2(nn.Module):
  """Returns logits, or ``(logits, pooled features)`` with ``return_features``."""
  num_classes: int = 10
  width_mult: float = 1.0
  dropout_rate: float = 0.2

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    x = ConvBNReLU6(make_divisible(32 * self.width_mult), 3, 2, name='features.0')(x, train)
    index = 1
    for t, c, n, s in _STAGES:
      for i in range(n):
        x = InvertedResidual(make_divisible(c * self.width_mult), s if i == 0 else 1, t,
                             name=f'features.{index}')(x, train)
        index += 1
    last = make_divisible(1280 * max(1.0, self.width_mult))
    features = global_avg_pool(ConvBNReLU6(last, 1, name=f'features.{index}')(x, train))
    y = nn.Dropout(self.dropout_rate)(features, deterministic=not train)
    logits = Linear(self.num_classes, kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros,
                    name='classifier.1')(y)
    return (logits, features) if return_features else logits


@register('mobilenetv2', aliases=('mobilenet_v2',))
def mobilenetv2(num_classes=10, width_mult=1.0, dropout_rate=0.2, **_):
  return MobileNetV2(num_classes, width_mult, dropout_rate)
