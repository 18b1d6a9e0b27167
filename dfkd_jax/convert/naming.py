"""Mechanical mapping between a reference PyTorch state_dict and a zoo model's Flax variables.

Zoo modules are named after the torch module paths, so a Flax leaf
``(collection, 'layer1.0', 'conv1', leaf)`` is the torch key ``layer1.0.conv1.<torch leaf>`` with

  params/kernel (4-D)   <- weight (O, I, kh, kw) transposed to (kh, kw, I, O)
  params/kernel (2-D)   <- weight (out, in) transposed
  params/scale          <- weight (BatchNorm affine)
  params/bias           <- bias
  batch_stats/mean      <- running_mean
  batch_stats/var       <- running_var

and ``num_batches_tracked`` ignored. Per-architecture facts (alternative namings, NCHW flattening
into or out of a Linear) come from the model's ``TorchLayout``.
"""
from __future__ import annotations

import collections
import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from dfkd_jax.errors import UserError
from dfkd_jax.models.registry import TorchLayout

_LEAF_TO_TORCH = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
                  'var': 'running_var', 'embedding': 'weight'}
IGNORED_SUFFIXES = ('num_batches_tracked',)


def strip_prefixes(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Removes DataParallel/DDP ``module.`` prefixes."""
  out = {}
  for k, v in state_dict.items():
    while k.startswith('module.'):
      k = k[len('module.'):]
    out[k] = v
  return out


def canonical_keys(state_dict: Mapping[str, np.ndarray], layout: TorchLayout) -> dict[str, np.ndarray]:
  """Strips prefixes and rewrites alternative namings to the canonical reference one."""
  out = {}
  for k, v in strip_prefixes(state_dict).items():
    for pattern, repl in layout.key_aliases:
      k = re.sub(pattern, repl, k)
    out[k] = v
  return out


def torch_key(path: tuple[str, ...]) -> str:
  """``('params', 'layer1.0', 'conv1', 'kernel')`` -> ``'layer1.0.conv1.weight'``."""
  *modules, leaf = path[1:]
  return '.'.join(modules + [_LEAF_TO_TORCH[leaf]])


def _module(path):
  return '.'.join(path[1:-1])


def _reorder_chw(value: np.ndarray, axis: int, chw: tuple[int, int, int], to_flax: bool) -> np.ndarray:
  """Reorders the flattened ``axis`` of ``value`` from torch's (C, H, W) order to Flax's (H, W, C)
  (``to_flax``) or back: a torch ``view``/``flatten`` of a feature map next to an NHWC one."""
  c, h, w = chw
  moved = np.moveaxis(value, axis, 0)
  rest = moved.shape[1:]
  order = (1, 2, 0) if to_flax else (2, 0, 1)
  grid = moved.reshape(((c, h, w) if to_flax else (h, w, c)) + rest)
  moved = grid.transpose(order + tuple(range(3, grid.ndim))).reshape((c * h * w,) + rest)
  return np.moveaxis(moved, 0, axis)


def _convert_leaf(value, path: tuple[str, ...], flatten_inputs, view_outputs, to_flax: bool) -> np.ndarray:
  """One tensor between torch's layout and the Flax leaf's at ``path``: conv kernels
  (O, I, kh, kw) <-> (kh, kw, I, O), linear kernels (out, in) <-> (in, out), with any flattened
  (C, H, W) axis of a module in ``flatten_inputs`` (its input) or ``view_outputs`` (its output)
  reordered to (H, W, C)."""
  value = np.asarray(value, np.float32)
  leaf, module = path[-1], _module(path)
  if leaf == 'kernel' and value.ndim == 4:
    return value.transpose((2, 3, 1, 0) if to_flax else (3, 2, 0, 1))
  if leaf == 'kernel' and value.ndim == 2:
    in_axis, out_axis = (1, 0) if to_flax else (0, 1)  # torch (out, in); Flax (in, out)
    if module in flatten_inputs:
      value = _reorder_chw(value, in_axis, flatten_inputs[module], to_flax)
    if module in view_outputs:
      value = _reorder_chw(value, out_axis, view_outputs[module], to_flax)
    return value.T
  if leaf == 'bias' and module in view_outputs:
    return _reorder_chw(value, 0, view_outputs[module], to_flax)
  return value


def to_flax_leaf(value: np.ndarray, path: tuple[str, ...], flatten_inputs, view_outputs) -> np.ndarray:
  """Converts one torch tensor to the layout of the Flax leaf at ``path``."""
  return _convert_leaf(value, path, flatten_inputs, view_outputs, to_flax=True)


def to_torch_leaf(value: np.ndarray, path: tuple[str, ...], flatten_inputs, view_outputs) -> np.ndarray:
  """Inverse of ``to_flax_leaf``."""
  return _convert_leaf(value, path, flatten_inputs, view_outputs, to_flax=False)


def torch_shape(flax_shape, path) -> tuple[int, ...]:
  """The torch shape of the tensor that fills the Flax leaf at ``path`` of shape ``flax_shape``."""
  if path[-1] == 'kernel' and len(flax_shape) == 4:
    kh, kw, i, o = flax_shape
    return (o, i, kh, kw)
  if path[-1] == 'kernel' and len(flax_shape) == 2:
    return tuple(flax_shape[::-1])
  return tuple(flax_shape)


def torch_to_flax(state_dict: Mapping[str, np.ndarray], abstract_variables: Any, layout: TorchLayout,
                  layout_kw: Mapping[str, Any] | None = None, what: str = 'checkpoint') -> dict:
  """Fills every leaf of ``abstract_variables`` from ``state_dict``.

  Raises a ``UserError`` listing every missing, unexpected and mis-shaped key (all of them, not
  the first) against the architecture's expected names.
  """
  layout_kw = dict(layout_kw or {})
  flatten_inputs, view_outputs = layout.flatten_inputs(**layout_kw), layout.view_outputs(**layout_kw)
  source = canonical_keys(state_dict, layout)
  flat = traverse_util.flatten_dict(abstract_variables)
  out, missing, misshaped, used = {}, [], [], set()
  for path, abstract in flat.items():
    key = torch_key(path)
    if key not in source:
      missing.append(key)
      continue
    used.add(key)
    value = np.asarray(source[key])
    expected = torch_shape(abstract.shape, path)
    if tuple(value.shape) != expected:
      misshaped.append(f'{key}: file {tuple(value.shape)} vs expected {expected}')
      continue
    out[path] = to_flax_leaf(value, path, flatten_inputs, view_outputs)
  unexpected = [k for k in source if k not in used and not k.endswith(IGNORED_SUFFIXES)]
  if missing or misshaped or unexpected:
    raise MismatchError(what, missing, unexpected, misshaped)
  return traverse_util.unflatten_dict(out)


def flax_to_torch(variables: Any, layout: TorchLayout, layout_kw: Mapping[str, Any] | None = None,
                  num_batches_tracked: bool = True) -> 'collections.OrderedDict[str, np.ndarray]':
  """A torch state_dict (numpy values, canonical reference names) from Flax ``variables``.

  BatchNorm modules get a ``num_batches_tracked`` entry (int64 0), as torch's ``load_state_dict``
  expects with ``strict=True``.
  """
  layout_kw = dict(layout_kw or {})
  flatten_inputs, view_outputs = layout.flatten_inputs(**layout_kw), layout.view_outputs(**layout_kw)
  out = collections.OrderedDict()
  bn_modules = []
  for path, value in traverse_util.flatten_dict(variables).items():
    out[torch_key(path)] = np.ascontiguousarray(to_torch_leaf(np.asarray(value), path, flatten_inputs, view_outputs))
    if path[0] == 'batch_stats' and path[-1] == 'var':
      bn_modules.append(_module(path))
  if num_batches_tracked:
    for m in bn_modules:
      out[f'{m}.num_batches_tracked'] = np.array(0, np.int64)
  return out


class MismatchError(UserError):
  """A state_dict that does not fit the architecture; the message lists every difference."""

  def __init__(self, what, missing, unexpected, misshaped, hint: str = ''):
    self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped
    parts = []
    for label, items in (('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped)):
      if items:
        shown = ', '.join(items[:6]) + (f', ... ({len(items)} in all)' if len(items) > 6 else '')
        parts.append(f'{len(items)} {label}: {shown}')
    super().__init__(f"{what} does not match the architecture: {'; '.join(parts)}" + (f'. {hint}' if hint else ''))
