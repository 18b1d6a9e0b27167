"""Unlabelled pools and small labelled subsets for the little-data methods (PU compression, DFND),
and the offline photographs used by the super-resolution job.

``config.unlabelled``:

  ``source``        ``'mnist_mix'`` (below) or any ``dfkd_jax.data`` source spec (``tfds:NAME``,
                    ``folder:DIR``, ``npz:PATH``, ``idx:DIR``); labels of a spec source are ignored
  ``split``         the split of a spec source

The ``mnist_mix`` pool stands in, offline, for "ImageNet as unlabelled data for a CIFAR teacher": it
mixes real MNIST digits (the in-distribution part) with out-of-distribution images, and records
which is which so that a selection can be scored. Its parts (``config.unlabelled``):

  ``digits``, ``digits_split``   real digits: by default the 4,500 embedded training digits (the
                                 only shipped digits besides the 500 evaluation hold-outs; their
                                 labels are dropped)
  ``noise``                      uniform noise images, half of them smoothed (low-frequency blobs)
  ``photo_patches``              grey patches of scikit-image's bundled sample photographs, random
                                 position and size, resized to 28x28
  ``sklearn_digits``             scikit-learn's 8x8 digits upsampled to 28x28 (a different, blurry
                                 digit distribution), taken only if scikit-learn is installed

``kind`` of each pool image: 0 real digit (``KINDS``), 1 noise, 2 photo patch, 3 upsampled 8x8
digit; -1 throughout for spec sources, where the truth is unknown.
"""
from __future__ import annotations

import importlib.util
from typing import NamedTuple

import ml_collections
import numpy as np

from dfkd_jax.data import sources
from dfkd_jax.errors import UserError

KINDS = ('digit', 'noise', 'photo_patch', 'sklearn_digit')
MIX_SIZE = 28

# scikit-image's bundled sample images that are photographs (or photograph-like textures).
PHOTOS = ('astronaut', 'camera', 'coffee', 'chelsea', 'rocket', 'stereo_motorcycle', 'hubble_deep_field',
          'immunohistochemistry', 'retina', 'coins', 'moon', 'brick', 'grass', 'gravel')


class Pool(NamedTuple):
  images: np.ndarray  # uint8 N H W C
  kinds: np.ndarray   # int32: index into KINDS, or -1 when unknown
  name: str

  def composition(self) -> dict[str, int]:
    return composition(self.kinds)


def composition(kinds: np.ndarray) -> dict[str, int]:
  """Number of images per kind (``KINDS``), or {'unknown': N}."""
  if np.all(kinds < 0):
    return {'unknown': len(kinds)}
  return {k: int(np.sum(kinds == i)) for i, k in enumerate(KINDS)}


def load_pool(cfg, seed: int, data_dir: str | None = None) -> Pool:
  """The unlabelled pool described by ``config.unlabelled``."""
  if cfg.source == 'mnist_mix':
    return mnist_mix(seed, digits=cfg.digits, digits_split=cfg.digits_split, noise=cfg.noise,
                     photo_patches=cfg.photo_patches, sklearn_digits=cfg.sklearn_digits)
  ds = sources.load(cfg.source, cfg.split, data_dir=data_dir)
  return Pool(ds.images, np.full(len(ds.images), -1, np.int32), ds.name)


def labelled_subset(spec: str, split: str, per_class: int, num_classes: int, seed: int,
                    data_dir: str | None = None) -> sources.Dataset:
  """``per_class`` labelled images of each class of ``spec[split]``, drawn with a fixed permutation
  (PU compression's positives: the reference uses 100 CIFAR-10 training images per class)."""
  ds = sources.load(spec, split, data_dir=data_dir)
  order = np.random.default_rng([seed, 1]).permutation(len(ds.labels))
  picked = []
  for c in range(num_classes):
    of_class = order[ds.labels[order] == c][:per_class]
    if len(of_class) < per_class:
      raise UserError(f'{ds.name} has {len(of_class)} images of class {c}, fewer than the {per_class} asked for')
    picked.append(of_class)
  idx = np.sort(np.concatenate(picked))
  return sources.Dataset(ds.images[idx], ds.labels[idx], f'{ds.name} ({per_class}/class)')


# ------------------------------------------------------------------------------------------------
# The offline MNIST pool
# ------------------------------------------------------------------------------------------------

def mnist_mix_config(small: bool = False) -> ml_collections.ConfigDict:
  """``config.unlabelled`` for the ``mnist_mix`` pool: the defaults below, or with ``small`` a
  900-image pool for smoke tests (the 500 hold-out digits, 100 noise, 200 patches, 100 8x8 digits)."""
  pool = dict(source='mnist_mix', split='train', digits='embedded_mnist', digits_split='train', noise=3000,
              photo_patches=10000, sklearn_digits=1797)
  if small:
    pool.update(digits_split='heldout', noise=100, photo_patches=200, sklearn_digits=100)
  return ml_collections.ConfigDict(pool)


def mnist_mix(seed: int, *, digits: str = 'embedded_mnist', digits_split: str = 'train', noise: int = 3000,
              photo_patches: int = 10000, sklearn_digits: int = 1797) -> Pool:
  """Real digits + noise + photograph patches (+ upsampled 8x8 digits), 28x28x1 uint8, shuffled."""
  rng = np.random.default_rng([seed, 2])
  real = sources.load(digits, digits_split).images
  parts = [(real, 0), (noise_images(noise, rng), 1), (photo_patches_gray(photo_patches, rng), 2)]
  if sklearn_digits and importlib.util.find_spec('sklearn') is not None:
    parts.append((upsampled_sklearn_digits(sklearn_digits, rng), 3))
  images = np.concatenate([p if p.ndim == 4 else p[..., None] for p, _ in parts])
  kinds = np.concatenate([np.full(len(p), k, np.int32) for p, k in parts])
  order = rng.permutation(len(images))
  return Pool(images[order], kinds[order], 'mnist_mix')


def noise_images(n: int, rng: np.random.Generator, size: int = MIX_SIZE) -> np.ndarray:
  """n uint8 noise images: the first half i.i.d. uniform pixels, the rest smooth blobs (uniform
  noise on a 4x4 to 10x10 grid, bilinearly upsampled)."""
  from PIL import Image
  out = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
  for i in range(n // 2, n):
    g = int(rng.integers(4, 11))
    coarse = Image.fromarray(rng.integers(0, 256, (g, g), dtype=np.uint8))
    out[i] = np.asarray(coarse.resize((size, size), Image.BILINEAR))
  return out


def sample_photos(names=PHOTOS) -> dict[str, np.ndarray]:
  """scikit-image's bundled sample photographs by name, as uint8 RGB (H, W, 3) arrays (grey ones
  repeated over the channels)."""
  if importlib.util.find_spec('skimage') is None:
    raise UserError('the offline photographs come from scikit-image: pip install scikit-image')
  import skimage.data
  out = {}
  for name in names:
    image = getattr(skimage.data, name)()
    image = np.asarray(image[0] if isinstance(image, tuple) else image)  # stereo_motorcycle: the left view
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=-1)
    out[name] = image[..., :3].astype(np.uint8)
  return out


def photo_patches_gray(n: int, rng: np.random.Generator, size: int = MIX_SIZE) -> np.ndarray:
  """n grey patches of the sample photographs: a photograph uniformly at random, a square of side
  uniform in [size, min(H, W) / 2] at a uniform position, resized to size x size (bilinear)."""
  from PIL import Image
  photos = [Image.fromarray(p).convert('L') for p in sample_photos().values()]
  out = np.empty((n, size, size), np.uint8)
  for i in range(n):
    photo = photos[int(rng.integers(len(photos)))]
    w, h = photo.size
    side = int(rng.integers(size, max(size + 1, min(w, h) // 2)))
    x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    out[i] = np.asarray(photo.resize((size, size), Image.BILINEAR, box=(x, y, x + side, y + side)))
  return out


def upsampled_sklearn_digits(n: int, rng: np.random.Generator, size: int = MIX_SIZE) -> np.ndarray:
  """Up to n of scikit-learn's 1,797 8x8 digits (16 grey levels), drawn without replacement, padded
  to 10x10 and bilinearly upsampled to size x size."""
  from PIL import Image
  from sklearn.datasets import load_digits
  small = load_digits().images  # float 0..16
  idx = rng.permutation(len(small))[:n]
  out = np.empty((len(idx), size, size), np.uint8)
  for j, i in enumerate(idx):
    padded = np.pad(small[i] * (255.0 / 16.0), 1).astype(np.uint8)
    out[j] = np.asarray(Image.fromarray(padded).resize((size, size), Image.BILINEAR))
  return out
