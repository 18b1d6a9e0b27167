"""Data sources and preprocessing: every source on local or mocked data, per-process sharding,
one-line errors, normalisation constants and the PIL-bilinear resize.

Nothing here reaches a tfds download: catalog names are read under ``tfds.testing.mock_data``,
a real prepared dataset is built in ``tmp_path`` from a tiny local builder, and the "not
prepared" case points ``data_dir`` at an empty directory (run in a subprocess with a timeout).
"""
from __future__ import annotations

import gzip
import io
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dfkd_jax import data
from dfkd_jax.data import preprocess
from dfkd_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The real MNIST test set lives beside the repository (../shared), never inside it.
MNIST_DIR = next((d for d in (os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'mnist'),
                              '/work/shared/data/mnist') if os.path.isdir(d)), '/work/shared/data/mnist')
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _one_line_error(excinfo) -> str:
  text = str(excinfo.value)
  assert text and '\n' not in text, repr(text)
  return text


def _assert_shards_cover(spec, split, full, counts=(1, 2, 3, 4), **kw):
  """Process shards of ``spec[split]`` are contiguous, near-equal and cover ``full`` exactly once."""
  for count in counts:
    shards = [data.load(spec, split, process_index=i, process_count=count, **kw) for i in range(count)]
    sizes = [len(s.images) for s in shards]
    assert sum(sizes) == len(full.images) and max(sizes) - min(sizes) <= 1, (count, sizes)
    np.testing.assert_array_equal(np.concatenate([s.images for s in shards]), full.images)
    np.testing.assert_array_equal(np.concatenate([s.labels for s in shards]), full.labels)


# --- embedded_mnist -----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def embedded():
  return {split: data.load('embedded_mnist', split) for split in ('train', 'heldout', 'all')}


def test_embedded_mnist_sizes_and_strata(embedded):
  train, heldout, everything = embedded['train'], embedded['heldout'], embedded['all']
  assert train.images.shape == (4500, 28, 28, 1) and heldout.images.shape == (500, 28, 28, 1)
  assert everything.images.shape == (5000, 28, 28, 1)
  for ds in (train, heldout):
    assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(train.labels, minlength=10), [450] * 10)
  np.testing.assert_array_equal(np.bincount(heldout.labels, minlength=10), [50] * 10)
  assert everything.images.max() == 255 and everything.images.min() == 0  # raw 0-255 digits
  assert train.name == 'embedded_mnist[train]'


def test_embedded_mnist_splits_are_disjoint_and_partition_all(embedded):
  train, heldout, everything = embedded['train'], embedded['heldout'], embedded['all']

  def keys(ds):
    return [ds.images[i].tobytes() + bytes([ds.labels[i]]) for i in range(len(ds.labels))]

  all_keys = keys(everything)
  assert len(set(all_keys)) == 5000  # every (image, label) of the source is distinct
  train_keys, heldout_keys = set(keys(train)), set(keys(heldout))
  assert not train_keys & heldout_keys
  assert train_keys | heldout_keys == set(all_keys)


def test_embedded_mnist_is_deterministic(embedded):
  again = data.load('embedded_mnist', 'heldout')
  np.testing.assert_array_equal(again.images, embedded['heldout'].images)
  np.testing.assert_array_equal(again.labels, embedded['heldout'].labels)


def test_embedded_mnist_shards(embedded):
  _assert_shards_cover('embedded_mnist', 'heldout', embedded['heldout'], counts=(3,))


def test_embedded_mnist_bad_split():
  with pytest.raises(UserError) as e:
    data.load('embedded_mnist', 'test')
  assert "'train', 'heldout' and 'all'" in _one_line_error(e)


def test_unknown_source():
  with pytest.raises(UserError) as e:
    data.load('csv:/tmp/x', 'test')
  assert 'embedded_mnist, tfds:NAME, idx:DIR, npz:PATH or folder:DIR' in _one_line_error(e)


# --- idx ----------------------------------------------------------------------------------------

def _idx_bytes(array: np.ndarray, dtype_code: int = 0x08) -> bytes:
  return struct.pack('>HBB', 0, dtype_code, array.ndim) + struct.pack('>' + 'I' * array.ndim, *array.shape) + \
      np.ascontiguousarray(array, np.uint8).tobytes()


def _write(path, payload: bytes, gz: bool = False):
  with (gzip.open if gz else open)(path, 'wb') as f:
    f.write(payload)


@pytest.fixture
def tiny_idx():
  rng = np.random.default_rng(1)
  return rng.integers(0, 256, (7, 5, 4), dtype=np.uint8), rng.integers(0, 10, 7).astype(np.uint8)


@pytest.mark.skipif(not os.path.isdir(MNIST_DIR), reason='the real MNIST test set is not on this machine')
def test_idx_real_mnist_test_set():
  ds = data.load(f'idx:{MNIST_DIR}', 'test')
  assert ds.images.shape == (10000, 28, 28, 1) and ds.images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(ds.labels, minlength=10), MNIST_TEST_COUNTS)
  assert ds.labels.dtype == np.int32 and ds.labels.min() == 0 and ds.labels.max() == 9
  # The first test digit is a 7 (the MNIST test set's well-known first image).
  assert ds.labels[0] == 7 and ds.images[0].max() == 255
  shards = [data.load(f'idx:{MNIST_DIR}', 'test', process_index=i, process_count=3) for i in range(3)]
  assert [len(s.labels) for s in shards] == [3334, 3333, 3333]
  np.testing.assert_array_equal(np.concatenate([s.labels for s in shards]), ds.labels)
  # This directory holds only the test split; asking for train names the missing file.
  with pytest.raises(UserError) as e:
    data.load(f'idx:{MNIST_DIR}', 'train')
  assert 'train-images-idx3-ubyte' in _one_line_error(e)


@pytest.mark.parametrize('gz,names', [
    (True, ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')),
    (False, ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')),
    (False, ('t10k-images.idx3-ubyte', 't10k-labels.idx1-ubyte')),  # the torchvision-style names
])
def test_idx_tiny_files(tmp_path, tiny_idx, gz, names):
  images, labels = tiny_idx
  _write(tmp_path / names[0], _idx_bytes(images), gz)
  _write(tmp_path / names[1], _idx_bytes(labels), gz)
  ds = data.load(f'idx:{tmp_path}', 'test')
  np.testing.assert_array_equal(ds.images, images[..., None])
  np.testing.assert_array_equal(ds.labels, labels.astype(np.int32))
  _assert_shards_cover(f'idx:{tmp_path}', 'test', ds, counts=(2, 3, 7))


def test_idx_train_split_names(tmp_path, tiny_idx):
  images, labels = tiny_idx
  _write(tmp_path / 'train-images-idx3-ubyte.gz', _idx_bytes(images), True)
  _write(tmp_path / 'train-labels-idx1-ubyte.gz', _idx_bytes(labels), True)
  assert len(data.load(f'idx:{tmp_path}', 'train').labels) == 7
  with pytest.raises(UserError) as e:
    data.load(f'idx:{tmp_path}', 'test')
  assert 't10k-images-idx3-ubyte' in _one_line_error(e)
  with pytest.raises(UserError) as e:
    data.load(f'idx:{tmp_path}', 'validation')
  assert "'train' and 'test'" in _one_line_error(e)


@pytest.mark.parametrize('case', ['garbage', 'garbage_gz', 'truncated', 'float_idx', 'missing_dir'])
def test_idx_unreadable_files(tmp_path, tiny_idx, case):
  images, labels = tiny_idx
  image_path = tmp_path / 't10k-images-idx3-ubyte'
  _write(tmp_path / 't10k-labels-idx1-ubyte', _idx_bytes(labels))
  if case == 'garbage':
    _write(image_path, b'\x89PNG this is not an IDX file at all')
  elif case == 'garbage_gz':  # a .gz name but not gzip data
    image_path = tmp_path / 't10k-images-idx3-ubyte.gz'
    _write(image_path, _idx_bytes(images))
  elif case == 'truncated':
    _write(image_path, _idx_bytes(images)[:-10])
  elif case == 'float_idx':
    _write(image_path, _idx_bytes(images, dtype_code=0x0D))
  directory = tmp_path / 'nowhere' if case == 'missing_dir' else tmp_path
  with pytest.raises(UserError) as e:
    data.load(f'idx:{directory}', 'test')
  msg = _one_line_error(e)
  if case == 'missing_dir':
    assert 'no t10k-images-idx3-ubyte[.gz]' in msg and str(directory) in msg
  else:
    assert msg.startswith(f'cannot read IDX file {image_path}')


def test_idx_count_mismatch(tmp_path, tiny_idx):
  images, labels = tiny_idx
  _write(tmp_path / 't10k-images-idx3-ubyte', _idx_bytes(images))
  _write(tmp_path / 't10k-labels-idx1-ubyte', _idx_bytes(labels[:5]))
  with pytest.raises(UserError) as e:
    data.load(f'idx:{tmp_path}', 'test')
  assert 'has 7 images but' in _one_line_error(e) and 'has 5 labels' in str(e.value)


# --- npz ----------------------------------------------------------------------------------------

def test_npz_keys_and_splits(tmp_path):
  rng = np.random.default_rng(2)
  x = rng.integers(0, 256, (9, 6, 6, 3), dtype=np.uint8)
  y = rng.integers(0, 10, 9)
  np.savez(tmp_path / 'xy.npz', x=x, y=y)
  ds = data.load(f'npz:{tmp_path / "xy.npz"}', 'test')
  np.testing.assert_array_equal(ds.images, x)
  np.testing.assert_array_equal(ds.labels, y)
  assert ds.labels.dtype == np.int32
  _assert_shards_cover(f'npz:{tmp_path / "xy.npz"}', 'test', ds, counts=(2, 4))
  # Split-specific arrays win over plain ones; 'images'/'labels' names; grayscale N,H,W.
  np.savez(tmp_path / 'split.npz', x_test=x[:3], y_test=y[:3], x=x, y=y)
  np.testing.assert_array_equal(data.load(f'npz:{tmp_path / "split.npz"}', 'test').images, x[:3])
  np.testing.assert_array_equal(data.load(f'npz:{tmp_path / "split.npz"}', 'train').images, x)
  np.savez(tmp_path / 'named.npz', images=x[..., 0], labels=y)
  ds = data.load(f'npz:{tmp_path / "named.npz"}', 'test')
  np.testing.assert_array_equal(ds.images, x[..., :1])
  # Without labels: unlabelled (-1).
  np.savez(tmp_path / 'nolabels.npz', x=x)
  np.testing.assert_array_equal(data.load(f'npz:{tmp_path / "nolabels.npz"}', 'test').labels, [-1] * 9)


def test_npz_errors(tmp_path):
  np.savez(tmp_path / 'float.npz', x=np.zeros((2, 4, 4), np.float32), y=np.zeros(2))
  np.savez(tmp_path / 'nox.npz', z=np.zeros((2, 4, 4), np.uint8))
  (tmp_path / 'garbage.npz').write_bytes(b'not a zip file')
  cases = {
      'missing.npz': 'does not exist',
      'float.npz': 'must be uint8 images',
      'nox.npz': "has no 'x' or 'images' array",
      'garbage.npz': 'cannot read npz file',
  }
  for name, expected in cases.items():
    with pytest.raises(UserError) as e:
      data.load(f'npz:{tmp_path / name}', 'test')
    assert expected in _one_line_error(e), name


# --- folder -------------------------------------------------------------------------------------

def _save_png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def test_folder_class_subfolders(tmp_path):
  rng = np.random.default_rng(3)
  expected = []
  for label, cls in enumerate(['airplane', 'bird', 'cat']):  # labels follow sorted folder names
    for j in range(label + 1):
      img = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
      _save_png(os.path.join(tmp_path, cls, f'{j:02d}.png'), img)
      expected.append((img, label))
  (tmp_path / 'cat' / 'notes.txt').write_text('not an image')
  ds = data.load(f'folder:{tmp_path}', 'test')
  assert ds.images.shape == (6, 5, 5, 3)
  np.testing.assert_array_equal(ds.images, np.stack([e[0] for e in expected]))  # PNG is lossless
  np.testing.assert_array_equal(ds.labels, [e[1] for e in expected])
  _assert_shards_cover(f'folder:{tmp_path}', 'test', ds, counts=(2, 4))


def test_folder_split_subfolder_and_unlabelled(tmp_path):
  rng = np.random.default_rng(4)
  gray = [rng.integers(0, 256, (4, 4), dtype=np.uint8) for _ in range(3)]
  for i, img in enumerate(gray):
    _save_png(os.path.join(tmp_path, 'flat', f'img{i}.png'), img)
  ds = data.load(f'folder:{tmp_path / "flat"}', 'test')
  np.testing.assert_array_equal(ds.images, np.stack(gray)[..., None])
  np.testing.assert_array_equal(ds.labels, [-1, -1, -1])
  # DIR/<split>/<class>/ is used when DIR/<split> exists.
  _save_png(os.path.join(tmp_path, 'tree', 'test', 'a', '0.png'), gray[0])
  _save_png(os.path.join(tmp_path, 'tree', 'test', 'b', '0.png'), gray[1])
  _save_png(os.path.join(tmp_path, 'tree', 'train', 'a', '0.png'), gray[2])
  ds = data.load(f'folder:{tmp_path / "tree"}', 'test')
  np.testing.assert_array_equal(ds.images[..., 0], np.stack(gray[:2]))
  np.testing.assert_array_equal(ds.labels, [0, 1])


def test_folder_errors(tmp_path):
  _save_png(os.path.join(tmp_path, 'mixed', 'a.png'), np.zeros((4, 4), np.uint8))
  _save_png(os.path.join(tmp_path, 'mixed', 'b.png'), np.zeros((5, 5), np.uint8))
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'readme.txt').write_text('x')
  cases = {'missing': 'does not exist', 'mixed': 'have different shapes', 'empty': 'no images'}
  for name, expected in cases.items():
    with pytest.raises(UserError) as e:
      data.load(f'folder:{tmp_path / name}', 'test')
    assert expected in _one_line_error(e), name


# --- tfds ---------------------------------------------------------------------------------------

@pytest.fixture
def no_download(monkeypatch):
  """Records the kwargs of every ``tfds.data_source`` call; any download attempt fails the test."""
  import tensorflow_datasets as tfds
  calls = []
  real = tfds.data_source

  def spy(*args, **kwargs):
    calls.append(kwargs)
    return real(*args, **kwargs)

  def refuse(*args, **kwargs):
    raise AssertionError('a tfds download/prepare was attempted')

  monkeypatch.setattr(tfds, 'data_source', spy)
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', refuse)
  return calls


@pytest.mark.parametrize('name,shape', [('mnist', (28, 28, 1)), ('cifar10', (32, 32, 3))])
def test_tfds_catalog_names_under_mock_data(no_download, name, shape):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=12):
    ds = data.load(f'tfds:{name}', 'test')
  assert ds.images.shape == (12,) + shape and ds.images.dtype == np.uint8
  assert ds.labels.dtype == np.int32 and ds.labels.min() >= 0 and ds.labels.max() <= 9
  assert ds.name == f'tfds:{name}[test]'
  assert no_download and all(call.get('download') is False for call in no_download)
  # The loaded records feed preprocessing (CIFAR-10 constants for 3 channels).
  x = data.prepare_images(ds.images, name, 32, shape[-1])
  assert x.shape == (12, 32, 32, shape[-1]) and x.dtype == np.float32


def _png_bytes(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


@pytest.fixture(scope='module')
def prepared_tfds(tmp_path_factory):
  """A real prepared array_record dataset (no TensorFlow, no network): 11 test + 4 train digits."""
  import tensorflow_datasets as tfds

  rng = np.random.default_rng(5)
  arrays = {'test': rng.integers(0, 256, (11, 28, 28), dtype=np.uint8),
            'train': rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)}

  class DfkdTinyDigits(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(28, 28, 1)),
          'label': tfds.features.ClassLabel(num_classes=10)}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(split) for split in arrays}

    def _generate_examples(self, split):
      for i, img in enumerate(arrays[split]):
        yield i, {'image': _png_bytes(img), 'label': i % 10}

  data_dir = str(tmp_path_factory.mktemp('tfds'))
  DfkdTinyDigits(data_dir=data_dir, file_format='array_record').download_and_prepare()
  return data_dir, arrays


def test_tfds_prepared_dataset_round_trip_and_shards(prepared_tfds, no_download):
  data_dir, arrays = prepared_tfds
  ds = data.load('tfds:dfkd_tiny_digits', 'test', data_dir=data_dir)
  np.testing.assert_array_equal(ds.images, arrays['test'][..., None])
  np.testing.assert_array_equal(ds.labels, np.arange(11) % 10)
  assert len(data.load('tfds:dfkd_tiny_digits', 'train', data_dir=data_dir).labels) == 4
  # Per-process shards (tfds.even_splits) cover the split exactly once.
  for count in (2, 3, 4):
    shards = [data.load('tfds:dfkd_tiny_digits', 'test', data_dir=data_dir, process_index=i, process_count=count)
              for i in range(count)]
    assert max(len(s.labels) for s in shards) - min(len(s.labels) for s in shards) <= 1
    np.testing.assert_array_equal(np.concatenate([s.images for s in shards]), ds.images)
    np.testing.assert_array_equal(np.concatenate([s.labels for s in shards]), ds.labels)
  assert all(call.get('download') is False for call in no_download)


def test_tfds_data_dir_from_environment(prepared_tfds, monkeypatch):
  data_dir, arrays = prepared_tfds
  monkeypatch.setenv('TFDS_DATA_DIR', data_dir)
  np.testing.assert_array_equal(data.load('tfds:dfkd_tiny_digits', 'train').images, arrays['train'][..., None])


def test_tfds_not_prepared_fails_fast_with_instructions(tmp_path):
  """Outside mock_data, a catalog dataset missing from data_dir is a prompt one-line UserError
  that says how to prepare it (a download attempt would hang for minutes offline)."""
  empty = tmp_path / 'empty_tfds'
  empty.mkdir()
  code = ('import sys, time\n'
          'from dfkd_jax import data\n'
          'from dfkd_jax.errors import UserError\n'
          't = time.monotonic()\n'
          'try:\n'
          f'  data.load("tfds:mnist", "test", data_dir={str(empty)!r})\n'
          'except UserError as e:\n'
          '  print(f"{time.monotonic() - t:.3f}"); print(e)\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 0, result.stderr
  elapsed, message = result.stdout.strip().split('\n')
  assert float(elapsed) < 5.0
  assert message.startswith(f"tfds dataset 'mnist' split 'test' is not prepared in {empty}")
  assert "download_and_prepare()" in message and "file_format='array_record'" in message
  assert 'npz:/idx:/folder:' in message
  assert not any(empty.iterdir())  # nothing was downloaded or prepared there


# --- preprocessing ------------------------------------------------------------------------------

def test_normalization_constants():
  n = data.NORMALIZATION
  assert n['mnist'] == ((0.1307,), (0.3081,))
  assert n['cifar10'] == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
  assert n['cifar100'] == ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
  assert n['cifar100_huawei'] == n['cifar10']
  assert n['imagenet'] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  assert n['svhn'] == ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
  assert n['tiny_imagenet'] == ((0.5,) * 3, (0.5,) * 3)
  assert n['none'] == ((0.0,), (1.0,))


def test_normalize_and_inverse():
  x = np.random.default_rng(6).random((2, 4, 4, 3)).astype(np.float32)
  mean, std = np.array([0.4914, 0.4822, 0.4465], np.float32), np.array([0.2023, 0.1994, 0.2010], np.float32)
  y = data.normalize(x, 'cifar10')
  np.testing.assert_array_equal(y, (x - mean) / std)
  np.testing.assert_allclose(data.to_unit_range(y, 'cifar10'), x, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(data.normalize(x, 'none'), x)
  with pytest.raises(UserError) as e:
    data.normalize(x, 'cifar11')
  assert "unknown dataset 'cifar11'" in _one_line_error(e) and 'cifar10' in str(e.value)


def _half_pixel_bilinear_weights(n_in, n_out):
  """Bilinear interpolation matrix with pixel centres at i + 0.5, clamped at the borders."""
  src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  w = np.zeros((n_out, n_in))
  np.add.at(w, (np.arange(n_out), lo), 1 - (src - lo))
  np.add.at(w, (np.arange(n_out), hi), src - lo)
  return w


def test_resize_28_to_32_is_pil_bilinear():
  rng = np.random.default_rng(7)
  gray = rng.integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
  out = preprocess.resize_uint8(gray, 32)
  assert out.shape == (3, 32, 32, 1) and out.dtype == np.uint8
  for i in range(3):
    pil = np.asarray(Image.fromarray(gray[i, ..., 0]).resize((32, 32), Image.BILINEAR))
    np.testing.assert_array_equal(out[i, ..., 0], pil)
  # PIL bilinear upsampling is half-pixel bilinear interpolation; PIL rounds to 8 bits between
  # its horizontal and vertical passes, hence at most one grey level of difference.
  w = _half_pixel_bilinear_weights(28, 32)
  ref = np.einsum('ij,njk,lk->nil', w, gray[..., 0].astype(np.float64), w)
  assert np.abs(out[..., 0] - np.round(ref)).max() <= 1
  rgb = rng.integers(0, 256, (2, 28, 28, 3), dtype=np.uint8)
  out = preprocess.resize_uint8(rgb, 32)
  for i in range(2):
    np.testing.assert_array_equal(out[i], np.asarray(Image.fromarray(rgb[i]).resize((32, 32), Image.BILINEAR)))
  assert preprocess.resize_uint8(gray, 28) is gray  # same size: untouched


def test_prepare_images():
  rng = np.random.default_rng(8)
  gray = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)  # N,H,W: a channel axis is added
  x = data.prepare_images(gray, 'mnist', 32, 1)
  assert x.shape == (2, 32, 32, 1) and x.dtype == np.float32
  resized = np.stack([np.asarray(Image.fromarray(g).resize((32, 32), Image.BILINEAR)) for g in gray])
  np.testing.assert_array_equal(x[..., 0], ((resized.astype(np.float32) / 255.0 - np.float32(0.1307))
                                            / np.float32(0.3081)).astype(np.float32))
  # Grey -> 3 channels repeats the channel (then normalises each with its own constants).
  x3 = data.prepare_images(gray, 'none', 32, 3)
  assert x3.shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(x3[..., 0], x3[..., 1])
  np.testing.assert_array_equal(x3[..., 0], x3[..., 2])
  np.testing.assert_array_equal(x3[..., 0], resized / np.float32(255.0))
  xc = data.prepare_images(np.repeat(gray[..., None], 3, -1), 'cifar10', 28, 3)
  np.testing.assert_allclose(data.to_unit_range(xc, 'cifar10') * 255.0, np.repeat(gray[..., None], 3, -1),
                             rtol=0, atol=1e-3)
  with pytest.raises(UserError) as e:
    data.prepare_images(rng.integers(0, 256, (1, 8, 8, 3), dtype=np.uint8), 'mnist', 8, 1)
  assert _one_line_error(e) == 'images have 3 channels but the model expects 1'
  with pytest.raises(UserError) as e:
    data.prepare_images(rng.integers(0, 256, (1, 8, 8, 2), dtype=np.uint8), 'cifar10', 8, 3)
  assert _one_line_error(e) == 'images have 2 channels but the model expects 3'
