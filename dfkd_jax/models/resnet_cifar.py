"""CIFAR ResNet-18/34/50 of DAFL (copied into CMI-fw ``resnet.py``, used by DAFL, DFND, pu_compress,
NVlabs CIFAR and CMI/Fast/NAYER): 3x3 stride-1 stem, no max pool, projection shortcuts
``layerN.0.shortcut.0`` (conv) / ``.1`` (BN), global average pooling, head ``linear``; PyTorch's
default initialisation. For 32x32 inputs the DAFL ``avg_pool2d(4)`` equals the global average.
"""
from __future__ import annotations

from dfkd_jax.models.registry import TorchLayout, register
from dfkd_jax.models.resnet_blocks import BasicBlock, Bottleneck, ResNet

# huawei pu_compress names the head ``fc`` instead of ``linear`` (same tensors).
_FC_HEAD = TorchLayout(key_aliases=((r'^fc\.', 'linear.'),))


def _cifar_resnet(block, stage_sizes, num_classes):
  return ResNet(block, stage_sizes, (64, 128, 256, 512), num_classes=num_classes, shortcut_name='shortcut',
                head_name='linear')


@register('resnet18', torch=_FC_HEAD)
def resnet18(num_classes=10, **_):
  return _cifar_resnet(BasicBlock, (2, 2, 2, 2), num_classes)


@register('resnet34', torch=_FC_HEAD)
def resnet34(num_classes=10, **_):
  return _cifar_resnet(BasicBlock, (3, 4, 6, 3), num_classes)


@register('resnet50', torch=_FC_HEAD)
def resnet50(num_classes=10, **_):
  return _cifar_resnet(Bottleneck, (3, 4, 6, 3), num_classes)
