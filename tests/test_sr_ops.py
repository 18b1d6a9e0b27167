"""dfkd_jax.sr.ops: closed-form Keys weights, polynomial reproduction, an independent per-pixel loop
implementation of MATLAB's bicubic imresize, PIL / torch (committed values; live in the ``torch``
group) on interior pixels, and hand-computed,
loop-computed and (when scikit-image is installed) scikit-image PSNR/SSIM/Y values.

MATLAB is not available: no value here comes from MATLAB itself. The loop references below are
written from the formulas (0-based pixel centres), not from sr_ops' weight matrices."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch_files
from dfkd_jax.sr import ops as sr_ops

# Keys a = -1/2 sampled at distances 1.75, 1.25, 0.75, 0.25, 0.25, 0.75, 1.25, 1.75, times 128.
KEYS_QUARTER_TAPS = np.array([-3, -9, 29, 111, 111, 29, -9, -3]) / 128


def _nhwc(image_hw):
  return jnp.asarray(image_hw, jnp.float32)[None, :, :, None]


def _hw(images):
  return np.asarray(images)[0, :, :, 0]


def _random_image(seed, shape, high=1.0):
  return np.random.default_rng(seed).uniform(0.0, high, size=shape).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Independent references
# ------------------------------------------------------------------------------------------------

def _keys(t):
  t = abs(t)
  if t <= 1:
    return 1.5 * t**3 - 2.5 * t**2 + 1
  if t <= 2:
    return -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2
  return 0.0


def _fold(index, size, boundary):
  if boundary == 'replicate':
    return min(max(index, 0), size - 1)
  while not 0 <= index < size:  # reflect about the outer pixel edges: -1 -> 0, size -> size - 1
    index = -1 - index if index < 0 else 2 * size - 1 - index
  return index


def _taps(j, in_size, scale, boundary):
  """[(input index, weight)] of output pixel j: centre c = (j + ½)/s − ½ in 0-based input pixels."""
  centre = (j + 0.5) / scale - 0.5
  stretch = min(scale, 1.0)  # antialiasing: the kernel widens by 1/s when shrinking
  radius = 2.0 / stretch
  support = range(math.floor(centre - radius), math.ceil(centre + radius) + 1)
  taps = [(i, _keys((centre - i) * stretch)) for i in support]
  total = sum(w for _, w in taps)
  return [(_fold(i, in_size, boundary), w / total) for i, w in taps]


def _loop_imresize(image, out_hw, scales, boundary='symmetric'):
  """Direct 2-D sum per output pixel: out[p, q] = Σ_r Σ_c w_r(p) w_c(q) x[r, c], float64."""
  rows = [_taps(p, image.shape[0], scales[0], boundary) for p in range(out_hw[0])]
  cols = [_taps(q, image.shape[1], scales[1], boundary) for q in range(out_hw[1])]
  out = np.zeros(out_hw)
  for p, row_taps in enumerate(rows):
    for q, col_taps in enumerate(cols):
      out[p, q] = sum(wr * wc * float(image[r, c]) for r, wr in row_taps for c, wc in col_taps)
  return out


def _matlab_round(x):
  return np.floor(np.clip(x, 0, 255) + 0.5)


def _loop_imresize_uint8(image, out_hw, scales):
  """MATLAB on uint8: two 1-D passes, smaller scale first, each rounded to uint8."""
  x = image.astype(np.float64)
  for axis in sorted((0, 1), key=lambda k: scales[k]):
    taps = [_taps(j, x.shape[axis], scales[axis], 'symmetric') for j in range(out_hw[axis])]
    moved = np.moveaxis(x, axis, 0)
    resized = np.stack([sum(w * moved[i] for i, w in tap) for tap in taps])
    x = _matlab_round(np.moveaxis(resized, 0, axis))
  return x


def _gaussian_window_2d():
  """fspecial('gaussian', 11, 1.5): exp(−(x² + y²)/(2σ²)) on −5..5, normalised."""
  t = np.arange(-5, 6)
  window = np.exp(-(t[:, None]**2 + t[None, :]**2) / (2 * 1.5**2))
  return window / window.sum()


def _loop_ssim(a, b, data_range=255.0):
  """ssim_index.m by explicit windows: one SSIM value per 'valid' 11×11 position, then the mean."""
  window = _gaussian_window_2d()
  c1, c2 = (0.01 * data_range)**2, (0.03 * data_range)**2
  a, b = a.astype(np.float64), b.astype(np.float64)
  values = []
  for p in range(a.shape[0] - 10):
    for q in range(a.shape[1] - 10):
      pa, pb = a[p:p + 11, q:q + 11], b[p:p + 11, q:q + 11]
      mu_a, mu_b = np.sum(window * pa), np.sum(window * pb)
      var_a = np.sum(window * (pa - mu_a)**2)
      var_b = np.sum(window * (pb - mu_b)**2)
      cov = np.sum(window * (pa - mu_a) * (pb - mu_b))
      values.append((2 * mu_a * mu_b + c1) * (2 * cov + c2)
                    / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
  return np.mean(values)


# ------------------------------------------------------------------------------------------------
# Bicubic resize: closed forms
# ------------------------------------------------------------------------------------------------

def test_upscale_x2_impulse_response_is_the_keys_quarter_taps():
  # Output j of ×2 sits at c = j/2 − 1/4: an impulse at k reaches j = 2k−3 … 2k+4 at distances
  # 1.75, 1.25, 0.75, 0.25, 0.25, 0.75, 1.25, 1.75. Columns use scale 1: the identity.
  signal = np.zeros((16, 3))
  signal[7, :] = 1.0
  out = _hw(sr_ops.imresize(_nhwc(signal), (2.0, 1.0)))
  expected = np.zeros((32, 3))
  expected[11:19, :] = KEYS_QUARTER_TAPS[:, None]
  np.testing.assert_allclose(out, expected, atol=1e-7)


def test_downscale_half_antialiased_taps():
  # ×½ with antialiasing: h(x) = ½ k(x/2), width 8; output i sits at c = 2i + ½, so its taps
  # 2i−3 … 2i+4 are at distances 3.5 … 0.5 … 3.5, i.e. the same Keys values, halved.
  matrix = sr_ops.resize_matrix(16, 8, 0.5)
  for i in range(2, 6):
    expected_row = np.pad(KEYS_QUARTER_TAPS / 2, (2 * i - 3, 16 - 2 * i - 5))
    np.testing.assert_allclose(matrix[i], expected_row, atol=1e-15)
  signal = np.zeros((16, 1))
  signal[8] = 1.0
  out = _hw(sr_ops.imresize(_nhwc(signal), (0.5, 1.0)))[:, 0]
  np.testing.assert_allclose(out, np.array([0, 0, -3, 29, 111, -9, 0, 0]) / 256, atol=1e-7)


def test_border_rows_mirror_or_replicate():
  # Output 0 of ×2 (c = −¼) takes -3, 29, 111, -9 (/128) from inputs −2, −1, 0, 1; output 1
  # (c = ¼) takes -9, 111, 29, -3 from −1, 0, 1, 2. Mirror: −1 → 0, −2 → 1. Replicate: both → 0.
  symmetric = sr_ops.resize_matrix(8, 16, 2.0) * 128
  np.testing.assert_allclose(symmetric[0, :3], [140, -12, 0], atol=1e-12)
  np.testing.assert_allclose(symmetric[1, :3], [102, 29, -3], atol=1e-12)
  np.testing.assert_allclose(symmetric[-1, -3:], [0, -12, 140], atol=1e-12)
  replicate = sr_ops.resize_matrix(8, 16, 2.0, boundary='replicate') * 128
  np.testing.assert_allclose(replicate[0, :3], [137, -9, 0], atol=1e-12)
  np.testing.assert_allclose(replicate[1, :3], [102, 29, -3], atol=1e-12)


def test_scale_one_is_identity():
  np.testing.assert_array_equal(sr_ops.resize_matrix(9, 9, 1.0), np.eye(9))


@pytest.mark.parametrize('boundary', ['symmetric', 'replicate'])
@pytest.mark.parametrize('scale', [2.0, 3.0, 4.0, 0.5, 1 / 3, 0.25, 0.7, (1.5, 0.6)])
def test_constant_image_stays_constant(scale, boundary):
  image = jnp.full((2, 13, 11, 3), 0.37, jnp.float32)
  out = sr_ops.imresize(image, scale, boundary=boundary)
  np.testing.assert_allclose(out, 0.37, rtol=1e-6)


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_upscaling_reproduces_quadratics_away_from_borders(scale):
  # Keys' a = −½ kernel interpolates polynomials of degree ≤ 2 exactly (Keys 1981): away from the
  # borders output j equals p(c_j) with c_j = (j + ½)/s − ½.
  n = 20
  t = np.arange(n, dtype=np.float64)
  for poly in (lambda x: 3.0 + 0.5 * x, lambda x: 0.05 * x**2 - 0.3 * x + 1.0):
    out = _hw(sr_ops.imresize(_nhwc(np.repeat(poly(t)[:, None], 2, 1)), (float(scale), 1.0)))[:, 0]
    centres = (np.arange(n * scale) + 0.5) / scale - 0.5
    interior = (centres >= 2) & (centres <= n - 3)
    np.testing.assert_allclose(out[interior], poly(centres[interior]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_integer_downscaling_reproduces_ramps_away_from_borders(scale):
  # Output i sits at c = s·i + (s − 1)/2, midway between taps placed symmetrically about it, so the
  # (normalised, even) antialiasing weights preserve linear functions.
  n = 12 * scale
  ramp = 2.0 + 0.25 * np.arange(n)
  out = _hw(sr_ops.imresize(_nhwc(np.repeat(ramp[:, None], 2, 1)), (1.0 / scale, 1.0)))[:, 0]
  centres = scale * np.arange(12) + (scale - 1) / 2
  interior = (centres >= 2 * scale) & (centres <= n - 1 - 2 * scale)
  np.testing.assert_allclose(out[interior], 2.0 + 0.25 * centres[interior], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Bicubic resize: independent implementations
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('boundary', ['symmetric', 'replicate'])
@pytest.mark.parametrize('scale', [2.0, 3.0, 4.0, 0.5, 1 / 3, 0.25, 0.7, (1.5, 0.6)])
def test_matches_per_pixel_loop_reference(scale, boundary):
  image = _random_image(0, (13, 11))
  out_hw, scales = sr_ops.resize_plan(image.shape, scale)
  expected = _loop_imresize(image, out_hw, scales, boundary)
  out = _hw(sr_ops.imresize(_nhwc(image), scale, boundary=boundary))
  assert out.shape == expected.shape
  np.testing.assert_allclose(out, expected, atol=2e-6)


def test_output_size_and_scale_follow_matlab():
  # From a scale, out = ⌈s·n⌉ and s itself enters the mapping; from a size, s = out / in.
  assert sr_ops.resize_plan((37, 30), 0.5) == ((19, 15), (0.5, 0.5))
  assert sr_ops.resize_plan((37, 30), output_size=(19, 15)) == ((19, 15), (19 / 37, 0.5))
  image = _random_image(1, (37, 30))
  by_size = _hw(sr_ops.imresize(_nhwc(image), output_size=(19, 15)))
  np.testing.assert_allclose(by_size, _loop_imresize(image, (19, 15), (19 / 37, 0.5)), atol=2e-6)
  assert not np.allclose(by_size, _hw(sr_ops.imresize(_nhwc(image), 0.5)), atol=1e-3)
  with pytest.raises(ValueError):
    sr_ops.imresize(_nhwc(image))
  with pytest.raises(ValueError):
    sr_ops.imresize(_nhwc(image), 2.0, output_size=(74, 60))


_INTERIOR_SCALES = [2, 3, 4, 0.5, 1 / 3, 0.25, 0.75]


def _interior_image():
  return _random_image(2, (48, 36))


def torch_reference(torch) -> dict:
  """torch's antialiased bicubic resize of _interior_image() to imresize's output size at each of
  _INTERIOR_SCALES: 'bicubic/<scale>' -> image (committed as fixtures/torch_files/sr_ops.npz by
  fixtures/make_torch_files.py)."""
  out = {}
  for scale in _INTERIOR_SCALES:
    size = sr_ops.resize_plan((48, 36), scale)[0]
    out[f'bicubic/{scale:.6g}'] = torch.nn.functional.interpolate(
        torch.from_numpy(_interior_image())[None, None], size=size, mode='bicubic', antialias=True,
        align_corners=False)[0, 0].numpy()
  return out


@pytest.fixture(scope='module', params=torch_files.SOURCES)
def reference(request):
  """torch_reference's values: committed, or (the torch group) computed by the installed torch."""
  return torch_files.values('sr_ops', request.param, torch_reference)


@pytest.mark.parametrize('scale', _INTERIOR_SCALES)
def test_interior_matches_pil_and_torch(reference, scale):
  # PIL's BICUBIC and torch's antialiased bicubic use the same a = −½ kernel, centre mapping and
  # (1/s)-stretched support; they renormalise truncated taps at the borders instead of mirroring,
  # so only pixels whose support lies inside the image are compared.
  from PIL import Image
  image = _interior_image()
  out = _hw(sr_ops.imresize(_nhwc(image), scale))
  out_h, out_w = out.shape
  pil = np.asarray(Image.fromarray(image, mode='F').resize((out_w, out_h), Image.BICUBIC))
  tch = reference[f'bicubic/{scale:.6g}']

  def interior(out_size, in_size):
    centres = (np.arange(out_size) + 0.5) / scale - 0.5
    radius = 2 / min(scale, 1)
    return (centres - radius >= 0) & (centres + radius <= in_size - 1)

  mask = interior(out_h, 48)[:, None] & interior(out_w, 36)[None, :]
  assert mask.sum() > 0.3 * mask.size
  np.testing.assert_allclose(out[mask], pil[mask], atol=1e-6)
  np.testing.assert_allclose(out[mask], tch[mask], atol=1e-5)
  assert np.abs(out - pil).max() > 1e-3  # the borders do differ: the mirror is MATLAB's own


def test_batch_channels_and_jit():
  images = jnp.asarray(_random_image(3, (2, 12, 10, 3)))
  resize = jax.jit(lambda x: sr_ops.imresize(x, 3.0))
  out = resize(images)
  assert out.shape == (2, 36, 30, 3) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, sr_ops.imresize(images, 3.0), atol=1e-6)
  expected = _loop_imresize(np.asarray(images[1, ..., 2]), (36, 30), (3.0, 3.0))
  np.testing.assert_allclose(out[1, ..., 2], expected, atol=2e-6)


# ------------------------------------------------------------------------------------------------
# Bicubic resize: uint8
# ------------------------------------------------------------------------------------------------

def test_matlab_uint8_rounds_half_away_from_zero_and_saturates():
  x = jnp.array([0.5, 1.5, 2.5, 2.4999, -3.0, 254.5, 300.0])
  np.testing.assert_array_equal(sr_ops.matlab_uint8(x), [1, 2, 3, 2, 0, 255, 255])
  assert sr_ops.matlab_uint8(x).dtype == jnp.uint8


@pytest.mark.slow
@pytest.mark.parametrize('scale', [0.5, 2.0, 1 / 3, (2.0, 0.5), (0.5, 3.0)])
def test_uint8_rounds_between_passes_in_matlab_order(scale):
  image = np.random.default_rng(4).integers(0, 256, size=(15, 12)).astype(np.uint8)
  out_hw, scales = sr_ops.resize_plan(image.shape, scale)
  out = sr_ops.imresize_uint8(jnp.asarray(image)[None, :, :, None], scale)
  assert out.dtype == jnp.uint8
  np.testing.assert_array_equal(_hw(out), _loop_imresize_uint8(image, out_hw, scales))
  # Rounding the intermediate image matters: one final rounding of the float result differs.
  once = _matlab_round(_loop_imresize(image, out_hw, scales))
  assert np.any(once != _hw(out))


# ------------------------------------------------------------------------------------------------
# Colour and metrics
# ------------------------------------------------------------------------------------------------

def test_rgb_to_y_bt601_values():
  rgb = jnp.array([[[[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]]]], jnp.float32)
  expected = [16.0, 235.0, 16 + 65.481, 16 + 128.553, 16 + 24.966]
  np.testing.assert_allclose(sr_ops.rgb_to_y(rgb)[0, 0, :, 0], expected, rtol=1e-6)
  rgb_uint8 = (rgb * 255).astype(jnp.uint8)
  np.testing.assert_allclose(sr_ops.rgb_to_y(rgb_uint8, data_range=255)[0, 0, :, 0], expected, rtol=1e-6)


def test_rgb_to_y_matches_skimage():
  color = pytest.importorskip('skimage.color')
  rgb = _random_image(5, (9, 7, 3))
  np.testing.assert_allclose(sr_ops.rgb_to_y(jnp.asarray(rgb))[..., 0], color.rgb2ycbcr(rgb)[..., 0],
                             rtol=1e-5)


def test_psnr_constant_offset_and_shave():
  base = jnp.asarray(_random_image(6, (2, 20, 16, 1), high=240.0))
  offsets = jnp.array([1.0, 7.5])[:, None, None, None]
  expected = [20 * math.log10(255), 20 * math.log10(255 / 7.5)]
  np.testing.assert_allclose(sr_ops.psnr(base + offsets, base), expected, rtol=1e-5)
  # A corrupted border of width 3 is ignored with shave = 3, and only then.
  corrupted = (base + offsets).at[:, :3].add(100.0).at[:, :, -3:].add(-100.0)
  np.testing.assert_allclose(sr_ops.psnr(corrupted, base, shave=3), expected, rtol=1e-5)
  assert np.all(sr_ops.psnr(corrupted, base) < 20)
  np.testing.assert_allclose(sr_ops.psnr(base / 255 + 0.01, base / 255, data_range=1.0), [40.0, 40.0],
                             rtol=1e-4)
  assert np.all(np.isposinf(sr_ops.psnr(base, base)))


@pytest.mark.slow
def test_psnr_matches_skimage():
  metrics = pytest.importorskip('skimage.metrics')
  a, b = _random_image(7, (17, 13, 1), 255.0), _random_image(8, (17, 13, 1), 255.0)
  expected = metrics.peak_signal_noise_ratio(a[2:-2, 2:-2].astype(np.float64), b[2:-2, 2:-2], data_range=255)
  np.testing.assert_allclose(sr_ops.psnr(jnp.asarray(a), jnp.asarray(b), shave=2), expected, rtol=1e-5)


@pytest.mark.slow
def test_ssim_identical_and_constant_images():
  a = jnp.asarray(_random_image(9, (1, 16, 14, 1), 255.0))
  np.testing.assert_allclose(sr_ops.ssim(a, a), [1.0], atol=1e-6)
  # Constant images: every σ is 0, so SSIM = (2 μ_a μ_b + C1) / (μ_a² + μ_b² + C1), C1 = 2.55².
  c1 = 2.55**2
  np.testing.assert_allclose(sr_ops.ssim(jnp.full((13, 12, 1), 100.0), jnp.full((13, 12, 1), 110.0)),
                             (2 * 100 * 110 + c1) / (100**2 + 110**2 + c1), rtol=1e-6)


def test_ssim_single_window_mean_shift():
  # 11×11 images: one window. b = a + d leaves σ_a = σ_b = σ_ab, so the contrast-structure factor is
  # 1 and SSIM = (2 μ (μ + d) + C1) / (μ² + (μ + d)² + C1), μ the Gaussian-weighted mean of a.
  a = _random_image(10, (11, 11), 200.0)
  mu, d, c1 = np.sum(_gaussian_window_2d() * a), 30.0, 2.55**2
  expected = (2 * mu * (mu + d) + c1) / (mu**2 + (mu + d)**2 + c1)
  np.testing.assert_allclose(sr_ops.ssim(jnp.asarray(a)[..., None], jnp.asarray(a + d)[..., None]), expected,
                             rtol=1e-5)


@pytest.mark.slow
def test_ssim_matches_window_loop_and_shave():
  a = _random_image(11, (22, 19), 255.0)
  b = np.clip(a + np.random.default_rng(12).normal(0, 20, a.shape), 0, 255).astype(np.float32)
  a_hwc, b_hwc = jnp.asarray(a)[..., None], jnp.asarray(b)[..., None]
  np.testing.assert_allclose(sr_ops.ssim(a_hwc, b_hwc), _loop_ssim(a, b), rtol=1e-5)
  np.testing.assert_allclose(sr_ops.ssim(a_hwc, b_hwc, shave=3), _loop_ssim(a[3:-3, 3:-3], b[3:-3, 3:-3]),
                             rtol=1e-5)
  with pytest.raises(ValueError):
    sr_ops.ssim(jnp.zeros((10, 30, 1)), jnp.zeros((10, 30, 1)))


@pytest.mark.slow
def test_ssim_matches_skimage_on_a_photograph():
  skimage = pytest.importorskip('skimage')
  from skimage.metrics import structural_similarity
  hr = skimage.data.camera()[100:196, 200:290].astype(np.float32)
  lr = sr_ops.imresize(_nhwc(hr), 0.5)
  sr = np.clip(_hw(sr_ops.imresize(lr, 2.0)), 0, 255)
  expected = structural_similarity(hr.astype(np.float64), sr.astype(np.float64), gaussian_weights=True,
                                   sigma=1.5, use_sample_covariance=False, data_range=255)
  np.testing.assert_allclose(sr_ops.ssim(_nhwc(hr), _nhwc(sr)), [expected], rtol=1e-5)


@pytest.mark.slow
def test_y_psnr_ssim_composes_and_jits():
  hr = jnp.asarray(_random_image(13, (2, 24, 20, 3)))
  sr = jnp.clip(sr_ops.imresize(sr_ops.imresize(hr, 0.5), 2.0), 0.0, 1.0)
  psnr_value, ssim_value = jax.jit(lambda s, h: sr_ops.y_psnr_ssim(s, h, scale=2))(sr, hr)
  sr_y, hr_y = sr_ops.rgb_to_y(sr), sr_ops.rgb_to_y(hr)
  np.testing.assert_allclose(psnr_value, sr_ops.psnr(sr_y, hr_y, shave=2), rtol=1e-6)
  sr_y_np, hr_y_np = np.asarray(sr_y)[:, 2:-2, 2:-2, 0], np.asarray(hr_y)[:, 2:-2, 2:-2, 0]
  expected = [_loop_ssim(s, h) for s, h in zip(sr_y_np, hr_y_np)]
  np.testing.assert_allclose(ssim_value, expected, rtol=1e-5)


def test_modcrop():
  assert sr_ops.modcrop(jnp.zeros((2, 13, 11, 3)), 3).shape == (2, 12, 9, 3)
  assert sr_ops.modcrop(jnp.zeros((13, 11, 1)), 1).shape == (13, 11, 1)
