"""Imports every model family so that its architectures are registered."""
from dfkd_jax.models import lenet  # noqa: F401
from dfkd_jax.models import mobilenetv2  # noqa: F401
from dfkd_jax.models import resnet_cifar  # noqa: F401
from dfkd_jax.models import resnet_imagenet  # noqa: F401
from dfkd_jax.models import resnet_tiny  # noqa: F401
from dfkd_jax.models import vgg  # noqa: F401
from dfkd_jax.models import wrn  # noqa: F401
from dfkd_jax.models import generators, vdsr  # noqa: F401
