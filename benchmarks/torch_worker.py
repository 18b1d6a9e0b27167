"""PyTorch steps timed in this process or in another Python's, for the benchmarks that race dfkd_jax
against PyTorch in interleaved rounds.

The primary platform (Python 3.12, newest jax) has no torch by default: on Python 3.12 ``pip install
torch`` brings the 4.4 GB CUDA build. ``--torch-python PATH`` (step_times.py,
dafl_iteration_vs_torch.py) names an interpreter that has torch (e.g. a Python 3.11 environment with
the CPU wheel); the PyTorch steps are then built and timed in a child process of that interpreter,
which this process drives one phase at a time over a pipe, so the rounds stay interleaved. Each
timing is taken inside the process that runs the step (``time.perf_counter`` around the calls),
so the pipe's latency is not in it.

  timers = torch_worker.steps(python_or_None, 'torch_dafl_wrn', 'dafl_steps', batch=64)
  seconds = timers[0](10)   # ten calls of the first step function, in seconds

Protocol (one JSON object per line): ``{"op": "build", "module", "factory", "kwargs"}`` ->
``{"count"}``; ``{"op": "time", "id", "index", "repeats"}`` -> ``{"seconds"}``; ``{"op": "peak",
"size"}`` -> ``{"gflops"}``; ``{"op": "info"}`` -> ``{"threads", "torch"}``. A failure answers
``{"error": traceback}``, raised in the driving process as ``RuntimeError``.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _build(module: str, factory: str, kwargs: dict) -> list:
  """The step functions of ``module.factory(**kwargs)`` (one callable or a tuple), each called once
  to warm up."""
  made = getattr(importlib.import_module(module), factory)(**kwargs)
  made = list(made) if isinstance(made, (tuple, list)) else [made]
  for step in made:
    step()
  return made


def seconds(step, repeats: int = 1) -> float:
  """Wall seconds of ``repeats`` calls of ``step`` (the benchmarks' one timer)."""
  t0 = time.perf_counter()
  for _ in range(repeats):
    step()
  return time.perf_counter() - t0


def _info() -> dict:
  import torch
  return {'threads': torch.get_num_threads(), 'torch': torch.__version__}


def _peak(size: int) -> float:
  import machine
  return machine.torch_matmul_peak_gflops(size)


class _Child:
  """A worker process of another interpreter, answering one request at a time."""

  def __init__(self, python: str):
    if not os.path.exists(python):
      raise SystemExit(f'--torch-python {python}: no such file')
    self.process = subprocess.Popen([python, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, cwd=HERE)

  def ask(self, **request):
    self.process.stdin.write(json.dumps(request) + '\n')
    self.process.stdin.flush()
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f'the PyTorch worker exited (code {self.process.wait()}); its errors are above')
    answer = json.loads(line)
    if 'error' in answer:
      raise RuntimeError(f'in the PyTorch worker:\n{answer["error"]}')
    return answer


_children: dict[str, _Child] = {}


def _child(python: str) -> _Child:
  if python not in _children:
    _children[python] = _Child(python)
  return _children[python]


def steps(python: str | None, module: str, factory: str, **kwargs) -> list:
  """Timers for the step functions ``module.factory(**kwargs)`` makes (a module of benchmarks/):
  each ``timer(repeats)`` runs its step ``repeats`` times and returns the seconds taken. With
  ``python`` None they run here; otherwise in a worker of that interpreter."""
  if python is None:
    made = _build(module, factory, kwargs)
    return [lambda repeats, step=step: seconds(step, repeats) for step in made]
  child = _child(python)
  count = child.ask(op='build', module=module, factory=factory, kwargs=kwargs)['count']
  key = f'{module}.{factory}:{json.dumps(kwargs, sort_keys=True)}'
  return [lambda repeats, i=i: child.ask(op='time', id=key, index=i, repeats=repeats)['seconds'] for i in range(count)]


def info(python: str | None) -> dict:
  """PyTorch's version and thread count, where the steps run."""
  return _info() if python is None else _child(python).ask(op='info')


def matmul_peak_gflops(python: str | None, size: int) -> float:
  """``machine.torch_matmul_peak_gflops`` where the steps run."""
  return _peak(size) if python is None else _child(python).ask(op='peak', size=size)['gflops']


def serve() -> None:
  """The worker: answers requests on stdin until it closes."""
  sys.path[:0] = [HERE, ROOT]
  built = {}
  answer = sys.stdout
  sys.stdout = sys.stderr  # prints of the step modules must not reach the pipe
  for line in sys.stdin:
    request = json.loads(line)
    try:
      op = request['op']
      if op == 'build':
        key = f'{request["module"]}.{request["factory"]}:{json.dumps(request["kwargs"], sort_keys=True)}'
        built[key] = _build(request['module'], request['factory'], request['kwargs'])
        reply = {'count': len(built[key])}
      elif op == 'time':
        reply = {'seconds': seconds(built[request['id']][request['index']], request['repeats'])}
      elif op == 'peak':
        reply = {'gflops': _peak(request['size'])}
      elif op == 'info':
        reply = _info()
      else:
        raise ValueError(f'unknown op {op!r}')
    except Exception:  # noqa: BLE001 (sent to the driving process, which raises it)
      reply = {'error': traceback.format_exc()}
    answer.write(json.dumps(reply) + '\n')
    answer.flush()


if __name__ == '__main__':
  serve()
