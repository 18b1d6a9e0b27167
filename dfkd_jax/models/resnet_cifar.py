"""CIFAR ResNet-18/34/50 of DAFL (copied into CMI-fw ``resnet.py``, used by DAFL, DFND, pu_compress,
NVlabs CIFAR and CMI/Fast/NAYER): 3x3 stride-1 stem, no max pool, projection shortcuts
``layerN.0.shortcut.0`` (conv) / ``.1`` (BN), global average pooling, head ``linear``; PyTorch's
default initialisation. For 32x32 inputs the DAFL ``avg_pool2d(4)`` equals the global average.

``width`` is the stem's and the first stage's channel count (64 in every reference); the stages have
``width`` x (1, 2, 4, 8) planes, so ``width=4`` is the network at 1/16 width (the reference
trajectories' ResNets). The converter reads it off a file's shapes.
"""
from __future__ import annotations

from dfkd_jax.models.registry import TorchLayout, register
from dfkd_jax.models.resnet_blocks import BasicBlock, Bottleneck, ResNet

# huawei pu_compress names the head ``fc`` instead of ``linear`` (same tensors).
_FC_HEAD = TorchLayout(key_aliases=((r'^fc\.', 'linear.'),))


def _cifar_resnet(block, stage_sizes, num_classes, width):
  return ResNet(block, stage_sizes, tuple(width * m for m in (1, 2, 4, 8)), num_classes=num_classes,
                stem_width=width, shortcut_name='shortcut', head_name='linear')


@register('resnet18', torch=_FC_HEAD)
def resnet18(num_classes=10, width=64, **_):
  return _cifar_resnet(BasicBlock, (2, 2, 2, 2), num_classes, width)


@register('resnet34', torch=_FC_HEAD)
def resnet34(num_classes=10, width=64, **_):
  return _cifar_resnet(BasicBlock, (3, 4, 6, 3), num_classes, width)


@register('resnet50', torch=_FC_HEAD)
def resnet50(num_classes=10, width=64, **_):
  return _cifar_resnet(Bottleneck, (3, 4, 6, 3), num_classes, width)
