"""Generators and super-resolution nets against the PyTorch references.

Fixtures (CMI Generator/LargeGenerator, original DAFL generator) are checked against the stored
reference outputs; the architectures without fixtures against small torch modules written in
tests/torch_generators.py from the reference structure, with the same deterministic weights: their
state_dict layout and outputs are committed (fixtures/torch_files/generators.npz, made by
``torch_reference``) and computed live in the ``torch`` group.
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
from dfkd_jax.errors import UserError
from dfkd_jax.models import generators, layers, vdsr


def _num_params(variables):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(variables['params']))


def _convert(arch, kw, sd, input_shape):
  spec = models.get_spec(arch)
  model = models.create(arch, **kw)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + tuple(input_shape)))
  return spec, model, naming.torch_to_flax(sd, abstract, spec.torch, layout_kw=kw)


def _assert_exports_back(spec, variables, kw, sd):
  back = naming.flax_to_torch(variables, spec.torch, layout_kw=kw)
  canon = naming.canonical_keys(sd, spec.torch)
  assert set(back) == set(canon)
  for k in back:
    if not k.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(back[k], canon[k], err_msg=k)


def _check(model, variables, x, out_eval, out_train, running, what):
  """Eval output, train output and post-train running stats; returns the worst relative error."""
  errs = [rf.assert_close(model.apply(variables, x, train=False), out_eval, f'{what} out_eval')]
  y, state = model.apply(variables, x, train=True, mutable=['batch_stats'])
  errs.append(rf.assert_close(y, out_train, f'{what} out_train'))
  for module, (mean, var) in running.items():
    stats = state['batch_stats'][module]
    errs.append(rf.assert_close(stats['mean'], mean, f'{what} running_mean/{module}'))
    errs.append(rf.assert_close(stats['var'], var, f'{what} running_var/{module}'))
  worst = max(errs)
  print(f'\n{what}: worst relative error {worst:.3g}')
  return worst


FIXTURES = [('cmi__generator', 'cmi_generator', dict(nz=256)),
            ('cmi__large_generator', 'cmi_large_generator', dict(nz=512)),
            ('huawei__dafl_generator_c1_nz100', 'dafl_generator', dict(nz=100, nc=1)),
            ('huawei__dafl_generator_c3_nz1000', 'dafl_generator', dict(nz=1000, nc=3))]


@pytest.mark.slow
@pytest.mark.parametrize('fixture,arch,kw', FIXTURES, ids=[f[0] for f in FIXTURES])
def test_generator_matches_fixture(fixture, arch, kw):
  doc, ref, sd = rf.load(fixture)
  assert models.input_shape(arch, **kw) == (kw['nz'],)
  spec, model, variables = _convert(arch, kw, sd, models.input_shape(arch, **kw))
  assert _num_params(variables) == doc['num_params']
  running = {m: (ref[f'bn_train_running_mean/{m}'], ref[f'bn_train_running_var/{m}']) for m in doc['bn_modules']}
  _check(model, variables, ref['input'], rf.nhwc(ref['out_eval']), rf.nhwc(ref['out_train']), running, fixture)
  _assert_exports_back(spec, variables, kw, sd)


def test_vdsr_param_counts():
  for arch, count in (('vdsr', 664_704), ('vdsr_half', 166_464)):
    model = models.create(arch)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + models.input_shape(arch)))
    assert _num_params(variables) == count
    assert models.get_spec(arch).kind == 'sr'


# --------------------------------------------------------------------------------------------
# Architectures without fixtures: torch modules following the reference structure.

def _nhwc_if_image(a):
  return rf.nhwc(a) if a.ndim == 4 else a


NO_FIXTURE = [
    ('cudfkd_d2', 'cudfkd_generator', dict(nz=64, ngf=16, d=2), lambda tg: tg.TorchCuDFKD(64, 16, 2)),
    ('cudfkd_d3', 'cudfkd_generator', dict(nz=64, ngf=8, d=3), lambda tg: tg.TorchCuDFKD(64, 8, 3)),
    ('nayer_chunks_exact', 'nayer_generator', dict(ngf=16, nl=3, sbz=8, le_emb_size=32, le_size=24),
     lambda tg: tg.TorchNoisyLayerGenerator(16, 3, 8, 32, 24)),
    ('nayer_rows_beyond_last', 'nayer_generator', dict(ngf=16, nl=3, sbz=6, le_emb_size=32, le_size=24),
     lambda tg: tg.TorchNoisyLayerGenerator(16, 3, 6, 32, 24)),
    ('nayer_empty_chunk', 'nayer_generator', dict(ngf=16, nl=3, sbz=12, le_emb_size=32, le_size=24),
     lambda tg: tg.TorchNoisyLayerGenerator(16, 3, 12, 32, 24)),
    ('dfad_generator', 'dfad_generator', dict(nz=256, nc=3), lambda tg: tg.TorchDaflLayout(256, 3, 32, 1e-5, False)),
    ('zskt_generator', 'zskt_generator', dict(nz=100), lambda tg: tg.TorchZskt(100)),
    # Defaults: latent 256, img_size 24 (input 48 at scale 2); then scale 4 (12 -> s = 3).
    ('dfsr_generator_24', 'dfsr_generator', dict(), lambda tg: tg.TorchDaflLayout(256, 1, 24, 0.8, True)),
    ('dfsr_generator_12', 'dfsr_generator', dict(img_size=12), lambda tg: tg.TorchDaflLayout(256, 1, 12, 0.8, True)),
    ('vdsr', 'vdsr', dict(), lambda tg: tg.TorchVDSR(64, 18)),
    ('vdsr_half', 'vdsr_half', dict(), lambda tg: tg.TorchVDSR(32, 18)),
]
_NEAREST = [(10, 1.6), (6, 1.7), (7, 1.3), (5, 2.5), (9, 0.7), (4, 2), (3, 3.0)]


def _case_input(arch, kw):
  """(NCHW or latent input, the model's input shape) of a NO_FIXTURE case."""
  shape = models.input_shape(arch, **kw)
  nchw = (shape[2], shape[0], shape[1]) if len(shape) == 3 else shape
  return weights_rule.make_input((8 if len(shape) == 1 else 2,) + tuple(nchw)), shape


def _module_outputs(module, x):
  """A torch module's state_dict layout, parameter count, and reference_outputs as values."""
  import torch_generators
  sd, out_eval, out_train, running = torch_generators.reference_outputs(module, x)
  return {**torch_files.layout_values(sd), 'num_params': np.array(sum(p.numel() for p in module.parameters())),
          'out_eval': out_eval, 'out_train': out_train,
          **{f'running_mean/{m}': mean for m, (mean, _) in running.items()},
          **{f'running_var/{m}': var for m, (_, var) in running.items()}}


def _torch_case(what, torch):
  """The values of NO_FIXTURE case ``what``, or of 'vdsr_half_depth4', 'upsample_nearest', 'instance_norm'."""
  import torch_generators as tg
  if what == 'vdsr_half_depth4':
    return _module_outputs(tg.TorchVDSR(32, 4), weights_rule.make_input((2, 1, 16, 16)))
  if what == 'upsample_nearest':
    return {f'{size},{factor}': tg.tnn.functional.interpolate(
        torch.from_numpy(weights_rule.make_input((1, 2, size, size + 1))), scale_factor=factor).numpy()
            for size, factor in _NEAREST}
  if what == 'instance_norm':
    return {'out': tg.tnn.functional.instance_norm(torch.from_numpy(weights_rule.make_input((2, 3, 5, 4))),
                                                   eps=0.8).numpy()}
  _, arch, kw, build = next(case for case in NO_FIXTURE if case[0] == what)
  return _module_outputs(build(tg), _case_input(arch, kw)[0])


def torch_reference(torch) -> dict:
  """Every case's values, '<case>/<name>' (committed as fixtures/torch_files/generators.npz by
  fixtures/make_torch_files.py)."""
  cases = [case[0] for case in NO_FIXTURE] + ['vdsr_half_depth4', 'upsample_nearest', 'instance_norm']
  return {f'{what}/{name}': value for what in cases for name, value in _torch_case(what, torch).items()}


def _reference(what, source):
  return torch_files.case_values('generators', what, source, functools.partial(_torch_case, what))


@pytest.mark.slow
@pytest.mark.parametrize('source', torch_files.SOURCES)
@pytest.mark.parametrize('what,arch,kw', [case[:3] for case in NO_FIXTURE], ids=[c[0] for c in NO_FIXTURE])
def test_matches_torch_module(source, what, arch, kw):
  ref = _reference(what, source)
  x, shape = _case_input(arch, kw)
  sd = weights_rule.make_state_dict(torch_files.layout(ref))
  spec, model, variables = _convert(arch, kw, sd, shape)
  assert _num_params(variables) == ref['num_params']
  running = {name[len('running_mean/'):]: (value, ref['running_var/' + name[len('running_mean/'):]])
             for name, value in ref.items() if name.startswith('running_mean/')}
  _check(model, variables, _nhwc_if_image(x), _nhwc_if_image(ref['out_eval']), _nhwc_if_image(ref['out_train']),
         running, what)
  _assert_exports_back(spec, variables, kw, sd)


@pytest.mark.parametrize('source', torch_files.SOURCES)
def test_vdsr_progressive_depth(source):
  """A num_blocks=d student equals the reference NetHalf(block_num=d), also when applied to the
  variables of a deeper student, and warm_start keeps the shallower student's blocks."""
  x = weights_rule.make_input((2, 1, 16, 16))
  ref = _reference('vdsr_half_depth4', source)
  sd, out_eval = weights_rule.make_state_dict(torch_files.layout(ref)), ref['out_eval']
  shallow = models.create('vdsr_half', num_blocks=4)
  _, _, small_vars = _convert('vdsr_half', dict(num_blocks=4), sd, (16, 16, 1))
  rf.assert_close(shallow.apply(small_vars, rf.nhwc(x)), rf.nhwc(out_eval), 'vdsr_half depth 4')
  deep = models.create('vdsr_half', num_blocks=7)
  fresh = deep.init(jax.random.key(1), jnp.zeros((1, 16, 16, 1)))
  grown = vdsr.warm_start(fresh, small_vars)
  for name in ('input', 'output', 'residual_layer.3.conv'):
    np.testing.assert_array_equal(grown['params'][name]['kernel'], small_vars['params'][name]['kernel'])
  np.testing.assert_array_equal(grown['params']['residual_layer.6.conv']['kernel'],
                                fresh['params']['residual_layer.6.conv']['kernel'])
  rf.assert_close(shallow.apply(grown, rf.nhwc(x)), rf.nhwc(out_eval), 'depth 4 on 7-block variables')


@pytest.mark.parametrize('source', torch_files.SOURCES)
@pytest.mark.parametrize('size,factor', _NEAREST)
def test_upsample_nearest_follows_torch_index_rule(source, size, factor):
  x = weights_rule.make_input((1, 2, size, size + 1))
  expected = _reference('upsample_nearest', source)[f'{size},{factor}']
  np.testing.assert_array_equal(layers.upsample_nearest(rf.nhwc(x), factor), rf.nhwc(expected))


@pytest.mark.parametrize('source', torch_files.SOURCES)
def test_instance_norm_matches_torch(source):
  x = weights_rule.make_input((2, 3, 5, 4))
  y = layers.InstanceNorm(epsilon=0.8).apply({}, rf.nhwc(x))
  rf.assert_close(y, rf.nhwc(_reference('instance_norm', source)['out']), 'instance_norm')


# --------------------------------------------------------------------------------------------
# Re-initialisation.

def _cmi_variables():
  model = models.create('cmi_generator')
  return model.init(jax.random.key(0), jnp.zeros((2, 256)))


@pytest.mark.slow
def test_reset_params_is_cmi_reset_model():
  variables = _cmi_variables()
  params = jax.jit(generators.reset_params)(variables['params'], jax.random.key(1))
  assert np.all(params['l1.0']['bias'] == 0) and np.all(params['conv_blocks.9']['bias'] == 0)
  assert abs(float(params['l1.0']['kernel'].std()) - 0.02) < 1e-3
  assert abs(float(params['conv_blocks.2']['kernel'].mean())) < 1e-3
  scale = params['conv_blocks.3']['scale']
  assert abs(float(scale.mean()) - 1.0) < 0.01 and 0.01 < float(scale.std()) < 0.03
  assert jax.tree.structure(params) == jax.tree.structure(variables['params'])


@pytest.mark.slow
def test_reset_l0_touches_only_the_first_layers():
  params = _cmi_variables()['params']
  new = generators.reset_l0(params, jax.random.key(2))
  assert abs(float(new['conv_blocks.0']['scale'].mean())) < 0.01
  assert np.all(new['conv_blocks.0']['bias'] == 0) and np.all(new['l1.0']['bias'] == 0)
  assert abs(float(new['l1.0']['kernel'].std()) - 0.02) < 1e-3
  for name in ('conv_blocks.2', 'conv_blocks.3', 'conv_blocks.9'):
    jax.tree.map(np.testing.assert_array_equal, new[name], params[name])
  drawn = generators.draw_reset_l0(params, jax.random.key(2))  # the replay seam: the drawn subtree alone
  assert sorted(drawn) == ['conv_blocks.0', 'l1.0']
  jax.tree.map(np.testing.assert_array_equal, generators.replace_params(params, drawn), new)
  with pytest.raises(UserError):
    generators.reset_params(params, jax.random.key(0), modules=('l2.0',))


@pytest.mark.slow
def test_redraw_noisy_layers():
  model = models.create('nayer_generator', ngf=16, nl=3, sbz=8, le_emb_size=32, le_size=24)
  params = model.init(jax.random.key(0), jnp.zeros((8, 24)))['params']
  redraw = jax.jit(generators.redraw_noisy_layers)
  a, b = redraw(params, jax.random.key(1)), redraw(params, jax.random.key(2))
  assert sorted(k for k in a if k.startswith('le1.')) == ['le1.0', 'le1.1', 'le1.2']
  for k in ('le1.0', 'le1.2'):
    assert abs(float(a[k]['kernel'].std()) - 1.0) < 0.1 and np.all(a[k]['bias'] == 0)
    assert not np.array_equal(a[k]['kernel'], b[k]['kernel'])
  for k in ('n1', 'l1.0', 'conv_blocks.2'):
    jax.tree.map(np.testing.assert_array_equal, a[k], params[k])
  drawn = jax.jit(generators.draw_noisy_layers)(params, jax.random.key(1))
  assert sorted(drawn) == ['le1.0', 'le1.1', 'le1.2']
  jax.tree.map(np.testing.assert_array_equal, generators.replace_params(params, drawn), a)
  with pytest.raises(UserError):
    generators.redraw_noisy_layers(_cmi_variables()['params'], jax.random.key(0))


def test_registry_entries():
  for name in ('cmi_generator', 'cmi_large_generator', 'cudfkd_generator', 'nayer_generator', 'dafl_generator',
               'dfad_generator', 'zskt_generator', 'dfsr_generator'):
    assert models.get_spec(name).kind == 'generator'
  assert models.input_shape('nayer_generator') == (512,)
  assert models.input_shape('cudfkd_generator') == (512,)
  with pytest.raises(UserError):
    models.create('cudfkd_generator', d=4)
