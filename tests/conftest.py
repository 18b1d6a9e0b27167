"""Test set-up: CPU only, 8 fake devices (multi-device tests build meshes over subsets); ``compilations``, the
XLA compile count of a jitted function (through ``jax.monitoring``)."""
import collections
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
# Tests never reach a tfds catalog download.
os.environ.setdefault('TFDS_DATA_DIR', os.path.join(os.path.dirname(__file__), '.tfds_never_used'))

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
sys.path.insert(0, FIXTURES)  # weights_rule

import jax  # noqa: E402  (after the platform and device flags above)
import pytest  # noqa: E402

# jax.monitoring reports every XLA compilation (also one served by the persistent compilation cache) as this
# duration event, with the compiled function's name ('jit(name)'); a call that reuses a compiled program reports
# nothing.
_BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
_unreported_compilations = collections.Counter()  # function name -> compilations not yet returned by compilations()


def _count_compilation(event, duration_secs, **kwargs):
  del duration_secs
  if event == _BACKEND_COMPILE_EVENT:
    name = kwargs.get('fun_name', '')
    _unreported_compilations[name[len('jit('):-1] if name.startswith('jit(') else name] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compilation)


@pytest.fixture(autouse=True)
def _compilations_counted_per_test():
  _unreported_compilations.clear()


def compilations(jitted) -> int:
  """How often XLA compiled functions named like ``jitted`` since the test began, or since the previous
  ``compilations`` of that name (each compilation is reported once). 1 after several calls: no recompilation."""
  return _unreported_compilations.pop(jitted.__name__, 0)
