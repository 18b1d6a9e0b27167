"""dfkd_jax.synth: replay-pool FIFO semantics and sampling, the uint8 PNG round trip (against numpy,
PIL and torch's ToTensor: committed values, live in the ``torch`` group), the CMI memory bank,
best-iterate selection, and a bitwise checkpoint round trip of pool and bank."""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch_files
from dfkd_jax.errors import UserError
from dfkd_jax.run import checkpoint
from dfkd_jax.synth import bank, init_best, keep_best, pool


def _rows(values):
  """Items of shape (1,) holding ``values``, to read a pool's contents at a glance."""
  return jnp.asarray(values, jnp.float32)[:, None]


def _contents(p):
  return np.asarray(p['items'][:, 0]).tolist(), int(p['next']), int(pool.size(p))


# ------------------------------------------------------------------------------------------------
# Quantisation (the references' PNG round trip)
# ------------------------------------------------------------------------------------------------

_EDGES = np.array([-0.5, 0.0, 1e-9, 0.5 / 255, 0.0039, 0.5, 127.999 / 255, 128 / 255, 0.999, 254.9999 / 255,
                   np.nextafter(np.float32(1), np.float32(0)), 1.0, 1.5], np.float32)


def test_quantize_truncates_like_numpy_astype():
  np.testing.assert_array_equal(pool.quantize(jnp.asarray(_EDGES)),
                                [0, 0, 0, 0, 0, 127, 127, 128, 254, 254, 254, 255, 255])
  grid = np.random.default_rng(0).uniform(-0.1, 1.1, 200_000).astype(np.float32)
  exact = np.arange(256, dtype=np.float32) / 255  # k/255 and the float just below it
  grid = np.concatenate([grid, exact, np.nextafter(exact, np.float32(0))])
  expected = (np.clip(grid, 0, 1) * 255).astype('uint8')  # CMI-fw save_image_batch
  np.testing.assert_array_equal(jax.jit(pool.quantize)(jnp.asarray(grid)), expected)


def test_dequantize_is_float32_division_by_255():
  codes = np.arange(256, dtype=np.uint8)
  expected = codes.astype(np.float32) / np.float32(255)
  np.testing.assert_array_equal(pool.dequantize(jnp.asarray(codes)), expected)
  # Re-encoding a decoded image gives back its codes: pool images survive any number of round trips.
  np.testing.assert_array_equal(pool.quantize(pool.dequantize(jnp.asarray(codes))), codes)


def _png_input():
  return np.random.default_rng(1).uniform(-0.05, 1.05, (8, 8, 3)).astype(np.float32)


def torch_reference(torch) -> dict:
  """The references' PNG round trip of _png_input(): clamp in torch, ×255 and truncate in numpy, write a
  PNG with PIL, read it, ToTensor (committed as fixtures/torch_files/synth_pool.npz by
  fixtures/make_torch_files.py)."""
  from PIL import Image
  codes = (torch.from_numpy(_png_input()).clamp(0, 1).numpy() * 255).astype('uint8')
  buffer = io.BytesIO()
  Image.fromarray(codes).save(buffer, format='png')
  decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
  return {'codes': codes, 'to_tensor': torch.from_numpy(decoded.copy()).float().div(255).numpy()}


@pytest.mark.parametrize('source', torch_files.SOURCES)
def test_png_round_trip_matches_pil_and_to_tensor(source):
  reference = torch_files.values('synth_pool', source, torch_reference)
  x = jnp.asarray(_png_input())
  np.testing.assert_array_equal(pool.quantize(x), reference['codes'])
  np.testing.assert_array_equal(pool.dequantize(pool.quantize(x)), reference['to_tensor'])


# ------------------------------------------------------------------------------------------------
# Pool
# ------------------------------------------------------------------------------------------------

def test_pool_fifo_wraps_around():
  p = pool.init(4, (1,))
  assert _contents(p) == ([0, 0, 0, 0], 0, 0)
  p = pool.add(p, _rows([1, 2, 3]))
  assert _contents(p) == ([1, 2, 3, 0], 3, 3)
  p = pool.add(p, _rows([4, 5, 6]))  # 1 and 2, the oldest, are overwritten
  assert _contents(p) == ([5, 6, 3, 4], 2, 4)
  p = jax.jit(pool.add)(p, _rows([7]))
  assert _contents(p) == ([5, 6, 7, 4], 3, 4)


def test_pool_keeps_the_newest_when_a_batch_exceeds_the_capacity():
  p = pool.add(pool.add(pool.init(3, (1,)), _rows([1])), _rows([2, 3, 4, 5, 6]))
  # Same state as adding the six items one at a time.
  q = pool.init(3, (1,))
  for v in range(1, 7):
    q = pool.add(q, _rows([v]))
  assert _contents(p) == _contents(q) == ([4, 5, 6], 0, 3)


@pytest.mark.slow
def test_uint8_pool_stores_codes_and_samples_decoded_images():
  p = pool.init(4, (2, 2, 3), jnp.uint8)
  x = jnp.asarray(np.random.default_rng(2).uniform(-0.1, 1.1, (2, 2, 2, 3)), jnp.float32)
  p = pool.add(p, x)
  assert p['items'].dtype == jnp.uint8
  np.testing.assert_array_equal(p['items'][:2], pool.quantize(x))
  out = pool.sample(p, jax.random.key(0), 16)
  assert out.dtype == jnp.float32
  decoded = np.asarray(pool.dequantize(pool.quantize(x)))
  assert all(any(np.array_equal(o, d) for d in decoded) for o in np.asarray(out))


def test_pool_samples_only_filled_items_with_replacement():
  p = pool.add(pool.init(10, (1,)), _rows([1, 2, 3]))
  out = np.asarray(jax.jit(pool.sample, static_argnums=2)(p, jax.random.key(0), 300))[:, 0]
  assert set(out.tolist()) == {1, 2, 3}
  np.testing.assert_array_equal(pool.sample(p, jax.random.key(0), 300)[:, 0], out)  # deterministic
  assert not np.array_equal(pool.sample(p, jax.random.key(1), 300)[:, 0], out)


def test_random_order_puts_a_permutation_of_the_filled_slots_first():
  orders = [np.asarray(pool.random_order(k, 5, 9)) for k in jax.random.split(jax.random.key(0), 20)]
  for order in orders:
    assert sorted(order[:5]) == list(range(5)) and sorted(order[5:]) == list(range(5, 9))
  assert len({tuple(o[:5]) for o in orders}) > 10


@pytest.mark.slow
def test_pool_epochs_visit_every_item_once_in_a_fresh_order():
  p = pool.add(pool.init(8, (1,)), _rows([10, 11, 12, 13, 14]))
  sample_epoch = lambda p, key, start, batch: pool.read(p, pool.epoch_indices(p, key, start, batch))
  stream = np.asarray(sample_epoch(p, jax.random.key(3), 0, 15))[:, 0]
  epochs = stream.reshape(3, 5)
  for epoch in epochs:
    assert sorted(epoch) == [10, 11, 12, 13, 14]
  assert len({tuple(e) for e in epochs}) > 1
  # Batch by batch (batches crossing epoch boundaries) reads the same stream.
  draw = jax.jit(sample_epoch, static_argnums=3)
  batches = [np.asarray(draw(p, jax.random.key(3), start, 3))[:, 0] for start in range(0, 15, 3)]
  np.testing.assert_array_equal(np.concatenate(batches), stream)
  # A batch larger than the pool spans several epochs.
  np.testing.assert_array_equal(draw(p, jax.random.key(3), 2, 11)[:, 0], stream[2:13])


def test_round_trip_is_what_a_read_gives_back():
  items = jnp.asarray([[0.0], [0.5], [1.2], [0.999]], jnp.float32)
  for dtype in (jnp.uint8, jnp.float32):
    p = pool.add(pool.init(4, (1,), dtype), items)
    np.testing.assert_array_equal(pool.round_trip(p, items), pool.read(p, jnp.arange(4)))
  # uint8: trunc(clip(x)·255)/255
  np.testing.assert_array_equal(pool.round_trip(pool.init(1, (1,), jnp.uint8), items)[:, 0],
                                np.float32([0, 127, 255, 254]) / np.float32(255))


def test_pool_rejects_bad_capacity_and_shapes():
  with pytest.raises(UserError):
    pool.init(0, (1,))
  with pytest.raises(ValueError):
    pool.add(pool.init(2, (2,)), _rows([1]))


# ------------------------------------------------------------------------------------------------
# CMI memory bank
# ------------------------------------------------------------------------------------------------

def test_bank_initialises_randn_and_counts_nothing_filled():
  b = bank.init(jax.random.key(0), 4096, 8)
  items = np.asarray(b['items'])
  assert items.shape == (4096, 8) and int(bank.size(b)) == 0
  assert abs(items.mean()) < 0.03 and abs(items.std() - 1) < 0.03


@pytest.mark.slow
def test_bank_fifo_and_sampling_from_the_filled_part():
  b = bank.init(jax.random.key(0), 8, 2)
  initial = np.asarray(b['items'])
  feats = jnp.arange(1, 7, dtype=jnp.float32)[:, None] * jnp.ones((1, 2))
  b = bank.add(b, feats[:3])
  rows, valid = jax.jit(bank.sample, static_argnums=2)(b, jax.random.key(1), 5)
  np.testing.assert_array_equal(valid, [True, True, True, False, False])
  assert sorted(np.asarray(rows[:3, 0]).tolist()) == [1, 2, 3]  # distinct rows, only filled ones
  # Padding rows are other (unfilled, still random) rows, never repeats of filled ones.
  assert all(any(np.array_equal(r, i) for i in initial[3:]) for r in np.asarray(rows[3:]))
  # More requested than filled, fewer than the capacity: the mask counts min(num, filled).
  rows, valid = bank.sample(b, jax.random.key(2), 2)
  assert valid.all() and set(np.asarray(rows[:, 0]).tolist()) <= {1, 2, 3}


def test_bank_samples_the_whole_bank_once_exactly_full():
  b = bank.init(jax.random.key(0), 4, 1)
  b = bank.add(bank.add(b, _rows([1, 2])), _rows([3, 4]))
  # The reference returns no rows at this call (its pointer wrapped to 0); here the bank is full.
  assert int(bank.size(b)) == 4 and int(b['next']) == 0
  rows, valid = bank.sample(b, jax.random.key(0), 4)
  assert valid.all() and sorted(np.asarray(rows[:, 0]).tolist()) == [1, 2, 3, 4]
  b = bank.add(b, _rows([5]))
  rows, valid = bank.sample(b, jax.random.key(1), 3)
  assert valid.all() and len(set(np.asarray(rows[:, 0]).tolist())) == 3
  assert set(np.asarray(rows[:, 0]).tolist()) <= {5, 2, 3, 4}


def test_bank_rejects_more_negatives_than_rows():
  with pytest.raises(UserError):
    bank.sample(bank.init(jax.random.key(0), 4, 1), jax.random.key(0), 5)
  with pytest.raises(UserError):
    bank.init(jax.random.key(0), 0, 1)


# ------------------------------------------------------------------------------------------------
# Best-iterate selection
# ------------------------------------------------------------------------------------------------

def test_keep_best_in_a_scan_keeps_the_first_lowest_loss():
  losses = jnp.array([3.0, 1.0, 2.0, 1.0, jnp.nan, 5.0])
  candidates = {'images': jnp.arange(6.0)[:, None, None] * jnp.ones((1, 2, 2)),
                'features': jnp.arange(6) * 10}

  def step(best, inputs):
    loss, candidate = inputs
    return keep_best(best, loss, candidate), None

  first = jax.tree.map(lambda a: a[0], candidates)
  (best_loss, best), _ = jax.jit(lambda: jax.lax.scan(step, init_best(first), (losses, candidates)))()
  assert float(best_loss) == 1.0  # ties keep the earlier iterate, NaN is never chosen
  np.testing.assert_array_equal(best['images'], jnp.ones((2, 2)))
  assert int(best['features']) == 10


def test_keep_best_all_nan_keeps_the_initial_zeros():
  best_loss, best = keep_best(init_best(jnp.ones(3)), jnp.nan, jnp.ones(3))
  assert np.isinf(best_loss) and not np.asarray(best).any()


# ------------------------------------------------------------------------------------------------
# Checkpointing
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_pool_and_bank_resume_bitwise_from_a_checkpoint(tmp_path):
  state = {'step': jnp.int32(3),
           'pool': pool.add(pool.init(5, (2, 2, 3), jnp.uint8), jnp.full((7, 2, 2, 3), 0.7)),
           'bank': bank.add(bank.init(jax.random.key(0), 6, 4), jnp.ones((2, 4)))}
  saver = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  saver.save(3, state, {}, force=True)
  saver.wait()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), state)
  restored, step = saver.restore_latest(target)
  saver.close()
  assert step == 3
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b), strict=True), state, restored)
