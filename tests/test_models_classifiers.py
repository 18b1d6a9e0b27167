"""Classifiers against the PyTorch references.

Fixture architectures (CMI-fw resnet18/20/34, vgg11, wrn16_1/40_2) are checked against the stored
reference outputs: logits (eval and train), features, BN input statistics through the taps, the
BN-statistics loss, CMI's instance-mean features and the running stats after one train forward.
Every registered classifier's parameter count is checked against reference_semantics.md §3.2.
Architectures without fixtures are checked in test_models_classifiers_torch.py.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_fixtures as rf
from dfkd_jax import models
from dfkd_jax.convert import naming
from dfkd_jax.errors import UserError
from dfkd_jax.models import hooks, layers, resnet_blocks, vgg, wrn

FIXTURES = ['cmi__resnet18', 'cmi__resnet20', 'cmi__resnet34', 'cmi__vgg11', 'cmi__wrn16_1', 'cmi__wrn40_2']


def _num_params(variables):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(variables['params']))


def _bn_terms(running, tapped):
  """Per-layer terms of DeepInversion's loss as CMI-fw computes it (un-squared L2 norms)."""
  return jnp.stack([jnp.linalg.norm(rv - t.var) + jnp.linalg.norm(rm - t.mean)
                    for (rm, rv), t in zip(running, tapped)])


@pytest.mark.slow
@pytest.mark.parametrize('fixture', FIXTURES)
def test_classifier_matches_fixture(fixture):
  doc, ref, sd = rf.load(fixture)
  arch = doc['arch']
  spec = models.get_spec(arch)
  model = models.create(arch, num_classes=doc['num_classes'])
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + models.input_shape(arch)))
  variables = naming.torch_to_flax(sd, abstract, spec.torch)
  assert _num_params(variables) == doc['num_params']
  x = rf.nhwc(ref['input'])
  errs = {}

  def check(actual, name):
    errs[name] = rf.assert_close(actual, ref[name], f'{fixture} {name}')

  # Eval forward with the BN taps, in the reference's named_modules order.
  (logits, features), bn = hooks.apply_with_bn_taps(model, variables, x, train=False, return_features=True)
  check(logits, 'logits_eval')
  check(features, 'features_eval')
  assert [t.name for t in bn] == doc['bn_modules']
  for t in bn:
    check(t.mean, f'bn_in_mean/{t.name}')
    check(t.var, f'bn_in_var/{t.name}')
  terms = _bn_terms(hooks.running_stats(variables, bn), bn)
  check(terms, 'bn_r_feature_eval')
  check(terms.sum(), 'bn_loss_eval')

  # CMI's instance-mean features: spatial means of BN inputs, or of layer1..4 inputs for resnet34.
  instance_modules = doc['instance_mean_modules']
  if instance_modules == doc['bn_modules']:
    instance = bn
  else:
    _, instance = hooks.apply_with_input_taps(model, variables, x, instance_modules, train=False)
    assert [t.name for t in instance] == instance_modules
  check(hooks.concat_spatial_means(instance), 'instance_mean_features')

  # One train forward: batch-statistics logits, then the updated running stats.
  (logits, state), bn = hooks.apply_with_bn_taps(model, variables, x, train=True, mutable=['batch_stats'])
  check(logits, 'logits_train')
  for t, (mean, var) in zip(bn, hooks.running_stats(state, bn)):
    check(mean, f'bn_train_running_mean/{t.name}')
    check(var, f'bn_train_running_var/{t.name}')

  # Export back: canonical names, exact values.
  back = naming.flax_to_torch(variables, spec.torch)
  canon = naming.canonical_keys(sd, spec.torch)
  assert set(back) == set(canon)
  for k in back:
    if not k.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(back[k], canon[k], err_msg=k)
  worst = max(errs, key=errs.get)
  print(f'\n{fixture}: worst relative error {errs[worst]:.3g} ({worst}; {len(errs)} arrays)')


def test_pu_compress_fc_head_alias():
  """huawei pu_compress saves the DAFL ResNet-34 with ``fc`` instead of ``linear``."""
  doc, _, sd = rf.load('cmi__resnet34')
  renamed = {('fc.' + k[len('linear.'):] if k.startswith('linear.') else k): v for k, v in sd.items()}
  spec = models.get_spec('resnet34')
  model = models.create('resnet34')
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  variables = naming.torch_to_flax(renamed, abstract, spec.torch)
  np.testing.assert_array_equal(variables['params']['linear']['kernel'], sd['linear.weight'].T)


# Parameters (buffers excluded) per reference_semantics.md §3.2 (10 classes unless noted).
# resnet14/44, vgg16/19 are not in that table; the torch modules of
# test_models_classifiers_torch.py give the same counts.
PARAM_COUNTS = {
    ('resnet18', 10): 11_173_962, ('resnet34', 10): 21_282_122, ('resnet50', 10): 23_520_842,
    ('resnet8', 10): 78_042, ('resnet14', 10): 175_258, ('resnet20', 10): 272_474, ('resnet32', 10): 466_906,
    ('resnet44', 10): 661_338, ('resnet56', 10): 855_770, ('resnet110', 10): 1_730_714,
    ('resnet8x4', 100): 1_233_540, ('resnet32x4', 100): 7_433_860,
    ('wrn16_1', 10): 175_066, ('wrn16_2', 10): 691_674, ('wrn40_1', 10): 563_930, ('wrn40_2', 10): 2_243_546,
    ('vgg8', 10): 3_918_858, ('vgg11', 10): 9_231_114, ('vgg13', 10): 9_416_010,
    ('vgg16', 10): 14_728_266, ('vgg19', 10): 20_040_522,
    ('mobilenetv2', 10): 2_236_682,
    ('lenet5', 10): 61_706, ('lenet5_half', 10): 15_738,
    # torchvision's published ImageNet counts (1000 classes).
    ('resnet18_imagenet', 1000): 11_689_512, ('resnet34_imagenet', 1000): 21_797_672,
    ('resnet50_imagenet', 1000): 25_557_032,
}


def test_every_classifier_has_its_reference_param_count():
  counted = {arch for arch, _ in PARAM_COUNTS} | {'wrn'}
  assert set(models.names('classifier')) <= counted, set(models.names('classifier')) - counted
  for (arch, num_classes), expected in PARAM_COUNTS.items():
    model = models.create(arch, num_classes=num_classes)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + models.input_shape(arch)))
    assert _num_params(variables) == expected, arch


def test_generic_wrn_and_aliases():
  variables = jax.eval_shape(models.create('wrn', depth=28, widen_factor=10).init, jax.random.key(0),
                             jnp.zeros((1, 32, 32, 3)))
  assert _num_params(variables) == 36_479_194  # WRN-28-10, CIFAR-10
  assert models.canonical_name('wrn_40_2') == 'wrn40_2'
  assert models.canonical_name('vgg11_bn') == 'vgg11'
  with pytest.raises(UserError):
    models.create('wrn', depth=15)
  with pytest.raises(UserError):
    models.create('wrn', depth=16, widen_factor=1.5)


def test_resnet_tiny_needs_32x32():
  model = models.create('resnet8')
  with pytest.raises(UserError, match='8x8'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


class _InitSamples(nn.Module):
  """Small pieces of several families, initialised in one compiled ``init``."""

  @nn.compact
  def __call__(self, x):
    wide = wrn.WideResNet(10, num_classes=100, name='wrn')(x)
    vgg_net = vgg.VGG(((64,), (64,), (64,), (64,), (64, 64)), num_classes=200, name='vgg')(x)
    resnet = resnet_blocks.BasicBlock(64, name='default_init')(jnp.zeros(x.shape[:3] + (64,)))
    return wide, vgg_net, resnet


@pytest.mark.slow
def test_initialisation_follows_the_references():
  params = jax.jit(_InitSamples().init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params']
  kaiming_fan_out = lambda k, out: np.sqrt(2 / (k * k * out))  # noqa: E731
  # WRN: convs N(0, sqrt(2/(k*k*out))), BN (1, 0), fc bias 0 with torch's default weight.
  w = params['wrn']
  np.testing.assert_allclose(np.std(w['block3']['layer.0']['conv2']['kernel']), kaiming_fan_out(3, 64), rtol=0.03)
  np.testing.assert_allclose(np.std(w['block3']['layer.0']['convShortcut']['kernel']), kaiming_fan_out(1, 64),
                             rtol=0.05)
  np.testing.assert_array_equal(w['bn1']['scale'], 1)
  np.testing.assert_array_equal(w['bn1']['bias'], 0)
  np.testing.assert_array_equal(w['fc']['bias'], 0)
  assert 0.9 / 8 < np.abs(w['fc']['kernel']).max() <= 1 / 8
  # VGG: convs kaiming fan_out with bias 0, classifier N(0, 0.01) with bias 0.
  v = params['vgg']
  np.testing.assert_allclose(np.std(v['block4']['3']['kernel']), kaiming_fan_out(3, 64), rtol=0.03)
  np.testing.assert_array_equal(v['block4']['3']['bias'], 0)
  np.testing.assert_allclose(np.std(v['classifier']['kernel']), 0.01, rtol=0.05)
  np.testing.assert_array_equal(v['classifier']['bias'], 0)
  # DAFL-style CIFAR ResNet: torch's default U(+-1/sqrt(fan_in)).
  kernel = params['default_init']['conv2']['kernel']
  assert 0.99 / 24 < np.abs(kernel).max() <= 1 / 24
  # resnet_tiny, ImageNet ResNets and MobileNetV2 use the kaiming fan_out init checked above.
  assert models.create('resnet8').conv_init is layers.kaiming_normal_fan_out
  assert models.create('resnet18_imagenet').conv_init is layers.kaiming_normal_fan_out
  assert models.create('resnet18').conv_init is None
