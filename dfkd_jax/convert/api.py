"""The converter's front door: reference PyTorch checkpoints in, zoo models out, and back.

  convert(source, out, arch=None, ...)    a ``.pth`` -> a converted-model directory (``model_dir``)
  convert_file(path, arch=None, ...)      a ``.pth`` -> (model, variables, metadata), nothing written
  load_teacher(path, arch=None, ...)      a ``.pth``, a converted directory or ``embedded:NAME``
                                          -> (model, variables)
  export(model, out, like=None)           a converted directory or training workdir -> a ``.pth``
  save_pth(path, arch, variables, ...)    Flax variables -> a ``.pth`` (what ``export`` writes)
  identify(state_dict)                    the registered architectures a state_dict fits exactly

Files are read by ``torch_pickle`` (no torch; nothing from the pickle runs) in any of its layouts
(zip or legacy; a state_dict, a ``{'state_dict': ...}`` training checkpoint or a pickled
``nn.Module``), ``module.`` prefixes are stripped and the architecture's alternative namings are
rewritten by ``naming``.

What the arguments leave open is read from the file. Without ``arch``, the file must fit exactly
one registered architecture. A *size argument* -- ``num_classes`` of a classifier, or an integer
keyword of the architecture's builder such as a generator's ``nz``, ``nc`` or ``ngf`` -- is read
off the tensor shapes when it appears as a dimension: the builder is probed with the argument one
larger, and the dimensions that grow by exactly one hold its value in the file. Sizes that never
appear as a dimension keep the builder's default unless given (``img_size``), except a *count*,
an argument that adds or removes keys (VDSR's ``num_blocks``): it is read off the file's key set. The
converted model records every size it was built with. A file that does not fit gives one line
listing the missing, unexpected and mis-shaped keys and, where some registered architecture fits
the file, the arch and sizes to use instead.
"""
from __future__ import annotations

import collections
import functools
import inspect
import os
from typing import Any, Mapping, NamedTuple

import numpy as np
from flax import traverse_util

from dfkd_jax import models
from dfkd_jax.convert import model_dir, naming, torch_pickle
from dfkd_jax.data import preprocess
from dfkd_jax.errors import UserError

Shapes = dict[str, tuple[int, ...]]


class Fit(NamedTuple):
  """An architecture and the keyword arguments (``num_classes`` included for classifiers) with
  which a state_dict fits it exactly."""
  arch: str
  kwargs: dict


class Converted(NamedTuple):
  """A zoo model, its Flax variables, and what it was built with."""
  model: Any
  variables: dict
  arch: str
  num_classes: int | None
  model_kwargs: dict


# --- what an architecture expects ----------------------------------------------------------------

def _keywords(spec: models.ModelSpec) -> dict[str, inspect.Parameter]:
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
  sizes = {name: p.default for name, p in _keywords(spec).items()
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


def _file_shapes(state_dict: Mapping[str, np.ndarray], spec: models.ModelSpec) -> Shapes:
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


def _read_counts(arch: str, keys: set[str], given: Mapping[str, Any]) -> dict:
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


def _read_sizes(arch: str, shapes: Shapes, given: Mapping[str, Any]) -> dict:
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
    given = {k: v for k, v in model_kwargs.items() if k in _keywords(spec)}
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
    shapes = _file_shapes(state_dict, spec)
    counts = _read_counts(spec.name, set(shapes), given)
    kwargs = {**kwargs, **counts}
    if set(shapes) != set(expected_shapes(spec.name, kwargs)):
      continue
    fitted = {**kwargs, **_read_sizes(spec.name, shapes, {**counts, **{k: v for k, v in given.items()
                                                                       if k not in size_defaults(spec.name)}})}
    if expected_shapes(spec.name, fitted) == shapes:
      fits.append(Fit(spec.name, fitted))
  return fits


def _closest(state_dict: Mapping[str, np.ndarray], model_kwargs: Mapping[str, Any], count: int = 2) -> str:
  """'arch (k of n tensors match)' for the architectures sharing most (key, shape) pairs."""
  scored = []
  for spec, _, kwargs in _candidates(model_kwargs):
    shapes, expected = _file_shapes(state_dict, spec), expected_shapes(spec.name, kwargs)
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


def _hint(state_dict, spec: models.ModelSpec, kwargs: Mapping[str, Any], given: Mapping[str, Any]) -> str:
  """What to use instead: the architectures the file fits, else the closest ones, and the sizes
  the file cannot determine that the mismatched keys depend on."""
  model_kwargs = {k: v for k, v in given.items() if k != 'num_classes'}
  fits = identify(state_dict, model_kwargs)
  if fits:
    return 'did you mean ' + ' or '.join(_describe(fit, given, spec.name) for fit in fits[:3]) + '?'
  hint = f'no registered architecture fits the file; closest: {_closest(state_dict, model_kwargs)}'
  shapes, expected = _file_shapes(state_dict, spec), expected_shapes(spec.name, kwargs)
  wrong = {k for k in set(shapes) | set(expected) if shapes.get(k) != expected.get(k)}
  frozen = tuple(sorted(kwargs.items()))
  unreadable = [name for name in size_defaults(spec.name) if name not in given
                and not _positions(spec.name, frozen, name) and _dependents(spec.name, frozen, name) & wrong]
  if unreadable:
    hint += (f"; the shapes of {spec.name} also depend on {', '.join(unreadable)}, which the file does not "
             f"determine (default {', '.join(f'{n}={kwargs[n]}' for n in unreadable)}): give them as model kwargs")
  return hint


# --- converting ----------------------------------------------------------------------------------

def _given_kwargs(spec: models.ModelSpec, num_classes: int | None, model_kwargs: Mapping[str, Any] | None) -> dict:
  """The caller's keyword arguments for ``spec``, checked against what its builder takes."""
  model_kwargs = dict(model_kwargs or {})
  known = set(_keywords(spec)) - {'num_classes'}
  unknown = sorted(set(model_kwargs) - known)
  if unknown:
    raise UserError(f"{spec.name} takes no model kwarg {', '.join(unknown)}"
                    + (' (give num_classes on its own)' if 'num_classes' in unknown else '')
                    + f"; it takes {', '.join(sorted(known)) or 'none'}")
  if spec.kind == 'classifier' and num_classes is not None:
    model_kwargs['num_classes'] = int(num_classes)
  return model_kwargs  # num_classes of a generator or SR net means nothing and is dropped


def _only_fit(state_dict, model_kwargs: Mapping[str, Any], what: str) -> str:
  fits = identify(state_dict, model_kwargs)
  if len(fits) == 1:
    return fits[0].arch
  if fits:
    raise UserError(f"cannot tell which architecture {what} holds: it fits "
                    f"{'; '.join(_describe(fit, {}) for fit in fits)}; choose one with arch")
  raise UserError(f'{what} fits no registered architecture (closest: {_closest(state_dict, model_kwargs)}); '
                  'give arch (and model kwargs such as img_size) to see what differs')


def convert_state_dict(state_dict: Mapping[str, np.ndarray], arch: str | None = None, num_classes: int | None = None,
                       model_kwargs: Mapping[str, Any] | None = None, what: str = 'the checkpoint') -> Converted:
  """A zoo model and its Flax variables from a reference state_dict (numpy values).

  ``arch``, ``num_classes`` and ``model_kwargs`` are taken as given; whatever is left open is read
  from the file (see the module docstring). A mismatch raises ``naming.MismatchError`` (one line)
  naming what to use instead.
  """
  if arch is None:
    arch = _only_fit(state_dict, dict(model_kwargs or {}), what)
  spec = models.get_spec(arch)
  given = _given_kwargs(spec, num_classes, model_kwargs)
  try:
    expected_shapes(spec.name, {**size_defaults(spec.name), **given})
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 - the builder rejects a given value
    raise UserError(f'cannot build {spec.name} with {given}: {" ".join(str(e).split())[:200]}') from e
  shapes = _file_shapes(state_dict, spec)
  given = {**_read_counts(spec.name, set(shapes), given), **given}
  kwargs = {**size_defaults(spec.name), **_read_sizes(spec.name, shapes, given)}
  num_classes = kwargs.get('num_classes')
  model_kwargs = {k: v for k, v in kwargs.items() if k != 'num_classes'}
  model, abstract = model_dir.abstract_variables(spec.name, num_classes, model_kwargs)
  what = f'{what} (read as {spec.name})'
  try:
    variables = naming.torch_to_flax(state_dict, abstract, spec.torch, layout_kw=model_kwargs, what=what)
  except naming.MismatchError as e:
    raise naming.MismatchError(what, e.missing, e.unexpected, e.misshaped,
                               hint=_hint(state_dict, spec, kwargs, given)) from None
  return Converted(model, variables, spec.name, num_classes, model_kwargs)


def _normalization(dataset: str | None, arch: str, model_kwargs: Mapping[str, Any]) -> dict | None:
  """The input normalisation recorded for ``dataset`` (None: not recorded), checked against the
  model's input channels."""
  if dataset is None:
    return None
  preprocess.constants(dataset)  # a one-line error for unknown names
  mean, std = preprocess.NORMALIZATION[dataset]
  spec = models.get_spec(arch)
  channels = models.input_shape(spec.name, **model_kwargs)[-1]
  if spec.kind != 'generator' and len(mean) > 1 and len(mean) != channels:
    raise UserError(f'dataset {dataset!r} normalises {len(mean)} channels but {spec.name} takes {channels}')
  return {'mean': list(mean), 'std': list(std)}


def _convert(path, arch, num_classes, dataset, model_kwargs) -> tuple[Converted, dict]:
  """(the conversion, the metadata entries that describe its source)."""
  path = os.path.abspath(os.fspath(path))
  if model_dir.is_model_dir(path):
    raise UserError(f'{path} is already a converted model directory (load it with load_teacher)')
  if os.path.isdir(path):
    raise UserError(f'{path} is a directory, not a PyTorch checkpoint file')
  converted = convert_state_dict(torch_pickle.load_state_dict(path), arch, num_classes, model_kwargs,
                                 what=os.path.basename(path))
  extra = {'normalization': _normalization(dataset, converted.arch, converted.model_kwargs),
           'source': {'file': path, 'sha256': model_dir.sha256(path), 'bytes': os.path.getsize(path)},
           'converted_by': 'dfkd_jax.convert'}
  return converted, extra


def convert_file(path, arch: str | None = None, num_classes: int | None = None, dataset: str | None = None,
                 model_kwargs: Mapping[str, Any] | None = None) -> tuple[Any, dict, dict]:
  """(model, variables, metadata) of a PyTorch checkpoint file; the metadata is what ``convert``
  writes (``dataset`` names the input normalisation, None if unknown)."""
  converted, extra = _convert(path, arch, num_classes, dataset, model_kwargs)
  meta = model_dir.metadata(converted.arch, num_classes=converted.num_classes, dataset=dataset,
                            model_kwargs=converted.model_kwargs, extra=extra)
  return converted.model, converted.variables, meta


def convert(source, out, arch: str | None = None, num_classes: int | None = None, dataset: str | None = None,
            model_kwargs: Mapping[str, Any] | None = None) -> dict:
  """Converts PyTorch checkpoint ``source`` into the converted-model directory ``out`` (absent or
  empty) and returns its metadata."""
  out = os.path.abspath(os.fspath(out))
  if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
    raise UserError(f'output {out} exists and is not an empty directory')
  converted, extra = _convert(source, arch, num_classes, dataset, model_kwargs)
  return model_dir.save(out, converted.arch, converted.variables, num_classes=converted.num_classes,
                        dataset=dataset, model_kwargs=converted.model_kwargs, extra=extra)


def load_teacher(path, arch: str | None = None, num_classes: int | None = None, *,
                 model_kwargs: Mapping[str, Any] | None = None) -> tuple[Any, dict]:
  """(model, variables) from a ``.pth`` file, a converted-model directory or ``embedded:NAME``;
  ``model.apply(variables, x_nhwc, train=False)`` gives the logits.

  For a directory the architecture and class count come from its metadata (``arch`` and
  ``num_classes``, if given, must agree with it); for a file see ``convert_state_dict``.
  """
  from dfkd_jax.convert import teachers
  path = teachers.resolve_path(os.fspath(path))
  if not os.path.isdir(path):
    model, variables, _ = convert_file(path, arch, num_classes, model_kwargs=model_kwargs)
    return model, variables
  model, variables, meta = model_dir.load(path)
  if arch is not None and models.canonical_name(arch) != meta['arch']:
    raise UserError(f"{path} holds a {meta['arch']}, not a {models.canonical_name(arch)}")
  if num_classes is not None and meta.get('num_classes') not in (None, num_classes):
    raise UserError(f"{path} has {meta['num_classes']} classes, not {num_classes}")
  return model, variables


# --- exporting -----------------------------------------------------------------------------------

def _named_like(state_dict: Mapping[str, np.ndarray], like: str, layout: models.TorchLayout) -> collections.OrderedDict:
  """``state_dict`` (canonical names) renamed and ordered as the keys of the checkpoint ``like``.

  ``num_batches_tracked`` entries that ``like`` lacks (files from torch < 0.4.1) are left out.
  """
  template = torch_pickle.load_state_dict(like)
  out, unexpected, misshaped = collections.OrderedDict(), [], []
  for key, value in template.items():
    canonical = next(iter(naming.canonical_keys({key: value}, layout)))
    if canonical not in state_dict:
      unexpected.append(key)
    elif np.shape(value) != np.shape(state_dict[canonical]):
      misshaped.append(f'{key}: file {np.shape(value)} vs model {np.shape(state_dict[canonical])}')
    else:
      out[key] = state_dict[canonical]
  named = {next(iter(naming.canonical_keys({key: None}, layout))) for key in template}
  missing = [k for k in state_dict if k not in named and not k.endswith(naming.IGNORED_SUFFIXES)]
  if missing or unexpected or misshaped:
    raise naming.MismatchError(f'naming template {like}', missing, unexpected, misshaped)
  return out


def to_state_dict(arch: str, variables: Any, model_kwargs: Mapping[str, Any] | None = None,
                  like: str | None = None) -> collections.OrderedDict:
  """The reference state_dict (numpy values) of ``arch``'s Flax ``variables``: canonical reference
  names, or the names and order of checkpoint ``like`` (e.g. the teacher file of a Huawei run)."""
  spec = models.get_spec(arch)
  state_dict = naming.flax_to_torch(variables, spec.torch, layout_kw=dict(model_kwargs or {}))
  return _named_like(state_dict, like, spec.torch) if like is not None else state_dict


def save_pth(path, arch: str, variables: Any, model_kwargs: Mapping[str, Any] | None = None,
             like: str | None = None) -> collections.OrderedDict:
  """Writes ``to_state_dict(...)`` to ``path`` (which must not exist) as ``torch.save`` would;
  returns the state_dict. Loads with ``torch.load(path, weights_only=True)``."""
  path = os.fspath(path)
  if os.path.exists(path):
    raise UserError(f'{path} exists; remove it or choose another output file')
  state_dict = to_state_dict(arch, variables, model_kwargs, like)
  torch_pickle.save_state_dict(path, state_dict)
  return state_dict


def resolve_model_dir(path) -> str:
  """``path`` if it is a converted-model directory, else the final model of training workdir
  ``path`` (``student/``, or ``model/`` for teacher training)."""
  path = os.fspath(path)
  for candidate in (path, os.path.join(path, 'student'), os.path.join(path, 'model')):
    if model_dir.is_model_dir(candidate):
      return candidate
  raise UserError(f'{path} is neither a converted model directory nor a training workdir with one '
                  'in student/ or model/')


def export(model, out, like: str | None = None) -> dict:
  """Writes the converted model (or the final model of a training workdir) ``model`` to ``out``
  as a torch-loadable state_dict; returns its metadata."""
  _, variables, meta = model_dir.load(resolve_model_dir(model))
  save_pth(out, meta['arch'], variables, meta.get('model_kwargs'), like)
  return meta
