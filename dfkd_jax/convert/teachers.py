"""Where the frozen teacher comes from (``config.teacher.checkpoint``):

  ``embedded:NAME``   a teacher shipped inside the package (``dfkd_jax/assets/teachers/NAME``), made
                      by a config in ``configs/teacher_*.py``
  ``DIR``             a converted-model directory (``python -m dfkd_jax.convert``, or the
                      ``WORKDIR/model`` of a teacher-training run)
  ``FILE.pth``        a reference PyTorch checkpoint, converted on the fly (needs
                      ``config.teacher.arch``; torch is not needed)
  ``random``          ``config.teacher.arch`` with random weights: for smoke tests of a config
                      (``:runlocal`` on a machine without the teacher file), never for results

The teacher is loaded on every start and never checkpointed.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple

from dfkd_jax.convert import model_dir
from dfkd_jax.errors import UserError

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'assets', 'teachers')  # dfkd_jax/assets


class Teacher(NamedTuple):
  model: Any
  variables: dict
  metadata: dict


def embedded_names() -> list[str]:
  return sorted(d for d in os.listdir(ASSETS) if model_dir.is_model_dir(os.path.join(ASSETS, d))) \
      if os.path.isdir(ASSETS) else []


def resolve_path(spec: str) -> str:
  if spec.startswith('embedded:'):
    name = spec.split(':', 1)[1]
    path = os.path.join(ASSETS, name)
    if not model_dir.is_model_dir(path):
      raise UserError(f"no embedded teacher {name!r}; available: {', '.join(embedded_names()) or 'none'}")
    return path
  return spec


def load(teacher_cfg, num_classes: int, dataset: str) -> Teacher:
  """Loads and checks the teacher against the job's class count and normalisation."""
  spec = teacher_cfg.checkpoint
  if not spec:
    raise UserError('no teacher given: set --config.teacher.checkpoint to embedded:NAME, a converted '
                    'directory or a .pth file')
  path = resolve_path(spec)
  if spec == 'random':
    model, variables, meta = _random_teacher(teacher_cfg.get('arch'), num_classes, dataset)
  elif os.path.isdir(path):
    model, variables, meta = model_dir.load(path)
  elif os.path.isfile(path):
    from dfkd_jax.convert import api
    model, variables, meta = api.convert_file(path, arch=teacher_cfg.get('arch') or None,
                                              num_classes=num_classes, dataset=dataset)
  else:
    raise UserError(f'teacher checkpoint {spec!r} does not exist; set --config.teacher.checkpoint to '
                    f"embedded:NAME ({', '.join(embedded_names())}), a converted directory or a .pth file")
  if meta.get('num_classes') is not None and meta['num_classes'] != num_classes:
    raise UserError(f"teacher {spec} has {meta['num_classes']} classes but the config has num_classes={num_classes}")
  if meta.get('dataset') not in (None, dataset):
    raise UserError(f"teacher {spec} was trained on {meta['dataset']!r} inputs but the config's dataset is "
                    f"{dataset!r}; set --config.dataset={meta['dataset']} or use a matching teacher")
  return Teacher(model, variables, meta)


def _random_teacher(arch: str | None, num_classes: int, dataset: str):
  import jax
  import jax.numpy as jnp
  from dfkd_jax import models
  if not arch:
    raise UserError('teacher.checkpoint=random needs --config.teacher.arch')
  model = models.create(arch, num_classes=num_classes)
  shape = models.input_shape(arch)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1,) + shape), train=False))(jax.random.key(0))
  return model, variables, {'arch': arch, 'num_classes': num_classes, 'dataset': dataset,
                            'input_shape': list(shape)}
