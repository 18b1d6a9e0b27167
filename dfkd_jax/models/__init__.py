"""The model zoo: Flax linen models, NHWC, layer for layer as the PyTorch references."""
from dfkd_jax.models.registry import (ModelSpec, TorchLayout, canonical_name, create, get_spec,  # noqa: I001
                                      input_shape, names, register)

__all__ = ['ModelSpec', 'TorchLayout', 'canonical_name', 'create', 'get_spec', 'input_shape', 'names', 'register']
