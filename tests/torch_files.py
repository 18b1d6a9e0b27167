"""The torch-written files and torch-computed values that tests compare against, committed under
fixtures/torch_files/ by fixtures/make_torch_files.py so that the default suite needs no torch.

A test that uses them is parametrised over ``SOURCES``: 'committed' reads fixtures/torch_files/ (no
torch), 'torch' writes or computes the same things with the installed torch at run time (marker
``torch``: ``pytest -m torch tests`` runs that group, which skips without torch).

Large reference checkpoints are committed as *templates*: the file torch wrote with the raw bytes of
its big storages cut out (gzip-compressed), plus where each cut was and which state_dict entry it
held. Those entries are weights_rule weights, so ``rebuild`` splices them back and checks that the
result is byte for byte the file torch wrote (its sha256).
"""
import functools
import gzip
import hashlib
import json
import os

import numpy as np
import pytest

DIR = os.path.join(os.path.dirname(__file__), 'fixtures', 'torch_files')
SOURCES = ['committed', pytest.param('torch', marks=pytest.mark.torch)]
_MIN_CUT_BYTES = 1024  # smaller storages stay in the template


def import_torch():
  return pytest.importorskip('torch')


def path(*parts) -> str:
  return os.path.join(DIR, *parts)


# --- values -------------------------------------------------------------------------------------

def save_values(group: str, values: dict) -> None:
  np.savez_compressed(path(group + '.npz'), **values)


def load_values(group: str) -> dict:
  with np.load(path(group + '.npz')) as stored:
    return {key: stored[key] for key in stored.files}


def values(group: str, source: str, compute) -> dict:
  """name -> array: the committed ``group`` values, or ``compute(torch)`` with the installed torch."""
  return load_values(group) if source == 'committed' else compute(import_torch())


@functools.lru_cache
def _committed(group: str) -> dict:
  return load_values(group)


def case_values(group: str, case: str, source: str, compute) -> dict:
  """One case of a group whose committed values are named '<case>/<name>': name -> array, committed or
  ``compute(torch)`` with the installed torch."""
  if source == 'torch':
    return compute(import_torch())
  prefix = case + '/'
  return {name[len(prefix):]: value for name, value in _committed(group).items() if name.startswith(prefix)}


def layout_values(state_dict: dict) -> dict:
  """A torch state_dict's keys and shapes, in its order, as one value: 'layout' -> its JSON."""
  return {'layout': np.array(json.dumps([[key, list(value.shape)] for key, value in state_dict.items()]))}


def layout(values: dict) -> list:
  """[(key, shape)] of the state_dict that ``layout_values`` recorded in ``values``."""
  return [(key, tuple(shape)) for key, shape in json.loads(str(values['layout']))]


def gunzip_all(directory: str, out_directory) -> None:
  """Every ``<name>.gz`` of ``directory`` as ``out_directory/<name>``."""
  for name in os.listdir(directory):
    with gzip.open(os.path.join(directory, name)) as source, open(os.path.join(out_directory, name[:-3]), 'wb') as out:
      out.write(source.read())


def save_json(name: str, doc) -> None:
  with open(path(name + '.json'), 'w') as f:
    json.dump(doc, f, indent=1, sort_keys=True)
    f.write('\n')


def load_json(name: str):
  with open(path(name + '.json')) as f:
    return json.load(f)


# --- templates of large files -------------------------------------------------------------------

def _storage_bytes(array) -> bytes:
  array = np.asarray(array)
  return np.ascontiguousarray(array, array.dtype.newbyteorder('<')).tobytes()


def make_template(file_path: str, arrays: dict, template_path: str) -> dict:
  """Writes ``file_path`` without the bytes of each array of ``arrays`` that occurs in it exactly once
  and is at least _MIN_CUT_BYTES long, gzipped, to ``template_path``; returns what ``rebuild`` needs."""
  with open(file_path, 'rb') as f:
    data = f.read()
  cuts = []
  for key, array in arrays.items():
    raw = _storage_bytes(array)
    start = data.find(raw)
    if len(raw) >= _MIN_CUT_BYTES and start >= 0 and data.find(raw, start + 1) < 0:
      cuts.append((start, len(raw), key))
  cuts.sort()
  rest, splices, position = [], [], 0
  for start, length, key in cuts:
    assert start >= position, f'{key} overlaps another cut storage'
    rest.append(data[position:start])
    splices.append([sum(map(len, rest)), key])
    position = start + length
  rest.append(data[position:])
  with open(template_path, 'wb') as f:
    f.write(gzip.compress(b''.join(rest), mtime=0))
  return {'sha256': hashlib.sha256(data).hexdigest(), 'splices': splices}


def rebuild(template_path: str, recipe: dict, arrays: dict, out_path: str) -> str:
  """The file ``make_template`` cut, from its template, ``recipe`` and the same ``arrays``; checks
  that it is the file torch wrote."""
  with open(template_path, 'rb') as f:
    rest = gzip.decompress(f.read())
  pieces, position = [], 0
  for offset, key in recipe['splices']:
    pieces += [rest[position:offset], _storage_bytes(arrays[key])]
    position = offset
  data = b''.join(pieces) + rest[position:]
  assert hashlib.sha256(data).hexdigest() == recipe['sha256'], f'{template_path} rebuilt differently'
  with open(out_path, 'wb') as f:
    f.write(data)
  return out_path
