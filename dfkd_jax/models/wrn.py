"""Wide ResNets WRN-depth-k (CMI-fw ``wresnet.py``, module names as polo5/ZeroShotKnowledgeTransfer).

``conv1`` (3x3, 16) -> groups ``block1..3`` of (depth - 4) / 6 pre-activation blocks ``layer.i`` with
16k, 32k, 64k channels (strides 1, 2, 2) -> ``bn1`` -> ReLU -> global average -> ``fc``.
Convs are initialised N(0, sqrt(2 / (k*k*out))), BN (1, 0), the ``fc`` bias 0 (its weight keeps
PyTorch's default), as the reference does.
"""
from __future__ import annotations

import functools

import flax.linen as nn

from dfkd_jax.errors import UserError
from dfkd_jax.models.layers import BatchNorm, Conv2d, Linear, global_avg_pool, kaiming_normal_fan_out
from dfkd_jax.models.registry import register

# N(0, sqrt(2 / (k*k*out))) is kaiming-normal with fan_out.
_conv = functools.partial(Conv2d, use_bias=False, kernel_init=kaiming_normal_fan_out)


class WideBasicBlock(nn.Module):
  """Pre-activation block: bn1 -> relu -> conv1 (3x3, ``stride``) -> bn2 -> relu -> dropout -> conv2.

  When the channel count changes, the residual is ``convShortcut`` (1x1, ``stride``, no BN) applied to
  relu(bn1(x)), the same activated tensor conv1 reads; otherwise it is the raw x.
  """
  out_channels: int
  stride: int = 1
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = functools.partial(BatchNorm, use_running_average=not train)
    activated = nn.relu(bn(name='bn1')(x))
    y = nn.relu(bn(name='bn2')(_conv(self.out_channels, 3, self.stride, 1, name='conv1')(activated)))
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    y = _conv(self.out_channels, 3, 1, 1, name='conv2')(y)
    if x.shape[-1] == self.out_channels:
      return x + y
    return _conv(self.out_channels, 1, self.stride, name='convShortcut')(activated) + y


class WideGroup(nn.Module):
  """torch ``NetworkBlock``: blocks ``layer.0 .. layer.{n-1}``, the first with ``stride``."""
  out_channels: int
  num_blocks: int
  stride: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i in range(self.num_blocks):
      x = WideBasicBlock(self.out_channels, self.stride if i == 0 else 1, self.dropout_rate,
                         name=f'layer.{i}')(x, train)
    return x


class WideResNet(nn.Module):
  """WRN-``depth``-``widen_factor``; returns logits, or ``(logits, pooled features)``.

  ``dropout_rate > 0`` needs a ``'dropout'`` rng in train mode.
  """
  depth: int
  widen_factor: int = 1
  num_classes: int = 10
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    n = (self.depth - 4) // 6
    x = _conv(16, 3, 1, 1, name='conv1')(x)
    for g, stride in enumerate((1, 2, 2)):
      x = WideGroup(16 * 2**g * self.widen_factor, n, stride, self.dropout_rate, name=f'block{g + 1}')(x, train)
    features = global_avg_pool(nn.relu(BatchNorm(use_running_average=not train, name='bn1')(x)))
    logits = Linear(self.num_classes, bias_init=nn.initializers.zeros, name='fc')(features)
    return (logits, features) if return_features else logits


@register('wrn', aliases=('wide_resnet', 'wideresnet'))
def wrn(num_classes=10, depth=None, widen_factor=1, dropout_rate=0.0, **_):
  """Any valid WRN, e.g. ``create('wrn', depth=28, widen_factor=10)``."""
  if depth is None or (depth - 4) % 6 or depth < 10:
    raise UserError(f"wrn needs depth=6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got depth={depth}")
  if int(widen_factor) != widen_factor or widen_factor < 1:
    raise UserError(f'wrn widen_factor must be a positive integer, got {widen_factor}')
  return WideResNet(depth, int(widen_factor), num_classes, dropout_rate)


for _depth, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
  register(f'wrn{_depth}_{_k}', aliases=(f'wrn_{_depth}_{_k}',))(
      functools.partial(wrn, depth=_depth, widen_factor=_k))
