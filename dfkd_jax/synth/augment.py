"""Image augmentations in JAX, deterministic under a key, on NHWC images in [0, 1].

Every op is jit-able with static shapes and differentiable with respect to the images (inversion
methods back-propagate through the views). Callers normalise after augmenting, as the references'
kornia pipelines do, so zero padding is black in pixel space.

Per-sample ops draw one set of parameters per image (kornia/torchvision semantics); DeepInversion's
jitter draws one set for the whole batch. Every random op is a parameter draw (``draw_crops``,
``draw_flips``, ``draw_crop_flip``, ``draw_jitter_flip``, ``sample_resized_crop_boxes``) and a
deterministic application of the drawn parameters (``crop``, ``mirror``, ``apply_crop_flip``,
``jitter_flip``, ``resized_crop``), so that a replay can apply parameters recorded from a
reference (``run.job.Phase``'s draw/apply seam); ``random_*`` and ``crop_flip`` are the two
composed.

What each reference uses:
- DeepInversion (NVlabs, CMI-fw ``jitter_and_flip``): ``random_jitter_flip``.
- CMI's global view, Fast's and NAYER's synthesis view and the standard CIFAR train transform
  (RandomCrop(size, padding=4) + RandomHorizontalFlip; the replay pool, teacher training, selected
  real images): ``crop_flip``.
- CMI's local view (RandomResizedCrop(size, scale=(0.25, 1)) + RandomHorizontalFlip):
  ``resized_crop_flip``.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from dfkd_jax.errors import UserError

# Draws per image before falling back (torchvision ``get_params`` and kornia both use 10).
_RESIZED_CROP_TRIALS = 10


def _check_padding(padding: int) -> None:
  if padding < 0:
    raise UserError(f'crop padding must be >= 0, got {padding}')


def draw_crops(key: jax.Array, num: int, padding: int) -> jax.Array:
  """``RandomCrop(size, padding)`` parameters: (num, 2) int32 offsets (top, left) of each image's
  crop in the zero-padded image, uniform in [0, 2 * padding]."""
  _check_padding(padding)
  return jax.random.randint(key, (num, 2), 0, 2 * padding + 1)


def crop(images: jax.Array, offsets: jax.Array, padding: int) -> jax.Array:
  """Zero-pads each image by ``padding`` and crops it back to size at its ``offsets`` row (top, left)."""
  _check_padding(padding)
  _, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  crop_one = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(crop_one)(padded, offsets)


def random_crop(key: jax.Array, images: jax.Array, padding: int) -> jax.Array:
  """``RandomCrop(size, padding)`` per image: zero-pad by ``padding`` and crop back to size at a
  uniformly drawn offset in [0, 2 * padding]."""
  return crop(images, draw_crops(key, images.shape[0], padding), padding)


def draw_flips(key: jax.Array, num: int, p: float = 0.5) -> jax.Array:
  """``RandomHorizontalFlip(p)`` parameters: (num,) bool, which images are mirrored."""
  return jax.random.bernoulli(key, p, (num, 1, 1, 1)).reshape(num)


def mirror(images: jax.Array, flips: jax.Array) -> jax.Array:
  """Mirrors left-right the images where ``flips`` (num,) is True."""
  return jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)


def random_flip(key: jax.Array, images: jax.Array, p: float = 0.5) -> jax.Array:
  """``RandomHorizontalFlip(p)`` per image."""
  return mirror(images, draw_flips(key, images.shape[0], p))


def draw_crop_flip(crop_key: jax.Array, flip_key: jax.Array, num: int, *, padding: int = 4,
                   flip: bool = True) -> dict:
  """The parameters of ``crop_flip`` for ``num`` images: ``{'offsets': draw_crops}`` if
  ``padding``, ``{'flips': draw_flips}`` if ``flip`` (an option off draws nothing).

  The crop and flip keys are separate arguments because callers derive them differently (the two
  halves of ``jax.random.split(key)``, or CMI's ``key`` and ``fold_in(key, 1)``), and changing a
  caller's derivation would change its random stream.
  """
  drawn = {}
  if padding:
    drawn['offsets'] = draw_crops(crop_key, num, padding)
  if flip:
    drawn['flips'] = draw_flips(flip_key, num)
  return drawn


def apply_crop_flip(images: jax.Array, drawn: dict, *, padding: int = 4) -> jax.Array:
  """``crop`` at ``drawn['offsets']`` then ``mirror`` by ``drawn['flips']``, each where drawn
  (``draw_crop_flip``)."""
  if 'offsets' in drawn:
    images = crop(images, drawn['offsets'], padding)
  return mirror(images, drawn['flips']) if 'flips' in drawn else images


def crop_flip(crop_key: jax.Array, flip_key: jax.Array, images: jax.Array, *, padding: int = 4,
              flip: bool = True) -> jax.Array:
  """``random_crop(padding)`` (skipped at padding 0, where it is the identity) then ``random_flip``
  if ``flip``, each per image: the standard CIFAR train augmentation (the replay pool's reads,
  teacher training, selected real images), CMI's global view and Fast's/NAYER's synthesis view.
  ``draw_crop_flip`` then ``apply_crop_flip``."""
  drawn = draw_crop_flip(crop_key, flip_key, images.shape[0], padding=padding, flip=flip)
  return apply_crop_flip(images, drawn, padding=padding)


# ------------------------------------------------------------------------------------------------
# DeepInversion jitter
# ------------------------------------------------------------------------------------------------

def jitter_flip(images: jax.Array, shift: jax.Array, flip: jax.Array) -> jax.Array:
  """Circular shift of the whole batch by ``shift = (dy, dx)`` pixels (``torch.roll`` along H, W:
  the pixel at (y, x) moves to ((y + dy) mod H, (x + dx) mod W)), then a left-right mirror of the
  whole batch if ``flip``."""
  rolled = jnp.roll(images, (shift[0], shift[1]), axis=(1, 2))
  return jnp.where(flip, rolled[:, :, ::-1], rolled)


def draw_jitter_flip(key: jax.Array, limit: int | Sequence[int], *, flip: bool = True) -> dict:
  """DeepInversion's augmentation parameters, one draw for the whole batch: ``{'shift': (2,) int32
  (dy, dx) uniform in [-limit, limit]`` (``limit`` an int or ``(limit_h, limit_w)``), ``'flip':
  bool`` with probability 0.5 (never if not ``flip``)}, the arguments of ``jitter_flip``."""
  limits = (limit, limit) if isinstance(limit, int) else tuple(limit)
  if len(limits) != 2 or min(limits) < 0:
    raise UserError(f'jitter limit must be an int >= 0 or a pair of them, got {limit}')
  shift_key, flip_key = jax.random.split(key)
  bound = jnp.asarray(limits, jnp.int32)
  return {'shift': jax.random.randint(shift_key, (2,), -bound, bound + 1),
          'flip': jax.random.bernoulli(flip_key, 0.5) & flip}


def random_jitter_flip(key: jax.Array, images: jax.Array, limit: int | Sequence[int], *,
                       flip: bool = True) -> jax.Array:
  """DeepInversion's augmentation: ``jitter_flip`` with ``draw_jitter_flip``'s parameters. CMI-fw
  uses limit = side // 8; NVlabs 30 (ImageNet) and 2 without flip (CIFAR-10)."""
  return jitter_flip(images, **draw_jitter_flip(key, limit, flip=flip))


# ------------------------------------------------------------------------------------------------
# Random resized crop
# ------------------------------------------------------------------------------------------------

def _check_range(values: Sequence[float], name: str) -> tuple[float, float]:
  low, high = (float(v) for v in values)
  if not 0 < low <= high:
    raise UserError(f'random resized crop {name} must be a range (low, high) with 0 < low <= high, '
                    f'got {tuple(values)}')
  return low, high


def _fallback_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
  """The box (height, width) used when no trial fits: the whole image, or if the image's aspect
  ratio is outside ``ratio``, the largest box at the nearest ratio bound (torchvision's and current
  kornia's fallback size)."""
  image_ratio = width / height
  if image_ratio < ratio[0]:
    return round(width / ratio[0]), width
  if image_ratio > ratio[1]:
    return height, round(height * ratio[1])
  return height, width


def sample_resized_crop_boxes(key: jax.Array, num: int, image_size: tuple[int, int], *,
                              scale: Sequence[float], ratio: Sequence[float]) -> jax.Array:
  """``RandomResizedCrop`` parameters, one box per image: (num, 4) int32 rows (top, left, height,
  width), the box inside the image.

  Per image, 10 trials each draw area ~ U(scale)·H·W and log(aspect) ~ U(log ratio), giving
  width = round(√(area·aspect)), height = round(√(area/aspect)); the first trial with
  1 ≤ height ≤ H and 1 ≤ width ≤ W is taken (torchvision's sequential rejection loop, drawn as a
  vectorised batch of trials, which gives the same distribution). If none fits (with CMI's scale
  and ratio 14% of trials fail, so about 3·10⁻⁹ of images), the box size is ``_fallback_size``.
  The top-left corner is then uniform over the positions that keep the box inside the image, as
  kornia does for every box (torchvision centres a fallback box).

  Older kornia releases (e.g. 0.5, current when CMI was published) differ in details that matter
  little here: they reject trials whose side equals the image side (strict <), draw the area
  from the output size rather than the input size (the same for CMI, which resizes to the input
  size), and compute a different fallback size.
  """
  height, width = image_size
  scale, ratio = _check_range(scale, 'scale'), _check_range(ratio, 'ratio')
  # One uniform draw per image for everything: area and log-aspect per trial, then top and left.
  u = jax.random.uniform(key, (num, 2 * _RESIZED_CROP_TRIALS + 2))
  u_area, u_ratio = u[:, :_RESIZED_CROP_TRIALS], u[:, _RESIZED_CROP_TRIALS:-2]
  area = (scale[0] + (scale[1] - scale[0]) * u_area) * (height * width)
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_low + (log_high - log_low) * u_ratio)
  widths = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  heights = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (widths >= 1) & (widths <= width) & (heights >= 1) & (heights <= height)
  first = jnp.argmax(fits, axis=1)[:, None]  # argmax returns the first True
  fallback_h, fallback_w = _fallback_size(height, width, ratio)
  fitted = fits.any(axis=1)
  box_h = jnp.where(fitted, jnp.take_along_axis(heights, first, axis=1)[:, 0], fallback_h)
  box_w = jnp.where(fitted, jnp.take_along_axis(widths, first, axis=1)[:, 0], fallback_w)
  # floor(u · positions), capped because u·n can round up to n in float32.
  top = jnp.minimum(jnp.floor(u[:, -2] * (height - box_h + 1)).astype(jnp.int32), height - box_h)
  left = jnp.minimum(jnp.floor(u[:, -1] * (width - box_w + 1)).astype(jnp.int32), width - box_w)
  return jnp.stack([top, left, box_h, box_w], axis=1)


def _interpolation_weights(start: jax.Array, length: jax.Array, in_size: int, out_size: int,
                           align_corners: bool) -> jax.Array:
  """(out_size, in_size) bilinear weights that resample the span [start, start + length) of one
  axis to ``out_size`` samples with ``F.interpolate(mode='bilinear')`` conventions: source
  positions outside the span are clamped to its first/last pixel, never read from outside it."""
  j = jnp.arange(out_size, dtype=jnp.float32)
  span = length.astype(jnp.float32)
  if align_corners:
    # The first and last output pixel centres land on the first and last pixel centres of the span.
    step = (span - 1) / (out_size - 1) if out_size > 1 else jnp.zeros(())
    position = step * j
  else:
    # Pixel areas align: output centre j + 1/2 maps to (j + 1/2)·length/out in span units.
    position = jnp.maximum(span / out_size * (j + 0.5) - 0.5, 0.0)
  lower = jnp.floor(position)
  frac = position - lower
  lower = lower.astype(jnp.int32)
  upper = jnp.minimum(lower + 1, length - 1)
  return ((1 - frac)[:, None] * jax.nn.one_hot(start + lower, in_size)
          + frac[:, None] * jax.nn.one_hot(start + upper, in_size))


def resized_crop(images: jax.Array, boxes: jax.Array, size: tuple[int, int] | None = None, *,
                 align_corners: bool = True) -> jax.Array:
  """Crops box i = (top, left, height, width) out of image i and resizes it bilinearly to ``size``
  (default: the input size), i.e. ``F.interpolate(crop, size, mode='bilinear',
  align_corners=align_corners)`` per image, without antialiasing.

  ``align_corners=True`` (default) is kornia's current ``RandomResizedCrop`` default: both its
  'slice' and 'resample' cropping modes sample source position x0 + j·(w − 1)/(out − 1) for output
  pixel j. ``False`` is the torch/torchvision half-pixel convention, x0 + (j + ½)·w/out − ½ clamped
  into the box. kornia 0.5 defaulted to align_corners=False but warped with a matrix normalised by
  (W − 1), which samples W/(W − 1)·(x0 + (j + ½)(w − 1)/out) − ½ with zero padding outside the
  image (slightly dark edges on boxes at the image border); that mix is not reproduced.
  """
  _, in_h, in_w, _ = images.shape
  out_h, out_w = size or (in_h, in_w)

  def crop_one(image, box):
    rows = _interpolation_weights(box[0], box[2], in_h, out_h, align_corners).astype(image.dtype)
    cols = _interpolation_weights(box[1], box[3], in_w, out_w, align_corners).astype(image.dtype)
    # Weighted sums as matmuls; HIGHEST keeps float32 accuracy on TPU (its default is bfloat16 passes).
    return jnp.einsum('oh,hwc,pw->opc', rows, image, cols, precision=jax.lax.Precision.HIGHEST)

  return jax.vmap(crop_one)(images, boxes)


def random_resized_crop(key: jax.Array, images: jax.Array, size: tuple[int, int] | None = None, *,
                        scale: Sequence[float] = (0.25, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                        align_corners: bool = True) -> jax.Array:
  """kornia ``RandomResizedCrop(size, scale, ratio)`` per image: ``sample_resized_crop_boxes`` then
  ``resized_crop``. The default scale is CMI's local view (kornia's own default is (0.08, 1))."""
  n, h, w, _ = images.shape
  boxes = sample_resized_crop_boxes(key, n, (h, w), scale=scale, ratio=ratio)
  return resized_crop(images, boxes, size, align_corners=align_corners)


def resized_crop_flip(key: jax.Array, images: jax.Array, *, scale: Sequence[float] = (0.25, 1.0),
                      ratio: Sequence[float] = (3 / 4, 4 / 3), align_corners: bool = True) -> jax.Array:
  """``random_resized_crop`` back to the input size, then ``random_flip``, each per image: CMI's
  local view."""
  crop_key, flip_key = jax.random.split(key)
  cropped = random_resized_crop(crop_key, images, scale=scale, ratio=ratio, align_corners=align_corners)
  return random_flip(flip_key, cropped)
