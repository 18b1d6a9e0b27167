"""Which registered architecture a reference state_dict holds, and with which sizes.

  identify(state_dict)                    every architecture the file fits exactly, with its sizes
  only_fit(state_dict, ...)               the one architecture it fits (else a one-line UserError)
  expected_shapes(arch, kwargs)           torch key -> torch shape of ``arch`` built with ``kwargs``
  mismatch_hint(...)                      what to use instead, for a file that does not fit

A *size argument* -- ``num_classes`` of a classifier, or an integer keyword of the architecture's
builder such as a generator's ``nz``, ``nc`` or ``ngf`` -- is read off the tensor shapes when it
appears as a dimension: the builder is probed with the argument one larger, and the dimensions that
grow by exactly one hold its value in the file. Sizes that never appear as a dimension keep the
builder's default unless given (``img_size``), except a *count*, an argument that adds or removes
keys (VDSR's ``num_blocks``): it is read off the file's key set. Shapes are compared under the
architecture's reference naming (``naming``), ``num_batches_tracked`` aside.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Mapping, NamedTuple

import numpy as np
from flax import traverse_util

from dfkd_jax import models
from dfkd_jax.convert import model_dir, naming
from dfkd_jax.errors import UserError

Shapes = dict[str, tuple[int, ...]]


class Fit(NamedTuple):
  """An architecture and the keyword arguments (``num_classes`` included for classifiers) with
  which a state_dict fits it exactly."""
  arch: str
  kwargs: dict


# --- what an architecture expects ----------------------------------------------------------------

def builder_keywords(spec: models.ModelSpec) -> dict[str, inspect.Parameter]:
  """Named keyword parameters of the builder and of its input-shape function."""
  out = {}
  for fn in (spec.input_shape, spec.build):
    for name, param in inspect.signature(fn).parameters.items():
      if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
        out[name] = param
  return out


def size_defaults(arch: str) -> dict[str, int]:
  """The size arguments of ``arch`` and their defaults: ``num_classes`` (10) for classifiers and
  every integer keyword of the builder or input-shape function."""
  spec = models.get_spec(arch)
  sizes = {name: p.default for name, p in builder_keywords(spec).items()
           if type(p.default) is int and name != 'num_classes'}  # noqa: E721 - bool is not a size
  return {'num_classes': 10, **sizes} if spec.kind == 'classifier' else sizes


@functools.lru_cache(maxsize=None)
def _expected(arch: str, frozen_kwargs: tuple) -> tuple[tuple[str, tuple[int, ...]], ...]:
  kwargs = dict(frozen_kwargs)
  num_classes = kwargs.pop('num_classes', None)
  _, abstract = model_dir.abstract_variables(arch, num_classes, kwargs)
  return tuple((naming.torch_key(path), naming.torch_shape(leaf.shape, path))
               for path, leaf in traverse_util.flatten_dict(abstract).items())


def expected_shapes(arch: str, kwargs: Mapping[str, Any]) -> Shapes:
  """Torch key -> torch shape of every tensor of ``arch`` built with ``kwargs`` (``num_classes``
  included), ``num_batches_tracked`` aside."""
  return dict(_expected(arch, tuple(sorted(kwargs.items()))))


def _grown(arch: str, frozen_kwargs: tuple, name: str, value: int) -> tuple[Shapes, Shapes | None]:
  """(shapes of ``arch``, shapes with size argument ``name`` set to ``value``; None if the
  builder rejects that value)."""
  kwargs = dict(frozen_kwargs)
  try:
    return expected_shapes(arch, kwargs), expected_shapes(arch, {**kwargs, name: value})
  except Exception:  # noqa: BLE001 - a builder may reject a probe value; then nothing is learned
    return expected_shapes(arch, kwargs), None


@functools.lru_cache(maxsize=None)
def _positions(arch: str, frozen_kwargs: tuple, name: str) -> tuple[tuple[str, int], ...]:
  """Where size argument ``name`` appears as a dimension, ((key, axis), ...): the dimensions that
  grow by exactly one when it does."""
  value = dict(frozen_kwargs)[name]
  base, grown = _grown(arch, frozen_kwargs, name, value + 1)
  if grown is None:
    return ()
  return tuple((key, axis) for key, shape in base.items() if len(grown.get(key, ())) == len(shape)
               for axis, (a, b) in enumerate(zip(shape, grown[key])) if a == value and b == value + 1)


@functools.lru_cache(maxsize=None)
def _dependents(arch: str, frozen_kwargs: tuple, name: str) -> frozenset[str]:
  """The keys whose shapes change when size argument ``name`` doubles (doubling, because one more
  can vanish in an integer division such as ``img_size // 4``)."""
  base, grown = _grown(arch, frozen_kwargs, name, 2 * dict(frozen_kwargs)[name] or 1)
  if grown is None:
    return frozenset()
  return frozenset(k for k in set(base) | set(grown) if base.get(k) != grown.get(k))


def file_shapes(state_dict: Mapping[str, np.ndarray], spec: models.ModelSpec) -> Shapes:
  """The file's canonical keys (for ``spec``'s naming) and shapes, ``num_batches_tracked`` aside."""
  return {key: tuple(np.shape(value)) for key, value in naming.canonical_keys(state_dict, spec.torch).items()
          if not key.endswith(naming.IGNORED_SUFFIXES)}


@functools.lru_cache(maxsize=None)
def _counted_keys(arch: str, frozen_kwargs: tuple, name: str) -> frozenset[str]:
  """The keys that appear or vanish when size argument ``name`` goes from its value to 1 or to
  twice its value, if that changes no other key's shape: nonempty for a count such as VDSR's
  ``num_blocks``, empty for a width that also adds keys (a WRN's ``widen_factor`` adds shortcuts)."""
  value = dict(frozen_kwargs)[name]
  counted = set()
  for probe in (1, 2 * value or 1):
    base, other = _grown(arch, frozen_kwargs, name, probe)
    if other is None:
      continue
    if any(base[k] != other[k] for k in set(base) & set(other)):
      return frozenset()  # it also changes shapes (a width): not a count
    counted |= set(base) ^ set(other)
  return frozenset(counted)


def read_counts(arch: str, keys: set[str], given: Mapping[str, Any]) -> dict:
  """The count arguments not in ``given`` (integer arguments that add or remove keys, such as a
  depth) whose value gives exactly the key set ``keys``: {} when the keys already agree or differ
  in a way no single count explains. Counts are probed upwards from 1 until the keys outnumber
  the file's, which a count only makes grow."""
  kwargs = {**size_defaults(arch), **given}
  differ = set(expected_shapes(arch, kwargs)) ^ keys
  if not differ:
    return {}
  frozen = tuple(sorted(kwargs.items()))
  for name in size_defaults(arch):
    if name in given or not differ <= _counted_keys(arch, frozen, name):
      continue
    for value in range(1, 4 * max(kwargs[name], 16)):
      try:
        probe = set(expected_shapes(arch, {**kwargs, name: value}))
      except Exception:  # noqa: BLE001 - a builder may reject a probe value; try the next
        continue
      if probe == keys:
        return {name: value}
      if len(probe) > len(keys):
        break
  return {}


def read_sizes(arch: str, shapes: Shapes, given: Mapping[str, Any]) -> dict:
  """``given`` plus every other size argument that ``shapes`` determine."""
  kwargs = {**size_defaults(arch), **given}
  frozen = tuple(sorted(kwargs.items()))
  base = expected_shapes(arch, kwargs)
  out = dict(given)
  for name in size_defaults(arch):
    if name in given:
      continue
    values = {shapes[key][axis] for key, axis in _positions(arch, frozen, name)
              if len(shapes.get(key, ())) == len(base[key])}
    if len(values) == 1:
      out[name] = values.pop()
  return out


# --- identifying a state_dict --------------------------------------------------------------------

def _candidates(model_kwargs: Mapping[str, Any]):
  """(spec, the model_kwargs it accepts, its default kwargs) for every buildable architecture."""
  for arch in models.names():
    spec = models.get_spec(arch)
    given = {k: v for k, v in model_kwargs.items() if k in builder_keywords(spec)}
    kwargs = {**size_defaults(arch), **given}
    try:
      expected_shapes(arch, kwargs)
    except Exception:  # noqa: BLE001 - e.g. 'wrn' has no default depth; it cannot fit anything
      continue
    yield spec, given, kwargs


def identify(state_dict: Mapping[str, np.ndarray], model_kwargs: Mapping[str, Any] | None = None) -> list[Fit]:
  """Every registered architecture that ``state_dict`` fits exactly, with its sizes read from the
  file; ``model_kwargs`` give what the file cannot (e.g. ``img_size``). Sorted by name."""
  fits = []
  for spec, given, kwargs in _candidates(dict(model_kwargs or {})):
    shapes = file_shapes(state_dict, spec)
    counts = read_counts(spec.name, set(shapes), given)
    kwargs = {**kwargs, **counts}
    if set(shapes) != set(expected_shapes(spec.name, kwargs)):
      continue
    fitted = {**kwargs, **read_sizes(spec.name, shapes, {**counts, **{k: v for k, v in given.items()
                                                                       if k not in size_defaults(spec.name)}})}
    if expected_shapes(spec.name, fitted) == shapes:
      fits.append(Fit(spec.name, fitted))
  return fits


def _closest(state_dict: Mapping[str, np.ndarray], model_kwargs: Mapping[str, Any], count: int = 2) -> str:
  """'arch (k of n tensors match)' for the architectures sharing most (key, shape) pairs."""
  scored = []
  for spec, _, kwargs in _candidates(model_kwargs):
    shapes, expected = file_shapes(state_dict, spec), expected_shapes(spec.name, kwargs)
    same = sum(shapes.get(k) == v for k, v in expected.items())
    scored.append((same / len(set(shapes) | set(expected)), f'{spec.name} ({same} of {len(expected)} tensors match)'))
  return ', '.join(text for score, text in sorted(scored, reverse=True)[:count] if score > 0) or 'none'


def _describe(fit: Fit, given: Mapping[str, Any], arch: str | None = None) -> str:
  """``arch=X, num_classes=N, nz=M``: the arch (unless it is ``arch``), the class count and the
  sizes that differ from ``given`` or the defaults."""
  usual = {**size_defaults(fit.arch), **given}
  sizes = [f'{k}={v}' for k, v in fit.kwargs.items()
           if k in size_defaults(fit.arch) and (k == 'num_classes' or usual.get(k) != v)]
  return ', '.join(([] if fit.arch == arch else [f'arch={fit.arch}']) + sizes)


def mismatch_hint(state_dict, spec: models.ModelSpec, kwargs: Mapping[str, Any], given: Mapping[str, Any]) -> str:
  """What to use instead: the architectures the file fits, else the closest ones, and the sizes
  the file cannot determine that the mismatched keys depend on."""
  model_kwargs = {k: v for k, v in given.items() if k != 'num_classes'}
  fits = identify(state_dict, model_kwargs)
  if fits:
    return 'did you mean ' + ' or '.join(_describe(fit, given, spec.name) for fit in fits[:3]) + '?'
  hint = f'no registered architecture fits the file; closest: {_closest(state_dict, model_kwargs)}'
  shapes, expected = file_shapes(state_dict, spec), expected_shapes(spec.name, kwargs)
  wrong = {k for k in set(shapes) | set(expected) if shapes.get(k) != expected.get(k)}
  frozen = tuple(sorted(kwargs.items()))
  unreadable = [name for name in size_defaults(spec.name) if name not in given
                and not _positions(spec.name, frozen, name) and _dependents(spec.name, frozen, name) & wrong]
  if unreadable:
    hint += (f"; the shapes of {spec.name} also depend on {', '.join(unreadable)}, which the file does not "
             f"determine (default {', '.join(f'{n}={kwargs[n]}' for n in unreadable)}): give them as model kwargs")
  return hint


def only_fit(state_dict, model_kwargs: Mapping[str, Any], what: str) -> str:
  """The one architecture ``state_dict`` fits; a UserError naming the fits (or the closest
  architectures) otherwise. ``what`` names the file in the message."""
  fits = identify(state_dict, model_kwargs)
  if len(fits) == 1:
    return fits[0].arch
  if fits:
    raise UserError(f"cannot tell which architecture {what} holds: it fits "
                    f"{'; '.join(_describe(fit, {}) for fit in fits)}; choose one with arch")
  raise UserError(f'{what} fits no registered architecture (closest: {_closest(state_dict, model_kwargs)}); '
                  'give arch (and model kwargs such as img_size) to see what differs')
