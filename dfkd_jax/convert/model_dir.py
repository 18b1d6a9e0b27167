"""The converted-model directory: an Orbax checkpoint of ``{params, batch_stats}`` plus
``metadata.json`` (architecture, class count, builder keywords, input normalisation, source file
and its sha256). It is what ``python -m dfkd_jax.convert`` writes, what teacher training exports,
and what ``--config.teacher.checkpoint=DIR`` accepts.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from dfkd_jax import models
from dfkd_jax.errors import UserError

FORMAT = 'dfkd_jax.model/1'
METADATA = 'metadata.json'
VARIABLES = 'variables'


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def is_model_dir(path: str) -> bool:
  return (epath.Path(path) / METADATA).is_file()


def abstract_variables(arch: str, num_classes: int | None, model_kwargs: dict) -> tuple[Any, Any]:
  """(model, abstract variables) of an architecture, without allocating weights."""
  model = models.create(arch, num_classes=num_classes, **model_kwargs)
  shape = models.input_shape(arch, **model_kwargs)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1,) + shape), train=False))
  return model, abstract


def metadata(arch: str, *, num_classes: int | None, dataset: str | None, model_kwargs: dict | None = None,
             extra: dict | None = None) -> dict:
  """The ``metadata.json`` content of a model directory (``extra`` entries are added as they are)."""
  spec = models.get_spec(arch)
  return {'format': FORMAT, 'arch': spec.name, 'kind': spec.kind, 'num_classes': num_classes,
          'model_kwargs': dict(model_kwargs or {}), 'dataset': dataset,
          'input_shape': list(models.input_shape(spec.name, **(model_kwargs or {}))), **(extra or {})}


def save(path: str, arch: str, variables: Any, *, num_classes: int | None, dataset: str | None,
         model_kwargs: dict | None = None, extra: dict | None = None) -> dict:
  """Writes ``variables`` (numpy or jax) and metadata to directory ``path`` (created; must be
  empty or absent; local or ``gs://``); returns the metadata. In a multi-process run every process
  calls it: Orbax writes the (global) arrays collectively, process 0 the directory and metadata."""
  path = epath.Path(path if '://' in str(path) else os.path.abspath(path))
  if path.exists() and any(path.iterdir()):
    raise UserError(f'output directory {path} is not empty')
  meta = metadata(arch, num_classes=num_classes, dataset=dataset, model_kwargs=model_kwargs, extra=extra)
  writer = jax.process_index() == 0
  if writer:
    path.mkdir(parents=True, exist_ok=True)
  # Global arrays stay on their devices (a process may not hold all of an FSDP-split array).
  variables = jax.tree.map(lambda a: a.astype(jnp.float32) if isinstance(a, jax.Array) else np.asarray(a, np.float32),
                           dict(variables))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / VARIABLES, variables)
  checkpointer.wait_until_finished()
  if writer:
    (path / METADATA).write_text(json.dumps(meta, indent=2, sort_keys=True) + '\n')
  return meta


def save_trained(workdir: str, name: str, arch: str, variables: Any, config, model_kwargs: dict,
                 extra: dict, *, replace: bool = False) -> None:
  """A trained model of a run as ``WORKDIR/name``: a directory already written by an earlier,
  resumed run is kept, unless ``replace`` (a better model than the one exported so far). Every
  process of a multi-process run calls it (see ``save``)."""
  path = epath.Path(workdir) / name
  if is_model_dir(path) and not replace:
    return
  # Written aside and renamed when complete, so that a run killed mid-export exports again.
  partial = path.with_name(f'{name}.partial')
  if jax.process_index() == 0 and partial.exists():
    partial.rmtree()
  _barrier('dfkd_jax export: no stale partial export')
  save(str(partial), arch, variables, num_classes=config.num_classes, dataset=config.dataset,
       model_kwargs=dict(model_kwargs), extra=extra)
  if jax.process_index() == 0:
    if path.exists():  # replaced: the old model is removed only once the new one is complete
      stale = path.with_name(f'{name}.replaced')
      if stale.exists():
        stale.rmtree()
      path.rename(stale)
      partial.rename(path)
      stale.rmtree()
    else:
      partial.rename(path)
  _barrier('dfkd_jax export: in place')  # every process returns seeing the finished directory


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def load(path: str) -> tuple[Any, dict, dict]:
  """(model, variables, metadata) from a converted-model directory."""
  meta_path = os.path.join(path, METADATA)
  if not os.path.isfile(meta_path):
    raise UserError(f'{path} is not a converted model directory (no {METADATA}); convert a .pth with '
                    f'python -m dfkd_jax.convert')
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except ValueError as e:
    raise UserError(f'{meta_path} is not valid JSON: {e}') from e
  if meta.get('format') != FORMAT:
    raise UserError(f'{path} has format {meta.get("format")!r}, expected {FORMAT!r}')
  model, abstract = abstract_variables(meta['arch'], meta.get('num_classes'), meta.get('model_kwargs', {}))
  try:
    # Read whole onto this process's first device, whatever devices wrote it (a model exported by a
    # pod slice loads on a laptop); the caller places it on its own mesh.
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    # Closed on every path: a checkpointer left open after a failed read let orbax's background
    # thread post to a closed event loop at exit, a traceback after the one-line error.
    with ocp.StandardCheckpointer() as checkpointer:
      variables = checkpointer.restore(
          os.path.join(os.path.abspath(path), VARIABLES),
          jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=local), abstract))
  except Exception as e:  # noqa: BLE001 - any read failure is a broken directory
    raise UserError(f'cannot read the weights in {path}: {str(e).splitlines()[0][:200]}') from e
  return model, jax.tree.map(np.asarray, variables), meta
