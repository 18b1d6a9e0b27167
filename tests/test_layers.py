"""The CPU kernels behind the layers: the custom kernel gradient of conv2d equals XLA's own."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfkd_jax.models import cpu_kernels, layers


def _xla_conv(x, w, stride, padding):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), ((padding, padding), (padding, padding)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.slow
@pytest.mark.parametrize('shape', [
    # (batch, size, c_in, c_out, kernel, stride, padding)
    (2, 8, 3, 16, 3, 1, 1), (2, 9, 4, 8, 3, 2, 1), (2, 12, 6, 16, 5, 1, 0), (2, 8, 5, 3, 3, 1, 1),
    (3, 7, 8, 12, 1, 2, 0), (2, 9, 6, 1, 3, 1, 2), (2, 7, 4, 2, 5, 1, 1), (2, 8, 4, 1, 3, 2, 1),
    (2, 8, 8, 3, 3, 1, 1), (2, 9, 10, 1, 3, 1, 2), (2, 7, 12, 2, 5, 1, 0)])  # the last three: C_in >= 8
def test_conv2d_gradients_match_xla(shape):
  n, size, c_in, c_out, k, stride, padding = shape
  kx, kw, kd = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (n, size, size, c_in))
  w = jax.random.normal(kw, (k, k, c_in, c_out))
  y, vjp = jax.vjp(lambda x_, w_: cpu_kernels.conv2d(x_, w_, stride, padding), x, w)
  y_ref, vjp_ref = jax.vjp(lambda x_, w_: _xla_conv(x_, w_, stride, padding), x, w)
  np.testing.assert_array_equal(y, y_ref)
  dy = jax.random.normal(kd, y.shape)
  for got, want in zip(jax.jit(vjp)(dy), vjp_ref(dy)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_batchnorm_running_var_is_unbiased():
  x = jax.random.normal(jax.random.key(1), (4, 3, 3, 2)) * 2 + 1
  bn = layers.BatchNorm(momentum=0.9)
  v = bn.init(jax.random.key(0), x, use_running_average=False)
  y, upd = bn.apply(v, x, use_running_average=False, mutable=['batch_stats'])
  xs = np.asarray(x).reshape(-1, 2)
  np.testing.assert_allclose(upd['batch_stats']['mean'], 0.1 * xs.mean(0), rtol=1e-5)
  np.testing.assert_allclose(upd['batch_stats']['var'], 0.9 + 0.1 * xs.var(0, ddof=1), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 2), (xs - xs.mean(0)) / np.sqrt(xs.var(0) + 1e-5),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('size', [(4, 4), (5, 3)])
def test_fused_upsample_conv_equals_upsample_then_conv(size):
  kx, kw, kd = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(kx, (2,) + size + (6,))
  w = jax.random.normal(kw, (3, 3, 6, 10))
  naive = lambda x_, w_: _xla_conv(layers.upsample_nearest(x_, 2), w_, 1, 1)
  y, vjp = jax.vjp(cpu_kernels.upsample2_conv3x3, x, w)
  y_ref, vjp_ref = jax.vjp(naive, x, w)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  dy = jax.random.normal(kd, y.shape)
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize('groups', [1, 2])
def test_batch_normalisation_closed_form_gradient_equals_autodiff(groups):
  """The custom VJP of train-mode BN equals differentiating its forward formula, including the
  cotangents of the returned batch mean and variance."""
  kx, kd = jax.random.split(jax.random.key(3))
  x = jax.random.normal(kx, (groups, 6, 5, 4, 3)) * 3 + 1

  def plain(x_):
    mean = x_.mean((1, 2, 3), keepdims=True)
    var = jnp.square(x_ - mean).mean((1, 2, 3), keepdims=True)
    return (x_ - mean) * jax.lax.rsqrt(var + 0.8), mean, var

  outs, vjp = jax.vjp(lambda x_: cpu_kernels.normalize_with_batch_stats(x_, 0.8), x)
  outs_ref, vjp_ref = jax.vjp(plain, x)
  for got, want in zip(outs, outs_ref):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  cotangents = tuple(jax.random.normal(k, o.shape) for k, o in zip(jax.random.split(kd, 3), outs))
  np.testing.assert_allclose(vjp(cotangents)[0], vjp_ref(cotangents)[0], rtol=1e-4, atol=1e-5)
