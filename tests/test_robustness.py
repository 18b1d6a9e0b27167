"""Robustness: crash-safe resume, one run per workdir, numerical failures, bad input (issue #7).

Through the command line, as a user runs it (real subprocesses, one CPU device, DAFL runlocal
shrunk to 6 iterations at batch 8 with a checkpoint every iteration; one compilation shared through
a persistent compilation cache):
  - kill -9 at arbitrary moments (mid-step while a second run is refused by the lock, then in the
    middle of writing a checkpoint), then the same command: the final state is bitwise the
    uninterrupted run's, metrics read as one run;
  - a damaged latest checkpoint: one warning line, moved to checkpoints/corrupt/, the previous one
    used, the same final state;
  - a disk that fills while checkpointing (or while writing other outputs), a teacher whose logits
    overflow (a numerical failure after a good checkpoint), SIGTERM during start-up, and every bad
    input of the issue: the exit code, the one-line message, and every file already in the workdir
    unchanged.
In-process, on a tiny job (milliseconds per step): where the finiteness checks happen (never a
non-finite state checkpointed, even at a SIGTERM), the messages, 'skip' mode, SIGTERM during a
checkpoint read, the workdir lock, and each kind of checkpoint damage.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cli_output import logged, one_line_error
from config_files import with_overrides
from dfkd_jax import configlib
from dfkd_jax.convert import api, model_dir, teachers
from dfkd_jax.errors import StopRequested, UserError
from dfkd_jax.run import checkpoint, lock, loop, parallel
from dfkd_jax.run.job import Evaluated, Job, Phase
from dfkd_jax.run.numerics import NumericalError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/dafl_mnist.py:runlocal'
# No evaluation, sample grids or phase timing: the runs are about state, checkpoints and messages.
SMALL = ['--config.batch_size=8', '--config.num_epochs=3', '--config.eval.data=', '--config.report.sample_grid=False',
         '--config.report.phase_timing_reps=0', '--config.checkpoint.every_steps=1']
STEPS = 6
TIMEOUT = 600  # seconds; generous for a loaded 2-core machine
HOST = socket.gethostname()


# --- command-line runs --------------------------------------------------------------------------

@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """One CPU device (like a user's machine), compilations shared between the runs of this module."""
  return dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='',
              JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('xla_cache')),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


def command(workdir, *extra, config=CONFIG):
  return [sys.executable, '-m', 'dfkd_jax.main', '--config', config, '--workdir', str(workdir), *SMALL, *extra]


def start(workdir, env, *extra, **kw) -> subprocess.Popen:
  return subprocess.Popen(command(workdir, *extra, **kw), cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def run(workdir, env, *extra, **kw) -> subprocess.CompletedProcess:
  return subprocess.run(command(workdir, *extra, **kw), cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=TIMEOUT)


def assert_clean(result):
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr and 'error:' not in result.stderr, result.stderr[-3000:]


@pytest.fixture(scope='module')
def reference(tmp_path_factory, env):
  """The uninterrupted run: checkpoints at 4, 5, 6 (keep=3), the exported student."""
  workdir = tmp_path_factory.mktemp('reference')
  assert_clean(run(workdir, env))
  return workdir


def snapshot(workdir) -> dict[str, str]:
  """{relative path: sha256} of every file in ``workdir`` but the lock file."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      if name != lock.LOCK_NAME:
        with open(path, 'rb') as f:
          out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return out


def copy_run(reference, workdir, at_step: int = STEPS):
  """A copy of the reference workdir as it was after the checkpoint at ``at_step``."""
  shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns(lock.LOCK_NAME))
  if at_step < STEPS:
    for step in range(at_step + 1, STEPS + 1):
      shutil.rmtree(workdir / 'checkpoints' / str(step), ignore_errors=True)
    shutil.rmtree(workdir / 'student')
    os.remove(workdir / 'summary.json')
    lines = (workdir / 'metrics.jsonl').read_text().splitlines(keepends=True)
    (workdir / 'metrics.jsonl').write_text(''.join(lines[:at_step]))  # one record per step
  return workdir


def checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())


def temporary_dirs(workdir):
  return [d for d in os.listdir(workdir / 'checkpoints') if 'tmp' in d]


def restore_arrays(workdir, step):
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(os.path.join(workdir, 'checkpoints', str(step), 'state'))
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same_final_run(workdir, reference):
  """Bitwise the same final state and exported student, metrics that read as one run."""
  final, expected = restore_arrays(workdir, STEPS), restore_arrays(reference, STEPS)
  assert final.keys() == expected.keys()
  for key in final:
    assert final[key].dtype == expected[key].dtype and final[key].tobytes() == expected[key].tobytes(), key
  student = jax.tree.leaves(model_dir.load(str(workdir / 'student'))[1])
  for a, b in zip(student, jax.tree.leaves(model_dir.load(str(reference / 'student'))[1]), strict=True):
    assert a.tobytes() == b.tobytes()
  strip = lambda path: [{k: v for k, v in r.items() if not k.startswith('time/')} for r in read_metrics(path)]
  assert strip(workdir) == strip(reference)
  assert not temporary_dirs(workdir)


def read_metrics(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


class Lines:
  """Collects a running process's stdout lines in a thread (for waiting on a message)."""

  def __init__(self, proc):
    self.lines = []
    self._thread = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
    self._thread.start()

  def has(self, text):
    return any(text in line for line in list(self.lines))


def wait_for(condition, proc, what: str, interval: float = 0.002):
  deadline = time.monotonic() + TIMEOUT
  while not condition():
    assert proc.poll() is None, f'the run ended before {what}: {proc.stderr.read()[-3000:]}'
    assert time.monotonic() < deadline, f'timed out waiting for {what}'
    time.sleep(interval)


def kill_9(proc):
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_kill_9_anywhere_then_the_same_command_finishes_bitwise(reference, env, tmp_path):
  workdir = tmp_path / 'run'
  # 1. Frozen (SIGSTOP) somewhere after its second checkpoint: the workdir is busy.
  first = start(workdir, env)
  wait_for(lambda: (workdir / 'checkpoints' / '2').exists(), first, 'the checkpoint at step 2')
  first.send_signal(signal.SIGSTOP)
  refused = run(workdir, env)
  message = one_line_error(refused)
  assert message.startswith(f'error: the workdir {workdir} is in use by process {first.pid} on host {HOST} '
                            f'(started ')
  assert message.endswith('); wait for that run to end (or stop it), or use another --workdir')
  kill_9(first)  # the lock dies with it
  resumed_from = checkpoint_steps(workdir)[-1]
  assert resumed_from >= 2

  # 2. Killed while writing a checkpoint: stopped as soon as a save's temporary directory exists.
  second = start(workdir, env)
  out = Lines(second)
  wait_for(lambda: out.has('resuming from the checkpoint'), second, 'the resume')  # old temporaries are gone
  while True:
    wait_for(lambda: temporary_dirs(workdir), second, 'a checkpoint being written', interval=0.001)
    second.send_signal(signal.SIGSTOP)
    if temporary_dirs(workdir):
      break
    second.send_signal(signal.SIGCONT)  # it finished in between: catch the next one
  half_written = temporary_dirs(workdir)
  kill_9(second)
  assert out.has(f'resuming from the checkpoint at step {resumed_from} in {workdir}')
  complete = checkpoint_steps(workdir)
  assert half_written and complete[-1] < STEPS

  # 3. The same command resumes from the last complete checkpoint and finishes.
  result = run(workdir, env)
  assert_clean(result)
  assert f'resuming from the checkpoint at step {complete[-1]} in {workdir}' in result.stdout
  assert f'done: {STEPS} steps' in result.stdout
  assert_same_final_run(workdir, reference)


@pytest.mark.slow
def test_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_used(reference, env, tmp_path):
  workdir = copy_run(reference, tmp_path / 'run')
  data = max((os.path.join(root, f) for root, _, files in os.walk(workdir / 'checkpoints' / str(STEPS))
              for f in files), key=os.path.getsize)
  with open(data, 'r+b') as f:  # a few bytes flipped in the middle: Orbax itself would read it
    f.seek(os.path.getsize(data) // 2)
    f.write(b'\x00\x01\x02\x03')
  damaged = snapshot(workdir / 'checkpoints' / str(STEPS))
  previous = {s: snapshot(workdir / 'checkpoints' / str(s)) for s in (STEPS - 2, STEPS - 1)}
  result = run(workdir, env)
  assert_clean(result)
  (quarantined,) = os.listdir(workdir / 'checkpoints' / 'corrupt')
  (warning,) = [m for m in logged(result.stderr, 'W') if 'unreadable' in m]
  assert warning.startswith(f"checkpoint at step {STEPS} is unreadable (array ['")
  assert warning.endswith(f'] does not match the fingerprint saved with it); moved it to '
                          f'{workdir}/checkpoints/corrupt/{quarantined} and resuming from the previous one')
  assert f'resuming from the checkpoint at step {STEPS - 1}' in result.stdout
  assert quarantined.startswith(f'{STEPS}.')
  assert snapshot(workdir / 'checkpoints' / 'corrupt' / quarantined) == damaged  # kept as it was
  for step, files in previous.items():
    assert snapshot(workdir / 'checkpoints' / str(step)) == files
  assert_same_final_run(workdir, reference)


@pytest.mark.slow
def test_disk_full_while_checkpointing(reference, env, tmp_path):
  workdir = copy_run(reference, tmp_path / 'run', at_step=4)
  before = snapshot(workdir)
  # A full disk, honestly simulated: a file may not grow past 2 MB, and the generator's first layer
  # (and each of its Adam moments) is a 3.3 MB array; Orbax spreads arrays over a varying number of
  # data files, but never splits one, so the write always fails with EFBIG (SIGXFSZ ignored) as it
  # would with ENOSPC.
  limited = ['bash', '-c', 'trap "" XFSZ; ulimit -f 2048; exec "$@"', 'bash', *command(workdir)]
  result = subprocess.run(limited, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
  assert one_line_error(result) == (
      f'error: could not write the checkpoint at step 5 in {workdir}/checkpoints (File too large); the '
      f'checkpoint at step 4 is intact. Free disk space (or raise the quota) and re-run the same command to resume')
  assert checkpoint_steps(workdir) == [4]
  after = snapshot(workdir)
  assert {k: v for k, v in after.items() if k.startswith('checkpoints/4/')} == \
         {k: v for k, v in before.items() if k.startswith('checkpoints/4/')}
  assert_clean(result := run(workdir, env))
  assert 'resuming from the checkpoint at step 4' in result.stdout
  assert_same_final_run(workdir, reference)


@pytest.fixture(scope='module')
def teacher_files(tmp_path_factory):
  """Teacher checkpoints a user might pass by mistake, and one that overflows."""
  d = tmp_path_factory.mktemp('teachers')
  embedded = teachers.resolve_path('embedded:lenet5_mnist')
  api.export(embedded, d / 'lenet5.pth')
  data = (d / 'lenet5.pth').read_bytes()
  (d / 'truncated.pth').write_bytes(data[:len(data) // 2])
  (d / 'notes.pth').write_text('these are my notes, not a checkpoint\n')
  for arch, classes in (('lenet5_half', 10), ('lenet5', 100)):
    _, shapes = model_dir.abstract_variables(arch, classes, {})
    rng = np.random.default_rng(0)
    weights = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), shapes)
    api.save_pth(d / f'{arch}_{classes}.pth', arch, weights)
  with zipfile.ZipFile(d / 'evil.pth', 'w') as archive:  # torch.save layout, a payload instead of tensors
    archive.writestr('archive/data.pkl', pickle.dumps({'state_dict': _Payload(d / 'pwned')}, protocol=2))
    archive.writestr('archive/version', '3\n')
  shutil.copytree(embedded, d / 'truncated_dir')
  weights = max((os.path.join(r, f) for r, _, fs in os.walk(d / 'truncated_dir') for f in fs), key=os.path.getsize)
  os.truncate(weights, os.path.getsize(weights) // 2)
  _, variables, meta = model_dir.load(embedded)
  variables['params']['fc.2']['kernel'] = variables['params']['fc.2']['kernel'] * np.float32(1e38)
  model_dir.save(d / 'overflowing', meta['arch'], variables, num_classes=10, dataset='mnist')
  (d / 'empty_tfds').mkdir()
  return d


class _Payload:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(reference, env, teacher_files, tmp_path):
  """A teacher whose logits overflow to inf, resumed after a good checkpoint: the first step makes
  every loss NaN; the run stops naming them, the models and the step; checkpoint 4 is untouched."""
  workdir = copy_run(reference, tmp_path / 'run', at_step=4)
  before = snapshot(workdir)
  result = run(workdir, env, f'--config.teacher.checkpoint={teacher_files / "overflowing"}')
  message = one_line_error(result, code=3)
  assert message.startswith('error: numerical failure at step 5: train/generator_grad_norm=nan, '
                            'train/generator_loss=nan, ')
  assert 'train/loss_oh=nan' in message and 'train/student_loss=nan' in message
  # The images the replay pool received were made before the generator's update: finite.
  assert '; non-finite values in: generator, student;' in message
  assert message.endswith('; the run stopped without keeping anything of this step and the last good checkpoint '
                          '(step 4) is kept; lower the learning rate, or set --config.numerics.on_nonfinite=skip '
                          'to skip such updates')
  assert checkpoint_steps(workdir) == [4]
  after = snapshot(workdir)
  assert {k: after[k] for k in before if k != 'config.json'} == {k: v for k, v in before.items() if k != 'config.json'}


@pytest.mark.slow
def test_sigterm_during_start_up_exits_0_and_changes_nothing(reference, env, tmp_path):
  # With the compilations in the cache the start-up after the lock lasts about 2 s: a test process
  # stalled longer than that (a loaded machine) signals a run that is already training, which stops
  # with a checkpoint (tests/test_smoke.py), or even done. Such an attempt tests nothing here: it is
  # made again on a fresh copy.
  for attempt in range(3):
    workdir = copy_run(reference, tmp_path / f'run{attempt}', at_step=4)
    before = snapshot(workdir)
    proc = start(workdir, env)
    lock_file = workdir / lock.LOCK_NAME
    # The lock is taken before the slow start-up (jax import, teacher, compilation) begins.
    wait_for(lambda: lock_file.exists() and f'"pid": {proc.pid}' in lock_file.read_text(), proc, 'the workdir lock')
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err[-3000:]
    if 'stopped at step' not in out and 'done:' not in out:  # not trained: the signal came in start-up
      break
  else:
    pytest.fail('in 3 attempts the SIGTERM reached the run only after its start-up')
  notes = logged(err)
  assert notes[-1] == ('stopped by SIGTERM before the first training step; nothing was changed; re-run the same '
                       'command to continue')
  assert len(notes) == len(err.strip().splitlines())  # nothing but log records
  assert snapshot(workdir) == before


def _bad_input_cases(files):
  """id -> (extra arguments, config file, fragments of the one-line message)."""
  return {
      'config_missing': ([], 'configs/no_such_config.py',
                         ["cannot load the config file", "No such file or directory: 'configs/no_such_config.py'"]),
      'unknown_key': (['--config.nope=1'], CONFIG, ["unknown config key 'nope' in --config.nope"]),
      'wrong_type': (['--config.g_steps=two'], CONFIG, ['--config.g_steps=two', "invalid literal for int()"]),
      'batch_not_divisible': (['--config.batch_size=9'], CONFIG,
                              ['batch_size=9 is not divisible by the 2 devices of the mesh', 'use batch_size=8 or 10']),
      'teacher_missing': ([f'--config.teacher.checkpoint={files}/missing.pth'], CONFIG,
                          [f"teacher checkpoint '{files}/missing.pth' does not exist; set --config.teacher.checkpoint "
                           f"to embedded:NAME ({', '.join(teachers.embedded_names())}), a converted directory or a "
                           '.pth file']),
      'teacher_truncated': ([f'--config.teacher.checkpoint={files}/truncated.pth'], CONFIG,
                            [f'{files}/truncated.pth is truncated or corrupted']),
      'teacher_dir_truncated': ([f'--config.teacher.checkpoint={files}/truncated_dir'], CONFIG,
                                [f'cannot read the weights in {files}/truncated_dir: ']),
      'teacher_not_a_checkpoint': ([f'--config.teacher.checkpoint={files}/notes.pth'], CONFIG,
                                   [f'{files}/notes.pth is not a PyTorch checkpoint']),
      'teacher_other_arch': ([f'--config.teacher.checkpoint={files}/lenet5_half_10.pth',
                              '--config.teacher.arch=lenet5'],
                             CONFIG, ['lenet5_half_10.pth (read as lenet5) does not match the architecture',
                                      'did you mean arch=lenet5_half, num_classes=10?']),
      'teacher_other_class_count': ([f'--config.teacher.checkpoint={files}/lenet5_100.pth'], CONFIG,
                                    ['fc.2.bias: file (100,) vs expected (10,)', 'did you mean num_classes=100?']),
      'code_running_pickle': ([f'--config.teacher.checkpoint={files}/evil.pth'], CONFIG,
                              [f'refusing to load {files}/evil.pth: it calls posix.system',
                               'nothing from the file was run']),
      'dataset_not_prepared': (['--config.eval.data=tfds:mnist', '--config.eval.split=test',
                                f'--config.data_dir={files}/empty_tfds'], CONFIG,
                               [f"tfds dataset 'mnist' split 'test' is not prepared in {files}/empty_tfds",
                                "download_and_prepare()"]),
      'changed_state_shapes': (['--config.student.arch=lenet5'], CONFIG,
                               ['checkpoints does not fit this config: the state differs '
                                '(student.params.fc.0.bias float32[42] -> float32[84], ',
                                "config fields changed since then: ", "student.arch: 'lenet5_half' -> 'lenet5'",
                                '; resume with the original config, or use a new --workdir']),
  }


@pytest.fixture(scope='module')
def bad_input_results(reference, env, teacher_files, tmp_path_factory):
  """Every bad-input command, run concurrently, each on its own copy of the finished reference run:
  id -> (result, workdir, snapshot before)."""
  procs = {}
  for name, (extra, config, _) in _bad_input_cases(teacher_files).items():
    workdir = copy_run(reference, tmp_path_factory.mktemp(name) / 'run')
    run_env = dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=2') if name == 'batch_not_divisible' else env
    procs[name] = (subprocess.Popen(command(workdir, *extra, config=config), cwd=REPO, env=run_env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE), workdir, snapshot(workdir))
  results = {}
  for name, (proc, workdir, before) in procs.items():
    out, err = proc.communicate(timeout=TIMEOUT)
    results[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), workdir, before)
  return results


@pytest.mark.slow
@pytest.mark.parametrize('case', list(_bad_input_cases('FILES')))
def test_bad_input_is_one_line_and_loses_nothing(bad_input_results, teacher_files, case):
  result, workdir, before = bad_input_results[case]
  message = one_line_error(result)
  for fragment in _bad_input_cases(teacher_files)[case][2]:
    assert fragment in message, (fragment, message)
  assert snapshot(workdir) == before  # the finished run's checkpoints and outputs are untouched
  assert not (teacher_files / 'pwned').exists()


def test_unwritable_workdir(env, tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  message = one_line_error(run(blocker / 'run', env))
  assert message == f"error: cannot create the workdir '{blocker / 'run'}': Not a directory"
  assert blocker.read_text() == 'not a directory'


@pytest.mark.slow
def test_disk_full_outside_checkpoints_is_one_line(env, tmp_path):
  """A full disk while writing metrics or outputs (simulated where the run starts) is one line too."""
  full = (f'import errno, sys\nfrom dfkd_jax import main, train\n'
          f'def no_space(*args):\n'
          f'  raise OSError(errno.ENOSPC, "No space left on device", "{tmp_path}/metrics.jsonl")\n'
          f'train.train_and_evaluate = no_space\nsys.argv = {command(tmp_path)[2:]!r}\nmain.run()\n')
  result = subprocess.run([sys.executable, '-c', full], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
  assert one_line_error(result) == (f'error: No space left on device: {tmp_path}/metrics.jsonl; free disk space or '
                                    'fix the permissions, then re-run the same command (it resumes from the last '
                                    'checkpoint)')


# --- the loop in-process, on a tiny job ---------------------------------------------------------

def tiny_config(**overrides):
  c = configlib.base(method='tiny', dataset='mnist', num_classes=10, image_size=32, in_channels=1, eval_data='')
  c.log.every_steps, c.checkpoint.every_steps, c.report.phase_timing_reps = 4, 3, 0
  return with_overrides(c, **overrides)


def tiny_job(num_steps=8, nan_loss_at=(), inf_student_at=(), on_batch=None) -> Job:
  """Generator w <- w/2 + 1 (its loss is sum w), student v <- v + 1 (its loss is the old sum v).
  ``nan_loss_at``: steps (1-based, as logged) whose generator update is NaN; ``inf_student_at``:
  steps whose student update is inf while its loss stays finite."""

  def at(step, steps):
    return jnp.isin(step, jnp.asarray(steps, jnp.int32)) if steps else jnp.array(False)

  def synth(state, frozen, key, batch):
    w = state['generator']['w'] / 2 + 1
    w = jnp.where(at(state['step'] + 1, nan_loss_at), jnp.nan, w)
    return dict(state, generator={'w': w}), {'train/generator_loss': w.sum()}

  def kd(state, frozen, key, batch):
    v = state['student']['v']
    new = jnp.where(at(state['step'] + 1, inf_student_at), jnp.inf, v + 1)
    return dict(state, student={'v': new}), {'train/student_loss': v.sum()}

  def next_batch(step):
    if on_batch is not None:
      on_batch(step)
    return {}

  return Job(init=lambda key: {'step': jnp.zeros((), jnp.int32), 'generator': {'w': jnp.ones(3)},
                                    'student': {'v': jnp.zeros(2)}},
                  phases=[Phase('synth', synth), Phase('kd', kd)], frozen={}, num_steps=num_steps,
                  student=Evaluated(lambda v, x, train=False: x, lambda s: s['student']),
                  next_batch=next_batch)


def tiny_run(workdir, job, **overrides):
  return loop.run(job, tiny_config(**overrides), str(workdir), parallel.make_mesh(1))


def logged_steps(workdir):
  return [r['step'] for r in read_metrics(workdir)]


def test_nonfinite_loss_between_logs_is_caught_before_the_next_checkpoint(tmp_path):
  # Step 5 is neither logged (every 4) nor checkpointed (every 3): the check at step 6's save finds it.
  with pytest.raises(NumericalError) as error:
    tiny_run(tmp_path, tiny_job(nan_loss_at=[5]))
  assert str(error.value) == (
      'numerical failure at step 5: train/generator_loss=nan; non-finite values in: generator; the run stopped '
      'without keeping anything of this step and the last good checkpoint (step 3) is kept; lower the learning '
      'rate, or set --config.numerics.on_nonfinite=skip to skip such updates')
  assert error.value.exit_code == 3
  assert checkpoint_steps(tmp_path) == [3] and logged_steps(tmp_path) == [4]


def test_nonfinite_parameter_with_finite_losses_names_the_model(tmp_path):
  with pytest.raises(NumericalError, match=r'^numerical failure at step 2: every loss is finite; non-finite '
                                                r'values in: student; .* no checkpoint had been saved yet;'):
    tiny_run(tmp_path, tiny_job(inf_student_at=[2]))
  assert checkpoint_steps(tmp_path) == [] and not (tmp_path / 'metrics.jsonl').exists()


def test_sigterm_at_a_nonfinite_step_does_not_checkpoint_it(tmp_path):
  """The stop signal forces a checkpoint of step 5 (off the interval); its state is NaN, so the
  run reports the failure instead and keeps checkpoint 3."""
  stop = lambda step: step == 4 and os.kill(os.getpid(), signal.SIGTERM)  # while fetching step 5's batch
  with pytest.raises(NumericalError, match='^numerical failure at step 5: train/generator_loss=nan; .*'
                                                r'the last good checkpoint \(step 3\) is kept'):
    tiny_run(tmp_path, tiny_job(nan_loss_at=[5], on_batch=stop))
  assert checkpoint_steps(tmp_path) == [3]


def test_skip_mode_keeps_the_previous_state_and_counts_the_skips(tmp_path):
  summary = tiny_run(tmp_path, tiny_job(nan_loss_at=[2, 5]), **{'numerics.on_nonfinite': 'skip'})
  assert summary.values['finished'] and summary.values['skipped_updates'] == 2
  assert [(r['step'], r['train/skipped_updates']) for r in read_metrics(tmp_path)] == [(4, 1), (8, 2)]
  state = restore_arrays(tmp_path, 8)
  w = np.ones(3, np.float32)
  for _ in range(8 - 2):  # two of the eight updates were skipped: generator and student both kept
    w = w / np.float32(2) + np.float32(1)
  assert state["['generator']['w']"].tobytes() == w.tobytes()
  np.testing.assert_array_equal(state["['student']['v']"], [6.0, 6.0])
  assert int(state["['step']"]) == 8 and int(state["['skipped_updates']"]) == 2


def test_unknown_nonfinite_mode(tmp_path):
  with pytest.raises(UserError, match=r"^numerics.on_nonfinite must be one of stop, skip, not 'ignore'$"):
    tiny_run(tmp_path, tiny_job(), **{'numerics.on_nonfinite': 'ignore'})


def test_sigterm_while_reading_a_checkpoint_stops_without_touching_it(tmp_path, monkeypatch):
  """Before the first step SIGTERM stops at once; a stop in the middle of restoring is not mistaken
  for a damaged checkpoint (nothing is moved aside), and the workdir lock is released."""
  tiny_run(tmp_path, tiny_job(num_steps=3))
  before = snapshot(tmp_path)
  real_init = checkpoint.Checkpointer.__init__

  def init_then_signal_on_read(self, *args, **kw):
    real_init(self, *args, **kw)
    real_restore = self.manager.restore

    def restore(*a, **k):
      os.kill(os.getpid(), signal.SIGTERM)  # handled inside restore_latest's try block
      return real_restore(*a, **k)

    self.manager.restore = restore

  monkeypatch.setattr(checkpoint.Checkpointer, '__init__', init_then_signal_on_read)
  with pytest.raises(StopRequested):
    tiny_run(tmp_path, tiny_job(num_steps=6))
  assert snapshot(tmp_path) == before and not (tmp_path / 'checkpoints' / 'corrupt').exists()
  with lock.claim(str(tmp_path)):
    pass


def test_workdir_lock_names_the_owner_and_dies_with_it(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time\nfrom dfkd_jax.run import lock\n'
                             f'with lock.claim({str(tmp_path)!r}):\n  print("held", flush=True)\n'
                             '  time.sleep(600)\n'],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == 'held\n'
    with pytest.raises(UserError) as error:
      with lock.claim(str(tmp_path)):
        pass
    assert str(error.value).startswith(f'the workdir {tmp_path} is in use by process {holder.pid} on host {HOST} '
                                       '(started ')
  finally:
    kill_9(holder)
  with lock.claim(str(tmp_path)):  # kill -9 released it
    with lock.claim(str(tmp_path)):  # re-entrant within a process (the CLI, then the loop)
      pass
    assert f'"pid": {os.getpid()}' in (tmp_path / lock.LOCK_NAME).read_text()


# --- checkpoint damage and mismatches, on the Checkpointer alone ------------------------------

def _saved(tmp_path, steps=(1, 2)):
  """A Checkpointer holding small random states at ``steps``; returns it, the states and a target."""
  saver = checkpoint.Checkpointer(str(tmp_path), every_steps=1, async_save=False)
  states = {s: {'step': jnp.int32(s), 'w': jax.random.normal(jax.random.key(s), (256, 64)),
                'key': jax.random.key(s)} for s in steps}
  for s, state in states.items():
    saver.save(s, state, {'lr': 0.1, 'model': {'width': 64}})
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), states[steps[0]])
  return saver, states, target


def _largest_file(directory):
  return max((os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs), key=os.path.getsize)


def _flip_bytes(step_dir):
  path = _largest_file(step_dir)
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0x10]))  # one bit


DAMAGE = {
    'one_flipped_bit': (_flip_bytes, "array ['w'] does not match the fingerprint saved with it"),
    'truncated_data': (lambda d: os.truncate(_largest_file(d), os.path.getsize(_largest_file(d)) // 2),
                       'Encountered error while reading array'),
    'empty_metadata': (lambda d: open(os.path.join(d, 'state', '_METADATA'), 'w').close(),
                       'its metadata cannot be read: Expecting value'),
    'state_missing': (lambda d: shutil.rmtree(os.path.join(d, 'state')), 'its metadata cannot be read: '),
}


@pytest.mark.parametrize('damage', list(DAMAGE))
def test_damaged_checkpoint_is_reported_moved_aside_and_skipped(tmp_path, caplog, damage):
  saver, states, target = _saved(tmp_path)
  damage_fn, reason = DAMAGE[damage]
  damage_fn(str(tmp_path / 'checkpoints' / '2'))
  damaged = snapshot(tmp_path / 'checkpoints' / '2')
  restored, step = saver.restore_latest(target)
  saver.close()
  assert step == 1
  np.testing.assert_array_equal(jax.random.key_data(restored['key']), jax.random.key_data(states[1]['key']))
  np.testing.assert_array_equal(restored['w'], states[1]['w'])
  (line,) = [r.getMessage() for r in caplog.records if r.name == checkpoint.__name__]
  (moved,) = os.listdir(tmp_path / 'checkpoints' / 'corrupt')
  assert line.startswith('checkpoint at step 2 is unreadable (') and reason in line
  assert line.endswith(f'); moved it to {tmp_path}/checkpoints/corrupt/{moved} and resuming from the previous one')
  assert snapshot(tmp_path / 'checkpoints' / 'corrupt' / moved) == damaged  # moved, not deleted or changed


def test_checkpoint_of_another_config_names_arrays_and_fields(tmp_path):
  saver, _, target = _saved(tmp_path, steps=(1,))
  wider = dict(target, w=jax.ShapeDtypeStruct((256, 128), jnp.float32, sharding=target['w'].sharding),
               extra=target['step'])
  with pytest.raises(UserError) as error:
    saver.restore_latest(wider, {'lr': 0.1, 'model': {'width': 128}})
  saver.close()
  assert str(error.value) == (
      f'the checkpoint at step 1 in {tmp_path}/checkpoints does not fit this config: the state differs (extra new, '
      "w float32[256,64] -> float32[256,128]); config fields changed since then: model.width: 64 -> 128; resume "
      'with the original config, or use a new --workdir')
  assert checkpoint_steps(tmp_path) == [1] and not (tmp_path / 'checkpoints' / 'corrupt').exists()
