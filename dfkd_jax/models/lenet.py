"""LeNet-5 and LeNet-5-half (CMI-fw ``lenet.py`` naming; the Huawei ``conv1..fc2`` naming is
handled by the converter). Input 32x32x1: 32 -> 28 -> 14 -> 10 -> 5 -> 1."""
from __future__ import annotations

import flax.linen as nn

from dfkd_jax.models.layers import Conv2d, Linear, max_pool
from dfkd_jax.models.registry import TorchLayout, register

# The Huawei DAFL/DFND LeNet names the same tensors conv1..conv3, fc1, fc2.
_HUAWEI_NAMES = TorchLayout(key_aliases=(
    (r'^conv1\.', 'features.0.'), (r'^conv2\.', 'features.3.'), (r'^conv3\.', 'features.6.'),
    (r'^fc1\.', 'fc.0.'), (r'^fc2\.', 'fc.2.')))


class LeNet5(nn.Module):
  """conv5-relu-pool2, conv5-relu-pool2, conv5-relu, fc-relu, fc; ``width`` 1.0 or 0.5 (half)."""
  num_classes: int = 10
  width: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    c1, c2, c3, f = (int(round(v * self.width)) for v in (6, 16, 120, 84))
    x = max_pool(nn.relu(Conv2d(c1, 5, name='features.0')(x)), 2)
    x = max_pool(nn.relu(Conv2d(c2, 5, name='features.3')(x)), 2)
    features = nn.relu(Conv2d(c3, 5, name='features.6')(x)).reshape(x.shape[0], -1)
    logits = Linear(self.num_classes, name='fc.2')(nn.relu(Linear(f, name='fc.0')(features)))
    return (logits, features) if return_features else logits


def _mnist_shape(in_channels=1, image_size=32, **_):
  return (image_size, image_size, in_channels)


@register('lenet5', aliases=('lenet', 'LeNet5'), input_shape=_mnist_shape, torch=_HUAWEI_NAMES)
def lenet5(num_classes=10, in_channels=1, **_):
  return LeNet5(num_classes=num_classes)


@register('lenet5_half', aliases=('LeNet5Half', 'lenet_half'), input_shape=_mnist_shape, torch=_HUAWEI_NAMES)
def lenet5_half(num_classes=10, in_channels=1, **_):
  return LeNet5(num_classes=num_classes, width=0.5)
