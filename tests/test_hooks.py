"""dfkd_jax.models.hooks: BN-input and module-input statistics under jit and grad, without touching variables."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfkd_jax import models
from dfkd_jax.errors import UserError
from dfkd_jax.models import hooks
from dfkd_jax.models.layers import BatchNorm


class _TwoNorms(nn.Module):
  """BN on an image, then BatchNorm1d-style on its (N, C) spatial mean."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = BatchNorm(use_running_average=not train, name='stem.bn')(x)
    return BatchNorm(use_running_average=not train, name='head')(y.mean((1, 2)))


def test_statistics_and_names():
  x = jnp.asarray(np.random.default_rng(1).normal(1, 2, (3, 5, 4, 2)), jnp.float32)
  model = _TwoNorms()
  variables = _random_variables(model, x.shape)
  y, tapped = hooks.apply_with_bn_taps(model, variables, x)
  np.testing.assert_array_equal(y, model.apply(variables, x))
  assert [(t.name, t.path) for t in tapped] == [('stem.bn', ('stem.bn',)), ('head', ('head',))]
  image, pooled = tapped
  xn = np.asarray(x, np.float64)
  np.testing.assert_allclose(image.mean, xn.mean((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(image.var, xn.var((0, 1, 2)), rtol=1e-5)  # biased
  np.testing.assert_allclose(image.spatial_mean, xn.mean((1, 2)), rtol=1e-5)
  assert pooled.spatial_mean.shape == (3, 2)  # an (N, C) input is its own spatial mean
  running = hooks.running_stats(variables, tapped)
  np.testing.assert_array_equal(running[0][1], variables['batch_stats']['stem.bn']['var'])
  assert hooks.concat_spatial_means(tapped).shape == (3, 4)


def _random_variables(model, input_shape):
  """Variables filled with numpy draws (compiling ``init``'s random normals takes ~15 s on CPU)."""
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'var':
      return jnp.asarray(0.5 + rng.uniform(size=leaf.shape), jnp.float32)
    scale = {'mean': 0.1, 'bias': 0.1, 'scale': 0.1}.get(name, np.sqrt(2 / np.prod(leaf.shape[:-1])))
    return jnp.asarray((name == 'scale') + scale * rng.standard_normal(leaf.shape), jnp.float32)

  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(input_shape))
  return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope='module')
def wrn():
  model = models.create('wrn', depth=10)  # one pre-activation block per group: 7 BatchNorms
  return model, _random_variables(model, (1, 16, 16, 3))


@pytest.mark.slow
def test_taps_under_jit_and_grad(wrn):
  model, variables = wrn
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 16, 16, 3)), jnp.float32)

  def bn_loss(x):
    _, tapped = hooks.apply_with_bn_taps(model, variables, x)
    running = hooks.running_stats(variables, tapped)
    return sum(jnp.linalg.norm(rv - t.var) + jnp.linalg.norm(rm - t.mean) for (rm, rv), t in zip(running, tapped))

  # A list of taps comes out of jit with its static names.
  logits, tapped = jax.jit(lambda x: hooks.apply_with_bn_taps(model, variables, x))(x)
  eager_logits, eager = hooks.apply_with_bn_taps(model, variables, x)
  assert [t.name for t in tapped] == [t.name for t in eager] and len(tapped) == 7
  assert tapped[0].name == 'block1.layer.0.bn1' and tapped[-1].name == 'bn1'
  np.testing.assert_allclose(logits, eager_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(tapped[5].var, eager[5].var, rtol=1e-5, atol=1e-6)

  loss, grad = jax.jit(jax.value_and_grad(bn_loss))(x)
  np.testing.assert_allclose(loss, bn_loss(x), rtol=1e-5)
  assert grad.shape == x.shape and bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).max()) > 0


def test_train_mode_taps_leave_the_variable_tree_alone(wrn):
  model, variables = wrn
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 16, 16, 3)), jnp.float32)
  (_, state), tapped = jax.jit(
      lambda v, x: hooks.apply_with_bn_taps(model, v, x, train=True, mutable=['batch_stats']))(variables, x)
  assert list(state) == ['batch_stats']
  assert jax.tree.structure(state['batch_stats']) == jax.tree.structure(variables['batch_stats'])
  assert len(tapped) == 7


def test_input_taps_of_named_modules():
  model = models.create('resnet34')
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  x = jnp.ones((2, 32, 32, 3))
  _, tapped = jax.eval_shape(
      lambda v: hooks.apply_with_input_taps(model, v, x, ['layer1', 'layer2', 'layer3', 'layer4']), variables)
  assert [t.name for t in tapped] == ['layer1', 'layer2', 'layer3', 'layer4']
  assert [t.spatial_mean.shape for t in tapped] == [(2, 64), (2, 64), (2, 128), (2, 256)]
  with pytest.raises(UserError, match='layer5'):
    jax.eval_shape(lambda v: hooks.apply_with_input_taps(model, v, x, ['layer5']), variables)
  with pytest.raises(UserError, match='layer1'):
    hooks.running_stats(variables, tapped)
