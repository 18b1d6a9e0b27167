import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_fixtures as rf
from dfkd_jax import models
from dfkd_jax.convert import naming


@pytest.mark.parametrize('fixture,arch', [('cmi__lenet5', 'lenet5'), ('cmi__lenet5_half', 'lenet5_half'),
                                          ('huawei__lenet5', 'lenet5'), ('huawei__lenet5_half', 'lenet5_half')])
def test_lenet_matches_reference(fixture, arch):
  doc, ref, sd = rf.load(fixture)
  spec = models.get_spec(arch)
  model = models.create(arch, num_classes=10)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  variables = naming.torch_to_flax(sd, abstract, spec.torch)
  x = rf.nhwc(ref['input'])
  logits, feats = model.apply(variables, x, train=False, return_features=True)
  rf.assert_close(logits, ref['logits_eval'], 'logits_eval')
  rf.assert_close(feats, ref['features_eval'], 'features_eval')
  rf.assert_close(model.apply(variables, x, train=True), ref['logits_train'], 'logits_train')
  # export back: canonical names, exact values
  back = naming.flax_to_torch(variables, spec.torch)
  canon = naming.canonical_keys(sd, spec.torch)
  assert set(back) == set(canon)
  for k in back:
    np.testing.assert_array_equal(back[k], canon[k])


def test_mismatch_lists_every_difference():
  doc, ref, sd = rf.load('cmi__lenet5')
  model = models.create('lenet5', num_classes=100)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  sd = dict(sd)
  sd.pop('features.0.bias')
  sd['extra.weight'] = np.zeros(3)
  with pytest.raises(naming.MismatchError) as e:
    naming.torch_to_flax(sd, abstract, models.get_spec('lenet5').torch)
  msg = str(e.value)
  assert 'features.0.bias' in msg and 'extra.weight' in msg and 'fc.2.weight' in msg
  assert '\n' not in msg
