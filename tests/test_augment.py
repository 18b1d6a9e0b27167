"""dfkd_jax.synth.augment: hand-built examples (pixel moves, zero borders, mirrors, bilinear values),
per-sample vs batch-wide parameters, determinism, jit and gradients, and bilinear resampling against
``torch.nn.functional.interpolate`` (its values committed; computed live in the ``torch`` group)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch_files
from dfkd_jax.errors import UserError
from dfkd_jax.synth import augment


def _ramp(n=1, h=4, w=5, c=1):
  """Images whose pixels are all distinct: value = index + 1 (so zero padding is recognisable)."""
  return jnp.arange(1, n * h * w * c + 1, dtype=jnp.float32).reshape(n, h, w, c)


def _keys(count, seed=0):
  return jax.random.split(jax.random.key(seed), count)


# ------------------------------------------------------------------------------------------------
# Jitter (DeepInversion)
# ------------------------------------------------------------------------------------------------

def test_jitter_roll_moves_pixels_exactly():
  image = _ramp()
  out = augment.jitter_flip(image, jnp.array([1, 2]), jnp.array(False))
  # The pixel at (y, x) lands at ((y + 1) mod 4, (x + 2) mod 5), as torch.roll(shifts=(1, 2)).
  for y, x in itertools.product(range(4), range(5)):
    assert out[0, (y + 1) % 4, (x + 2) % 5, 0] == image[0, y, x, 0]
  np.testing.assert_array_equal(out[0, :, :, 0][0], [19, 20, 16, 17, 18])


def test_jitter_flip_mirrors_after_the_roll():
  image = _ramp()
  rolled = augment.jitter_flip(image, jnp.array([-1, 3]), jnp.array(False))
  flipped = augment.jitter_flip(image, jnp.array([-1, 3]), jnp.array(True))
  np.testing.assert_array_equal(flipped, rolled[:, :, ::-1])
  np.testing.assert_array_equal(augment.jitter_flip(image, jnp.array([0, 0]), jnp.array(True))[0, 0, :, 0],
                                [5, 4, 3, 2, 1])


def _identify_jitter(image, out, limit):
  """The (dy, dx, flip) that turns ``image`` into ``out`` by ``np.roll`` (torch.roll semantics)
  along H, W and an optional mirror."""
  image, out = np.asarray(image), np.asarray(out)
  matches = []
  for dy, dx, flip in itertools.product(range(-limit, limit + 1), range(-limit, limit + 1), (False, True)):
    candidate = np.roll(image, (dy, dx), axis=(1, 2))
    if np.array_equal(candidate[:, :, ::-1] if flip else candidate, out):
      matches.append((dy, dx, flip))
  assert len(matches) == 1
  return matches[0]


@pytest.mark.slow
def test_random_jitter_covers_the_range_with_one_draw_per_batch():
  image = jnp.tile(_ramp(h=6, w=7), (3, 1, 1, 1))
  outs = np.asarray(jax.jit(jax.vmap(lambda key: augment.random_jitter_flip(key, image, 2)))(_keys(300)))
  # Batch-wide parameters: identical inputs give identical outputs.
  np.testing.assert_array_equal(outs[:, 0], outs[:, 1])
  np.testing.assert_array_equal(outs[:, 0], outs[:, 2])
  seen = {_identify_jitter(image[:1], out[:1], 2) for out in outs}
  assert {(dy, dx) for dy, dx, _ in seen} == set(itertools.product(range(-2, 3), repeat=2))
  assert {f for _, _, f in seen} == {False, True}


def test_random_jitter_without_flip_and_per_axis_limits():
  image = _ramp(h=6, w=7)
  outs = jax.jit(jax.vmap(lambda key: augment.random_jitter_flip(key, image, (0, 2), flip=False)))(_keys(40))
  for out in np.asarray(outs):
    dy, dx, flip = _identify_jitter(image, out, 2)
    assert dy == 0 and abs(dx) <= 2 and not flip


def test_random_jitter_rejects_negative_limits():
  with pytest.raises(UserError):
    augment.random_jitter_flip(jax.random.key(0), _ramp(), -1)


# ------------------------------------------------------------------------------------------------
# Padded crop and flip
# ------------------------------------------------------------------------------------------------

def _identify_crop(image, out, padding):
  padded = np.pad(np.asarray(image), ((padding, padding), (padding, padding), (0, 0)))
  h, w, _ = image.shape
  matches = [(oy, ox) for oy, ox in itertools.product(range(2 * padding + 1), repeat=2)
             if np.array_equal(padded[oy:oy + h, ox:ox + w], out)]
  assert len(matches) == 1
  return matches[0]


@pytest.mark.slow
def test_random_crop_pads_with_zeros_and_draws_per_image():
  images = jnp.tile(_ramp(h=4, w=4), (400, 1, 1, 1))
  out = augment.random_crop(jax.random.key(0), images, 2)
  offsets = [_identify_crop(images[0], o, 2) for o in np.asarray(out)]
  assert set(offsets) == set(itertools.product(range(5), repeat=2))  # per image, all offsets
  i = offsets.index((2, 4))  # shifted fully right: the last two columns are the zero padding
  np.testing.assert_array_equal(out[i, :, 2:], 0)
  np.testing.assert_array_equal(out[i, :, :2, 0], [[3, 4], [7, 8], [11, 12], [15, 16]])


def test_random_flip_mirrors_per_image():
  images = jnp.tile(_ramp(), (32, 1, 1, 1))
  out = np.asarray(augment.random_flip(jax.random.key(1), images))
  flipped = [np.array_equal(o, images[0, :, ::-1]) for o in out]
  kept = [np.array_equal(o, images[0]) for o in out]
  assert all(f != k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_crop_flip_is_a_crop_then_a_mirror():
  images = jnp.tile(_ramp(h=4, w=4), (16, 1, 1, 1))
  out = np.asarray(jax.jit(lambda x: augment.crop_flip(*jax.random.split(jax.random.key(2)), x))(images))
  for o in out:
    padded = np.pad(np.asarray(images[0]), ((4, 4), (4, 4), (0, 0)))
    windows = [padded[y:y + 4, x:x + 4] for y, x in itertools.product(range(9), repeat=2)]
    assert any(np.array_equal(o, win) or np.array_equal(o, win[:, ::-1]) for win in windows)


def test_crop_flip_options_select_the_steps_and_their_keys():
  images = jnp.asarray(np.random.default_rng(0).random((8, 6, 6, 3)), jnp.float32)
  crop_key, flip_key = jax.random.key(3), jax.random.key(4)
  np.testing.assert_array_equal(augment.crop_flip(crop_key, flip_key, images, padding=0, flip=False), images)
  np.testing.assert_array_equal(augment.crop_flip(crop_key, flip_key, images, padding=2, flip=False),
                                augment.random_crop(crop_key, images, 2))
  np.testing.assert_array_equal(augment.crop_flip(crop_key, flip_key, images, padding=0),
                                augment.random_flip(flip_key, images))
  np.testing.assert_array_equal(augment.crop_flip(crop_key, flip_key, images, padding=2),
                                augment.random_flip(flip_key, augment.random_crop(crop_key, images, 2)))


# ------------------------------------------------------------------------------------------------
# Resized crop
# ------------------------------------------------------------------------------------------------

def _linear_image():
  """4×4 image with value 4y + x: bilinear resampling of it is exact, value = 4·y_src + x_src."""
  return jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)


def test_resized_crop_align_corners_hand_values():
  # Box rows 1..2, cols 0..2 to 3×3: source rows 1, 1.5, 2 and columns 0, 1, 2.
  out = augment.resized_crop(_linear_image(), jnp.array([[1, 0, 2, 3]]), (3, 3), align_corners=True)
  np.testing.assert_allclose(out[0, :, :, 0], [[4, 5, 6], [6, 7, 8], [8, 9, 10]], atol=1e-6)


@pytest.mark.slow
def test_resized_crop_half_pixel_hand_values_clamp_to_the_box():
  # Rows: (j + 1/2)·2/4 − 1/2 = −0.25, 0.25, 0.75, 1.25 → clamped into the box to 0, 0.25, 0.75, 1,
  # i.e. source rows 1, 1.25, 1.75, 2 (never row 0 or 3, outside the box). Columns: 0, 1, 2.
  out = augment.resized_crop(_linear_image(), jnp.array([[1, 0, 2, 3]]), (4, 3), align_corners=False)
  np.testing.assert_allclose(out[0, :, :, 0], [[4, 5, 6], [5, 6, 7], [7, 8, 9], [8, 9, 10]], atol=1e-6)


def test_resized_crop_nonlinear_hand_value():
  # A 2×2 box upsampled to 3×3 with corners aligned: the centre is the mean of the four pixels.
  image = jnp.array([[1.0, 2.0, 0.0], [4.0, 8.0, 0.0], [0.0, 0.0, 0.0]]).reshape(1, 3, 3, 1)
  out = augment.resized_crop(image, jnp.array([[0, 0, 2, 2]]), (3, 3), align_corners=True)
  np.testing.assert_allclose(out[0, :, :, 0], [[1, 1.5, 2], [2.5, 3.75, 5], [4, 6, 8]], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('align_corners', [True, False])
def test_resized_crop_of_the_whole_image_is_the_identity(align_corners):
  images = jnp.asarray(np.random.default_rng(0).random((2, 5, 6, 3)), jnp.float32)
  boxes = jnp.array([[0, 0, 5, 6]] * 2)
  out = augment.resized_crop(images, boxes, align_corners=align_corners)
  np.testing.assert_allclose(out, images, atol=1e-6)


_RESIZE_IMAGES = np.random.default_rng(1).random((6, 9, 11, 3), dtype=np.float32)
_RESIZE_BOXES = np.array([[0, 0, 9, 11], [2, 3, 4, 5], [1, 0, 8, 2], [5, 7, 4, 4], [0, 4, 3, 7], [3, 3, 1, 1]])
_RESIZE_SIZES = [(9, 11), (5, 4), (16, 13)]


def torch_reference(torch) -> dict:
  """``F.interpolate(bilinear)`` of each box of _RESIZE_IMAGES to each size, NHWC: 'align_corners=<bool>/<h>x<w>'
  -> the batch (committed as fixtures/torch_files/augment.npz by fixtures/make_torch_files.py)."""
  out = {}
  for align_corners, size in itertools.product([True, False], _RESIZE_SIZES):
    resized = []
    for image, (top, left, h, w) in zip(_RESIZE_IMAGES, _RESIZE_BOXES):
      patch = torch.from_numpy(image[top:top + h, left:left + w].transpose(2, 0, 1).copy())[None]
      expected = torch.nn.functional.interpolate(patch, size=size, mode='bilinear', align_corners=align_corners)
      resized.append(expected[0].numpy().transpose(1, 2, 0))
    out[f'align_corners={align_corners}/{size[0]}x{size[1]}'] = np.stack(resized)
  return out


@pytest.fixture(scope='module', params=torch_files.SOURCES)
def reference(request):
  """torch_reference's values: committed, or (the torch group) computed by the installed torch."""
  return torch_files.values('augment', request.param, torch_reference)


@pytest.mark.parametrize('align_corners', [True, False])
def test_resized_crop_matches_torch_interpolate(reference, align_corners):
  resize = jax.jit(augment.resized_crop, static_argnums=2, static_argnames='align_corners')
  for size in _RESIZE_SIZES:
    out = resize(jnp.asarray(_RESIZE_IMAGES), jnp.asarray(_RESIZE_BOXES), size, align_corners=align_corners)
    np.testing.assert_allclose(out, reference[f'align_corners={align_corners}/{size[0]}x{size[1]}'], atol=2e-6)


def _torchvision_boxes(rng, count, height, width, scale, ratio):
  """torchvision ``RandomResizedCrop.get_params`` written as its sequential loop, in numpy."""
  boxes = []
  for _ in range(count):
    for _ in range(10):
      area = rng.uniform(*scale) * height * width
      aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
      w, h = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
      if 0 < w <= width and 0 < h <= height:
        boxes.append((rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w))
        break
    else:
      boxes.append((0, 0, height, width))
  return np.array(boxes)


@pytest.mark.slow
def test_resized_crop_boxes_stay_inside_and_match_torchvision_statistics():
  height, width, scale, ratio = 32, 32, (0.25, 1.0), (3 / 4, 4 / 3)
  sample = jax.jit(augment.sample_resized_crop_boxes, static_argnums=(1, 2), static_argnames=('scale', 'ratio'))
  boxes = np.asarray(sample(jax.random.key(0), 20000, (height, width), scale=scale, ratio=ratio))
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
  assert (h >= 1).all() and (w >= 1).all()
  # Rounded sides: the area stays within the scale range up to rounding of each side by 1/2.
  area = h * w / (height * width)
  assert area.min() > 0.25 * 0.9 and area.max() <= 1.0
  assert (w / h).min() > 0.75 * 0.9 and (w / h).max() < 4 / 3 / 0.9
  assert (h == height).any() and (w == width).any()  # full-size sides are accepted, as torchvision
  reference = _torchvision_boxes(np.random.default_rng(0), 20000, height, width, scale, ratio)
  for ours, theirs in zip(boxes.T.astype(float), reference.T.astype(float)):
    assert abs(ours.mean() - theirs.mean()) < 0.15 and abs(ours.std() - theirs.std()) < 0.15


@pytest.mark.slow
def test_resized_crop_fallback_when_no_trial_fits():
  key = jax.random.key(3)
  # Areas above the image: the aspect range contains the image's, so the whole image.
  boxes = augment.sample_resized_crop_boxes(key, 8, (10, 10), scale=(2.0, 3.0), ratio=(3 / 4, 4 / 3))
  np.testing.assert_array_equal(boxes, [[0, 0, 10, 10]] * 8)
  # Aspect ratios wider than a square image: full width, height = round(width / min ratio).
  boxes = augment.sample_resized_crop_boxes(key, 8, (10, 10), scale=(2.0, 3.0), ratio=(2.0, 3.0))
  np.testing.assert_array_equal(boxes[:, 2:], [[5, 10]] * 8)
  assert (boxes[:, 1] == 0).all() and set(np.asarray(boxes[:, 0]).tolist()) <= set(range(6))


@pytest.mark.parametrize('scale, ratio', [((0.5, 0.25), (0.75, 1.33)), ((0.0, 1.0), (0.75, 1.33)),
                                          ((0.25, 1.0), (-1.0, 1.0))])
def test_resized_crop_rejects_bad_ranges(scale, ratio):
  with pytest.raises(UserError):
    augment.sample_resized_crop_boxes(jax.random.key(0), 2, (8, 8), scale=scale, ratio=ratio)


@pytest.mark.slow
def test_random_resized_crop_is_per_image_and_deterministic():
  images = jnp.tile(jnp.asarray(np.random.default_rng(2).random((1, 16, 16, 3)), jnp.float32), (8, 1, 1, 1))
  crop = jax.jit(augment.random_resized_crop)
  first, again = crop(jax.random.key(5), images), crop(jax.random.key(5), images)
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, crop(jax.random.key(6), images))
  assert len({np.asarray(o).tobytes() for o in first}) == 8  # each image got its own box
  boxes = augment.sample_resized_crop_boxes(jax.random.key(5), 8, (16, 16), scale=(0.25, 1.0),
                                            ratio=(3 / 4, 4 / 3))
  np.testing.assert_array_equal(first, jax.jit(augment.resized_crop)(images, boxes))  # both compiled: same rounding


@pytest.mark.slow
def test_views_are_differentiable():
  images = jnp.asarray(np.random.default_rng(3).random((4, 8, 8, 3)), jnp.float32)
  for view in (lambda x: augment.resized_crop_flip(jax.random.key(0), x),
               lambda x: augment.crop_flip(*jax.random.split(jax.random.key(0)), x),
               lambda x: augment.random_jitter_flip(jax.random.key(0), x, 2)):
    grad = jax.jit(jax.grad(lambda x: jnp.sum(view(x) ** 2)))(images)
    assert np.isfinite(grad).all() and np.abs(grad).sum() > 0


@pytest.mark.slow
def test_resized_crop_flip_keeps_shape_and_dtype():
  images = jnp.zeros((3, 12, 10, 3), jnp.float32)
  out = augment.resized_crop_flip(jax.random.key(0), images, scale=(0.5, 1.0))
  assert out.shape == images.shape and out.dtype == images.dtype
