"""Imports every model family so that its architectures are registered."""
from dfkd_jax.models import (generators, lenet, mobilenetv2, resnet_cifar, resnet_imagenet,  # noqa: F401, I001
                             resnet_tiny, vdsr, vgg, wrn)
