"""Classifiers without a stored fixture against the torch modules of torch_classifiers.py.

Same deterministic weights as the fixtures (weights_rule, from the torch state_dict's keys). Both
sides run in float64, so the comparison checks the architecture, not float32 rounding (which the
fixture tests cover): with these weights, train-mode BN over the tiny late feature maps is so
ill-conditioned that torch float32 itself is 1e-5 (ResNet-50) to 1 (MobileNetV2, batch 2) away
from float64.

Checked: state_dict keys and shapes (every architecture); then, for a set covering every family and
code path (bottlenecks, x4 projections in layer1, the ImageNet stem, VGG's pool3 at 64x64,
MobileNetV2's residual rules), eval and train logits, features, BN input statistics through the
taps (names in torch ``named_modules`` order), running stats after one train forward, and the exact
export back.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_fixtures as rf
import weights_rule
from dfkd_jax import models
from dfkd_jax.convert import naming
from dfkd_jax.models import hooks

torch = pytest.importorskip('torch')
import torch_classifiers  # noqa: E402  (needs torch)

ARCHS = [a for a in models.names('classifier') if not a.startswith('lenet') and a != 'wrn']
FORWARD = [('resnet50', 32), ('resnet8', 32), ('resnet8x4', 32), ('resnet18_imagenet', 64), ('wrn16_2', 32),
           ('wrn40_1', 32), ('vgg8', 64), ('vgg19', 32), ('mobilenetv2', 32)]


def _torch_model(arch, **kw):
  """The torch counterpart of ``arch`` with weights_rule weights, and its state_dict as numpy."""
  model = torch_classifiers.build(arch, **kw)
  sd = weights_rule.make_state_dict([(k, tuple(v.shape)) for k, v in model.state_dict().items()])
  model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()})
  return model, sd


def _flax_model(arch, sd, **kw):
  spec = models.get_spec(arch)
  model = models.create(arch, **kw)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + models.input_shape(arch)))
  return spec, model, naming.torch_to_flax(sd, abstract, spec.torch)


@pytest.mark.parametrize('arch', ARCHS)
def test_state_dict_layout_matches_torch(arch):
  tmodel, sd = _torch_model(arch)
  _, _, variables = _flax_model(arch, sd)  # raises listing every missing, unexpected or mis-shaped key
  flax_params = sum(math.prod(v.shape) for v in jax.tree.leaves(variables['params']))
  assert flax_params == sum(p.numel() for p in tmodel.parameters())


def _torch_reference(tmodel, x):
  """Eval logits/features, per-BN input (mean, biased var), train logits, running stats after it."""
  tmodel = tmodel.double()
  bn_modules = [(n, m) for n, m in tmodel.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
  bn_inputs = {}

  def record(name):
    def hook(module, args):
      bn_inputs[name] = (args[0].mean((0, 2, 3)), args[0].var((0, 2, 3), unbiased=False))
    return hook

  hooks = [m.register_forward_pre_hook(record(n)) for n, m in bn_modules]
  x = torch.from_numpy(x).double()
  with torch.no_grad():
    logits_eval, features = tmodel.eval()(x)
    for h in hooks:
      h.remove()
    logits_train, _ = tmodel.train()(x)
  running = {n: (m.running_mean, m.running_var) for n, m in bn_modules}
  return logits_eval, features, bn_inputs, logits_train, running


@pytest.mark.slow
@pytest.mark.parametrize('arch,size', FORWARD, ids=[a for a, _ in FORWARD])
def test_forward_matches_torch(arch, size):
  tmodel, sd = _torch_model(arch)
  spec, model, variables = _flax_model(arch, sd, **({'dropout_rate': 0.0} if arch == 'mobilenetv2' else {}))
  x = weights_rule.make_input((2, 3, size, size))
  with jax.enable_x64(True):
    _check_forward(arch, model, jax.tree.map(np.float64, variables), rf.nhwc(x).astype(np.float64),
                   _torch_reference(tmodel, x))
  back = naming.flax_to_torch(variables, spec.torch)
  assert set(back) == set(sd)
  for k in back:
    if not k.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def _check_forward(arch, model, variables, x, reference):
  logits_eval, features, bn_inputs, logits_train, running = reference
  errs = {}

  def check(actual, reference, name):
    errs[name] = rf.assert_close(actual, reference.numpy(), f'{arch} {name}')

  # jit compiles each pass once, faster on CPU than the eager per-op compilation.
  eval_pass = jax.jit(lambda v, x: hooks.apply_with_bn_taps(model, v, x, train=False, return_features=True))
  train_pass = jax.jit(lambda v, x: hooks.apply_with_bn_taps(model, v, x, train=True, mutable=['batch_stats']))
  (logits, feats), bn = eval_pass(variables, x)
  check(logits, logits_eval, 'logits_eval')
  check(feats, features, 'features_eval')
  assert [t.name for t in bn] == list(bn_inputs)
  for t in bn:
    check(t.mean, bn_inputs[t.name][0], f'bn_in_mean/{t.name}')
    check(t.var, bn_inputs[t.name][1], f'bn_in_var/{t.name}')
  (logits, state), bn = train_pass(variables, x)
  check(logits, logits_train, 'logits_train')
  for t, (mean, var) in zip(bn, hooks.running_stats(state, bn)):
    check(mean, running[t.name][0], f'running_mean/{t.name}')
    check(var, running[t.name][1], f'running_var/{t.name}')
  worst = max(errs, key=errs.get)
  print(f'\n{arch} ({x.shape[1]}x{x.shape[2]}, float64): worst relative error {errs[worst]:.3g} '
        f'({worst}; {len(errs)} arrays)')


@pytest.mark.slow
@pytest.mark.parametrize('arch,kw', [('mobilenetv2', {}), ('wrn10_1', {'dropout_rate': 0.3})])
def test_dropout_only_in_train_mode(arch, kw):
  """MobileNetV2's classifier Dropout(0.2) and WRN's optional dropout: off in eval, rng-driven in train."""
  _, sd = _torch_model(arch)
  name, extra = ('wrn', {'depth': 10}) if arch.startswith('wrn') else (arch, {})
  spec = models.get_spec(name)
  x = jnp.asarray(rf.nhwc(weights_rule.make_input((2, 3, 32, 32))))
  model = models.create(name, **extra, **kw)
  variables = naming.torch_to_flax(sd, jax.eval_shape(model.init, jax.random.key(0), x[:1]), spec.torch)
  jax.jit(model.apply)(variables, x)  # eval needs no 'dropout' rng
  train = jax.jit(lambda key: model.apply(variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': key})[0])
  assert not np.allclose(train(jax.random.key(0)), train(jax.random.key(1)))
