"""Access to the torch reference fixtures copied from ../shared/fixtures/torch_reference."""
import json
import os

import numpy as np

import weights_rule

DIR = os.path.join(os.path.dirname(__file__), 'fixtures', 'torch_reference')


def names():
  return sorted(f[:-5] for f in os.listdir(DIR) if f.endswith('.json'))


def load(name):
  """(doc, arrays, state_dict) of fixture ``name``; the state_dict is rebuilt from the key list."""
  with open(os.path.join(DIR, name + '.json')) as f:
    doc = json.load(f)
  arrays = dict(np.load(os.path.join(DIR, name + '.npz')))
  return doc, arrays, weights_rule.make_state_dict(doc['keys'])


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def assert_close(actual, reference, what, rtol=1e-5):
  """Relative error against max|reference| (the fixtures' contract); returns the error."""
  actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
  assert actual.shape == reference.shape, (what, actual.shape, reference.shape)
  scale = max(np.abs(reference).max(), 1e-12)
  err = float(np.abs(actual - reference).max() / scale)
  assert err <= rtol, f'{what}: relative error {err:.3g} > {rtol}'
  return err
