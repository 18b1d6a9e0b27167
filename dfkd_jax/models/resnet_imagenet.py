"""torchvision-style ImageNet ResNet-18/34/50 (CMI-fw / Fast-Datafree ``resnet_in.py``): 7x7 stride-2
stem (pad 3), MaxPool 3/2/1, projections ``layerN.0.downsample.0/1``, global average pooling, head
``fc``; convs initialised kaiming-normal (fan_out) as torchvision does. Default input 224x224.
"""
from __future__ import annotations

from dfkd_jax.models.layers import kaiming_normal_fan_out
from dfkd_jax.models.registry import register
from dfkd_jax.models.resnet_blocks import BasicBlock, Bottleneck, ResNet


def _imagenet_shape(in_channels=3, image_size=224, **_):
  return (image_size, image_size, in_channels)


def _imagenet_resnet(block, stage_sizes, num_classes):
  return ResNet(block, stage_sizes, (64, 128, 256, 512), num_classes=num_classes, imagenet_stem=True,
                shortcut_name='downsample', head_name='fc', conv_init=kaiming_normal_fan_out)


@register('resnet18_imagenet', input_shape=_imagenet_shape)
def resnet18_imagenet(num_classes, **_):
  return _imagenet_resnet(BasicBlock, (2, 2, 2, 2), num_classes)


@register('resnet34_imagenet', input_shape=_imagenet_shape)
def resnet34_imagenet(num_classes, **_):
  return _imagenet_resnet(BasicBlock, (3, 4, 6, 3), num_classes)


@register('resnet50_imagenet', input_shape=_imagenet_shape)
def resnet50_imagenet(num_classes, **_):
  return _imagenet_resnet(Bottleneck, (3, 4, 6, 3), num_classes)
