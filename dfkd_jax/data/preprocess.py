"""Preprocessing shared by evaluation, teacher training and generators: resizing and the
per-dataset normalisation constants exactly as in the reference repos
(``docs/reference_semantics.md#normalisation``).

Everything the teacher sees is ``(x - mean) / std`` of images in [0, 1].
"""
from __future__ import annotations

import numpy as np

from dfkd_jax.errors import UserError

# (mean, std) per channel. CIFAR-10's std is the references' (0.2023, 0.1994, 0.2010), not the
# "true" one; the Huawei repos use the CIFAR-10 constants for CIFAR-100 too ('cifar100_huawei').
NORMALIZATION = {
    'mnist': ((0.1307,), (0.3081,)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    'cifar100': ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    'cifar100_huawei': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    'svhn': ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    'tiny_imagenet': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    'none': ((0.0,), (1.0,)),
}


def constants(dataset: str) -> tuple[np.ndarray, np.ndarray]:
  if dataset not in NORMALIZATION:
    raise UserError(f"unknown dataset {dataset!r} for normalisation; known: {', '.join(NORMALIZATION)}")
  mean, std = NORMALIZATION[dataset]
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def normalize(x01, dataset: str):
  """[0, 1] images (NHWC, numpy or jax) -> the teacher's input space."""
  mean, std = constants(dataset)
  return (x01 - mean) / std


def to_unit_range(x, dataset: str):
  """Inverse of ``normalize``: teacher input space -> [0, 1] (for image grids and the pool)."""
  mean, std = constants(dataset)
  return x * std + mean


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of uint8 NHWC images with PIL, as torchvision's ``Resize(size)`` does on PIL
  images (the references resize MNIST 28 -> 32 this way)."""
  from PIL import Image
  n, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  out = np.empty((n, size, size, c), np.uint8)
  for i in range(n):
    img = Image.fromarray(images[i, ..., 0] if c == 1 else images[i])
    out[i] = np.asarray(img.resize((size, size), Image.BILINEAR)).reshape(size, size, c)
  return out


def prepare_images(images: np.ndarray, dataset: str, image_size: int, channels: int) -> np.ndarray:
  """uint8 N,H,W[,C] -> float32 NHWC, resized to ``image_size`` and normalised for ``dataset``."""
  if images.ndim == 3:
    images = images[..., None]
  if images.shape[-1] != channels:
    if images.shape[-1] == 1 and channels == 3:
      images = np.repeat(images, 3, axis=-1)
    else:
      raise UserError(f'images have {images.shape[-1]} channels but the model expects {channels}')
  images = resize_uint8(np.asarray(images, np.uint8), image_size)
  return normalize(images.astype(np.float32) / 255.0, dataset).astype(np.float32)
