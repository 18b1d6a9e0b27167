"""Configs and the command line: ``configlib.parse_arg``, every ``configs/*.py`` (default and each
argument it accepts), and the CLI's one-line errors (``python -m dfkd_jax.main`` as a subprocess:
exactly one stderr line starting with ``error:``, a non-zero exit, no traceback).
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import ml_collections
import pytest

from cli_output import one_line_error
from config_files import load_module
from dfkd_jax import configlib, methods
from dfkd_jax.errors import UserError
from dfkd_jax.run import cadence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))
TEACHER = 'configs/teacher_lenet5_mnist.py'


# --- parse_arg ----------------------------------------------------------------------------------

def test_parse_arg_defaults_and_types():
  defaults = dict(runlocal=False, seed=0, lr=0.1, teacher='resnet34', paper=True, path=None)
  c = configlib.parse_arg(None, **defaults)
  assert isinstance(c, ml_collections.ConfigDict) and c.to_dict() == defaults
  assert configlib.parse_arg('', **defaults).to_dict() == defaults
  c = configlib.parse_arg('runlocal,seed=3,lr=0.5,teacher=wrn40_2,paper=false,path=/x/y', **defaults)
  assert c.to_dict() == dict(runlocal=True, seed=3, lr=0.5, teacher='wrn40_2', paper=False, path='/x/y')
  assert type(c.seed) is int and type(c.lr) is float and type(c.runlocal) is bool
  for text, value in (('true', True), ('1', True), ('False', False), ('0', False)):
    assert configlib.parse_arg(f'runlocal={text}', **defaults).runlocal is value
  assert configlib.parse_arg(' runlocal , seed=4', **defaults).seed == 4  # names are stripped
  assert configlib.parse_arg('runlocal,,seed=5,', **defaults).seed == 5   # empty items ignored


@pytest.mark.parametrize('arg,message', [
    ('bogus', "unknown config argument 'bogus'; this config accepts: lr, runlocal, seed"),
    ('seed', "config argument 'seed' needs a value (seed=...)"),
    ('seed=abc', "config argument seed='abc' must be a int"),
    ('lr=fast', "config argument lr='fast' must be a float"),
    ('runlocal=yes', "config argument runlocal='yes' must be true or false"),
])
def test_parse_arg_errors(arg, message):
  with pytest.raises(UserError) as e:
    configlib.parse_arg(arg, runlocal=False, seed=0, lr=0.1)
  assert str(e.value) == message


# --- configs/*.py -------------------------------------------------------------------------------

def _accepted_args(module) -> list[str]:
  """The argument names a config accepts, as its own error message lists them."""
  with pytest.raises(UserError) as e:
    module.get_config('no_such_argument_xyz')
  listed = re.search(r'this config accepts: (.*)$', str(e.value))
  assert listed, str(e.value)
  return listed.group(1).split(', ')


def _total_steps(c) -> int | None:
  """Outer iterations of a step-counted job (None for epoch-counted teacher training)."""
  if 'num_steps' in c:
    return c.num_steps
  return c.num_epochs * c.iters_per_epoch if 'iters_per_epoch' in c else None


def _documented_values(module, name) -> list[str]:
  """The values of ``name=VALUE`` that the config's docstring shows."""
  return sorted(set(re.findall(rf'\b{name}=([\w.-]+)', module.__doc__)))


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_config_file(path):
  module = load_module(path)
  name = os.path.relpath(path, REPO)
  assert f'python -m dfkd_jax.main --config {name}' in module.__doc__  # a runnable command
  default = module.get_config()
  assert isinstance(default, ml_collections.ConfigDict)
  assert default.method in methods.METHODS
  assert isinstance(default.to_json(), str)  # config.json is written from it
  for key in ('seed', 'dataset', 'num_classes', 'image_size', 'in_channels', 'batch_size', 'mesh', 'eval',
              'checkpoint', 'report', 'log'):
    assert key in default, key
  args = _accepted_args(module)
  assert 'runlocal' in args
  variants = []
  for arg in args:
    assert arg in module.__doc__, f'{name}: argument {arg!r} is not documented'
    try:
      variants.append(module.get_config(arg))  # a flag (runlocal, paper, ...)
    except UserError as e:  # a valued argument: every value the docstring shows, alone and with runlocal
      assert f'needs a value ({arg}=...)' in str(e)
      values = _documented_values(module, arg)
      assert values, f'{name}: no documented value of {arg!r}'
      for value in values:
        variants += [module.get_config(f'{arg}={value}'), module.get_config(f'{arg}={value},runlocal')]
  for c in variants:
    assert isinstance(c, ml_collections.ConfigDict) and c.method == default.method
  small = module.get_config('runlocal')
  assert small.batch_size <= default.batch_size
  if _total_steps(default) is not None:
    assert _total_steps(small) <= 4 < _total_steps(default)
  else:
    assert small.num_epochs < default.num_epochs
  if 'pair' in args:  # every teacher-student pair on every dataset
    for dataset in ('cifar10', 'cifar100'):
      for pair in configlib.CIFAR_PAIRS:
        c = module.get_config(f'dataset={dataset},pair={pair},runlocal')
        assert (c.teacher.arch, c.student.arch) == tuple(pair.split('-'))
        assert c.num_classes == (10 if dataset == 'cifar10' else 100) and c.dataset == dataset


def test_runlocal_sizes():
  teacher = load_module(os.path.join(REPO, TEACHER)).get_config('runlocal')
  assert teacher.num_epochs == 1 and teacher.batch_size == 64  # 4,500 // 64 = 70 steps
  assert cadence.resolve(teacher, num_steps=70) == cadence.Cadences(log=10, eval=35, checkpoint=35)
  dafl = load_module(os.path.join(REPO, 'configs', 'dafl_mnist.py'))
  small, paper = dafl.get_config('runlocal'), dafl.get_config('paper')
  assert (small.num_epochs, small.iters_per_epoch, cadence.resolve(small, num_steps=4).checkpoint) == (2, 2, 2)
  assert (paper.batch_size, paper.num_epochs, paper.iters_per_epoch) == (512, 200, 120)
  both = dafl.get_config('paper,runlocal')
  assert _total_steps(both) == 4


# --- the command line ---------------------------------------------------------------------------

def _cli(args, devices=None, timeout=120):
  """Runs ``python -m dfkd_jax.main ARGS`` from the repository root on CPU."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}' if devices else ''
  return subprocess.run([sys.executable, '-m', 'dfkd_jax.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _assert_one_line_error(result, *fragments):
  line = one_line_error(result)
  for fragment in fragments:
    assert fragment in line, (fragment, line)
  return line


@pytest.mark.parametrize('args,fragments', [
    (['--config', 'configs/no_such_config.py'],
     ['cannot load the config file', "No such file or directory: 'configs/no_such_config.py'"]),
    (['--config', 'configs/no_such_config.py', '--config.batch_size=8'], ['cannot load the config file']),
    (['--config', f'{TEACHER}:runlocal', '--config.nope=1'], ["unknown config key 'nope' in --config.nope"]),
    (['--config', f'{TEACHER}:runlocal', '--config.eval.nope=1'],
     ["unknown config key 'nope' in --config.eval.nope"]),
    (['--config', f'{TEACHER}:runlocal', '--config.batch_sise=8'],
     ["unknown config key 'batch_sise'", "did you mean 'batch_size'?"]),
    (['--config', f'{TEACHER}:runlocal', '--config.batch_size=abc'],
     ['--config.batch_size=abc', "invalid literal for int() with base 10: 'abc'"]),
    (['--config', f'{TEACHER}:bogus'], ["unknown config argument 'bogus'; this config accepts: runlocal"]),
    (['--config', f'{TEACHER}:runlocal=maybe'], ["config argument runlocal='maybe' must be true or false"]),
], ids=['missing_file', 'missing_file_with_override', 'unknown_key', 'unknown_nested_key', 'typo_key',
        'wrong_type', 'unknown_arg', 'bad_arg_value'])
def test_cli_config_errors(tmp_path, args, fragments):
  result = _cli([*args, '--workdir', str(tmp_path / 'run')])
  _assert_one_line_error(result, *fragments)
  assert not (tmp_path / 'run').exists()  # nothing ran


def test_cli_missing_required_flags_and_extra_arguments(tmp_path):
  _assert_one_line_error(_cli(['--config', f'{TEACHER}:runlocal']), '--workdir')
  _assert_one_line_error(_cli(['--config', f'{TEACHER}:runlocal', '--workdir', str(tmp_path), 'extra']),
                         'unexpected arguments: extra')


def test_cli_verbose_adds_the_traceback(tmp_path):
  result = _cli(['--config', f'{TEACHER}:bogus', '--workdir', str(tmp_path), '--verbose'])
  assert result.returncode == 2
  assert 'Traceback' in result.stderr and 'UserError' in result.stderr
  assert result.stderr.strip().splitlines()[-1] == ("error: unknown config argument 'bogus'; "
                                                    'this config accepts: runlocal')


@pytest.mark.parametrize('config,batch,expected', [
    (f'{TEACHER}:runlocal', 64, ['batch_size=64 is not divisible by the 3 devices of the mesh',
                                 'use batch_size=63 or 66', '--config.mesh.num_devices=<a divisor of 64>']),
    ('configs/dafl_mnist.py:runlocal', 64, ['batch_size=64 is not divisible by the 3 devices',
                                            'use batch_size=63 or 66']),
], ids=['teacher_batch', 'dafl_batch'])  # evaluation rounds its batch up to the device count
def test_cli_batch_not_divisible_by_devices(tmp_path, config, batch, expected):
  result = _cli(['--config', config, f'--config.batch_size={batch}', '--workdir', str(tmp_path / 'run')],
                devices=3)
  _assert_one_line_error(result, *expected)
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_cli_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  result = _cli(['--config', f'{TEACHER}:runlocal', '--workdir', str(blocker / 'run')])
  _assert_one_line_error(result, f"cannot create the workdir '{blocker / 'run'}'", 'Not a directory')
