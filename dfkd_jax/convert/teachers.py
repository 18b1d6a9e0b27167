"""The one teacher loader. A teacher source (``config.teacher.checkpoint``) is one of:

  ``embedded:NAME``   a teacher shipped inside the package (``dfkd_jax/assets/teachers/NAME``), made
                      by a config in ``configs/teacher_*.py``
  ``DIR``             a converted-model directory (``python -m dfkd_jax.convert``, or the
                      ``WORKDIR/model`` of a teacher-training run)
  ``FILE.pth``        a reference PyTorch checkpoint, converted on the fly (torch is not needed;
                      ``arch`` picks the architecture where the file fits several)
  ``random``          ``arch`` with random weights: for smoke tests of a config (``:runlocal`` on a
                      machine without the teacher file), never for results

``load_teacher`` reads any of them and checks it against what the caller expects (architecture,
class count, input normalisation); ``load`` is the same for a job's ``config.teacher``. The teacher
is loaded on every start and never checkpointed.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from dfkd_jax import models
from dfkd_jax.convert import api, model_dir
from dfkd_jax.errors import UserError

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'assets', 'teachers')  # dfkd_jax/assets


class Teacher(NamedTuple):
  """A frozen teacher: ``model.apply(variables, x_nhwc, train=False)`` gives its logits."""
  model: Any
  variables: dict
  metadata: dict


def embedded_names() -> list[str]:
  return sorted(d for d in os.listdir(ASSETS) if model_dir.is_model_dir(os.path.join(ASSETS, d))) \
      if os.path.isdir(ASSETS) else []


def resolve_path(source: str) -> str:
  """The directory of ``embedded:NAME``; any other source unchanged."""
  if source.startswith('embedded:'):
    name = source.split(':', 1)[1]
    path = os.path.join(ASSETS, name)
    if not model_dir.is_model_dir(path):
      raise UserError(f"no embedded teacher {name!r}; available: {', '.join(embedded_names()) or 'none'}")
    return path
  return source


def load_teacher(source, arch: str | None = None, num_classes: int | None = None, dataset: str | None = None, *,
                 model_kwargs: Mapping[str, Any] | None = None) -> Teacher:
  """The teacher at ``source`` (see the module docstring), checked against what is given: ``arch``
  (a directory's must agree; a file is read as it), ``num_classes`` and ``dataset`` (the input
  normalisation it was trained with, where recorded)."""
  source = os.fspath(source)
  if not source:
    raise UserError('no teacher given: set --config.teacher.checkpoint to embedded:NAME, a converted '
                    'directory or a .pth file')
  path = resolve_path(source)
  if source == 'random':
    model, variables, meta = _random_teacher(arch, num_classes, dataset)
  elif os.path.isdir(path):
    model, variables, meta = model_dir.load(path)
    if arch is not None and models.canonical_name(arch) != meta['arch']:
      raise UserError(f"{path} holds a {meta['arch']}, not a {models.canonical_name(arch)}")
  elif os.path.isfile(path):
    model, variables, meta = api.convert_file(path, arch, num_classes, dataset, model_kwargs)
  else:
    raise UserError(f'teacher checkpoint {source!r} does not exist; set --config.teacher.checkpoint to '
                    f"embedded:NAME ({', '.join(embedded_names())}), a converted directory or a .pth file")
  if num_classes is not None and meta.get('num_classes') not in (None, num_classes):
    raise UserError(f"teacher {source} has {meta['num_classes']} classes but the config has num_classes={num_classes}")
  if dataset is not None and meta.get('dataset') not in (None, dataset):
    raise UserError(f"teacher {source} was trained on {meta['dataset']!r} inputs but the config's dataset is "
                    f"{dataset!r}; set --config.dataset={meta['dataset']} or use a matching teacher")
  return Teacher(model, variables, meta)


def load(teacher_cfg, num_classes: int, dataset: str) -> Teacher:
  """The job's teacher: ``load_teacher`` of ``config.teacher`` (``checkpoint``, and ``arch`` if set)."""
  return load_teacher(teacher_cfg.checkpoint, teacher_cfg.get('arch') or None, num_classes, dataset)


def _random_teacher(arch: str | None, num_classes: int | None, dataset: str | None):
  if not arch:
    raise UserError('teacher.checkpoint=random needs --config.teacher.arch')
  model = models.create(arch, num_classes=num_classes)
  shape = models.input_shape(arch)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1,) + shape), train=False))(jax.random.key(0))
  return model, variables, {'arch': arch, 'num_classes': num_classes, 'dataset': dataset,
                            'input_shape': list(shape)}
