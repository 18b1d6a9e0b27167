"""torch modules with the reference module names, and the files test_convert.py reads: each reference
fixture's weights (weights_rule) written by torch in the formats the references use. Written once by
fixtures/make_torch_files.py; the torch group of test_convert.py also loads exported files into these
modules. Needs torch.
"""
import collections
import os
import sys
import types

import numpy as np
import torch

import reference_fixtures as rf
import torch_classifiers
import torch_generators

tnn = torch.nn


class _LeNet5(tnn.Module):
  """The Huawei DAFL ``lenet.LeNet5`` layout: conv1..conv3, fc1, fc2 with their ReLU/pool modules."""
  widths = (6, 16, 120, 84)

  def __init__(self):
    super().__init__()
    c1, c2, c3, f = self.widths
    self.conv1, self.relu1, self.maxpool1 = tnn.Conv2d(1, c1, 5), tnn.ReLU(), tnn.MaxPool2d(2, 2)
    self.conv2, self.relu2, self.maxpool2 = tnn.Conv2d(c1, c2, 5), tnn.ReLU(), tnn.MaxPool2d(2, 2)
    self.conv3, self.relu3 = tnn.Conv2d(c2, c3, 5), tnn.ReLU()
    self.fc1, self.relu4, self.fc2 = tnn.Linear(c3, f), tnn.ReLU(), tnn.Linear(f, 10)

  def forward(self, img):
    x = self.maxpool1(self.relu1(self.conv1(img)))
    x = self.maxpool2(self.relu2(self.conv2(x)))
    x = self.relu3(self.conv3(x)).view(img.shape[0], -1)
    return self.fc2(self.relu4(self.fc1(x)))


class LeNet5(_LeNet5):
  __module__, __qualname__ = 'lenet', 'LeNet5'  # pickled as the reference's lenet.LeNet5


class LeNet5Half(_LeNet5):
  __module__, __qualname__ = 'lenet', 'LeNet5Half'
  widths = (3, 8, 60, 42)


class CmiLeNet5(tnn.Module):
  """CMI-fw ``lenet.py`` naming: ``features`` and ``fc`` Sequentials."""

  def __init__(self, half=False):
    super().__init__()
    c1, c2, c3, f = (3, 8, 60, 42) if half else (6, 16, 120, 84)
    self.features = tnn.Sequential(tnn.Conv2d(1, c1, 5), tnn.ReLU(), tnn.MaxPool2d(2, 2), tnn.Conv2d(c1, c2, 5),
                                   tnn.ReLU(), tnn.MaxPool2d(2, 2), tnn.Conv2d(c2, c3, 5), tnn.ReLU())
    self.fc = tnn.Sequential(tnn.Linear(c3, f), tnn.ReLU(), tnn.Linear(f, 10))

  def forward(self, img):
    return self.fc(self.features(img).view(img.shape[0], -1))


class CmiGenerator(tnn.Module):
  """CMI-fw ``Generator`` / ``LargeGenerator``: ``l1`` Linear -> view(N, C, 8, 8) -> ``conv_blocks``."""

  def __init__(self, nz, widths):
    super().__init__()
    self.c = widths[0]
    self.l1 = tnn.Sequential(tnn.Linear(nz, self.c * 8 * 8))
    self.conv_blocks = torch_generators._torch_cmi_stack(widths, 3)

  def forward(self, z):
    return self.conv_blocks(self.l1(z).view(z.shape[0], self.c, 8, 8))


def torch_module(name, arch, sizes, canonical=False):
  """A torch module with the state_dict names of fixture ``name``'s reference class (``canonical``:
  of the registry's canonical naming, which differs for the Huawei LeNets)."""
  doc = rf.load(name)[0]
  if name.startswith('huawei__lenet5') and not canonical:
    return LeNet5Half() if name.endswith('half') else LeNet5()
  if arch.startswith('lenet5'):
    return CmiLeNet5(half=name.endswith('half'))
  if name.startswith('huawei__dafl_generator'):
    return torch_generators.TorchDaflLayout(doc['input_shape'][1], sizes['nc'], 32, 0.8, False)
  if arch == 'cmi_generator':
    return CmiGenerator(256, (128, 128, 64))
  if arch == 'cmi_large_generator':
    return CmiGenerator(512, (256, 128, 64))
  return torch_classifiers.build(arch, num_classes=doc['num_classes'])


def _torch_state_dict(sd):
  return collections.OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in sd.items())


def loaded(name, arch, sizes, state_dict=None, canonical=False):
  """torch_module(...) with ``state_dict`` (default: the fixture's weights), strict, in eval mode."""
  module = torch_module(name, arch, sizes, canonical)
  module.load_state_dict(_torch_state_dict(rf.load(name)[2]) if state_dict is None else state_dict, strict=True)
  return module.eval()


def _torch_save_module(module, path, legacy):
  # Pickling lenet.LeNet5 needs a module 'lenet' that holds the class, as the reference run had.
  lenet = types.ModuleType('lenet')
  lenet.__file__ = __file__
  lenet.LeNet5, lenet.LeNet5Half = LeNet5, LeNet5Half
  sys.modules['lenet'] = lenet
  try:
    torch.save(module, path, _use_new_zipfile_serialization=not legacy)
  finally:
    del sys.modules['lenet']


def write_file(name, arch, sizes, fmt, path):
  """Fixture ``name``'s weights written by torch in format ``fmt``."""
  sd = _torch_state_dict(rf.load(name)[2])
  if fmt == 'state_dict':
    torch.save(sd, path)
  elif fmt == 'legacy':
    torch.save(sd, path, _use_new_zipfile_serialization=False)
  elif fmt == 'module_prefix':
    torch.save(collections.OrderedDict((f'module.{k}', v) for k, v in sd.items()), path)
  elif fmt == 'checkpoint':  # train_scratch.py of CMI-fw
    first = next(iter(sd.values()))
    torch.save({'epoch': 200, 'arch': arch, 'state_dict': sd, 'best_acc1': 95.7,
                'optimizer': {'state': {0: {'momentum_buffer': torch.zeros_like(first)}},
                              'param_groups': [{'lr': 0.1, 'momentum': 0.9, 'params': [0]}]},
                'scheduler': {'last_epoch': 200}}, path)
  elif fmt.startswith('pickled_'):
    module = loaded(name, arch, sizes)
    _torch_save_module(tnn.DataParallel(module) if fmt == 'pickled_data_parallel' else module, path,
                       legacy=fmt.endswith('legacy'))
  else:
    raise KeyError(fmt)
  return path


class _Payload:
  """Unpickles as ``os.system('touch armed')``: creates ``armed`` in the working directory."""

  def __reduce__(self):
    return os.system, ('touch armed',)


def write_malicious(path):
  """A training checkpoint whose state_dict is a payload, written by torch.save."""
  torch.save({'state_dict': _Payload()}, path)
  return path
