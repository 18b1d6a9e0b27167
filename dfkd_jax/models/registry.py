"""One registry for every model of the zoo: ``create(name, num_classes=..., **kw)``.

Names follow the reference registries (``resnet34``, ``wrn40_2``, ``vgg11``, ``lenet5_half``, ...);
each family module registers its builders with ``@register``. Lookup is case-insensitive and
treats ``-`` like ``_``.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Callable

import flax.linen as nn

from dfkd_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What the rest of the library needs to know about an architecture.

  kind: 'classifier' (image -> logits), 'generator' (latent -> image) or 'sr' (image -> image).
  input_shape: per-example input shape used to initialise it, given the builder's keyword
    arguments (NHWC image, or (nz,) latent).
  torch: how the reference PyTorch state_dict differs from the mechanical mapping of
    ``dfkd_jax.convert.naming`` (see ``TorchLayout``).
  """
  name: str
  build: Callable[..., nn.Module]
  kind: str
  input_shape: Callable[..., tuple[int, ...]]
  aliases: tuple[str, ...] = ()
  torch: 'TorchLayout' = None


@dataclasses.dataclass(frozen=True)
class TorchLayout:
  """Per-architecture facts of the reference state_dict that a mechanical mapping cannot know.

  key_aliases: (regex, replacement) pairs rewriting alternative reference namings to the
    canonical one (e.g. the Huawei LeNet's ``conv1.`` to CMI-fw's ``features.0.``).
  flatten_inputs: Linear module -> (C, H, W) of the NCHW feature map flattened into its input.
  view_outputs: Linear module -> (C, H, W) that its output is viewed as (``Linear -> view``),
    given the builder's keyword arguments (a callable of them, since sizes depend on nz/img_size).
  """
  key_aliases: tuple[tuple[str, str], ...] = ()
  flatten_inputs: Callable[..., dict[str, tuple[int, int, int]]] = lambda **_: {}
  view_outputs: Callable[..., dict[str, tuple[int, int, int]]] = lambda **_: {}


_SPECS: dict[str, ModelSpec] = {}
_ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
  return name.strip().lower().replace('-', '_')


def register(name: str, *, kind: str = 'classifier', aliases: tuple[str, ...] = (),
             input_shape: Callable[..., tuple[int, ...]] | None = None,
             torch: TorchLayout | None = None):
  """Decorator registering ``build(**kw) -> nn.Module`` under ``name`` and its ``aliases``."""

  def deco(build):
    shape_fn = input_shape or (lambda in_channels=3, image_size=32, **_: (image_size, image_size, in_channels))
    spec = ModelSpec(name, build, kind, shape_fn, tuple(aliases), torch or TorchLayout())
    _SPECS[name] = spec
    for a in (name,) + tuple(aliases):
      _ALIASES[_key(a)] = name
    return build

  return deco


def get_spec(name: str) -> ModelSpec:
  """The spec of ``name`` (any alias); a one-line error with suggestions for unknown names."""
  _load_families()
  key = _key(name)
  if key not in _ALIASES:
    close = difflib.get_close_matches(key, list(_ALIASES), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ''
    raise UserError(f"unknown architecture {name!r}.{hint} Known: {', '.join(sorted(_SPECS))}")
  return _SPECS[_ALIASES[key]]


def canonical_name(name: str) -> str:
  return get_spec(name).name


def create(name: str, num_classes: int | None = None, **kw) -> nn.Module:
  """Builds architecture ``name``; ``num_classes`` is passed to classifiers only."""
  spec = get_spec(name)
  if spec.kind == 'classifier':
    kw['num_classes'] = 10 if num_classes is None else num_classes
  return spec.build(**kw)


def input_shape(name: str, **kw) -> tuple[int, ...]:
  """Per-example input shape of ``name`` built with ``kw`` (without the batch axis)."""
  return get_spec(name).input_shape(**kw)


def names(kind: str | None = None) -> list[str]:
  _load_families()
  return sorted(n for n, s in _SPECS.items() if kind is None or s.kind == kind)


def _load_families():
  # Importing the family modules runs their @register decorators.
  from dfkd_jax.models import families  # noqa: F401
