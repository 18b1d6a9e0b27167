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
export back. The torch side (layouts, parameter counts, outputs) is committed as
fixtures/torch_files/classifiers.npz (``torch_reference``) and computed live in the ``torch`` group.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_fixtures as rf
import torch_files
import weights_rule
from dfkd_jax import models
from dfkd_jax.convert import naming
from dfkd_jax.models import hooks

ARCHS = [a for a in models.names('classifier') if not a.startswith('lenet') and a != 'wrn']
FORWARD = [('resnet50', 32), ('resnet8', 32), ('resnet8x4', 32), ('resnet18_imagenet', 64), ('wrn16_2', 32),
           ('wrn40_1', 32), ('vgg8', 64), ('vgg19', 32), ('mobilenetv2', 32)]


def _torch_model(torch, arch):
  """The torch counterpart of ``arch`` with weights_rule weights."""
  import torch_classifiers
  model = torch_classifiers.build(arch)
  sd = weights_rule.make_state_dict([(k, tuple(v.shape)) for k, v in model.state_dict().items()])
  model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()})
  return model


def _flax_model(arch, sd, **kw):
  spec = models.get_spec(arch)
  model = models.create(arch, **kw)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + models.input_shape(arch)))
  return spec, model, naming.torch_to_flax(sd, abstract, spec.torch)


@pytest.mark.parametrize('source', torch_files.SOURCES)
@pytest.mark.parametrize('arch', ARCHS)
def test_state_dict_layout_matches_torch(source, arch):
  ref = _reference(arch, source, forward=False)
  _, _, variables = _flax_model(arch, _state_dict(ref))  # raises listing every missing, unexpected or mis-shaped key
  flax_params = sum(math.prod(v.shape) for v in jax.tree.leaves(variables['params']))
  assert flax_params == ref['num_params']


def _torch_outputs(torch, tmodel, x):
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
  values = {'logits_eval': logits_eval, 'features': features, 'logits_train': logits_train}
  for name, (mean, var) in bn_inputs.items():
    values[f'bn_in_mean/{name}'], values[f'bn_in_var/{name}'] = mean, var
  for name, m in bn_modules:
    values[f'running_mean/{name}'], values[f'running_var/{name}'] = m.running_mean, m.running_var
  return {name: value.numpy() for name, value in values.items()}


def _torch_case(arch, forward, torch):
  """``arch``'s torch state_dict layout and parameter count, and with ``forward`` its outputs on the
  FORWARD input size."""
  tmodel = _torch_model(torch, arch)
  values = {**torch_files.layout_values(tmodel.state_dict()),
            'num_params': np.array(sum(p.numel() for p in tmodel.parameters()))}
  if forward:
    values.update(_torch_outputs(torch, tmodel, _forward_input(arch)))
  return values


def _forward_input(arch):
  size = dict(FORWARD)[arch]
  return weights_rule.make_input((2, 3, size, size))


def torch_reference(torch) -> dict:
  """Every architecture's values, '<arch>/<name>' (committed as fixtures/torch_files/classifiers.npz by
  fixtures/make_torch_files.py)."""
  return {f'{arch}/{name}': value for arch in [*ARCHS, 'wrn10_1']  # wrn10_1: test_dropout_only_in_train_mode
          for name, value in _torch_case(arch, arch in dict(FORWARD), torch).items()}


def _reference(arch, source, forward):
  return torch_files.case_values('classifiers', arch, source, functools.partial(_torch_case, arch, forward))


def _state_dict(ref):
  return weights_rule.make_state_dict(torch_files.layout(ref))


@pytest.mark.slow
@pytest.mark.parametrize('source', torch_files.SOURCES)
@pytest.mark.parametrize('arch,size', FORWARD, ids=[a for a, _ in FORWARD])
def test_forward_matches_torch(source, arch, size):
  ref = _reference(arch, source, forward=True)
  sd = _state_dict(ref)
  spec, model, variables = _flax_model(arch, sd, **({'dropout_rate': 0.0} if arch == 'mobilenetv2' else {}))
  x = _forward_input(arch)
  assert x.shape[2:] == (size, size)
  with jax.enable_x64(True):
    _check_forward(arch, model, jax.tree.map(np.float64, variables), rf.nhwc(x).astype(np.float64), ref)
  back = naming.flax_to_torch(variables, spec.torch)
  assert set(back) == set(sd)
  for k in back:
    if not k.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def _check_forward(arch, model, variables, x, ref):
  errs = {}

  def check(actual, reference, name):
    errs[name] = rf.assert_close(actual, reference, f'{arch} {name}')

  # jit compiles each pass once, faster on CPU than the eager per-op compilation.
  eval_pass = jax.jit(lambda v, x: hooks.apply_with_bn_taps(model, v, x, train=False, return_features=True))
  train_pass = jax.jit(lambda v, x: hooks.apply_with_bn_taps(model, v, x, train=True, mutable=['batch_stats']))
  (logits, feats), bn = eval_pass(variables, x)
  check(logits, ref['logits_eval'], 'logits_eval')
  check(feats, ref['features'], 'features_eval')
  assert [t.name for t in bn] == [name[len('bn_in_mean/'):] for name in ref if name.startswith('bn_in_mean/')]
  for t in bn:
    check(t.mean, ref[f'bn_in_mean/{t.name}'], f'bn_in_mean/{t.name}')
    check(t.var, ref[f'bn_in_var/{t.name}'], f'bn_in_var/{t.name}')
  (logits, state), bn = train_pass(variables, x)
  check(logits, ref['logits_train'], 'logits_train')
  for t, (mean, var) in zip(bn, hooks.running_stats(state, bn)):
    check(mean, ref[f'running_mean/{t.name}'], f'running_mean/{t.name}')
    check(var, ref[f'running_var/{t.name}'], f'running_var/{t.name}')
  worst = max(errs, key=errs.get)
  print(f'\n{arch} ({x.shape[1]}x{x.shape[2]}, float64): worst relative error {errs[worst]:.3g} '
        f'({worst}; {len(errs)} arrays)')


@pytest.mark.slow
@pytest.mark.parametrize('source', torch_files.SOURCES)
@pytest.mark.parametrize('arch,kw', [('mobilenetv2', {}), ('wrn10_1', {'dropout_rate': 0.3})])
def test_dropout_only_in_train_mode(source, arch, kw):
  """MobileNetV2's classifier Dropout(0.2) and WRN's optional dropout: off in eval, rng-driven in train."""
  sd = _state_dict(_reference(arch, source, forward=False))
  name, extra = ('wrn', {'depth': 10}) if arch.startswith('wrn') else (arch, {})
  spec = models.get_spec(name)
  x = jnp.asarray(rf.nhwc(weights_rule.make_input((2, 3, 32, 32))))
  model = models.create(name, **extra, **kw)
  variables = naming.torch_to_flax(sd, jax.eval_shape(model.init, jax.random.key(0), x[:1]), spec.torch)
  jax.jit(model.apply)(variables, x)  # eval needs no 'dropout' rng
  train = jax.jit(lambda key: model.apply(variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': key})[0])
  assert not np.allclose(train(jax.random.key(0)), train(jax.random.key(1)))
