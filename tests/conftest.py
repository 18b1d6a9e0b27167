"""Test set-up: CPU only, 8 fake devices (multi-device tests build meshes over subsets)."""
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
# Tests never reach a tfds catalog download.
os.environ.setdefault('TFDS_DATA_DIR', os.path.join(os.path.dirname(__file__), '.tfds_never_used'))

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
sys.path.insert(0, FIXTURES)  # weights_rule
