"""Image augmentations in JAX, deterministic under a key, on NHWC images in [0, 1].

Per-sample ops draw one set of parameters per image (kornia/torchvision semantics in the
references); zero padding happens in pixel space, before normalisation, as there.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def random_crop(key: jax.Array, images: jax.Array, padding: int) -> jax.Array:
  """``RandomCrop(size, padding)`` per image: zero-pad by ``padding`` and crop back to size at a
  uniformly drawn offset in [0, 2 * padding]."""
  n, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(key, (n, 2), 0, 2 * padding + 1)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array, p: float = 0.5) -> jax.Array:
  """``RandomHorizontalFlip(p)`` per image."""
  flip = jax.random.bernoulli(key, p, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1], images)
