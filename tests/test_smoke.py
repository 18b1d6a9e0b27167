"""End to end through the command line, as a user runs it (one CPU device, a subprocess):

- the README's main command in runlocal form (DAFL from the embedded teacher, 4 iterations);
- the teacher config in runlocal form (70 steps);
- SIGTERM to a running CLI: exit 0 with a checkpoint at the stop step; re-running the same command
  resumes and finishes with exactly the arrays of the uninterrupted run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY_KEYS = {'teacher_top1', 'student_top1_best', 'student_top1_final', 'steps', 'wall_s', 'peak_rss_mb'}
TEACHER = 'configs/teacher_lenet5_mnist.py:runlocal'


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = ''  # one CPU device, like a user's machine (conftest fakes 8 for in-process tests)
  return env


def _command(config, workdir):
  return [sys.executable, '-m', 'dfkd_jax.main', '--config', config, '--workdir', str(workdir)]


def _run(config, workdir, timeout=300):
  return subprocess.run(_command(config, workdir), cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=timeout)


def _json(path):
  with open(path) as f:
    return json.load(f)


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())


def _restore_arrays(workdir, step):
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(os.path.join(workdir, 'checkpoints', str(step), 'state'))
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_clean(result):
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr and 'error:' not in result.stderr


@pytest.mark.slow
def test_readme_main_command_runlocal(tmp_path):
  workdir = tmp_path / 'dafl_mnist'
  result = _run('configs/dafl_mnist.py:runlocal', workdir)
  _assert_clean(result)
  assert 'teacher top-1 on embedded_mnist[heldout]: 98.40%' in result.stdout
  assert 'done: 4 steps' in result.stdout
  summary = _json(workdir / 'summary.json')
  assert SUMMARY_KEYS | {'synth_s', 'kd_s'} <= summary.keys()
  assert summary['steps'] == 4 and summary['finished'] is True and summary['teacher_top1'] == 0.984
  assert 0.0 <= summary['student_top1_final'] <= 1.0 and summary['synth_s'] > 0 and summary['kd_s'] > 0
  assert _json(workdir / 'config.json')['method'] == 'dafl'
  records = _metrics(workdir)
  assert [r['step'] for r in records] == [0, 1, 2, 3, 4]
  assert all('train/student_loss' in r and 'train/generator_loss' in r for r in records[1:])
  assert records[-1]['eval/student_top1'] == summary['student_top1_final']
  assert _checkpoint_steps(workdir) == [2, 4]
  for step in (2, 4):
    with Image.open(workdir / 'samples' / f'step_{step:07d}.png') as grid:
      assert grid.size == (274, 274) and np.asarray(grid).std() > 0
  student = _json(workdir / 'student' / 'metadata.json')  # the distilled student, exported
  assert student['arch'] == 'lenet5_half' and student['num_classes'] == 10


@pytest.fixture(scope='module')
def teacher_cli_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('teacher_cli')
  result = _run(TEACHER, workdir)
  return workdir, result


@pytest.mark.slow
def test_teacher_config_runlocal(teacher_cli_run):
  workdir, result = teacher_cli_run
  _assert_clean(result)
  assert 'done: 70 steps' in result.stdout
  summary = _json(workdir / 'summary.json')
  assert SUMMARY_KEYS <= summary.keys() and summary['steps'] == 70 and summary['finished'] is True
  assert summary['student_top1_final'] > 0.5
  assert [r['step'] for r in _metrics(workdir)] == [10, 20, 30, 35, 40, 50, 60, 70]
  assert _checkpoint_steps(workdir) == [35, 70]
  model = _json(workdir / 'model' / 'metadata.json')
  assert model['arch'] == 'lenet5' and model['dataset'] == 'mnist'


@pytest.mark.slow
def test_sigterm_then_rerun_resumes_bitwise(teacher_cli_run, tmp_path):
  full, full_result = teacher_cli_run
  _assert_clean(full_result)
  workdir = tmp_path / 'run'
  proc = subprocess.Popen(_command(TEACHER, workdir), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    # Wait for the first metrics record (step 10), then stop the run in the middle of training.
    deadline = time.monotonic() + 240
    metrics = workdir / 'metrics.jsonl'
    while not (metrics.exists() and metrics.read_text().endswith('\n')):
      assert proc.poll() is None, proc.communicate()[1][-3000:]
      assert time.monotonic() < deadline, 'the run never logged step 10'
      time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err[-3000:]
  assert 'Traceback' not in err
  (stopped,) = _checkpoint_steps(workdir)
  assert 10 <= stopped < 35
  assert f'stopped at step {stopped} (checkpoint saved); re-run the same command to resume' in out
  assert not (workdir / 'summary.json').exists() or _json(workdir / 'summary.json')['finished'] is False

  result = _run(TEACHER, workdir)
  _assert_clean(result)
  assert f'resuming from the checkpoint at step {stopped} in {workdir}' in result.stdout
  assert 'done: 70 steps' in result.stdout
  final, reference = _restore_arrays(workdir, 70), _restore_arrays(full, 70)
  assert final.keys() == reference.keys()
  for key in final:
    assert final[key].dtype == reference[key].dtype and final[key].tobytes() == reference[key].tobytes(), key
  records, full_records = _metrics(workdir), _metrics(full)
  steps = [r['step'] for r in records]
  assert steps == [r['step'] for r in full_records] and len(set(steps)) == len(steps)
  strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith('time/')} for r in rs]
  assert strip(records) == strip(full_records)
  assert _json(workdir / 'summary.json')['student_top1_final'] == _json(full / 'summary.json')['student_top1_final']
