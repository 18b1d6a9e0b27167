"""benchmarks/machine.py: the record of where a benchmark ran (its keys, its markdown line, the key that
keeps rows of different machines apart) and the FLOP count from XLA's cost analysis. No timing."""
import importlib.util
import os

import jax
import jax.numpy as jnp

_spec = importlib.util.spec_from_file_location(
    'benchmarks_machine', os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'machine.py'))
machine = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(machine)


def test_describe_has_every_field():
  info = machine.describe()
  expected = {'cpu', 'vector_flags', 'cpu_count', 'affinity_count', 'python', 'jax', 'jaxlib', 'flax', 'optax',
              'numpy', 'torch', 'commit', 'date_utc'}
  assert expected <= set(info)
  assert info['cpu'] and info['cpu_count'] >= 1 and info['jax'] == jax.__version__
  assert set(info['vector_flags']) <= set(machine.VECTOR_FLAGS)


def test_markdown_line_and_machine_key():
  info = machine.describe()
  line = machine.markdown(info)
  assert line.startswith('Machine: ') and '\n' not in line
  for value in (info['cpu'], f"jax {info['jax']}", info['commit'], info['date_utc']):
    assert value in line
  key = machine.machine_key(info)
  assert info['commit'] not in key and info['date_utc'] not in key  # same machine, any commit or date
  assert machine.machine_key(dict(info, commit='other', date_utc='other')) == key
  assert machine.machine_key(dict(info, jax='0.0.1')) != key
  assert machine.machine_key(dict(info, cpu_count=info['cpu_count'] + 1)) != key


def test_compiled_flops_of_a_matmul():
  x = jnp.ones((8, 16))
  y = jnp.ones((16, 4))
  flops = machine.compiled_flops(jax.jit(jnp.matmul).lower(x, y).compile())
  assert flops == 2 * 8 * 16 * 4
