"""Super-resolution images and evaluation: where HR images come from, how SR networks see them
(the BT.601 luma Y / 255, as VDSR's ``im_b_y / 255``), and the SR literature's PSNR/SSIM of a
network against bicubic interpolation.

Image specs (``config.sr_data.train`` / ``config.sr_eval.data``):

  ``skimage:NAME,NAME,...``  scikit-image's bundled sample photographs (``dfkd_jax.data.unlabelled.PHOTOS``),
                             optionally centre-cropped to ``crop`` pixels (0 = whole image)
  ``folder:DIR``             every PNG/JPEG/BMP in DIR, any sizes (Set5, Set14, B100, Urban100 as
                             distributed: the HR images)

Evaluation (``evaluate``) for scale s: HR = modcrop(Y, s); LR = MATLAB ``imresize(HR, 1/s)``;
bicubic = ``imresize(LR, s)`` (the network input, ``im_b_y``); SR = clamp(net(bicubic), 0, 1);
PSNR and SSIM on the 8-bit scale with s border pixels shaved, averaged over the images. Values are
float (no rounding of Y or of the SR output to 8 bits: ``sr_ops.y_psnr_ssim`` discusses the
~0.01 dB this leaves out).
"""
from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dfkd_jax.data import unlabelled
from dfkd_jax.errors import UserError
from dfkd_jax.sr import ops as sr_ops

_IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')


def load_images(spec: str, crop: int = 0) -> dict[str, np.ndarray]:
  """name -> uint8 RGB (H, W, 3) HR images of ``spec`` (see the module docstring)."""
  kind, _, arg = spec.partition(':')
  if kind == 'skimage':
    names = tuple(n for n in arg.split(',') if n)
    unknown = sorted(set(names) - set(unlabelled.PHOTOS))
    if unknown or not names:
      raise UserError(f"skimage:{arg}: use names from {', '.join(unlabelled.PHOTOS)}")
    images = unlabelled.sample_photos(names)
  elif kind == 'folder':
    from PIL import Image
    if not os.path.isdir(arg):
      raise UserError(f'image folder {arg!r} does not exist')
    files = sorted(f for f in os.listdir(arg) if f.lower().endswith(_IMAGE_EXTENSIONS))
    if not files:
      raise UserError(f'no images ({", ".join(_IMAGE_EXTENSIONS)}) in {arg!r}')
    images = {os.path.splitext(f)[0]: np.asarray(Image.open(os.path.join(arg, f)).convert('RGB')) for f in files}
  else:
    raise UserError(f'unknown SR image source {spec!r}: use skimage:NAME,... or folder:DIR')
  return {name: _centre_crop(image, crop) for name, image in images.items()}


def _centre_crop(image: np.ndarray, size: int) -> np.ndarray:
  if not size:
    return image
  h, w = image.shape[:2]
  top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
  return image[top:top + size, left:left + size]


def luma01(image_u8: np.ndarray) -> np.ndarray:
  """uint8 RGB (H, W, 3) -> float32 (H, W, 1): BT.601 Y / 255, in [16/255, 235/255]."""
  return np.asarray(sr_ops.rgb_to_y(jnp.asarray(image_u8, jnp.float32), data_range=255.0)) / 255.0


def random_patches(images: list[np.ndarray], num: int, size: int, rng: np.random.Generator) -> np.ndarray:
  """``num`` random size x size crops of the luma images (a uniformly drawn image, position, and a
  horizontal flip with probability ½): float32 (num, size, size, 1)."""
  out = np.empty((num, size, size, 1), np.float32)
  for i in range(num):
    image = images[int(rng.integers(len(images)))]
    h, w = image.shape[:2]
    if min(h, w) < size:
      raise UserError(f'an SR training image of {h}x{w} is smaller than the {size}x{size} patches')
    top, left = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
    patch = image[top:top + size, left:left + size]
    out[i] = patch[:, ::-1] if rng.random() < 0.5 else patch
  return out


def evaluate(apply_fn: Callable, variables, images: dict[str, np.ndarray], scale: int) -> dict[str, float]:
  """Mean PSNR/SSIM (dB / [0, 1]) of bicubic and of ``apply_fn(variables, bicubic)`` at ``scale``
  over ``images`` (uint8 RGB): keys ``bicubic_psnr``, ``bicubic_ssim``, ``psnr``, ``ssim``."""
  sums = {'bicubic_psnr': 0.0, 'bicubic_ssim': 0.0, 'psnr': 0.0, 'ssim': 0.0}
  for image in images.values():
    hr = jnp.asarray(sr_ops.modcrop(luma01(image), scale))[None]
    bicubic = bicubic_input(hr, scale)
    sr = jnp.clip(jax.jit(apply_fn)(variables, bicubic), 0.0, 1.0)
    for name, result in (('bicubic_', bicubic), ('', sr)):
      sums[name + 'psnr'] += float(sr_ops.psnr(result * 255, hr * 255, shave=scale)[0])
      sums[name + 'ssim'] += float(sr_ops.ssim(result * 255, hr * 255, shave=scale)[0])
  return {k: v / len(images) for k, v in sums.items()}


def evaluate_scales(apply_fn: Callable, variables, sr_eval_config) -> dict[str, float]:
  """``evaluate`` on the images of ``sr_eval_config`` (``data``, ``crop``) at each of its ``scales``,
  keys ``x{s}/{metric}``."""
  images = load_images(sr_eval_config.data, sr_eval_config.crop)
  out = {}
  for s in sr_eval_config.scales:
    out.update({f'x{s}/{k}': v for k, v in evaluate(apply_fn, variables, images, s).items()})
  return out


def bicubic_input(hr: jax.Array, scale: int) -> jax.Array:
  """The network input of an HR luma batch: MATLAB bicubic down by ``scale`` and back up."""
  lr = sr_ops.imresize(hr, 1.0 / scale)
  return sr_ops.imresize(lr, output_size=hr.shape[1:3])
