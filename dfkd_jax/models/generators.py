"""The image generators of the data-free KD references: a latent (N, nz) to an NHWC image.

Layer for layer as the PyTorch classes, with Flax module names equal to the torch module paths:

- ``cmi_generator``: CMI/Fast ``Generator`` (Sigmoid output, [0, 1]).
- ``cmi_large_generator``: CMI-fw ``LargeGenerator`` (DAFL/ZSKT/DFAD/DFQ inside CMI-fw).
- ``cudfkd_generator``: CuDFKD ``DCGAN_Generator_CIFAR10`` (the same stack under ``project.1``/``main.*``).
- ``nayer_generator``: NAYER ``NLGenerator`` (label-embedding input, per-chunk noisy layers).
- ``dafl_generator``: the original DAFL generator (Tanh, then an affine-free BatchNorm output).
- ``dfad_generator``: DFAD ``GeneratorA`` (the DAFL layout with default BatchNorm eps).
- ``zskt_generator``: the original ZSKT generator (x1.6 upsampling, affine-free BatchNorm output).

Every generator is called as ``model.apply(variables, z, train)``; ``train=True`` normalises with
batch statistics and updates the running statistics (``mutable=['batch_stats']``).

Re-initialisation that methods rely on is functional: ``reset_params`` (CMI's ``reset_model``),
``reset_l0`` (Fast's ``reset_l0``) and ``redraw_noisy_layers`` (NAYER's ``re_init_le``) take the
generator's ``params`` and a PRNG key and return new params; running statistics are kept, as in
the references. Each is a draw of the new values (``draw_reset``, ``draw_reset_l0``,
``draw_noisy_layers``: a subtree of params) and ``replace_params``, so that a replay can put in
values recorded from a reference.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from dfkd_jax.errors import UserError
from dfkd_jax.models.layers import BatchNorm, Conv2d, InstanceNorm, Linear, upsample_nearest
from dfkd_jax.models.registry import TorchLayout, register

Array = jax.Array

# torch.nn.init.kaiming_normal_ (fan_in, gain sqrt(2)); jax's 'normal' is untruncated.
kaiming_normal_fan_in = jax.nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


def cmi_decoder(z: Array, widths: Sequence[int], nc: int, img_size: int, train: bool,
                linear: str = 'l1.0', blocks: str = 'conv_blocks') -> Array:
  """The CMI-fw generator body, shared by CMI, LargeGenerator, CuDFKD and NAYER.

  ``Linear(z, widths[0]*s*s) -> view(N, widths[0], s, s) -> BN -> [Upsample x2 -> Conv3x3(no bias)
  -> BN -> LeakyReLU 0.2] for each of widths[1:] -> Conv3x3(nc, bias) -> Sigmoid``, with
  s = img_size / 2**(len(widths)-1). The blocks are named by their index in the torch Sequential
  ``blocks`` (BN at 0, then Upsample/Conv/BN/LeakyReLU at 1+4i..4+4i, the output conv at 1+4k).
  Must be called inside a compact method: the layers become submodules of the caller.
  """
  s = img_size // 2 ** (len(widths) - 1)
  # The Flax kernel's output features are in (H, W, C) order; the converter permutes torch's (C, H, W).
  x = Linear(widths[0] * s * s, name=linear)(z).reshape(z.shape[0], s, s, widths[0])
  x = BatchNorm(use_running_average=not train, name=f'{blocks}.0')(x)
  for i, width in enumerate(widths[1:]):
    x = Conv2d(width, 3, padding=1, use_bias=False, upsample=2, name=f'{blocks}.{2 + 4 * i}')(x)
    x = nn.leaky_relu(BatchNorm(use_running_average=not train, name=f'{blocks}.{3 + 4 * i}')(x), 0.2)
  x = Conv2d(nc, 3, padding=1, name=f'{blocks}.{1 + 4 * (len(widths) - 1)}')(x)
  return nn.sigmoid(x)


class CmiGenerator(nn.Module):
  """CMI-fw ``Generator`` / ``LargeGenerator`` and CuDFKD ``DCGAN_Generator_CIFAR10``: ``cmi_decoder``
  with the given widths under the torch names ``linear`` and ``blocks``."""
  widths: tuple[int, ...] = (128, 128, 64)
  nc: int = 3
  img_size: int = 32
  linear: str = 'l1.0'
  blocks: str = 'conv_blocks'

  @nn.compact
  def __call__(self, z: Array, train: bool = False) -> Array:
    return cmi_decoder(z, self.widths, self.nc, self.img_size, train, self.linear, self.blocks)


class NoisyLayerGenerator(nn.Module):
  """NAYER ``NLGenerator`` on a batch of label embeddings ``z`` (N, le_size): the method looks up
  the (CLIP text) embedding of each sample's target class, as the reference's ``label_emb[targets]``.

  ``BatchNorm1d(le_size) -> noisy layer -> cmi_decoder``, where the noisy layer is
  ``le1.{k} = Linear(le_size, le_emb_size)`` applied to rows [k*nl, (k+1)*nl) of the batch, and
  the last of the ``ceil(sbz/nl)`` layers also takes any rows beyond (the reference's slicing).
  The reference re-draws these layers N(0, 1) (bias 0) for every synthesis batch: see
  ``redraw_noisy_layers``.
  """
  ngf: int = 64
  nc: int = 3
  img_size: int = 32
  nl: int = 10
  sbz: int = 400
  le_emb_size: int = 1000

  @property
  def num_noisy_layers(self) -> int:
    return math.ceil(self.sbz / self.nl)

  @nn.compact
  def __call__(self, z: Array, train: bool = False) -> Array:
    le = BatchNorm(use_running_average=not train, name='n1')(z)
    chunks = []
    for k in range(self.num_noisy_layers):
      end = le.shape[0] if k == self.num_noisy_layers - 1 else (k + 1) * self.nl
      # A chunk past the batch is empty, as in the reference; its layer still exists.
      chunks.append(Linear(self.le_emb_size, name=f'le1.{k}')(le[k * self.nl:end]))
    v = jnp.concatenate(chunks)
    return cmi_decoder(v, (2 * self.ngf, 2 * self.ngf, self.ngf), self.nc, self.img_size, train)


class DaflGenerator(nn.Module):
  """The DAFL generator layout, shared by the original DAFL generator, DFAD's ``GeneratorA`` and
  DFSR's ``GeneratorINE1``.

  ``l1.0 = Linear(nz, 2ngf*s*s) -> view(N, 2ngf, s, s) -> conv_blocks0.0 norm -> nearest x2 ->
  conv_blocks1 = [Conv3x3(2ngf, bias), norm(inner_eps), LeakyReLU 0.2] -> nearest x2 ->
  conv_blocks2 = [Conv3x3(ngf, bias), norm(inner_eps), LeakyReLU 0.2, Conv3x3(nc, bias), Tanh, out]``
  with s = img_size // 4. With ``instance_norm=False`` (DAFL, DFAD) the norms are BatchNorm and
  ``out`` is ``BatchNorm(nc, affine=False)`` (``conv_blocks2.5``), so the image comes out
  batch-normalised. DAFL's ``BatchNorm2d(C, 0.8)`` is eps 0.8 (``inner_eps``); DFAD keeps 1e-5.

  ``instance_norm=True`` is DFSR's ``GeneratorINE1``: affine InstanceNorm instead of BatchNorm,
  no output norm, ``out = (tanh + 1) / 2`` in [0, 1], kaiming-normal (fan_in) Linear/Conv weights.
  """
  ngf: int = 64
  nc: int = 3
  img_size: int = 32
  inner_eps: float = 1e-5
  instance_norm: bool = False

  def _norm(self, eps: float, name: str, train: bool) -> Callable[[Array], Array]:
    if self.instance_norm:
      return InstanceNorm(epsilon=eps, affine=True, name=name)
    return BatchNorm(use_running_average=not train, epsilon=eps, name=name)

  @nn.compact
  def __call__(self, z: Array, train: bool = False) -> Array:
    s, c = self.img_size // 4, 2 * self.ngf
    kernel_init = kaiming_normal_fan_in if self.instance_norm else None
    x = Linear(c * s * s, kernel_init=kernel_init, name='l1.0')(z.reshape(z.shape[0], -1))
    x = self._norm(1e-5, 'conv_blocks0.0', train)(x.reshape(z.shape[0], s, s, c))
    x = Conv2d(c, 3, padding=1, kernel_init=kernel_init, upsample=2, name='conv_blocks1.0')(x)
    x = nn.leaky_relu(self._norm(self.inner_eps, 'conv_blocks1.1', train)(x), 0.2)
    x = Conv2d(self.ngf, 3, padding=1, kernel_init=kernel_init, upsample=2, name='conv_blocks2.0')(x)
    x = nn.leaky_relu(self._norm(self.inner_eps, 'conv_blocks2.1', train)(x), 0.2)
    x = jnp.tanh(Conv2d(self.nc, 3, padding=1, kernel_init=kernel_init, name='conv_blocks2.3')(x))
    if self.instance_norm:
      return (x + 1) * 0.5
    return BatchNorm(use_running_average=not train, affine=False, name='conv_blocks2.5')(x)


class ZsktGenerator(nn.Module):
  """The ZSKT generator of polo5/ZeroShotKnowledgeTransfer's first version (one torch Sequential
  ``layers``; the head, fab3b92, has 128x8x8, x2 upsampling and an affine output BN), 32x32x3 output:

  ``layers.0 = Linear(nz, 128*10*10) -> view(N, 128, 10, 10) -> BN -> Upsample x1.6 (10 -> 16,
  torch's nearest rule) -> Conv3x3(128, bias) -> BN -> LeakyReLU 0.2 -> Upsample x2 ->
  Conv3x3(64, bias) -> BN -> LeakyReLU 0.2 -> Conv3x3(3, bias) -> BatchNorm(3, affine=False)``.
  No Tanh: the output is the batch-normalised conv output.
  """

  @nn.compact
  def __call__(self, z: Array, train: bool = False) -> Array:
    def bn(name, **kw):
      return BatchNorm(use_running_average=not train, name=name, **kw)

    x = Linear(128 * 10 * 10, name='layers.0')(z).reshape(z.shape[0], 10, 10, 128)
    x = upsample_nearest(bn('layers.2')(x), 1.6)
    x = nn.leaky_relu(bn('layers.5')(Conv2d(128, 3, padding=1, name='layers.4')(x)), 0.2)
    x = Conv2d(64, 3, padding=1, upsample=2, name='layers.8')(x)
    x = nn.leaky_relu(bn('layers.9')(x), 0.2)
    return bn('layers.12', affine=False)(Conv2d(3, 3, padding=1, name='layers.11')(x))


# --------------------------------------------------------------------------------------------
# Re-initialisation used by the methods.

def reset_params(params: dict, key: jax.Array, modules: Sequence[str] | None = None,
                 norm_scale_mean: float = 1.0, std: float = 0.02) -> dict:
  """CMI-fw's ``reset_model``: every Conv/Linear weight N(0, std), every bias 0, every
  normalisation scale N(norm_scale_mean, std). Returns new params; batch_stats are not part of
  ``params`` and stay as they are (``reset_model`` does not touch running statistics).

  ``modules`` limits it to those torch module names (e.g. ``('l1.0', 'conv_blocks.0')``).
  CMI calls this before every synthesis batch. (``reset_model`` re-draws BatchNorm2d scales only;
  all the generators it is used with have no other normalisation layer.) It is
  ``replace_params(params, draw_reset(...))``: the draw and its application apart, for a replay
  that applies recorded values.
  """
  return replace_params(params, draw_reset(params, key, modules, norm_scale_mean, std))


def draw_reset(params: dict, key: jax.Array, modules: Sequence[str] | None = None,
               norm_scale_mean: float = 1.0, std: float = 0.02) -> dict:
  """The new values ``reset_params`` gives: a params subtree holding only the re-drawn modules'
  parameters (all of them without ``modules``). Only shapes and dtypes of ``params`` are read."""
  flat = traverse_util.flatten_dict(params)
  paths = [p for p in flat if modules is None or '.'.join(p[:-1]) in modules]
  if modules is not None:
    unknown = set(modules) - {'.'.join(p[:-1]) for p in paths}
    if unknown:
      raise UserError(f'reset_params: no parameters under module(s) {sorted(unknown)}')
  keys = jax.random.split(key, max(len(paths), 1))
  drawn = {}
  for k, path in zip(keys, paths):
    value, leaf = flat[path], path[-1]
    if leaf == 'bias':
      drawn[path] = jnp.zeros_like(value)
    elif leaf == 'scale':
      drawn[path] = norm_scale_mean + std * jax.random.normal(k, value.shape, value.dtype)
    else:
      drawn[path] = std * jax.random.normal(k, value.shape, value.dtype)
  return traverse_util.unflatten_dict(drawn)


def replace_params(params: dict, new: dict) -> dict:
  """``params`` with the leaves of the subtree ``new`` (e.g. ``draw_reset``'s) put in."""
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(params), **traverse_util.flatten_dict(new)})


RESET_L0_MODULES = ('l1.0', 'conv_blocks.0')


def draw_reset_l0(params: dict, key: jax.Array) -> dict:
  """Fast's ``reset_l0`` values: ``l1.0`` N(0, 0.02) with bias 0, and the first BatchNorm
  ``conv_blocks.0`` with scale N(0, 0.02) (not N(1, .)) and bias 0 (``draw_reset``'s subtree)."""
  return draw_reset(params, key, modules=RESET_L0_MODULES, norm_scale_mean=0.0)


def reset_l0(params: dict, key: jax.Array) -> dict:
  """Fast's ``reset_l0``: ``replace_params(params, draw_reset_l0(params, key))``."""
  return replace_params(params, draw_reset_l0(params, key))


def noisy_layers(params: dict) -> list[str]:
  """The noisy layers ``le1.{k}`` of a ``NoisyLayerGenerator``'s params."""
  noisy = sorted(name for name in params if name.startswith('le1.'))
  if not noisy:
    raise UserError('redraw_noisy_layers: these params have no NAYER noisy layers (le1.*)')
  return noisy


def draw_noisy_layers(params: dict, key: jax.Array) -> dict:
  """NAYER's ``re_init_le`` values: every noisy layer ``le1.{k}`` with a fresh N(0, 1) kernel and
  a zero bias (``draw_reset``'s subtree)."""
  return draw_reset(params, key, modules=noisy_layers(params), std=1.0)


def redraw_noisy_layers(params: dict, key: jax.Array) -> dict:
  """NAYER's ``re_init_le``: ``replace_params(params, draw_noisy_layers(params, key))``; every other
  parameter is kept.

  NAYER does this before each synthesis batch (then builds a fresh Adam over all generator
  parameters). It is jit-compatible.
  """
  return replace_params(params, draw_noisy_layers(params, key))


# --------------------------------------------------------------------------------------------
# Registry entries. Builders take the reference's sizes under uniform names: nz (latent size),
# ngf, img_size, nc (image channels).

def _latent(nz=256, **_):
  return (nz,)


def linear_view_layout(linear: str, width: Callable[..., int], default_img_size: int = 32) -> TorchLayout:
  """TorchLayout of a ``Linear -> view(N, width, s, s)`` with s = img_size // 4 (``width`` is a
  function of the builder's keyword arguments; ``default_img_size`` is the builder's default)."""

  def view_outputs(img_size=default_img_size, **kw):
    return {linear: (width(**kw), img_size // 4, img_size // 4)}

  return TorchLayout(view_outputs=view_outputs)


# l1.0 -> view(N, 2*ngf, s, s): CMI Generator, NAYER, DAFL and DFAD.
_L1_TWO_NGF = linear_view_layout('l1.0', lambda ngf=64, **_: 2 * ngf)


@register('cmi_generator', kind='generator', aliases=('fast_generator',), input_shape=_latent, torch=_L1_TWO_NGF)
def cmi_generator(nz=256, ngf=64, img_size=32, nc=3, **_):
  return CmiGenerator(widths=(2 * ngf, 2 * ngf, ngf), nc=nc, img_size=img_size)


@register('cmi_large_generator', kind='generator', aliases=('large_generator', 'LargeGenerator'),
          input_shape=_latent, torch=linear_view_layout('l1.0', lambda ngf=64, **_: 4 * ngf))
def cmi_large_generator(nz=256, ngf=64, img_size=32, nc=3, **_):
  return CmiGenerator(widths=(4 * ngf, 2 * ngf, ngf), nc=nc, img_size=img_size)


def _cudfkd_layout(img_size=32, ngf=64, d=2, **_):
  s = img_size // 2 ** d
  return {'project.1': (ngf * 2 ** d, s, s)}


@register('cudfkd_generator', kind='generator', aliases=('DCGAN_Generator_CIFAR10',),
          input_shape=lambda nz=512, **_: (nz,), torch=TorchLayout(view_outputs=_cudfkd_layout))
def cudfkd_generator(nz=512, ngf=64, img_size=32, nc=3, d=2, **_):
  if d not in (2, 3):
    raise UserError(f'cudfkd_generator: depth d must be 2 or 3 (the reference asserts it), got {d}')
  return CmiGenerator(widths=tuple(ngf * 2 ** (d - i) for i in range(d + 1)), nc=nc, img_size=img_size,
                      linear='project.1', blocks='main')


@register('nayer_generator', kind='generator', aliases=('NLGenerator',),
          input_shape=lambda le_size=512, **_: (le_size,), torch=_L1_TWO_NGF)
def nayer_generator(ngf=64, img_size=32, nc=3, nl=10, sbz=400, le_emb_size=1000, le_size=512, **_):
  """``nl``: samples per noisy layer (the reference passes num_classes); ``sbz``: synthesis batch
  size, which fixes the number of noisy layers ceil(sbz/nl); ``le_size``: embedding width."""
  return NoisyLayerGenerator(ngf=ngf, nc=nc, img_size=img_size, nl=nl, sbz=sbz, le_emb_size=le_emb_size)


@register('dafl_generator', kind='generator', input_shape=lambda nz=100, **_: (nz,), torch=_L1_TWO_NGF)
def dafl_generator(nz=100, ngf=64, img_size=32, nc=1, **_):
  """DAFL-train.py defaults: latent_dim 100, channels 1 (MNIST); CIFAR uses nz=1000, nc=3."""
  return DaflGenerator(ngf=ngf, nc=nc, img_size=img_size, inner_eps=0.8)


@register('dfad_generator', kind='generator', aliases=('GeneratorA',), input_shape=_latent, torch=_L1_TWO_NGF)
def dfad_generator(nz=256, ngf=64, img_size=32, nc=3, **_):
  """DFAD_cifar.py settings: nz 256, nc 3."""
  return DaflGenerator(ngf=ngf, nc=nc, img_size=img_size)


@register('zskt_generator', kind='generator', input_shape=lambda nz=100, **_: (nz,),
          torch=TorchLayout(view_outputs=lambda **_: {'layers.0': (128, 10, 10)}))
def zskt_generator(nz=100, **_):
  """The reference hard-codes 128x10x10 and 3 channels; only the latent size varies."""
  return ZsktGenerator()
