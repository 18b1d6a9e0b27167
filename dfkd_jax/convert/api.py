"""The converter's front door: reference PyTorch checkpoints in, zoo models out, and back
(``teachers.load_teacher`` loads any of them, converted or not, as a frozen teacher).

  convert(source, out, arch=None, ...)    a ``.pth`` -> a converted-model directory (``model_dir``)
  convert_file(path, arch=None, ...)      a ``.pth`` -> (model, variables, metadata), nothing written
  export(model, out, like=None)           a converted directory or training workdir -> a ``.pth``
  save_pth(path, arch, variables, ...)    Flax variables -> a ``.pth`` (what ``export`` writes)

Files are read by ``torch_pickle`` (no torch; nothing from the pickle runs) in any of its layouts
(zip or legacy; a state_dict, a ``{'state_dict': ...}`` training checkpoint or a pickled
``nn.Module``), ``module.`` prefixes are stripped and the architecture's alternative namings are
rewritten by ``naming``.

What the arguments leave open is read from the file (``identify``): without ``arch``, the file
must fit exactly one registered architecture, and sizes such as ``num_classes`` or a generator's
``nz`` are read off the tensor shapes. The converted model records every size it was built with. A
file that does not fit gives one line listing the missing, unexpected and mis-shaped keys and, where
some registered architecture fits the file, the arch and sizes to use instead.
"""
from __future__ import annotations

import collections
import os
from typing import Any, Mapping, NamedTuple

import numpy as np

from dfkd_jax import models
from dfkd_jax.convert import identify, model_dir, naming, torch_pickle
from dfkd_jax.data import preprocess
from dfkd_jax.errors import UserError


class Converted(NamedTuple):
  """A zoo model, its Flax variables, and what it was built with."""
  model: Any
  variables: dict
  arch: str
  num_classes: int | None
  model_kwargs: dict


# --- converting ----------------------------------------------------------------------------------

def _given_kwargs(spec: models.ModelSpec, num_classes: int | None, model_kwargs: Mapping[str, Any] | None) -> dict:
  """The caller's keyword arguments for ``spec``, checked against what its builder takes."""
  model_kwargs = dict(model_kwargs or {})
  known = set(identify.builder_keywords(spec)) - {'num_classes'}
  unknown = sorted(set(model_kwargs) - known)
  if unknown:
    raise UserError(f"{spec.name} takes no model kwarg {', '.join(unknown)}"
                    + (' (give num_classes on its own)' if 'num_classes' in unknown else '')
                    + f"; it takes {', '.join(sorted(known)) or 'none'}")
  if spec.kind == 'classifier' and num_classes is not None:
    model_kwargs['num_classes'] = int(num_classes)
  return model_kwargs  # num_classes of a generator or SR net means nothing and is dropped


def convert_state_dict(state_dict: Mapping[str, np.ndarray], arch: str | None = None, num_classes: int | None = None,
                       model_kwargs: Mapping[str, Any] | None = None, what: str = 'the checkpoint') -> Converted:
  """A zoo model and its Flax variables from a reference state_dict (numpy values).

  ``arch``, ``num_classes`` and ``model_kwargs`` are taken as given; whatever is left open is read
  from the file (see the module docstring). A mismatch raises ``naming.MismatchError`` (one line)
  naming what to use instead.
  """
  if arch is None:
    arch = identify.only_fit(state_dict, dict(model_kwargs or {}), what)
  spec = models.get_spec(arch)
  given = _given_kwargs(spec, num_classes, model_kwargs)
  try:
    identify.expected_shapes(spec.name, {**identify.size_defaults(spec.name), **given})
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 - the builder rejects a given value
    raise UserError(f'cannot build {spec.name} with {given}: {" ".join(str(e).split())[:200]}') from e
  shapes = identify.file_shapes(state_dict, spec)
  given = {**identify.read_counts(spec.name, set(shapes), given), **given}
  kwargs = {**identify.size_defaults(spec.name), **identify.read_sizes(spec.name, shapes, given)}
  num_classes = kwargs.get('num_classes')
  model_kwargs = {k: v for k, v in kwargs.items() if k != 'num_classes'}
  model, abstract = model_dir.abstract_variables(spec.name, num_classes, model_kwargs)
  what = f'{what} (read as {spec.name})'
  try:
    variables = naming.torch_to_flax(state_dict, abstract, spec.torch, layout_kw=model_kwargs, what=what)
  except naming.MismatchError as e:
    raise naming.MismatchError(what, e.missing, e.unexpected, e.misshaped,
                               hint=identify.mismatch_hint(state_dict, spec, kwargs, given)) from None
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
    raise UserError(f'{path} is already a converted model directory (load it with teachers.load_teacher)')
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
