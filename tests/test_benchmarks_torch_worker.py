"""benchmarks/torch_worker.py: step functions built and timed here or in a worker process of another
interpreter (here: this one), driven one phase at a time; errors come back as RuntimeError. The
timings are only checked against the sleeps they contain (a lower bound), never for speed."""
import importlib.util
import os
import sys

import pytest

_spec = importlib.util.spec_from_file_location(
    'benchmarks_torch_worker', os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'torch_worker.py'))
torch_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(torch_worker)
TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def steps_module_on_path(monkeypatch):
  """tests/benchmark_worker_steps.py importable here and in a worker started from here."""
  monkeypatch.syspath_prepend(TESTS)
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(filter(None, [TESTS, os.environ.get('PYTHONPATH')])))


@pytest.mark.parametrize('python', [None, sys.executable], ids=['in_process', 'worker'])
def test_each_timer_runs_its_step_the_asked_number_of_times(python):
  first, second = torch_worker.steps(python, 'benchmark_worker_steps', 'sleeping_steps', seconds=0.01)
  assert first(3) >= 0.03 and second(2) >= 0.04
  assert first(0) < 0.01


def test_a_failure_in_the_worker_is_raised_with_its_traceback():
  with pytest.raises(RuntimeError, match='no such network: resnet1000'):
    torch_worker.steps(sys.executable, 'benchmark_worker_steps', 'failing_steps')


def test_a_missing_interpreter_is_a_one_line_error():
  with pytest.raises(SystemExit, match='no such file'):
    torch_worker.steps('/nonexistent/python', 'benchmark_worker_steps', 'sleeping_steps', seconds=0.0)
