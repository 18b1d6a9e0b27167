"""dfkd_jax.convert.torch_pickle: reading every torch.save layout and content the reference repos
produce, refusing pickles that would run code, and writing files torch.load reads back exactly.

The files torch writes (``write_torch_files``) are read from the copies fixtures/make_torch_files.py
committed, and, in the ``torch`` group, from files the installed torch writes at run time; reading
ours back with torch is in the ``torch`` group only. The loader never imports torch.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import pathlib
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import warnings
import zipfile
from typing import Mapping

import numpy as np
import pytest

import torch_files
import weights_rule
from dfkd_jax.convert import torch_pickle
from dfkd_jax.errors import UserError

FIXTURE_DIR = os.path.join(os.path.dirname(__file__), 'fixtures', 'torch_reference')
FIXTURE_NAMES = sorted(f[:-len('.json')] for f in os.listdir(FIXTURE_DIR) if f.endswith('.json'))
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {'zip': True, 'legacy': False}  # torch.save's _use_new_zipfile_serialization


@pytest.fixture
def torch():
  return pytest.importorskip('torch')


def write_torch_files(torch, directory: pathlib.Path) -> dict[str, dict[str, np.ndarray]]:
  """Writes every torch-written file these tests read into ``directory``; returns file name -> the
  state_dict load_state_dict must give (empty for files it must refuse). Committed gzipped."""
  torch.manual_seed(0)
  written = {}
  for write in (_write_state_dicts, _write_legacy_views, _write_pickled_modules, _write_payloads,
                _write_foreign_kinds):
    written.update(write(torch, directory))
  return {name: {k: _as_numpy(v) for k, v in state_dict.items()} for name, state_dict in written.items()}


@pytest.fixture(scope='module', params=torch_files.SOURCES)
def torch_written(request, tmp_path_factory):
  """(directory, write_torch_files' answer): the committed files, or (the torch group) written now."""
  if request.param == 'torch':
    directory = tmp_path_factory.mktemp('torch_written')
    return directory, write_torch_files(torch_files.import_torch(), directory)
  directory = tmp_path_factory.mktemp('committed')
  torch_files.gunzip_all(torch_files.path('torch_pickle'), directory)
  state_dicts = collections.defaultdict(dict)  # the distinct ones, stored once
  for name, value in torch_files.load_values('torch_pickle').items():
    file, key = name.split('/', 1)
    state_dicts[file][key] = value
  return directory, {file: {prefix + k: v for k, v in state_dicts[source].items()}
                     for file, (source, prefix) in torch_files.load_json('torch_pickle').items()}


def _as_numpy(tensor) -> np.ndarray:
  """What the loader should give for ``tensor``: its values, bfloat16 widened to float32."""
  tensor = tensor.detach()
  return (tensor.float() if str(tensor.dtype) == 'torch.bfloat16' else tensor).numpy()


def _assert_same(loaded: dict, expected: Mapping) -> None:
  """Same keys in the same order, and per key the same dtype, shape and values."""
  assert list(loaded) == list(expected)
  for key, value in expected.items():
    value = value if isinstance(value, np.ndarray) else _as_numpy(value)
    assert (loaded[key].dtype, loaded[key].shape) == (value.dtype, value.shape), key
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def _assert_one_line_error(error: pytest.ExceptionInfo, path, *fragments: str) -> None:
  message = str(error.value)
  assert '\n' not in message and str(path) in message, message
  for fragment in fragments:
    assert fragment in message, message


# --- state_dicts in both layouts, wrapped and prefixed -------------------------------------------

def _mixed_state_dict(torch) -> collections.OrderedDict:
  """Every supported dtype, plus views that share, stride and offset into one storage."""
  generator = torch.Generator().manual_seed(0)
  base = torch.randn(4, 6, generator=generator)
  tagged = torch.randn(2, generator=generator)
  tagged.note = 'a Python attribute, so torch pickles it with _rebuild_from_type_v2'
  return collections.OrderedDict([
      ('conv1.weight', torch.randn(3, 2, 3, 3, generator=generator)),
      ('bn1.running_mean', torch.randn(3, generator=generator)),
      ('bn1.num_batches_tracked', torch.tensor(100)),
      ('half', torch.randn(5, generator=generator).half()),
      ('bfloat16', torch.randn(2, 3, generator=generator).bfloat16()),
      ('double', torch.randn(3, generator=generator, dtype=torch.float64)),
      ('int32', torch.arange(-3, 3, dtype=torch.int32)),
      ('int16', torch.arange(-3, 3, dtype=torch.int16)),
      ('int8', torch.arange(-3, 3, dtype=torch.int8)),
      ('uint8', torch.arange(250, 256, dtype=torch.uint8)),
      ('mask', torch.tensor([True, False, True])),
      ('base', base),
      ('transposed', base.t()),
      ('window', base[1:3, 2:5]),
      ('row', base[3]),
      ('expanded', torch.arange(3.0).expand(2, 3)),
      ('scalar', torch.tensor(2.5)),
      ('empty', torch.zeros(0, 3)),
      ('tagged', tagged),
  ])


def _optimizer_and_scheduler_state(torch) -> dict:
  """What a training checkpoint stores next to the weights, tensors included."""
  weight = torch.nn.Parameter(torch.ones(3))
  optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
  weight.sum().backward()
  optimizer.step()
  scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10)
  return {'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict()}


PREFIXES = {'plain': '', 'prefixed': 'module.'}
WRAPPINGS = ('raw', *torch_pickle.STATE_DICT_ENTRIES)


def _state_dict_file(layout, prefix, wrapping):
  return f'state_dict-{layout}-{prefix}-{wrapping}.pth'


def _write_state_dicts(torch, directory) -> dict:
  written = {}
  for layout, prefix, wrapping in ((a, b, c) for a in LAYOUTS for b in PREFIXES for c in WRAPPINGS):
    state_dict = collections.OrderedDict((PREFIXES[prefix] + k, v) for k, v in _mixed_state_dict(torch).items())
    if wrapping == 'raw':
      checkpoint = state_dict
    else:  # the train_scratch.py layout: metadata, then weights, then optimizer tensors to ignore
      checkpoint = {'epoch': 3, 'arch': 'resnet34', wrapping: state_dict, 'best_acc1': np.float64(91.5),
                    'args': argparse.Namespace(lr=0.1, milestones={100, 150}), 'commit': b'\x00\xff',
                    **_optimizer_and_scheduler_state(torch)}
    name = _state_dict_file(layout, prefix, wrapping)
    torch.save(checkpoint, directory / name, _use_new_zipfile_serialization=LAYOUTS[layout])
    written[name] = state_dict
  return written


@pytest.mark.slow
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('prefix', PREFIXES)
@pytest.mark.parametrize('wrapping', WRAPPINGS)
def test_state_dict_round_trip(torch_written, layout, prefix, wrapping):
  directory, expected = torch_written
  name = _state_dict_file(layout, prefix, wrapping)
  assert all(k.startswith(PREFIXES[prefix]) for k in expected[name])
  _assert_same(torch_pickle.load_state_dict(directory / name), expected[name])


def test_tensor_with_attributes_uses_rebuild_from_type(torch_written):
  path = torch_written[0] / _state_dict_file('zip', 'plain', 'raw')
  with zipfile.ZipFile(path) as archive:
    data_pkl = archive.read(next(n for n in archive.namelist() if n.endswith('/data.pkl')))
  assert b'_rebuild_from_type_v2' in data_pkl  # so the round trip above covers it


def _legacy_file_with_storage_views(torch, path) -> None:
  """A torch < 0.4 style legacy file: tensors on views into a CUDA-typed root storage."""
  root = np.arange(10, dtype=np.float32)

  class StorageRef:
    def __init__(self, view):
      self.view = view

  class Tensor:
    def __init__(self, storage, offset, size, stride):
      self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
      return torch._utils._rebuild_tensor_v2, self.args

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, StorageRef):
        return ('storage', torch.cuda.FloatStorage, 'root', 'cuda:0', root.size, obj.view)
      return None

  whole, middle = StorageRef(None), StorageRef(('view', 2, 6))
  checkpoint = collections.OrderedDict([('whole', Tensor(whole, 1, (3,), (2,))),
                                        ('middle', Tensor(middle, 1, (2, 2), (1, 2)))])
  with open(path, 'wb') as file:
    for header in (torch_pickle.LEGACY_MAGIC_NUMBER, torch_pickle.LEGACY_PROTOCOL_VERSION,
                   {'protocol_version': 1001, 'little_endian': True,
                    'type_sizes': {'short': 2, 'int': 4, 'long': 4}}):
      pickle.dump(header, file, protocol=2)
    Pickler(file, protocol=2).dump(checkpoint)
    pickle.dump(['root'], file, protocol=2)
    file.write(struct.pack('<q', root.size) + root.tobytes())


def _write_legacy_views(torch, directory) -> dict:
  _legacy_file_with_storage_views(torch, directory / 'legacy_views.pth')
  return {'legacy_views.pth': torch.load(directory / 'legacy_views.pth', map_location='cpu', weights_only=False)}


def test_legacy_storage_views_and_cuda_storage_types(torch_written):
  directory, expected = torch_written
  loaded = torch_pickle.load_state_dict(directory / 'legacy_views.pth')
  _assert_same(loaded, expected['legacy_views.pth'])
  np.testing.assert_array_equal(loaded['middle'], [[3, 5], [4, 6]])


def test_big_endian_zip(tmp_path):
  """Zip files record their byte order; 'big' files are read by swapping."""
  little, big = tmp_path / 'little.pth', tmp_path / 'big.pth'
  expected = {'w': np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), 'n': np.array(100, np.int64)}
  torch_pickle.save_state_dict(little, expected)
  with zipfile.ZipFile(little) as source, zipfile.ZipFile(big, 'w') as target:
    for name in source.namelist():
      data = source.read(name)
      if name.endswith('byteorder'):
        data = b'big'
      elif name.endswith('data/0'):
        data = np.frombuffer(data, '<f4').astype('>f4').tobytes()
      elif name.endswith('data/1'):
        data = np.frombuffer(data, '<i8').astype('>i8').tobytes()
      target.writestr(name, data)
  _assert_same(torch_pickle.load_state_dict(big), expected)


# --- whole pickled modules (torch.save(net), as the huawei repos save teachers) ------------------

USER_MODULES = {
    'lenet': '''
        import torch
        import torch.nn as nn

        class LeNet5(nn.Module):
          def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 6, 5)
            self.bn1 = nn.BatchNorm2d(6)
            self.conv2 = nn.Conv2d(6, 16, 5, bias=False)
            self.fc = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Sequential(nn.Linear(12, 10)))
            self.register_buffer('scratch', torch.zeros(2), persistent=False)
            self.register_buffer('unset', None)
            self.device = torch.device('cpu')
            self.conv1.weight.tag = 'so that torch pickles it with _rebuild_parameter_with_state'
        ''',
    'resnet': '''
        import torch.nn as nn

        class BasicBlock(nn.Module):
          def __init__(self, in_planes, planes, stride=1):
            super().__init__()
            self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.shortcut = nn.Sequential()
            if stride != 1 or in_planes != planes:
              self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

        class ResNet(nn.Module):
          def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(4)
            self.layer1 = nn.Sequential(BasicBlock(4, 4), BasicBlock(4, 4))
            self.layer2 = nn.Sequential(BasicBlock(4, 8, 2), BasicBlock(8, 8))
            self.linear = nn.Linear(8, 10)
        ''',
}
USER_CLASSES = {'lenet': 'LeNet5', 'resnet': 'ResNet'}


class UserNets:
  """Nets of USER_MODULES (no forward: only their structure is pickled), built from module files that
  are never on sys.path; ``save`` puts their modules in sys.modules only while torch.save pickles (it
  checks the classes are importable)."""

  def __init__(self, torch, directory):
    self.torch, self.modules, self.nets = torch, {}, {}
    for name, source in USER_MODULES.items():
      assert name not in sys.modules
      (directory / f'{name}.py').write_text(textwrap.dedent(source))
      spec = importlib.util.spec_from_file_location(name, directory / f'{name}.py')
      self.modules[name] = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(self.modules[name])
      net = getattr(self.modules[name], USER_CLASSES[name])().train()
      for module in net.modules():  # move BN running stats and num_batches_tracked off their init
        if isinstance(module, torch.nn.BatchNorm2d):
          module(torch.randn(2, module.num_features, 4, 4))
      self.nets[name] = net

  def save(self, obj, path, layout='zip'):
    sys.modules.update(self.modules)
    try:
      self.torch.save(obj, path, _use_new_zipfile_serialization=LAYOUTS[layout])
    finally:
      for name in self.modules:
        del sys.modules[name]


MODULE_WRAPPINGS = {'module': 'module', 'DataParallel': 'DataParallel', "{'model': module}": 'dict'}


def _module_file(layout, name, wrapping):
  return f'module-{layout}-{name}-{MODULE_WRAPPINGS[wrapping]}'


def _write_pickled_modules(torch, directory) -> dict:
  """The USER_MODULES nets, plain, in DataParallel or in a dict, as torch.save(net) writes them."""
  written = {}
  with tempfile.TemporaryDirectory() as sources:
    user_nets = UserNets(torch, pathlib.Path(sources))
    for layout, name, wrapping in ((a, b, c) for a in LAYOUTS for b in USER_MODULES for c in MODULE_WRAPPINGS):
      net = user_nets.nets[name]
      checkpoint = {'module': net, 'DataParallel': torch.nn.DataParallel(net),
                    "{'model': module}": {'model': net, 'epoch': 1}}[wrapping]
      user_nets.save(checkpoint, directory / _module_file(layout, name, wrapping), layout)
      written[_module_file(layout, name, wrapping)] = (checkpoint if wrapping == 'DataParallel' else net).state_dict()
  return written


@pytest.mark.slow
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('name', USER_MODULES)
@pytest.mark.parametrize('wrapping', MODULE_WRAPPINGS)
def test_pickled_module(torch_written, layout, name, wrapping):
  directory, expected = torch_written
  expected = expected[_module_file(layout, name, wrapping)]
  assert any(k.startswith('module.') for k in expected) == (wrapping == 'DataParallel')
  _assert_same(torch_pickle.load_state_dict(directory / _module_file(layout, name, wrapping)), expected)
  assert name not in sys.modules


def test_pickled_module_uses_parameter_with_state(torch_written):
  path = torch_written[0] / _module_file('zip', 'lenet', 'module')
  with zipfile.ZipFile(path) as archive:
    data_pkl = archive.read(next(n for n in archive.namelist() if n.endswith('/data.pkl')))
  assert b'_rebuild_parameter_with_state' in data_pkl and b'lenet' in data_pkl


# --- the reference fixtures' key patterns ---------------------------------------------------------

@pytest.mark.parametrize('name', FIXTURE_NAMES)
def test_fixture_keys_round_trip(tmp_path, name):
  with open(os.path.join(FIXTURE_DIR, name + '.json')) as f:
    state_dict = weights_rule.make_state_dict(json.load(f)['keys'])
  path = tmp_path / 'weights.pth'
  torch_pickle.save_state_dict(path, state_dict)
  _assert_same(torch_pickle.load_state_dict(path), state_dict)


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize('name', FIXTURE_NAMES)
def test_fixture_keys_with_torch(torch, tmp_path, name):
  """torch reads our file exactly, and we read torch's legacy files with the ``module.`` prefix."""
  with open(os.path.join(FIXTURE_DIR, name + '.json')) as f:
    state_dict = weights_rule.make_state_dict(json.load(f)['keys'])
  ours, theirs = tmp_path / 'ours.pth', tmp_path / 'theirs.pth'
  torch_pickle.save_state_dict(ours, state_dict)
  reread = torch.load(ours, weights_only=True)
  assert type(reread) is collections.OrderedDict
  _assert_same({k: _as_numpy(v) for k, v in reread.items()}, state_dict)
  torch.save({'state_dict': collections.OrderedDict(
      ('module.' + k, torch.from_numpy(v)) for k, v in state_dict.items())}, theirs,
             _use_new_zipfile_serialization=False)
  loaded = torch_pickle.load_state_dict(theirs)
  _assert_same({k.removeprefix('module.'): v for k, v in loaded.items()}, state_dict)


# --- writing --------------------------------------------------------------------------------------

def _saveable_arrays() -> dict:
  ml_dtypes = pytest.importorskip('ml_dtypes')
  rng = np.random.default_rng(0)
  base = rng.standard_normal((4, 6)).astype(np.float32)
  return {
      'layer.weight': base, 'transposed': base.T, 'strided': base[::2, 1::2],
      'double': rng.standard_normal(3), 'half': rng.standard_normal(3).astype(np.float16),
      'bfloat16': rng.standard_normal(3).astype(ml_dtypes.bfloat16),
      'bn.num_batches_tracked': np.array(100, np.int64), 'int32': np.arange(3, dtype=np.int32),
      'int16': np.arange(3, dtype=np.int16), 'int8': np.arange(-2, 1, dtype=np.int8),
      'uint8': np.arange(3, dtype=np.uint8), 'mask': np.array([True, False]),
      'big_endian': np.arange(3, dtype='>f4'), 'empty': np.zeros((0, 2), np.float32),
  }


def _expected_after_load(arrays: dict) -> dict:
  return {k: v.astype(np.float32) if v.dtype.name == 'bfloat16' else v.astype(v.dtype.newbyteorder('='))
          for k, v in arrays.items()}


def test_save_then_load(tmp_path):
  path = tmp_path / 'student.pth'
  arrays = _saveable_arrays()
  torch_pickle.save_state_dict(path, arrays)
  _assert_same(torch_pickle.load_state_dict(path), _expected_after_load(arrays))
  with zipfile.ZipFile(path) as archive, open(path, 'rb') as raw:
    for info in archive.infolist():  # every record's data starts 64-byte aligned, as torch writes
      raw.seek(info.header_offset + 26)
      name_length, extra_length = struct.unpack('<HH', raw.read(4))
      assert (info.header_offset + 30 + name_length + extra_length) % 64 == 0, info.filename
      assert info.compress_type == zipfile.ZIP_STORED
  assert not os.path.exists(str(path) + '.partial')


@pytest.mark.torch
@pytest.mark.parametrize('mmap', [False, True])
def test_torch_reads_saved_file(torch, tmp_path, mmap):
  path = tmp_path / 'student.pth'
  arrays = _saveable_arrays()
  torch_pickle.save_state_dict(path, arrays)
  reread = torch.load(path, weights_only=True, mmap=mmap)
  assert type(reread) is collections.OrderedDict
  assert str(reread['bfloat16'].dtype) == 'torch.bfloat16'
  _assert_same({k: _as_numpy(v) for k, v in reread.items()}, _expected_after_load(arrays))


@pytest.mark.parametrize('state_dict', [{'complex': np.zeros(2, np.complex64)},
                                        {'object': np.array([None])}, {3: np.zeros(2)}])
def test_save_rejects_what_torch_cannot_hold(tmp_path, state_dict):
  with pytest.raises(UserError) as error:
    torch_pickle.save_state_dict(tmp_path / 'x.pth', state_dict)
  _assert_one_line_error(error, tmp_path / 'x.pth')
  assert not os.listdir(tmp_path)


# --- refusing pickles that would run code ---------------------------------------------------------

class _Call:
  """Pickles as ``func(*args)``, the way a malicious ``__reduce__`` does."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


def _payloads(marker) -> dict:
  """name -> (object whose unpickling would create ``marker``, the global the refusal names)."""
  return {
      'os.system': (_Call(os.system, f'touch {marker}'), f'{os.system.__module__}.system'),
      'eval': (_Call(eval, f'open({str(marker)!r}, "w").close()'), 'builtins.eval'),
      'subprocess.Popen': (_Call(subprocess.Popen, ['touch', str(marker)]), 'subprocess.Popen'),
      'getattr(__import__)': (_Call(getattr, _Call(__import__, 'os'), 'system'), 'builtins.__import__'),
      'nested in a checkpoint': ({'state_dict': {}, 'optimizer': {'state': {0: [_Call(
          os.system, f'touch {marker}')]}}}, f'{os.system.__module__}.system'),
  }


def _write_zip_checkpoint(path, data_pkl: bytes) -> None:
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', data_pkl)
    archive.writestr('archive/version', '3\n')


def _legacy_headers() -> list[bytes]:
  return [pickle.dumps(torch_pickle.LEGACY_MAGIC_NUMBER, protocol=2),
          pickle.dumps(torch_pickle.LEGACY_PROTOCOL_VERSION, protocol=2),
          pickle.dumps({'protocol_version': 1001, 'little_endian': True,
                        'type_sizes': {'short': 2, 'int': 4, 'long': 4}}, protocol=2)]


def _write_legacy_checkpoint(path, data_pkl: bytes, payload_header: int | None = None) -> None:
  """A legacy file whose object pickle is ``data_pkl`` (or whose header ``payload_header`` is)."""
  pickles = _legacy_headers() + [pickle.dumps(collections.OrderedDict(), protocol=2),
                                 pickle.dumps([], protocol=2)]
  pickles[3 if payload_header is None else payload_header] = data_pkl
  with open(path, 'wb') as file:
    file.write(b''.join(pickles))


@pytest.mark.parametrize('protocol', [2, 5])
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('payload', _payloads('unused'))
def test_malicious_pickle_is_refused(tmp_path, payload, layout, protocol):
  marker = tmp_path / 'pwned'
  obj, global_name = _payloads(marker)[payload]
  path = tmp_path / 'evil.pth'
  write = _write_zip_checkpoint if layout == 'zip' else _write_legacy_checkpoint
  write(path, pickle.dumps(obj, protocol=protocol))
  with pytest.raises(torch_pickle.UnsafeCheckpointError) as error:
    torch_pickle.load_state_dict(path)
  _assert_one_line_error(error, path, f'calls {global_name},')
  assert not marker.exists()


@pytest.mark.parametrize('header', [0, 1, 2])
def test_malicious_legacy_header_is_refused(tmp_path, header):
  marker = tmp_path / 'pwned'
  path = tmp_path / 'evil.pth'
  _write_legacy_checkpoint(path, pickle.dumps(_Call(os.system, f'touch {marker}'), protocol=2), header)
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match='system'):
    torch_pickle.load_state_dict(path)
  assert not marker.exists()


def _write_payloads(torch, directory) -> dict:
  """A state_dict with a payload (``touch pwned`` in the working directory) next to a tensor."""
  for layout, new_zipfile in LAYOUTS.items():
    state_dict = collections.OrderedDict(weight=torch.ones(2), extra=_Call(os.system, 'touch pwned'))
    torch.save(state_dict, directory / f'payload-{layout}.pth', _use_new_zipfile_serialization=new_zipfile)
  return {}


@pytest.mark.parametrize('layout', LAYOUTS)
def test_payload_next_to_real_tensors_is_refused(torch_written, tmp_path, monkeypatch, layout):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match='system'):
    torch_pickle.load_state_dict(torch_written[0] / f'payload-{layout}.pth')
  assert not (tmp_path / 'pwned').exists()


def test_pickled_classes_are_never_imported(tmp_path):
  """An object rebuilt by NEWOBJ + BUILD of a class whose module would act on import or on
  __setstate__ loads as an inert stand-in: no import, no __setstate__, and a clear refusal."""
  marker = tmp_path / 'pwned'
  (tmp_path / 'trap_module.py').write_text(textwrap.dedent(f'''
      open({str(marker)!r} + '.imported', 'w').close()

      class Trap:
        def __setstate__(self, state):
          open({str(marker)!r}, 'w').close()
      '''))
  sys.path.insert(0, str(tmp_path))
  try:
    import trap_module
    trap = trap_module.Trap()
    trap.payload = 'x'
    data_pkl = pickle.dumps(trap, protocol=2)
  finally:
    sys.path.remove(str(tmp_path))
    sys.modules.pop('trap_module', None)
  os.remove(str(marker) + '.imported')
  path = tmp_path / 'trap.pth'
  _write_zip_checkpoint(path, data_pkl)
  with pytest.raises(torch_pickle.CheckpointFormatError) as error:
    torch_pickle.load_state_dict(path)
  _assert_one_line_error(error, path, 'trap_module.Trap object')
  assert not marker.exists() and not os.path.exists(str(marker) + '.imported')
  assert 'trap_module' not in sys.modules


# --- damaged and foreign files --------------------------------------------------------------------

def _valid_file(tmp_path) -> bytes:
  path = tmp_path / 'valid.pth'
  torch_pickle.save_state_dict(path, {'w': np.arange(64, dtype=np.float32), 'b': np.ones(3, np.float32)})
  return path.read_bytes()


def _damaged_files(tmp_path) -> dict[str, bytes]:
  valid = _valid_file(tmp_path)
  data_offset = valid.index(np.arange(64, dtype=np.float32).tobytes())
  corrupted = bytearray(valid)
  corrupted[data_offset + 5] ^= 0xFF
  return {
      'empty': b'',
      'garbage': bytes(range(256)) * 4,
      'zip cut in half': valid[:len(valid) // 2],
      'zip missing its last bytes': valid[:-10],
      'storage bytes flipped': bytes(corrupted),
      'plain pickle': pickle.dumps({'w': [1.0, 2.0]}, protocol=2),
      'pickle cut short': pickle.dumps(torch_pickle.LEGACY_MAGIC_NUMBER, protocol=2)[:5],
      'legacy headers only': b''.join(_legacy_headers()),
  }


@pytest.mark.parametrize('damage', ['empty', 'garbage', 'zip cut in half', 'zip missing its last bytes',
                                    'storage bytes flipped', 'plain pickle', 'pickle cut short',
                                    'legacy headers only'])
def test_damaged_files_give_one_line_errors(tmp_path, damage):
  path = tmp_path / 'damaged.pth'
  path.write_bytes(_damaged_files(tmp_path)[damage])
  with pytest.raises(torch_pickle.CheckpointFormatError) as error:
    torch_pickle.load_state_dict(path)
  _assert_one_line_error(error, path)


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('cut', [0.3, 0.6, 0.95])
def test_truncated_torch_files(torch_written, tmp_path, layout, cut):
  data = (torch_written[0] / _state_dict_file(layout, 'plain', 'state_dict')).read_bytes()
  path = tmp_path / 'teacher.pth'
  path.write_bytes(data[:int(len(data) * cut)])
  with pytest.raises(torch_pickle.CheckpointFormatError) as error:
    torch_pickle.load_state_dict(path)
  _assert_one_line_error(error, path)


def test_foreign_contents_are_named(tmp_path):
  missing = tmp_path / 'missing.pth'
  with pytest.raises(torch_pickle.CheckpointFormatError) as error:
    torch_pickle.load_state_dict(missing)
  _assert_one_line_error(error, missing, 'cannot read')
  npz = tmp_path / 'weights.npz'
  np.savez(npz, w=np.ones(2))
  with pytest.raises(torch_pickle.CheckpointFormatError) as error:
    torch_pickle.load_state_dict(npz)
  _assert_one_line_error(error, npz, 'no data.pkl')
  listing = tmp_path / 'list.pth'
  _write_zip_checkpoint(listing, pickle.dumps([1, 2], protocol=2))
  with pytest.raises(torch_pickle.CheckpointFormatError) as error:
    torch_pickle.load_state_dict(listing)
  _assert_one_line_error(error, listing, 'holds a list')
  metrics = tmp_path / 'metrics.pth'
  _write_zip_checkpoint(metrics, pickle.dumps({'epoch': 3, 'acc': 0.9}, protocol=2))
  with pytest.raises(torch_pickle.CheckpointFormatError) as error:
    torch_pickle.load_state_dict(metrics)
  _assert_one_line_error(error, metrics, "'epoch', 'acc'")


def _write_foreign_kinds(torch, directory) -> dict:
  """A TorchScript archive and a sparse tensor: files the loader names and refuses."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)  # torch.jit is deprecated
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), directory / 'scripted.pt')
  torch.save({'w': torch.eye(3).to_sparse()}, directory / 'sparse.pth')
  return {}


def test_torchscript_archive_is_named(torch_written):
  path = torch_written[0] / 'scripted.pt'
  with pytest.raises(torch_pickle.CheckpointFormatError) as error:
    torch_pickle.load_state_dict(path)
  _assert_one_line_error(error, path, 'TorchScript')


def test_unsupported_tensor_kind_is_named(torch_written):
  path = torch_written[0] / 'sparse.pth'
  with pytest.raises(torch_pickle.CheckpointFormatError) as error:
    torch_pickle.load_state_dict(path)
  _assert_one_line_error(error, path, 'calls torch.', 'does not support')


# --- torch-free -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_loader_never_imports_torch(torch_written, tmp_path):
  """In a fresh interpreter, reading torch-written files (zip, legacy, a pickled module) and writing
  one leaves torch and the user's module unimported."""
  paths = []
  for layout in LAYOUTS:
    for name in (_state_dict_file(layout, 'plain', 'state_dict'), _module_file(layout, 'lenet', 'module')):
      paths.append(shutil.copy(torch_written[0] / name, tmp_path / name))
  script = textwrap.dedent('''
      import sys
      from dfkd_jax.convert import torch_pickle
      for path in sys.argv[1:]:
        weights = torch_pickle.load_state_dict(path)
        torch_pickle.save_state_dict(path + '.resaved', weights)
      leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lenet'))
      print('imported:', leaked)
      ''')
  env = {**os.environ, 'PYTHONPATH': REPO_ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')}
  result = subprocess.run([sys.executable, '-c', script, *map(str, paths)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == 'imported: []', result.stdout
