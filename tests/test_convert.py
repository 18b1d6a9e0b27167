"""The converter's front door (``dfkd_jax.convert``: the API and ``python -m dfkd_jax.convert``) on
real ``.pth`` files.

Every reference fixture's weights (weights_rule) as torch wrote them in the formats the references use
(a state_dict, the CMI-fw ``{'state_dict': ...}`` training checkpoint, ``module.`` prefixes, legacy
serialisation, and for the Huawei fixtures a whole pickled ``nn.Module`` with the reference module
names, plain or in ``DataParallel``): fixtures/make_torch_files.py wrote them with torch_convert.py,
and they are rebuilt byte for byte from the committed templates (torch_files.py). Each file goes
through the public API (the CLI for one) and its eval output is compared with the stored reference;
every converted model is exported back, read with the exact values and re-converted exactly, and
(the ``torch`` group) loaded by torch with ``weights_only=True`` and ``strict=True`` into the
reference layout. Errors: wrong arch or class count (with the right one suggested), a malicious
pickle, and the CLI's one-line messages.
"""
import collections
import functools
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

import reference_fixtures as rf
import torch_files
import weights_rule
from dfkd_jax import models
from dfkd_jax.convert import __main__ as cli
from dfkd_jax.convert import api, identify, load_teacher, model_dir, naming, torch_pickle
from dfkd_jax.data import NORMALIZATION
from dfkd_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# fixture -> (arch, dataset, sizes the metadata must record, formats written; the first is also exported)
_GRAY, _RGB = dict(in_channels=1), dict(in_channels=3)
FIXTURES = {
    'cmi__lenet5': ('lenet5', 'mnist', _GRAY, ('state_dict', 'checkpoint', 'module_prefix', 'legacy')),
    'cmi__lenet5_half': ('lenet5_half', 'mnist', _GRAY, ('checkpoint', 'legacy')),
    'huawei__lenet5': ('lenet5', 'mnist', _GRAY, ('pickled_module', 'pickled_module_legacy', 'pickled_data_parallel')),
    'huawei__lenet5_half': ('lenet5_half', 'mnist', _GRAY, ('pickled_module_legacy', 'pickled_data_parallel')),
    'cmi__resnet20': ('resnet20', 'cifar10', _RGB, ('checkpoint', 'state_dict', 'module_prefix', 'legacy')),
    'cmi__wrn16_1': ('wrn16_1', 'cifar10', _RGB, ('checkpoint', 'legacy')),
    'cmi__resnet18': ('resnet18', 'cifar10', _RGB, ('checkpoint',)),
    'cmi__resnet34': ('resnet34', 'cifar10', _RGB, ('checkpoint',)),
    'cmi__vgg11': ('vgg11', 'cifar10', _RGB, ('checkpoint', 'module_prefix')),
    'cmi__wrn40_2': ('wrn40_2', 'cifar10', _RGB, ('checkpoint',)),
    'cmi__generator': ('cmi_generator', None, dict(nz=256, nc=3, ngf=64), ('state_dict', 'module_prefix')),
    'cmi__large_generator': ('cmi_large_generator', None, dict(nz=512, nc=3, ngf=64), ('legacy',)),
    'huawei__dafl_generator_c1_nz100': ('dafl_generator', None, dict(nz=100, nc=1), ('pickled_module', 'legacy')),
    'huawei__dafl_generator_c3_nz1000': ('dafl_generator', None, dict(nz=1000, nc=3), ('pickled_module_legacy',)),
}
CASES = [(name, fmt) for name, (*_, formats) in FIXTURES.items() for fmt in formats]
WORST = collections.defaultdict(float)  # arch -> worst relative error through the file path


def _template(name, fmt):
  return torch_files.path('convert', f'{name}.{fmt}.pth.gz')



class Store:
  """Files and converted directories shared by the tests of this module."""

  def __init__(self, root):
    self.root = root
    self.files, self.converted = {}, {}
    self.recipes = torch_files.load_json('convert')  # '<name>.<fmt>' -> where its storages were cut

  def file(self, name, fmt):
    """Fixture ``name`` as torch wrote it in format ``fmt``, rebuilt from its committed template."""
    if (name, fmt) not in self.files:
      self.files[name, fmt] = torch_files.rebuild(_template(name, fmt), self.recipes[f'{name}.{fmt}'], rf.load(name)[2],
                                                  str(self.root / f'{name}.{fmt}.pth'))
    return self.files[name, fmt]

  def convert(self, name):
    """(directory, metadata) of fixture ``name``'s first format converted with ``api.convert``."""
    if name not in self.converted:
      arch, dataset, _, formats = FIXTURES[name]
      out = str(self.root / f'{name}.converted')
      self.converted[name] = out, api.convert(self.file(name, formats[0]), out, arch=arch, dataset=dataset)
    return self.converted[name]


@pytest.fixture(scope='module')
def store(tmp_path_factory):
  return Store(tmp_path_factory.mktemp('convert'))


@pytest.fixture(scope='module', autouse=True)
def report_worst_errors():
  """Prints the worst relative error per architecture over every file path (run with -s)."""
  yield
  for arch, err in sorted(WORST.items()):
    print(f'\n{arch}: worst relative error through the file path {err:.3g}')


def _input(doc, ref):
  return ref['input'] if doc['kind'] == 'generator' else rf.nhwc(ref['input'])


def _reference(doc, ref):
  return rf.nhwc(ref['out_eval']) if doc['kind'] == 'generator' else ref['logits_eval']


_EVAL = {}  # fixture -> jitted eval forward (one compilation per architecture, not per op)


def _check_eval(name, model, variables, what):
  doc, ref, _ = rf.load(name)
  forward = _EVAL.setdefault(name, jax.jit(functools.partial(model.apply, train=False)))
  err = rf.assert_close(forward(variables, _input(doc, ref)), _reference(doc, ref), what)
  WORST[FIXTURES[name][0]] = max(WORST[FIXTURES[name][0]], err)
  print(f'\n{what}: relative error {err:.3g}')


def _sha256(path):
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


# --- every fixture, every format ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('name,fmt', CASES, ids=[f'{n}-{f}' for n, f in CASES])
def test_reference_file_converts_exactly(store, name, fmt):
  """The first format goes file -> api.convert -> directory -> load_teacher; the others straight
  through load_teacher(file). Sizes (num_classes, nz, nc) are read from the file."""
  arch, dataset, sizes, formats = FIXTURES[name]
  source = store.file(name, fmt)
  if fmt != formats[0]:
    model, variables, _ = load_teacher(source, arch=arch)
    _check_eval(name, model, variables, f'{name} [{fmt}, load_teacher(file)]')
    return
  out, meta = store.convert(name)
  model, variables, _ = load_teacher(out)
  _check_eval(name, model, variables, f'{name} [{fmt}, convert -> directory]')
  doc = rf.load(name)[0]
  assert meta['arch'] == arch and meta['num_classes'] == doc['num_classes'] and meta['dataset'] == dataset
  assert meta['normalization'] == (None if dataset is None else
                                   {'mean': list(NORMALIZATION[dataset][0]), 'std': list(NORMALIZATION[dataset][1])})
  assert meta['source']['sha256'] == _sha256(source) and meta['source']['file'] == os.path.abspath(source)
  assert sizes.items() <= meta['model_kwargs'].items()
  assert meta == model_dir.load(out)[2]  # what was written is what is returned


# Who reads an exported file back: our reader, or (the torch group) torch.load(weights_only=True).
READERS = ['torch_pickle', pytest.param('torch', marks=pytest.mark.torch)]


def _read_export(reader, path):
  """The exported file as name -> numpy array, in file order; with torch also the torch tensors."""
  if reader == 'torch_pickle':
    return torch_pickle.load_state_dict(path), None
  loaded = torch_files.import_torch().load(path, weights_only=True)
  return {k: v.numpy() for k, v in loaded.items()}, loaded


def _torch_output(module, ref):
  torch = torch_files.import_torch()
  with torch.no_grad():
    y = module.eval()(torch.from_numpy(ref['input']))
  return (y[0] if isinstance(y, tuple) else y).numpy()


def _reference_output(doc, ref):
  return ref['out_eval' if doc['kind'] == 'generator' else 'logits_eval']


def _assert_values(loaded, sd, prefix=''):
  """``loaded`` holds ``sd``'s entries (names prefixed) in its order, with its values (num_batches_tracked 0)."""
  assert [(k, v.shape) for k, v in loaded.items()] == [(prefix + k, np.shape(v)) for k, v in sd.items()]
  for key, value in sd.items():
    expected = 0 if key.endswith('num_batches_tracked') else value
    np.testing.assert_array_equal(loaded[prefix + key], expected, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize('reader', READERS)
@pytest.mark.parametrize('name', list(FIXTURES))
def test_export_round_trip(store, name, reader, tmp_path):
  """Directory -> .pth: the values are the original ones; converting it again gives the same
  variables bit for bit; torch loads it (weights_only, strict) into the reference layout and
  reproduces the reference output."""
  arch, _, sizes, _ = FIXTURES[name]
  out, _ = store.convert(name)
  exported = str(tmp_path / 'exported.pth')
  meta = api.export(out, exported)
  assert meta['arch'] == arch
  doc, ref, sd = rf.load(name)
  loaded, tensors = _read_export(reader, exported)
  sd = naming.canonical_keys(sd, models.get_spec(arch).torch)  # the Huawei LeNets' conv1.. -> features.0..
  assert {k: v.shape for k, v in loaded.items()} == {k: np.shape(v) for k, v in sd.items()}
  _assert_values(loaded, {k: sd[k] for k in loaded})
  if reader == 'torch':
    import torch_convert
    module = torch_convert.loaded(name, arch, sizes, tensors, canonical=True)
    rf.assert_close(_torch_output(module, ref), _reference_output(doc, ref), f'{name} torch(exported)')
  _, variables, _ = model_dir.load(out)
  _, again, _ = load_teacher(exported, arch=arch)
  jax.tree.map(np.testing.assert_array_equal, again, variables)


@pytest.mark.parametrize('reader', READERS)
@pytest.mark.parametrize('name,like_fmt', [('huawei__lenet5', 'pickled_module'),
                                           ('huawei__lenet5_half', 'pickled_data_parallel')])
def test_export_like_reference_file(store, name, like_fmt, reader, tmp_path):
  """``like=`` a Huawei pickled module gives its conv1..fc2 names (with ``module.`` for
  DataParallel), order and values; the Huawei class loads the result strictly and reproduces the
  reference logits."""
  out, _ = store.convert(name)
  exported = str(tmp_path / 'student.pth')
  api.export(out, exported, like=store.file(name, like_fmt))
  _, ref, sd = rf.load(name)  # sd: the reference names in the reference order
  loaded, tensors = _read_export(reader, exported)
  prefix = 'module.' if like_fmt == 'pickled_data_parallel' else ''
  _assert_values(loaded, sd, prefix)
  if reader == 'torch':
    import torch_convert
    module = torch_convert.torch_module(name, FIXTURES[name][0], FIXTURES[name][2])
    (torch_convert.tnn.DataParallel(module) if prefix else module).load_state_dict(tensors, strict=True)
    rf.assert_close(_torch_output(module, ref), ref['logits_eval'], f'{name} torch(exported like the reference)')


def test_export_like_other_architecture_fails(store, tmp_path):
  with pytest.raises(naming.MismatchError, match='naming template') as e:
    api.export(store.convert('cmi__lenet5')[0], str(tmp_path / 'x.pth'), like=store.file('huawei__lenet5_half',
                                                                                           'pickled_data_parallel'))
  assert '\n' not in str(e.value) and not os.path.exists(tmp_path / 'x.pth')


def test_export_from_training_workdir_and_refusals(store, tmp_path):
  workdir = tmp_path / 'workdir'
  shutil.copytree(store.convert('cmi__resnet20')[0], workdir / 'student')
  out = tmp_path / 'student.pth'
  assert api.export(str(workdir), str(out))['arch'] == 'resnet20'
  with pytest.raises(UserError, match='exists'):
    api.export(str(workdir), str(out))
  with pytest.raises(UserError, match='neither a converted model directory nor a training workdir'):
    api.export(str(tmp_path), str(tmp_path / 'other.pth'))


# --- inference and suggestions -------------------------------------------------------------------

def _mismatch(store, name, fmt, **kwargs):
  with pytest.raises(UserError) as e:
    api.convert_file(store.file(name, fmt), **kwargs)
  message = str(e.value)
  assert '\n' not in message
  return message


@pytest.mark.slow
def test_wrong_arch_suggests_the_right_one(store):
  assert 'did you mean arch=resnet20, num_classes=10?' in _mismatch(store, 'cmi__resnet20', 'legacy', arch='resnet32')
  assert 'did you mean arch=wrn16_1, num_classes=10?' in _mismatch(store, 'cmi__wrn16_1', 'legacy', arch='wrn16_2')
  assert 'did you mean arch=lenet5, num_classes=10?' in _mismatch(store, 'huawei__lenet5', 'pickled_module',
                                                                  arch='lenet5_half')
  assert 'did you mean arch=cmi_large_generator, nz=512?' in _mismatch(store, 'cmi__large_generator', 'legacy',
                                                                       arch='cmi_generator')


@pytest.mark.slow
def test_wrong_class_count_suggests_the_right_one(store):
  message = _mismatch(store, 'cmi__resnet20', 'legacy', arch='resnet20', num_classes=100)
  assert 'fc.weight: file (10, 64) vs expected (100, 64)' in message and 'did you mean num_classes=10?' in message


@pytest.mark.slow
def test_wrong_generator_size_suggests_the_right_one(store):
  message = _mismatch(store, 'huawei__dafl_generator_c3_nz1000', 'pickled_module_legacy', arch='dafl_generator',
                      model_kwargs={'nz': 100})
  assert 'l1.0.weight: file (8192, 1000) vs expected (8192, 100)' in message and 'nz=1000, nc=3' in message


@pytest.mark.slow
def test_sizes_the_file_cannot_tell_are_named(tmp_path):
  """img_size never appears as a dimension: the error says so, and giving it converts the file."""
  keys = list(identify.expected_shapes('cmi_generator', dict(nz=100, ngf=64, img_size=64, nc=3)).items())
  path = tmp_path / 'generator64.pth'
  torch_pickle.save_state_dict(path, weights_rule.make_state_dict(keys))
  with pytest.raises(UserError, match=r'also depend on img_size, which the file does not determine') as e:
    api.convert_file(path, arch='cmi_generator')
  assert 'l1.0.weight: file (32768, 100) vs expected (8192, 100)' in str(e.value)
  _, variables, meta = api.convert_file(path, arch='cmi_generator', model_kwargs={'img_size': 64})
  assert meta['model_kwargs'] == dict(nz=100, ngf=64, img_size=64, nc=3)
  fits = identify.identify(torch_pickle.load_state_dict(path), {'img_size': 64})
  assert [fit.arch for fit in fits] == ['cmi_generator']


@pytest.mark.slow
def test_depth_is_read_from_the_key_set(tmp_path):
  """A VDSR of 3 or 25 blocks (default 18) converts with or without arch, its depth read from which
  residual_layer keys the file holds, and evaluates like the model it was saved from."""
  x = jax.random.normal(jax.random.key(1), (1, 12, 12, 1))
  for blocks in (3, 25):
    model = models.create('vdsr', num_blocks=blocks)
    variables = model.init(jax.random.key(blocks), x)
    path = tmp_path / f'vdsr{blocks}.pth'
    api.save_pth(path, 'vdsr', variables, model_kwargs=dict(num_blocks=blocks))
    for arch in ('vdsr', None):
      converted, converted_variables, meta = api.convert_file(path, arch=arch)
      assert meta['arch'] == 'vdsr' and meta['model_kwargs']['num_blocks'] == blocks, meta
      np.testing.assert_array_equal(converted.apply(converted_variables, x), model.apply(variables, x))
  # A file whose keys no single depth explains still fails, naming what differs.
  sd = dict(torch_pickle.load_state_dict(tmp_path / 'vdsr3.pth'))
  del sd['residual_layer.1.conv.weight']
  torch_pickle.save_state_dict(tmp_path / 'holed.pth', sd)
  with pytest.raises(UserError, match='residual_layer.1.conv.weight'):
    api.convert_file(tmp_path / 'holed.pth', arch='vdsr')


def test_bad_model_kwarg_value_is_a_user_error(store):
  with pytest.raises(UserError, match='cannot build cmi_generator with'):
    api.convert_file(store.file('cmi__generator', 'state_dict'), arch='cmi_generator', model_kwargs={'ngf': 'wide'})


@pytest.mark.slow
def test_arch_detected_from_the_file(store):
  for name, fmt in [('huawei__lenet5', 'pickled_data_parallel'), ('cmi__wrn16_1', 'legacy'),
                    ('cmi__large_generator', 'legacy')]:
    model, variables, meta = api.convert_file(store.file(name, fmt))
    assert meta['arch'] == FIXTURES[name][0]
    _check_eval(name, model, variables, f'{name} [{fmt}, arch detected]')
  # DAFL's and DFAD's generators have the same tensors: the choice is left to the user.
  message = _mismatch(store, 'huawei__dafl_generator_c1_nz100', 'legacy')
  assert 'fits arch=dafl_generator; arch=dfad_generator, nz=100, nc=1; choose one' in message


@pytest.mark.slow
def test_unknown_model_kwarg_and_unfit_file(store, tmp_path):
  with pytest.raises(UserError, match='cmi_generator takes no model kwarg nzz; it takes '):
    api.convert_file(store.file('cmi__generator', 'state_dict'), arch='cmi_generator', model_kwargs={'nzz': 3})
  sd = dict(rf.load('cmi__resnet20')[2])
  sd['extra.weight'] = np.zeros(3, np.float32)
  torch_pickle.save_state_dict(tmp_path / 'odd.pth', sd)
  with pytest.raises(UserError, match=r'fits no registered architecture \(closest: resnet20 \('):
    api.convert_file(tmp_path / 'odd.pth')


def test_load_teacher_checks_directory_and_embedded(store):
  out, _ = store.convert('cmi__resnet20')
  with pytest.raises(UserError, match='holds a resnet20, not a resnet32'):
    load_teacher(out, arch='resnet32')
  with pytest.raises(UserError, match='has 10 classes but the config has num_classes=100'):
    load_teacher(out, num_classes=100)
  model, variables, _ = load_teacher('embedded:lenet5_mnist', arch='lenet5', num_classes=10)
  assert model.apply(variables, np.zeros((1, 32, 32, 1), np.float32), train=False).shape == (1, 10)


# --- the command line ---------------------------------------------------------------------------

def _run_cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  return subprocess.run([sys.executable, '-m', 'dfkd_jax.convert', *args], capture_output=True, text=True, env=env,
                        cwd=REPO, timeout=300)


def _one_line(text):
  return len(text.strip().splitlines()) == 1 and 'Traceback' not in text


def _main(capsys, *args):
  code = cli.main(list(args))
  captured = capsys.readouterr()
  return code, captured.err


@pytest.mark.slow
def test_cli_converts_and_exports(store, tmp_path):
  """The Huawei DAFL teacher (a legacy pickled module) through the CLI, and back like the original."""
  name = 'huawei__lenet5'
  source = store.file(name, 'pickled_module_legacy')
  out, exported = tmp_path / 'teacher', tmp_path / 'teacher.pth'
  proc = _run_cli('--source', source, '--out', str(out), '--arch', 'LeNet5', '--num-classes', '10',
                  '--dataset', 'mnist')
  assert proc.returncode == 0, proc.stderr
  assert 'lenet5, num_classes=10' in proc.stdout and 'dataset=mnist' in proc.stdout
  model, variables, _ = load_teacher(str(out), arch='lenet5', num_classes=10)
  _check_eval(name, model, variables, f'{name} [pickled_module_legacy, CLI]')
  proc = _run_cli('export', '--model', str(out), '--out', str(exported), '--like', source)
  assert proc.returncode == 0, proc.stderr
  _assert_values(torch_pickle.load_state_dict(exported), rf.load(name)[2])  # the Huawei names, order and values


def test_cli_help(capsys):
  for args, expected in [((), 'python -m dfkd_jax.convert export --model DIR --out FILE.pth'),
                         (('export',), '--like REFERENCE.pth')]:
    with pytest.raises(SystemExit) as e:
      cli.main([*args, '--help'])
    assert e.value.code == 0 and expected in ' '.join(capsys.readouterr().out.split())


def test_cli_one_line_errors(store, tmp_path, capsys):
  not_a_checkpoint = tmp_path / 'notes.txt'
  not_a_checkpoint.write_text('hello\n')
  busy = tmp_path / 'busy'
  busy.mkdir()
  (busy / 'file').write_text('x')
  source = store.file('cmi__resnet20', 'legacy')
  cases = [
      (('--source', str(tmp_path / 'missing.pth'), '--out', str(tmp_path / 'o1')), 'cannot read'),
      (('--source', str(not_a_checkpoint), '--out', str(tmp_path / 'o2')), 'is not a PyTorch checkpoint'),
      (('--source', source, '--out', str(busy)), 'is not an empty directory'),
      (('--source', source, '--out', str(tmp_path / 'o3'), '--arch', 'resnet200'), "unknown architecture 'resnet200'"),
      (('--source', source, '--out', str(tmp_path / 'o4'), '--num-classes', '100'), 'did you mean num_classes=10?'),
      (('--source', source, '--out', str(tmp_path / 'o5'), '--model-kwargs', 'nz'), 'expects key=value'),
      (('export', '--model', str(tmp_path), '--out', str(tmp_path / 'x.pth')), 'neither a converted model'),
  ]
  for args, expected in cases:
    code, err = _main(capsys, *args)
    assert code == 2 and err.startswith('error: ') and expected in err and _one_line(err), (args, err)
  assert not any((tmp_path / f'o{i}').exists() for i in range(1, 6))
  code, err = _main(capsys, '--source', str(not_a_checkpoint), '--out', str(tmp_path / 'o6'), '--verbose')
  assert code == 2 and 'Traceback' in err and err.strip().splitlines()[-1].startswith('error: ')


def test_parse_model_kwargs():
  assert cli.parse_model_kwargs('nz=512, img_size=32,scale=0.5,flag=True,name=abc') == \
      {'nz': 512, 'img_size': 32, 'scale': 0.5, 'flag': True, 'name': 'abc'}
  assert cli.parse_model_kwargs('') == {}


# --- malicious files ---------------------------------------------------------------------------

def test_malicious_pickle_is_refused_by_api_and_cli(tmp_path, capsys, monkeypatch):
  """torch.save of a checkpoint whose state_dict unpickles as os.system('touch armed')."""
  monkeypatch.chdir(tmp_path)
  armed = tmp_path / 'armed'
  path = torch_files.path('convert', 'malicious.pth')
  with zipfile.ZipFile(path) as archive:  # the payload is real: a plain unpickler runs it
    pickle.loads(archive.read(next(n for n in archive.namelist() if n.endswith('/data.pkl'))))
  assert armed.exists()
  armed.unlink()
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match='refusing to load'):
    load_teacher(path, arch='lenet5')
  code, err = _main(capsys, '--source', path, '--out', str(tmp_path / 'out'), '--arch', 'lenet5')
  assert code == 2 and err.startswith('error: refusing to load') and _one_line(err)
  assert not armed.exists() and not (tmp_path / 'out').exists()
