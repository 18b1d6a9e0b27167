"""Taps: statistics of what flows *into* chosen modules of a zoo model, captured during ``apply``.

The references read BatchNorm inputs with forward hooks (DeepInversion's BN-statistics loss, CMI's
``InstanceMeanHook`` features). Here ``flax.linen.intercept_methods`` wraps the model's ``apply``:
every call of a selected module records the statistics of its first argument, then runs unchanged.
Nothing is added to the variables, and the taps are ordinary traced values, so they work under
``jax.jit`` and ``jax.grad``.

  outputs, taps = apply_with_bn_taps(teacher, variables, x)          # every layers.BatchNorm call
  running = running_stats(variables, taps)                           # [(mean, var)] in the same order
  outputs, taps = apply_with_input_taps(teacher, variables, x, ['layer1', 'layer2'])
  outputs, bn, named = apply_with_bn_and_input_taps(teacher, variables, x, ['layer1'])  # one forward

Taps come in call order. Each is a ``LayerInput`` whose ``name`` and ``path`` are static pytree
metadata, so lists of taps can be returned from a jitted function.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfkd_jax.errors import UserError
from dfkd_jax.models.layers import BatchNorm


class LayerInput(NamedTuple):
  """Statistics of the input x, shape (N, ..., C), of one module call.

  name: the torch-style module name, the Flax path joined with '.' (e.g. 'block1.layer.0.bn1').
  path: the Flax module path, e.g. ('block1', 'layer.0', 'bn1'); it indexes ``variables['batch_stats']``
    (names may contain dots, so ``name`` cannot be split back into the path).
  mean: (C,) mean over every axis but the channel axis.
  var: (C,) *biased* variance over the same axes (what torch BatchNorm normalises with).
  spatial_mean: (N, C) per-example mean over the spatial axes (x itself for (N, C) inputs).
  """
  name: str
  path: tuple[str, ...]
  mean: jax.Array
  var: jax.Array
  spatial_mean: jax.Array


# name and path are static: they go into the treedef, only the arrays are leaves.
jax.tree_util.register_pytree_node(
    LayerInput,
    lambda t: ((t.mean, t.var, t.spatial_mean), (t.name, t.path)),
    lambda static, arrays: LayerInput(*static, *arrays))


def _layer_input(path: tuple[str, ...], x: jax.Array) -> LayerInput:
  batch_axes = tuple(range(x.ndim - 1))
  return LayerInput('.'.join(path), tuple(path), x.mean(batch_axes), x.var(batch_axes),
                    x.mean(batch_axes[1:]))


def _apply_tapped(model: nn.Module, variables, x, selects: Sequence[Callable[[nn.Module], bool]],
                  apply_kw: dict[str, Any]) -> tuple[Any, list[list[LayerInput]], list[tuple[str, ...]]]:
  """Runs ``model.apply``; returns its outputs, for each predicate in ``selects`` the taps of the
  calls it selects, and every called path."""
  taps, called = [[] for _ in selects], []

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == '__call__':
      called.append(context.module.path)
      hits = [i for i, select in enumerate(selects) if select(context.module)]
      if hits:
        tap = _layer_input(context.module.path, args[0])
        for i in hits:
          taps[i].append(tap)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    outputs = model.apply(variables, x, **apply_kw)
  return outputs, taps, called


def _is_bn(module: nn.Module) -> bool:
  return isinstance(module, BatchNorm)


def _named(names: Sequence[str]) -> Callable[[nn.Module], bool]:
  wanted = set(names)
  return lambda module: '.'.join(module.path) in wanted


def _check_named(model: nn.Module, names: Sequence[str], taps: Sequence[LayerInput],
                 called: Sequence[tuple[str, ...]]) -> None:
  missing = sorted(set(names) - {t.name for t in taps})
  if missing:
    known = ', '.join(sorted({'.'.join(p) for p in called if p}))
    raise UserError(f'no module named {", ".join(missing)} is called by {type(model).__name__}; known: {known}')


def apply_with_bn_taps(model: nn.Module, variables, x, **apply_kw) -> tuple[Any, list[LayerInput]]:
  """``model.apply(variables, x, **apply_kw)`` and the input statistics of every ``layers.BatchNorm``
  call, in call order (for the zoo's classifiers that is the reference's ``named_modules`` order).

  ``apply_kw`` goes to ``apply`` unchanged (``train=``, ``mutable=``, ``rngs=``, ...), so the outputs
  are whatever ``apply`` returns.
  """
  outputs, (taps,), _ = _apply_tapped(model, variables, x, [_is_bn], apply_kw)
  return outputs, taps


def apply_with_input_taps(model: nn.Module, variables, x, names: Sequence[str],
                          **apply_kw) -> tuple[Any, list[LayerInput]]:
  """``model.apply(variables, x, **apply_kw)`` and the input statistics of the modules whose
  torch-style name is in ``names`` (e.g. CMI's ResNet-34 features: 'layer1' .. 'layer4'), in call
  order. A name that no module call matches raises a ``UserError``.
  """
  outputs, (taps,), called = _apply_tapped(model, variables, x, [_named(names)], apply_kw)
  _check_named(model, names, taps, called)
  return outputs, taps


def apply_with_bn_and_input_taps(model: nn.Module, variables, x, names: Sequence[str],
                                 **apply_kw) -> tuple[Any, list[LayerInput], list[LayerInput]]:
  """One ``model.apply``: the taps of ``apply_with_bn_taps`` and those of ``apply_with_input_taps``
  for ``names`` (CMI on ResNet-34 reads the BN statistics and the stage inputs of the same forward)."""
  outputs, (bn_taps, named_taps), called = _apply_tapped(model, variables, x, [_is_bn, _named(names)], apply_kw)
  _check_named(model, names, named_taps, called)
  return outputs, bn_taps, named_taps


def running_stats(variables, taps: Sequence[LayerInput]) -> list[tuple[jax.Array, jax.Array]]:
  """The running (mean, var) of each tapped BatchNorm, from ``variables['batch_stats']``, in the
  order of ``taps``: the targets of a BN-statistics loss."""
  out = []
  for tap in taps:
    stats = variables.get('batch_stats', {})
    for key in tap.path:
      stats = stats.get(key, {})
    if 'mean' not in stats or 'var' not in stats:
      raise UserError(f'{tap.name} has no running statistics in variables["batch_stats"]; is it a BatchNorm?')
    out.append((stats['mean'], stats['var']))
  return out


def concat_spatial_means(taps: Sequence[LayerInput]) -> jax.Array:
  """(N, sum of C) concatenation of the taps' per-example spatial means: CMI's ``InstanceMeanHook``
  features, in the order of ``taps``."""
  return jnp.concatenate([t.spatial_mean for t in taps], axis=1)


def apply_with_output_taps(model: nn.Module, variables, x, names: Sequence[str],
                           **apply_kw) -> tuple[Any, list[jax.Array]]:
  """``model.apply(variables, x, **apply_kw)`` and the raw *outputs* of the modules named in
  ``names`` (torch-style names), in the order of ``names`` (ZSKT's attention transfer reads the
  activation maps of each residual group). If ``apply_kw`` has ``mutable``, the outputs are
  ``((model_outputs, maps), mutated_variables)`` as ``apply`` nests them."""
  captured = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and '.'.join(context.module.path) in names:
      captured['.'.join(context.module.path)] = out
    return out

  with nn.intercept_methods(interceptor):
    outputs = model.apply(variables, x, **apply_kw)
  missing = [n for n in names if n not in captured]
  if missing:
    raise UserError(f'no module named {", ".join(missing)} is called by {type(model).__name__}')
  maps = [captured[n] for n in names]
  if 'mutable' in apply_kw:
    out, mutated = outputs
    return (out, maps), mutated
  return outputs, maps
