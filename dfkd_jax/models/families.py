"""Imports every model family so that its architectures are registered."""
from dfkd_jax.models import lenet  # noqa: F401
