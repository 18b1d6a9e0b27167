"""Step functions for tests/test_benchmarks_torch_worker.py: the worker protocol without torch."""
import time


def sleeping_steps(seconds: float):
  """Two steps that sleep ``seconds`` and ``2 * seconds``."""
  return (lambda: time.sleep(seconds)), (lambda: time.sleep(2 * seconds))


def failing_steps():
  raise ValueError('no such network: resnet1000')
