"""Super-resolution image operations: MATLAB-compatible bicubic resize, BT.601 luma, PSNR and SSIM.

These are what DFSR (``docs/reference_semantics.md#dfsr``) and the SR literature use:
the LR input of a test image is MATLAB ``imresize(HR, 1/s, 'bicubic')``, DFSR's generator output is
upscaled with the same bicubic, and results are reported as PSNR / SSIM on the BT.601 luma (Y)
channel with a border of ``s`` pixels shaved (the metric of the paper's tables).

Images are NHWC, or more generally (..., H, W, C); everything on device is pure ``jnp`` with static
shapes and runs under ``jit``. Only the resampling matrices (and SSIM's Gaussian taps) are built on
the host, with numpy in float64: they depend on sizes alone, so they are constants of the traced
computation, and applying them is one matmul per axis (exact, and fast on CPU). SSIM's window is
applied as 11 shifted slices per axis.

**What has been verified, and how** (``tests/test_sr_ops.py``; MATLAB itself was not available):

- ``imresize``: the weight construction follows MATLAB's ``imresize.m`` ``contributions`` step
  (Keys kernel a = −0.5, antialiasing kernel ``s·k(s·x)`` of width 4/s when s < 1, the index map
  u = x/s + ½(1 − 1/s), row normalisation), read from MathWorks source. Tests check the closed-form
  Keys weights (×2 up: (−3, −9, 29, 111)/128 taps; ×½ down: the same taps /256), constants, exact
  reproduction of linear and quadratic ramps away from the borders, an independent per-pixel loop
  implementation in the test, and, for interior pixels, PIL and ``torch.nn.functional.interpolate``
  (both use a = −0.5 with the same centre mapping and antialiased support; they differ from MATLAB
  only at the borders). No MATLAB output images were compared and no published PSNR was reproduced.
- Boundary: MathWorks' 2018 resize code (``resizeRaster``, on the same internal resize helpers as
  ``imresize``) mirrors out-of-range indices (symmetric padding, ``aux = [1:n, n:-1:1]``), as do the
  MATLAB ports of the SR literature; the 2006-era ``imresize.m`` clamped them (replicated end
  points). Which MATLAB release switched was not established. The default is the mirror;
  ``boundary='replicate'`` gives the old behaviour.
- ``psnr`` / ``ssim``: exact hand values, an independent windowed loop, and scikit-image's
  ``structural_similarity`` with Gaussian weights.
"""
from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Boundary = Literal['symmetric', 'replicate']
Scale = float | tuple[float, float]

# MATLAB's 'bicubic' kernel: Keys (1981) cubic convolution with a = -0.5, support [-2, 2].
_KEYS_SUPPORT = 4.0
# BT.601 luma row of MATLAB ``rgb2ycbcr`` for R, G, B in [0, 1]; Y lands in [16, 235] (8-bit scale).
_BT601_Y_WEIGHTS = (65.481, 128.553, 24.966)
_BT601_Y_OFFSET = 16.0
# SSIM constants of Wang et al. (2004) / ``ssim_index.m``.
_SSIM_WINDOW, _SSIM_SIGMA = 11, 1.5
_SSIM_K1, _SSIM_K2 = 0.01, 0.03
# The resampling/filter matrices are small constants: full float32 precision, never bf16 passes.
_PRECISION = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# Bicubic resize (MATLAB ``imresize(..., 'bicubic')``)
# ----------------------------------------------------------------------------------------------

def keys_cubic(x: np.ndarray) -> np.ndarray:
  """Keys cubic convolution kernel with a = −0.5 (MATLAB's ``cubic``), on the host.

  k(x) = 1.5|x|³ − 2.5|x|² + 1 for |x| ≤ 1;  −0.5|x|³ + 2.5|x|² − 4|x| + 2 for 1 < |x| ≤ 2;  0 else.
  """
  ax = np.abs(np.asarray(x, np.float64))
  inner = (1.5 * ax - 2.5) * ax * ax + 1.0
  outer = ((-0.5 * ax + 2.5) * ax - 4.0) * ax + 2.0
  return np.where(ax <= 1.0, inner, np.where(ax <= 2.0, outer, 0.0))


def _source_index(index: np.ndarray, size: int, boundary: Boundary) -> np.ndarray:
  """Maps (possibly out-of-range) 0-based input indices to in-range ones.

  'symmetric': half-sample mirror with the edge repeated (… 1 0 | 0 1 … n−1 | n−1 n−2 …), periodic
  in 2n, as MATLAB's ``aux = [1:n, n:-1:1]``; 'replicate': clamp to [0, n − 1].
  """
  if boundary == 'replicate':
    return np.clip(index, 0, size - 1)
  if boundary != 'symmetric':
    raise ValueError(f"boundary must be 'symmetric' or 'replicate', got {boundary!r}")
  folded = np.mod(index, 2 * size)
  return np.where(folded < size, folded, 2 * size - 1 - folded)


@functools.lru_cache(maxsize=128)
def resize_matrix(in_size: int, out_size: int, scale: float, antialias: bool = True,
                  boundary: Boundary = 'symmetric') -> np.ndarray:
  """The (out_size, in_size) float64 matrix A of MATLAB's 1-D bicubic resize: y = A x.

  For 1-based output pixel j: u_j = j/s + ½(1 − 1/s) (the input coordinate whose pixel centres
  are 1, 2, …), taps i = ⌊u_j − w/2⌋ + {0, …, ⌈w⌉ + 1}, weights h(u_j − i) normalised to sum 1,
  with h = k and w = 4, or, when downscaling with antialiasing, h(x) = s·k(s·x) and w = 4/s.
  Out-of-range taps are folded back by ``boundary`` and accumulated. Read-only (cached).
  """
  if in_size < 1 or out_size < 1 or not scale > 0:
    raise ValueError(f'need positive sizes and scale, got in={in_size} out={out_size} scale={scale}')
  if scale < 1 and antialias:
    width = _KEYS_SUPPORT / scale
    kernel = lambda x: scale * keys_cubic(scale * x)
  else:
    width = _KEYS_SUPPORT
    kernel = keys_cubic
  u = np.arange(1, out_size + 1, dtype=np.float64) / scale + 0.5 * (1.0 - 1.0 / scale)
  taps = np.floor(u - width / 2)[:, None] + np.arange(math.ceil(width) + 2)[None, :]
  weights = kernel(u[:, None] - taps)
  weights /= weights.sum(axis=1, keepdims=True)
  columns = _source_index(taps.astype(np.int64) - 1, in_size, boundary)
  matrix = np.zeros((out_size, in_size))
  np.add.at(matrix, (np.repeat(np.arange(out_size), taps.shape[1]), columns.ravel()), weights.ravel())
  matrix.flags.writeable = False
  return matrix


def _pair(value: Scale) -> tuple[float, float]:
  return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def resize_plan(in_hw: tuple[int, int], scale: Scale | None = None,
                output_size: tuple[int, int] | None = None) -> tuple[tuple[int, int], tuple[float, float]]:
  """MATLAB's output size and per-axis scale: exactly one of ``scale`` and ``output_size``.

  From a scale s: out = ⌈s·in⌉ and s itself enters u (not out/in). From a size: s = out/in.
  """
  if (scale is None) == (output_size is None):
    raise ValueError('give exactly one of scale and output_size')
  if output_size is not None:
    out_hw = tuple(int(n) for n in output_size)
    return out_hw, tuple(o / i for o, i in zip(out_hw, in_hw))
  scales = tuple(float(s) for s in _pair(scale))
  return tuple(math.ceil(s * n) for s, n in zip(scales, in_hw)), scales


def _resize_axis(images: Array, matrix: np.ndarray, axis: int) -> Array:
  """Applies a (out, in) resampling matrix along the H (axis −3) or W (axis −2) axis."""
  spec = 'oh,...hwc->...owc' if axis == -3 else 'ow,...hwc->...hoc'
  return jnp.einsum(spec, jnp.asarray(matrix, images.dtype), images, precision=_PRECISION)


def matlab_uint8(x: Array) -> Array:
  """MATLAB's double → uint8 conversion: saturate to [0, 255], round half away from zero.

  (``jnp.round`` rounds half to even; after saturation x ≥ 0, so ⌊x + ½⌋ is MATLAB's rounding.)
  """
  return jnp.floor(jnp.clip(x, 0.0, 255.0) + 0.5).astype(jnp.uint8)


def _imresize(images: Array, scale: Scale | None, output_size: tuple[int, int] | None,
              antialias: bool, boundary: Boundary, quantize: bool) -> Array:
  in_hw = images.shape[-3:-1]
  out_hw, scales = resize_plan(in_hw, scale, output_size)
  x = images.astype(jnp.float32) if quantize or not jnp.issubdtype(images.dtype, jnp.floating) else images
  for dim in sorted((0, 1), key=lambda d: scales[d]):  # MATLAB's dimensionOrder (see ``imresize``)
    x = _resize_axis(x, resize_matrix(in_hw[dim], out_hw[dim], scales[dim], antialias, boundary), dim - 3)
    if quantize:
      x = matlab_uint8(x).astype(jnp.float32)
  return x.astype(jnp.uint8) if quantize else x


def imresize(images: Array, scale: Scale | None = None, output_size: tuple[int, int] | None = None,
             *, antialias: bool = True, boundary: Boundary = 'symmetric') -> Array:
  """MATLAB ``imresize(images, scale or [H W], 'bicubic')`` on (..., H, W, C) images, in float.

  Separable: out = A_H · x · A_Wᵀ with the ``resize_matrix`` of each axis (computed on the host,
  constants under ``jit``). The output is float (the input dtype if floating, else float32),
  neither rounded nor clamped: MATLAB on a double image. DFSR clamps to [0, 1] afterwards.

  Pass order: MATLAB's ``dimensionOrder`` sorts the scales, so the axis with the smaller scale goes
  first (rows first on ties, the sort being stable), which also shrinks before it enlarges. The
  float result depends on the order only through float rounding; ``imresize_uint8``'s does not.
  ``scale``/``output_size`` must be Python numbers (static under ``jit``).
  """
  return _imresize(images, scale, output_size, antialias, boundary, quantize=False)


def imresize_uint8(images: Array, scale: Scale | None = None,
                   output_size: tuple[int, int] | None = None, *, antialias: bool = True,
                   boundary: Boundary = 'symmetric') -> Array:
  """MATLAB ``imresize`` on a uint8 image: returns uint8, as MATLAB does.

  MATLAB keeps the input class between the two 1-D passes, so the intermediate image is rounded to
  uint8 too (``matlab_uint8`` after each pass, in MATLAB's axis order). ``images`` holds integers in
  [0, 255] (any dtype). Accumulation is float32 (MATLAB: double), so a value within ~1e-5 of a .5
  tie could round the other way.
  """
  return _imresize(images, scale, output_size, antialias, boundary, quantize=True)


def modcrop(images: Array, scale: int) -> Array:
  """Crops H and W down to multiples of ``scale`` (bottom/right), the SR test-set convention."""
  height, width = images.shape[-3:-1]
  return images[..., :height - height % scale, :width - width % scale, :]


# ----------------------------------------------------------------------------------------------
# Colour and metrics
# ----------------------------------------------------------------------------------------------

def rgb_to_y(images: Array, data_range: float = 1.0) -> Array:
  """BT.601 luma of (..., H, W, 3) RGB in [0, data_range], on the 8-bit scale: shape (..., H, W, 1).

  Y = 16 + 65.481 R + 128.553 G + 24.966 B with R, G, B = images / data_range ∈ [0, 1], so Y ∈
  [16, 235], unrounded. This is 255 × the Y of MATLAB ``rgb2ycbcr`` on a double image; MATLAB on a
  uint8 image returns ``matlab_uint8`` of it.
  """
  rgb = images.astype(jnp.float32) / data_range
  weights = jnp.asarray(_BT601_Y_WEIGHTS, jnp.float32)
  return (_BT601_Y_OFFSET + jnp.einsum('...c,c->...', rgb, weights, precision=_PRECISION))[..., None]


def _shave(images: Array, shave: int) -> Array:
  """Drops ``shave`` pixels on each side of H and W."""
  if shave == 0:
    return images
  height, width = images.shape[-3:-1]
  if 2 * shave >= min(height, width):
    raise ValueError(f'shave={shave} leaves nothing of a {height}x{width} image')
  return images[..., shave:height - shave, shave:width - shave, :]


def psnr(a: Array, b: Array, shave: int = 0, data_range: float = 255.0) -> Array:
  """PSNR in dB per image of (..., H, W, C) arrays: 10·log10(L² / MSE), shape (...).

  MSE over H, W, C after shaving ``shave`` border pixels (SR convention: shave = scale, on the Y
  channel, L = 255). Identical images give +inf (pytorch-vdsr's evaluation returns 100 instead).
  """
  diff = _shave(a.astype(jnp.float32), shave) - _shave(b.astype(jnp.float32), shave)
  mse = jnp.mean(jnp.square(diff), axis=(-3, -2, -1))
  return 10.0 * jnp.log10(data_range**2 / mse)


def _gaussian_taps() -> np.ndarray:
  """The normalised 11-tap Gaussian g(t) ∝ exp(−t²/(2σ²)), t = −5 … 5, σ = 1.5, Σ g = 1.

  g gᵀ is MATLAB ``fspecial('gaussian', 11, 1.5)`` (whose eps·max cut-off removes nothing here).
  """
  offsets = np.arange(_SSIM_WINDOW) - _SSIM_WINDOW // 2
  taps = np.exp(-offsets**2 / (2 * _SSIM_SIGMA**2))
  return taps / taps.sum()


def _gaussian_window(images: Array) -> Array:
  """'valid' 11×11 Gaussian filtering of (..., H, W, C): (..., H − 10, W − 10, C).

  Separable, as a sum of 11 shifted slices per axis: O(11·H·W), where a dense matrix would be O(H²W).
  """
  taps = _gaussian_taps()
  for axis in (-3, -2):
    valid = images.shape[axis] - _SSIM_WINDOW + 1
    images = sum(float(g) * jax.lax.slice_in_dim(images, t, t + valid, axis=axis % images.ndim)
                 for t, g in enumerate(taps))
  return images


def ssim(a: Array, b: Array, shave: int = 0, data_range: float = 255.0) -> Array:
  """Mean SSIM per image of (..., H, W, C) arrays (channels averaged), shape (...).

  Wang et al. (2004) / ``ssim_index.m``: with the 11×11 Gaussian window (σ = 1.5) applied as 'valid'
  filtering (no padding: the map is (H − 10) × (W − 10)), μ, σ², σ_ab the windowed means, biased
  variances and covariance, C1 = (0.01 L)², C2 = (0.03 L)²,
    SSIM = (2 μ_a μ_b + C1)(2 σ_ab + C2) / ((μ_a² + μ_b² + C1)(σ_a² + σ_b² + C2)),
  averaged over the map. ``shave`` border pixels are dropped first (SR convention: shave = scale).
  """
  a = _shave(a.astype(jnp.float32), shave)
  b = _shave(b.astype(jnp.float32), shave)
  height, width = a.shape[-3:-1]
  if min(height, width) < _SSIM_WINDOW:
    raise ValueError(f'SSIM needs at least {_SSIM_WINDOW}x{_SSIM_WINDOW} pixels, got {height}x{width}')
  # (Co)variances are shift-invariant: filtering centred data avoids the float32 cancellation of
  # E[x²] − E[x]² at 8-bit magnitudes.
  centre = 0.5 * jnp.mean(a + b, axis=(-3, -2, -1), keepdims=True)
  a, b = a - centre, b - centre
  mean_a, mean_b = _gaussian_window(a), _gaussian_window(b)
  var_a = _gaussian_window(a * a) - mean_a**2
  var_b = _gaussian_window(b * b) - mean_b**2
  cov = _gaussian_window(a * b) - mean_a * mean_b
  mean_a, mean_b = mean_a + centre, mean_b + centre
  c1, c2 = (_SSIM_K1 * data_range)**2, (_SSIM_K2 * data_range)**2
  ssim_map = ((2 * mean_a * mean_b + c1) * (2 * cov + c2)
              / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)))
  return jnp.mean(ssim_map, axis=(-3, -2, -1))


def y_psnr_ssim(sr: Array, hr: Array, scale: int, data_range: float = 1.0) -> tuple[Array, Array]:
  """The SR evaluation: PSNR and SSIM on BT.601 Y (8-bit scale, L = 255), shave = ``scale``.

  ``sr`` and ``hr`` are (..., H, W, 3) RGB in [0, data_range]; callers clamp ``sr`` first. Y is not
  rounded: evaluation scripts on uint8 images also round the SR image and Y to 8 bits
  (``matlab_uint8``), which moves PSNR by a few hundredths of a dB.
  """
  sr_y, hr_y = rgb_to_y(sr, data_range), rgb_to_y(hr, data_range)
  return psnr(sr_y, hr_y, shave=scale), ssim(sr_y, hr_y, shave=scale)


def scale_switch(key, scales, fn):
  """``fn(s)`` for a scale s drawn uniformly from ``scales`` (static Python ints: one branch each)."""
  index = jax.random.randint(key, (), 0, len(scales))
  return jax.lax.switch(index, [lambda s=s: fn(s) for s in scales])
