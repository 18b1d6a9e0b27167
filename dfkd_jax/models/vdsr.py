"""DFSR's super-resolution networks and its generator (huawei ``DEMC/DFSR``).

- ``vdsr``: the VDSR teacher ``Net``: ``input`` Conv3x3(1->64) -> ReLU -> 18 x ``residual_layer.{i}``
  [``conv`` Conv3x3(64->64) -> ReLU] -> ``output`` Conv3x3(64->1) -> + input (global residual).
  No biases. 664,704 parameters.
- ``vdsr_half``: the student ``NetHalf``, the same with 32 channels. 166,464 parameters.
- ``dfsr_generator``: ``GeneratorINE1`` (see ``generators.DaflGenerator`` with ``instance_norm``).

Input and output are the NHWC luminance channel (N, H, W, 1); the network keeps the size.

Progressive depth (DFSR's ``inc_num``): the reference builds a student with ``block_num = d``
residual blocks and loads the previous, shallower student into it with ``strict=False``. Here
``num_blocks=d`` builds the same network, ``warm_start`` does the partial load, and a
``num_blocks=d`` model applied to a deeper model's variables uses only its first d blocks.
Teacher checkpoints are DataParallel state_dicts; the converter strips the ``module.`` prefix.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from dfkd_jax.models.generators import DaflGenerator, linear_view_layout
from dfkd_jax.models.layers import Conv2d, kaiming_normal_fan_out
from dfkd_jax.models.registry import register

Array = jax.Array


class VDSR(nn.Module):
  """VDSR with ``width`` channels and ``num_blocks`` residual Conv-ReLU blocks.

  Weights are initialised as the reference: N(0, sqrt(2 / (3*3*out_channels))).
  """
  width: int = 64
  num_blocks: int = 18

  @nn.compact
  def __call__(self, x: Array, train: bool = False, depth: Array | None = None) -> Array:
    """``depth`` (optional, traced int): only the first ``depth`` blocks act, the others pass their
    input through, which is the ``num_blocks=depth`` network on the same variables (DFSR's
    progressive distillation inside one compiled program)."""
    def conv(features, name):
      return Conv2d(features, 3, padding=1, use_bias=False, kernel_init=kaiming_normal_fan_out, name=name)

    out = nn.relu(conv(self.width, 'input')(x))
    for i in range(self.num_blocks):
      block = nn.relu(conv(self.width, f'residual_layer.{i}.conv')(out))
      out = block if depth is None else jnp.where(i < depth, block, out)
    return conv(1, 'output')(out) + x


def warm_start(fresh: Any, previous: Any) -> Any:
  """``load_state_dict(previous, strict=False)`` on a freshly initialised deeper student:
  every leaf of ``fresh`` that ``previous`` also has (same path) is taken from ``previous``."""
  flat_prev = traverse_util.flatten_dict(previous)
  flat = {path: flat_prev.get(path, value) for path, value in traverse_util.flatten_dict(fresh).items()}
  return traverse_util.unflatten_dict(flat)


def _sr_shape(image_size=48, **_):
  return (image_size, image_size, 1)


@register('vdsr', kind='sr', aliases=('vdsr_net',), input_shape=_sr_shape)
def vdsr(num_blocks=18, **_):
  return VDSR(width=64, num_blocks=num_blocks)


@register('vdsr_half', kind='sr', aliases=('NetHalf', 'vdsr_nethalf'), input_shape=_sr_shape)
def vdsr_half(num_blocks=18, **_):
  return VDSR(width=32, num_blocks=num_blocks)


@register('dfsr_generator', kind='generator', aliases=('GeneratorINE1',),
          input_shape=lambda nz=256, **_: (nz,), torch=linear_view_layout('l1.0', lambda **_: 128, 24))
def dfsr_generator(nz=256, img_size=24, nc=1, **_):
  """``GeneratorINE1(img_size, channels, latent)``. DFSR builds one per scale s in {2, 3, 4} with
  img_size = input_size // s (24, 16, 12 for the README's 48); the output side is 4*(img_size//4)."""
  return DaflGenerator(ngf=64, nc=nc, img_size=img_size, inner_eps=0.8, instance_norm=True)
