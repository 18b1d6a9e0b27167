"""Multi-host runs, as on a TPU pod or a SLURM allocation, on this CPU.

- Two processes over 127.0.0.1 (``jax.distributed`` with an explicit coordinator, 2 fake CPU
  devices each: one 4-device mesh) run ``python -m dfkd_jax.main`` on DAFL ``:runlocal``: they train
  2 iterations, evaluate (each process reads half of the held-out digits), checkpoint, and stop;
  run again with a longer schedule, both resume from the shared checkpoint and train 2 more. Only
  process 0 writes the outputs.
- SIGTERM to one process only: both stop after the same step, save one checkpoint, exit 0, and
  resume from it.
- The run outputs (config.json, metrics.jsonl, summary.json, sample grids) on an object-store
  workdir (``gs://``), through a stand-in file system with GCS's semantics (objects can be
  written whole but not appended to).

The second run reuses the first one's compiled programs through a persistent compilation cache
(jax 0.10; with newer jax the CLI turns that cache off for multi-process CPU runs, see dfkd_jax.main).
"""
from __future__ import annotations

import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import fsspec
import jax
import numpy as np
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from dfkd_jax.convert import model_dir
from dfkd_jax.run import outputs
from dfkd_jax.run.outputs import read_history

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAFL = 'configs/dafl_mnist.py:runlocal'
TIMEOUT_S = 900  # per run of the two processes; a loaded 2-core machine needs a fraction of it
STOP_TIMEOUT_S = 240  # from a stop signal to both processes' exit: a step and a checkpoint


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_two_processes(workdir, cache_dir, *overrides: str) -> list[subprocess.Popen]:
  """Starts the DAFL CLI as processes 0 and 1 of one job."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  coordinator = f'127.0.0.1:{free_port()}'
  return [subprocess.Popen(
      [sys.executable, '-m', 'dfkd_jax.main', '--config', DAFL, '--workdir', str(workdir), '--jax_distributed',
       '--coordinator_address', coordinator, '--num_processes', '2', '--process_id', str(i),
       '--config.report.phase_timing_reps=0', *overrides],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


def finish(procs: list[subprocess.Popen], timeout_s: float = TIMEOUT_S) -> list[subprocess.CompletedProcess]:
  """Waits for both processes (killed after ``timeout_s``: a hang fails the test); returns both,
  checked for exit code 0."""
  results = []
  try:
    for p in procs:
      try:
        out, err = p.communicate(timeout=timeout_s)
      except subprocess.TimeoutExpired:
        for q in procs:
          q.kill()
        outputs_so_far = [q.communicate() for q in procs]
        pytest.fail(f'the processes did not finish within {timeout_s} s (a deadlock?); their stderr:\n' +
                    '\n'.join(err[-2000:] for _, err in outputs_so_far))
      results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, r in enumerate(results):
    assert r.returncode == 0, f'process {i} exited with {r.returncode}:\n{r.stdout}\n{r.stderr[-3000:]}'
  return results


def run_two_processes(workdir, cache_dir, *overrides: str) -> list[subprocess.CompletedProcess]:
  """Runs the DAFL CLI as processes 0 and 1 of one job; returns both, checked for exit code 0."""
  return finish(start_two_processes(workdir, cache_dir, *overrides))


@pytest.mark.slow
def test_two_processes_train_evaluate_checkpoint_and_resume(tmp_path):
  workdir, cache = tmp_path / 'run', tmp_path / 'xla_cache'
  first = run_two_processes(workdir, cache, '--config.num_epochs=1')
  # The held-out digits are split between the processes; the teacher gets 492 of the 500 right
  # only if every digit is counted exactly once.
  assert 'teacher top-1 on embedded_mnist[heldout]: 98.40%' in first[0].stdout
  records = outputs.read_metrics(workdir)
  assert [r['step'] for r in records] == [0, 1, 2]  # written once, by process 0
  assert records[0] == {'step': 0, 'eval/teacher_top1': 0.984, 'eval/teacher_worst_class_top1': 0.92}
  assert 'eval/student_top1' in records[2]
  assert sorted(d for d in os.listdir(workdir / 'checkpoints') if d.isdigit()) == ['1', '2']  # twice a run
  assert json.loads((workdir / 'summary.json').read_text())['steps'] == 2

  second = run_two_processes(workdir, cache)
  for i, r in enumerate(second):
    assert f'resuming from the checkpoint at step 2 in {workdir}' in r.stdout, f'process {i}: {r.stdout}'
  records = outputs.read_metrics(workdir)
  assert [r['step'] for r in records] == [0, 1, 2, 3, 4]
  assert all(np.isfinite(r['train/student_loss']) for r in records[1:])
  student_top1 = [r['eval/student_top1'] for r in records if 'eval/student_top1' in r]
  assert len(student_top1) == 2 and all(a * 500 == round(a * 500) for a in student_top1)  # k of 500
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['steps'] == 4 and summary['finished'] is True and summary['teacher_top1'] == 0.984
  assert summary['student_top1_final'] == student_top1[-1]
  assert sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit()) == [1, 2, 4]
  for step in (2, 4):
    with Image.open(workdir / 'samples' / f'step_{step:07d}.png') as grid:
      assert grid.size == (8 * 34 + 2, 8 * 34 + 2)
  assert json.loads((workdir / 'config.json').read_text())['num_epochs'] == 2
  # The student exported by both processes together (Orbax writes the global arrays collectively)
  # is one complete model directory that loads in a single process.
  assert not (workdir / 'student.partial').exists()
  _, variables, meta = model_dir.load(str(workdir / 'student'))
  assert meta['arch'] == 'lenet5_half'
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(variables))


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resumes(tmp_path):
  """A preemption notice reaches only process 1. Both processes must agree on the step to stop
  after: acting alone, process 1 would enter the (collective) checkpoint save while process 0
  enters the next step's collectives, and both would wait for ever."""
  workdir, cache = tmp_path / 'run', tmp_path / 'xla_cache'
  procs = start_two_processes(workdir, cache, '--config.num_epochs=500')  # 1,000 iterations: still training
  deadline = time.monotonic() + TIMEOUT_S
  while not any('train/student_loss' in r for r in outputs.read_metrics(workdir)):  # process 0 logs every step
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs), 'training did not start'
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)
  first = finish(procs, timeout_s=STOP_TIMEOUT_S)
  stopped = [re.search(r'stopped at step (\d+) \(checkpoint saved\)', r.stdout) for r in first]
  assert all(stopped), [r.stdout for r in first]
  step = int(stopped[0].group(1))
  assert int(stopped[1].group(1)) == step < 1000
  assert max(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit()) == step  # saved once, by both
  assert outputs.read_metrics(workdir)[-1]['step'] == step

  total = 2 * (step // 2 + 2)  # a shorter run (whole epochs of 2 iterations), so that the resumed part is short
  second = run_two_processes(workdir, cache, f'--config.num_epochs={total // 2}')
  for i, r in enumerate(second):
    assert f'resuming from the checkpoint at step {step} in {workdir}' in r.stdout + r.stderr, f'process {i}'
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['steps'] == total and summary['finished'] is True
  assert [r['step'] for r in outputs.read_metrics(workdir)][-(total - step):] == list(range(step + 1, total + 1))


class ObjectStore(MemoryFileSystem):
  """An in-memory stand-in for GCS (gcsfs): whole objects only, no appending."""
  store: dict = {}
  pseudo_dirs = ['']

  def _open(self, path, mode='rb', **kwargs):
    if 'a' in mode:
      raise NotImplementedError('objects cannot be appended to')
    return super()._open(path, mode, **kwargs)


@pytest.fixture
def object_store(monkeypatch):
  """``gs://`` paths of ``etils.epath`` served by ``ObjectStore`` (through its fsspec backend)."""
  ObjectStore.store.clear()
  monkeypatch.setattr('etils.epath.gpath._is_tf_installed', lambda: False)  # tf.io.gfile would reach GCS
  fsspec.register_implementation('gcs', ObjectStore, clobber=True)
  epath.backend.fsspec_backend._get_filesystem.cache_clear()
  yield 'gs://bucket/dfkd/run1'
  importlib.import_module('fsspec.registry')._registry.pop('gcs', None)
  epath.backend.fsspec_backend._get_filesystem.cache_clear()


def test_outputs_on_an_object_store_workdir(object_store):
  workdir = object_store
  outputs.write_json(f'{workdir}/config.json', {'method': 'dafl', 'batch_size': np.int64(64)})
  assert outputs.read_json(f'{workdir}/config.json') == {'method': 'dafl', 'batch_size': 64}

  writer = outputs.MetricWriter(workdir)
  writer.write(0, {'eval/teacher_top1': 0.984})
  writer.write(2, {'train/student_loss': np.float32(1.5), 'eval/student_top1': 0.25, 'time/elapsed_s': 3.0})
  writer.close()
  # A resumed run appends to what is there; a run that died after step 2's checkpoint had logged step 3.
  outputs.MetricWriter(workdir).write(3, {'eval/student_top1': 0.5})
  assert [r['step'] for r in outputs.read_metrics(workdir)] == [0, 2, 3]
  outputs.truncate_metrics(workdir, 2)
  assert outputs.read_metrics(workdir) == [
      {'step': 0, 'eval/teacher_top1': 0.984},
      {'step': 2, 'train/student_loss': 1.5, 'eval/student_top1': 0.25, 'time/elapsed_s': 3.0}]
  history = read_history(workdir)
  assert history['teacher_top1'] == 0.984 and history['student_top1'] == [0.25] and history['elapsed_s'] == 3.0

  images = np.linspace(0, 1, 4 * 5 * 5).reshape(4, 5, 5, 1)
  outputs.save_image_grid(f'{workdir}/samples/step_0000002.png', images)
  with epath.Path(f'{workdir}/samples/step_0000002.png').open('rb') as f, Image.open(f) as grid:
    assert grid.mode == 'L' and grid.size == (4 * 7 + 2, 7 + 2)
    assert np.asarray(grid)[2, 2] == 0 and np.asarray(grid)[2 + 4, 3 * 7 + 2 + 4] == 255
  assert sorted(epath.Path(workdir).iterdir()) == [epath.Path(f'{workdir}/{name}') for name in
                                                    ('config.json', 'metrics.jsonl', 'samples')]


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr('jax.process_index', lambda: 1)
  assert not outputs.is_writer()
  writer = outputs.MetricWriter(tmp_path)
  writer.write(1, {'train/loss': 1.0})
  outputs.truncate_metrics(tmp_path, 0)
  assert not os.listdir(tmp_path)
