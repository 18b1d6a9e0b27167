"""The training loop through ``train_and_evaluate`` in-process, and evaluation.

- Outputs of a teacher run (``configs/teacher_lenet5_mnist.py:runlocal``, 70 steps on a 2-device
  mesh) and a DAFL run (``configs/dafl_mnist.py:runlocal``, 4 iterations): ``config.json``,
  ``metrics.jsonl``, ``summary.json``, checkpoints, the exported model, the sample grids.
- Resume is bitwise: a run stopped by SIGTERM (sent from inside the loop at a chosen step), then
  re-run to completion, ends with exactly the arrays of an uninterrupted run, and its
  ``metrics.jsonl`` reads as one run (no duplicate steps, equal values). Same after losing the last
  checkpoint (metrics logged after the resumed step are dropped).
- ``evaluation.accuracies`` counts every example exactly once with padding, on meshes of 1 and 2 devices,
  overall and per class.

Compiles are shared between the runs of this module through a persistent compilation cache in a
temporary directory (every run builds new closures, so jit's in-memory cache cannot help).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental.compilation_cache import compilation_cache
from PIL import Image

from config_files import load_config
from dfkd_jax.convert import model_dir
from dfkd_jax.errors import UserError
from dfkd_jax.run import evaluation, loop, parallel, timing
from dfkd_jax.run.job import Job, Phase
from dfkd_jax.run.timing import time_phases
from dfkd_jax.train import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY_KEYS = {'teacher_top1', 'student_top1_best', 'student_top1_final', 'steps', 'wall_s', 'peak_rss_mb'}
_CACHE_OPTIONS = {'jax_compilation_cache_dir': None, 'jax_persistent_cache_min_compile_time_secs': 0.0,
                  'jax_persistent_cache_min_entry_size_bytes': 0}


@pytest.fixture(scope='module', autouse=True)
def compile_once(tmp_path_factory):
  saved = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
  compilation_cache.reset_cache()
  for name, value in dict(_CACHE_OPTIONS, jax_compilation_cache_dir=str(tmp_path_factory.mktemp('xla'))).items():
    jax.config.update(name, value)
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


def teacher_config(**overrides):
  return load_config('teacher_lenet5_mnist', **{'mesh.num_devices': 2, **overrides})


def dafl_config(**overrides):
  return load_config('dafl_mnist', **{'mesh.num_devices': 1, **overrides})


def stop_at(monkeypatch, step: int):
  """Sends this process SIGTERM while the loop fetches the batch of ``step`` (0-based), so the
  loop finishes that iteration, checkpoints and stops: exactly what a preempted run does."""
  real = loop.device_batch

  def signalling_batch(job, s, sharding):
    if s == step:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(job, s, sharding)

  monkeypatch.setattr(loop, 'device_batch', signalling_batch)


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def read_json(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return json.load(f)


def checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())


def restore_arrays(workdir, step):
  """The state saved at ``step``, restored by Orbax from ``WORKDIR/checkpoints/<step>/state``,
  as {path: numpy array}."""
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(path)
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def assert_bitwise_equal(a: dict, b: dict):
  assert a.keys() == b.keys()
  for key in a:
    assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
    assert a[key].tobytes() == b[key].tobytes(), f'{key} differs'


def without_timing(records):
  return [{k: v for k, v in r.items() if not k.startswith('time/')} for r in records]


def assert_same_run_metrics(resumed, reference):
  steps = [r['step'] for r in resumed]
  assert len(steps) == len(set(steps)), f'duplicate steps in metrics.jsonl: {steps}'
  assert steps == sorted(steps)
  assert without_timing(resumed) == without_timing(reference)


# --- evaluation ---------------------------------------------------------------------------------

def _label_encoding_apply(variables, x, train=False):
  """A fake classifier: ``x[:, 0]`` holds the example index; predicts the true label for the
  indices in ``variables['correct']`` and a wrong one otherwise."""
  assert train is False
  idx = x[:, 0].astype(jnp.int32)
  label = variables['labels'][idx]
  pred = jnp.where(variables['correct'][idx], label, (label + 1) % 10)
  return jax.nn.one_hot(pred, 10)


def _accuracies(labels, correct, eval_set, mesh, batch):
  variables = {'labels': jnp.asarray(labels), 'correct': jnp.asarray(correct)}
  return evaluation.accuracies(_label_encoding_apply, variables, eval_set, mesh, batch)


@pytest.mark.parametrize('num_devices', [1, 2])
def test_accuracies_count_every_example_once(num_devices):
  n, batch = 10, 4
  labels = np.array([0, 3, 1, 4, 1, 5, 9, 2, 6, 5], np.int32)
  correct = np.zeros(n, bool)
  correct[[0, 2, 7]] = True  # padded rows read as example 0 (label 0): counting them would inflate
  eval_set = evaluation.EvalSet.build(np.arange(n, dtype=np.float32)[:, None], labels, batch)
  assert eval_set.size == n and len(eval_set.images) == 12 and eval_set.mask.sum() == n
  np.testing.assert_array_equal(eval_set.mask, [1] * 10 + [0] * 2)
  mesh = parallel.make_mesh(num_devices)
  assert _accuracies(labels, correct, eval_set, mesh, batch) == {'top1': 0.3, 'worst_class_top1': 0.0}
  correct[:] = True
  assert _accuracies(labels, correct, eval_set, mesh, batch) == {'top1': 1.0, 'worst_class_top1': 1.0}
  # A batch that divides the split: no padding, same count. Classes 1 and 5 hold two examples each;
  # one of each right: the worst of the eight classes present (7 and 8 absent) is 0.5.
  exact = evaluation.EvalSet.build(np.arange(n, dtype=np.float32)[:, None], labels, 2)
  assert len(exact.images) == n
  correct[[2, 5]] = False
  assert _accuracies(labels, correct, exact, mesh, 2) == {'top1': 0.8, 'worst_class_top1': 0.5}


# --- teacher training ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def teacher_run(tmp_path_factory):
  """An uninterrupted teacher runlocal run (70 steps, checkpoints at 35 and 70)."""
  workdir = str(tmp_path_factory.mktemp('teacher_full'))
  config = teacher_config()
  summary = train_and_evaluate(config, workdir)
  return workdir, config, summary


@pytest.mark.slow
def test_teacher_outputs(teacher_run):
  workdir, config, summary = teacher_run
  assert summary.stopped_by_signal is None
  assert read_json(workdir, 'config.json') == json.loads(config.to_json())
  records = read_metrics(workdir)
  steps = [r['step'] for r in records]
  assert steps == [10, 20, 30, 35, 40, 50, 60, 70]  # logs every 10 steps, evaluations at 35 and 70
  for r in records:
    assert isinstance(r['step'], int)
    if r['step'] % 10 == 0:
      assert {'train/loss', 'train/accuracy', 'train/lr'} <= r.keys()
      assert all(np.isfinite(r[k]) for k in ('train/loss', 'train/accuracy', 'train/lr'))
    assert r['time/elapsed_s'] >= r['time/train_s'] > 0 and r['time/steps_per_s'] > 0
  evals = [(r['step'], r['eval/student_top1']) for r in records if 'eval/student_top1' in r]
  assert [s for s, _ in evals] == [35, 70]
  assert all(0.0 <= a <= 1.0 and a * 500 == round(a * 500) for _, a in evals)  # k/500 held-out digits
  values = read_json(workdir, 'summary.json')
  assert SUMMARY_KEYS <= values.keys()
  assert values == json.loads(json.dumps(summary.values))
  assert values['steps'] == 70 and values['finished'] is True
  assert values['teacher_top1'] is None  # a teacher run has no teacher
  assert values['student_top1_final'] == evals[-1][1]
  assert values['student_top1_best'] == max(a for _, a in evals)
  assert values['student_top1_last3_mean'] == pytest.approx(np.mean([a for _, a in evals][-3:]))
  assert values['exported'] == 'final' and values['exported_step'] == 70
  assert values['machine']['cpu'] and values['machine']['jax'] == jax.__version__
  assert values['student_top1_final'] > 0.5  # one epoch on 4,500 digits learns something
  assert values['wall_s'] >= values['train_s'] >= records[-1]['time/train_s'] > 0
  assert values['peak_rss_mb'] > 100
  assert checkpoint_steps(workdir) == [35, 70]
  state = restore_arrays(workdir, 70)
  assert int(state["['step']"]) == 70 and int(state["['model']['step']"]) == 70
  assert os.path.isfile(os.path.join(workdir, 'model', 'metadata.json'))  # on_finish export


@pytest.mark.slow
def test_export_best_writes_the_model_of_the_best_evaluation(tmp_path):
  workdir = str(tmp_path)
  summary = train_and_evaluate(teacher_config(**{'export': 'best', 'eval.every_steps': 7,
                                                 'checkpoint.every_steps': 7, 'checkpoint.keep': 20}), workdir)
  evals = [(r['step'], r['eval/student_top1']) for r in read_metrics(workdir) if 'eval/student_top1' in r]
  best_step = next(s for s, a in evals if a == max(a for _, a in evals))  # the first best
  assert summary.values['exported'] == 'best' and summary.values['exported_step'] == best_step
  _, variables, _ = model_dir.load(os.path.join(workdir, 'model'))
  state = restore_arrays(workdir, best_step)
  exported = {jax.tree_util.keystr(path): np.asarray(leaf)
              for path, leaf in jax.tree_util.tree_leaves_with_path(variables['params'])}
  for name, value in exported.items():
    np.testing.assert_array_equal(value, state[f"['model']['params']{name}"])
  assert not [p for p in os.listdir(workdir) if p.endswith(('.partial', '.replaced'))]


def test_export_needs_a_known_choice_and_an_evaluation(tmp_path):
  with pytest.raises(UserError, match="export must be one of final, best, not 'last'"):
    train_and_evaluate(teacher_config(export='last'), str(tmp_path / 'a'))
  with pytest.raises(UserError, match='export=best exports the model of the best evaluation, but this run '
                                      'evaluates nothing'):
    train_and_evaluate(teacher_config(**{'export': 'best', 'eval.data': ''}), str(tmp_path / 'b'))


@pytest.mark.slow
def test_teacher_resume_after_sigterm_is_bitwise(teacher_run, tmp_path, monkeypatch, capsys):
  full, _, full_summary = teacher_run
  workdir = str(tmp_path / 'run')
  stop_at(monkeypatch, 20)
  summary = train_and_evaluate(teacher_config(), workdir)
  assert summary.stopped_by_signal == signal.SIGTERM
  assert summary.values['steps'] == 21 and summary.values['finished'] is False
  assert checkpoint_steps(workdir) == [21]  # off the 35-step interval: saved because of the signal
  assert not os.path.exists(os.path.join(workdir, 'model'))  # no export of an unfinished run
  assert 'stopped at step 21 (checkpoint saved)' in capsys.readouterr().out
  assert max(r['step'] for r in read_metrics(workdir)) <= 21
  np.testing.assert_equal(restore_arrays(workdir, 21)["['step']"], 21)

  monkeypatch.undo()
  summary = train_and_evaluate(teacher_config(), workdir)
  assert f'resuming from the checkpoint at step 21 in {workdir}' in capsys.readouterr().out
  assert summary.stopped_by_signal is None and summary.values['finished'] is True
  assert checkpoint_steps(workdir) == [21, 35, 70]
  assert_bitwise_equal(restore_arrays(workdir, 70), restore_arrays(full, 70))
  records = read_metrics(workdir)
  assert_same_run_metrics(records, read_metrics(full))
  for key in ('steps', 'student_top1_best', 'student_top1_final'):
    assert summary.values[key] == full_summary.values[key]
  # Wall and training time add up over the two runs.
  for key in ('time/elapsed_s', 'time/train_s'):
    times = [r[key] for r in records]
    assert times == sorted(times), key
  assert summary.values['train_s'] >= records[-1]['time/train_s']
  assert summary.values['wall_s'] >= records[-1]['time/elapsed_s']


@pytest.mark.slow
def test_teacher_resume_after_losing_the_last_checkpoint(teacher_run, tmp_path, capsys):
  """A run that died after its step-35 checkpoint but had logged up to step 70 (and was cut in
  the middle of a metrics line): the re-run resumes at 35, drops the later records, and ends
  exactly like the uninterrupted run."""
  full, _, full_summary = teacher_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(full, workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '70'))
  shutil.rmtree(os.path.join(workdir, 'model'))
  os.remove(os.path.join(workdir, 'summary.json'))
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 71, "train/lo')  # a line cut by the crash
  summary = train_and_evaluate(teacher_config(), workdir)
  assert f'resuming from the checkpoint at step 35 in {workdir}' in capsys.readouterr().out
  assert summary.values['finished'] is True
  assert_bitwise_equal(restore_arrays(workdir, 70), restore_arrays(full, 70))
  assert_same_run_metrics(read_metrics(workdir), read_metrics(full))
  assert summary.values['student_top1_final'] == full_summary.values['student_top1_final']
  assert os.path.isfile(os.path.join(workdir, 'model', 'metadata.json'))


@pytest.mark.slow
def test_finished_run_is_not_retrained(teacher_run, tmp_path, capsys):
  full, _, full_summary = teacher_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(full, workdir)
  summary = train_and_evaluate(teacher_config(), workdir)
  assert 'resuming from the checkpoint at step 70' in capsys.readouterr().out
  assert summary.values['steps'] == 70 and summary.values['finished'] is True
  assert read_metrics(workdir) == read_metrics(full)  # nothing logged again
  assert checkpoint_steps(workdir) == [35, 70]
  assert summary.values == full_summary.values  # its summary (timings included) stands
  assert read_json(workdir, 'summary.json') == read_json(full, 'summary.json')


@pytest.mark.slow
def test_results_of_on_finish_join_the_summary(tmp_path, monkeypatch):
  """What a job reports and measures once trained (PU's selection counts, DFSR's PSNRs) lands in its
  results file in full and in summary.json as plain scalars; arrays are left out and the loop's own
  keys are not replaced."""
  from dfkd_jax.methods import supervised
  make_job = supervised.make_job

  def make_job_reporting(config, mesh):
    job = make_job(config, mesh)

    def on_finish(state):
      return {'psnr': np.float32(31.5), 'selected': np.int64(7), 'note': 'ok', 'per_class': np.zeros(3),
              'steps': -1}
    return dataclasses.replace(job, on_finish=on_finish, report={'pool': 'toy', 'selected': 3},
                               results_file='results.json')

  monkeypatch.setattr(supervised, 'make_job', make_job_reporting)
  workdir = str(tmp_path / 'run')
  summary = train_and_evaluate(teacher_config(num_epochs=1, **{'eval.every_steps': 10}), workdir)
  values = read_json(workdir, 'summary.json')
  assert values == json.loads(json.dumps(summary.values))
  assert values['psnr'] == 31.5 and values['selected'] == 7 and values['note'] == 'ok' and values['pool'] == 'toy'
  assert 'per_class' not in values and values['steps'] == 70
  # The job's file holds its report and results in full (the results win a shared key).
  assert read_json(workdir, 'results.json') == {'pool': 'toy', 'selected': 7, 'psnr': 31.5, 'note': 'ok',
                                               'per_class': [0.0, 0.0, 0.0], 'steps': -1}
  assert summary.results['per_class'].shape == (3,)


def test_phases_are_timed_at_the_middle_iteration():
  """A phase skipped during warm-up (Fast's synthesis-only epochs) must still be timed: the timing
  copy of the state is at the run's middle iteration, whatever step training starts from; each
  phase is timed on the state the one before it returned (the student reads a filled pool)."""
  seen = []

  def phase(name):
    def fn(state, frozen, key, batch):
      jax.debug.callback(lambda step, filled: seen.append((name, int(step), int(filled))), state['step'],
                         state['filled'])
      return dict(state, filled=state['filled'] + 1), {}
    return fn

  job = Job(init=None, phases=[Phase('synth', phase('synth')), Phase('kd', phase('kd'))], frozen={}, num_steps=9,
                 student=None)
  config = load_config('dafl_mnist', **{'report.phase_timing_reps': 2})
  state = {'step': jnp.zeros((), jnp.int32), 'filled': jnp.zeros((), jnp.int32)}
  fractions = time_phases(job, state, {}, jax.random.key(0), parallel.make_mesh(1), config)
  # Compiled ahead, run `reps` times each; kd runs on what synth returned (e.g. a filled pool).
  assert seen == [('synth', 4, 0), ('synth', 4, 0), ('kd', 4, 1), ('kd', 4, 1)]
  assert set(fractions) == {'synth', 'kd'} and sum(fractions.values()) == pytest.approx(1.0)
  assert int(state['step']) == 0 and int(state['filled']) == 0  # the caller's state is untouched


# --- DAFL ---------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def dafl_run(tmp_path_factory):
  """An uninterrupted DAFL runlocal run: 4 iterations, evaluations and checkpoints at 2 and 4."""
  workdir = str(tmp_path_factory.mktemp('dafl_full'))
  config = dafl_config()
  summary = train_and_evaluate(config, workdir)
  return workdir, config, summary


@pytest.mark.slow
def test_dafl_outputs(dafl_run):
  workdir, config, summary = dafl_run
  assert read_json(workdir, 'config.json') == json.loads(config.to_json())
  records = read_metrics(workdir)
  assert [r['step'] for r in records] == [0, 1, 2, 3, 4]
  assert records[0].keys() == {'step', 'eval/teacher_top1', 'eval/teacher_worst_class_top1'}
  names = {'train/generator_loss', 'train/loss_oh', 'train/loss_ie', 'train/loss_a', 'train/student_loss',
           'train/lr_student'}
  for r in records[1:]:
    assert names <= r.keys() and all(np.isfinite(r[k]) for k in names)
  assert [r['step'] for r in records if 'eval/student_top1' in r] == [2, 4]
  values = read_json(workdir, 'summary.json')
  assert SUMMARY_KEYS | {'synth_s', 'kd_s'} <= values.keys()
  assert values['steps'] == 4 and values['finished'] is True
  # The embedded LeNet-5 teacher on the 500 held-out digits: 492 right.
  assert values['teacher_top1'] == records[0]['eval/teacher_top1'] == 0.984
  assert records[0]['eval/teacher_worst_class_top1'] == 0.92  # 46 of one class's 50
  assert values['student_top1_final'] == records[-1]['eval/student_top1']
  assert values['synth_s'] > 0 and values['kd_s'] > 0
  assert values['synth_s'] + values['kd_s'] == pytest.approx(values['train_s'], rel=1e-9)
  assert checkpoint_steps(workdir) == [2, 4]
  for step in (2, 4):
    with Image.open(os.path.join(workdir, 'samples', f'step_{step:07d}.png')) as grid:
      assert grid.mode == 'L' and grid.size == (8 * 34 + 2, 8 * 34 + 2)  # 64 digits of 32 px, 2-px gaps
      pixels = np.asarray(grid)
    assert pixels.std() > 0  # not a blank image


@pytest.mark.slow
def test_dafl_resume_after_sigterm_is_bitwise(dafl_run, tmp_path, monkeypatch, capsys):
  full, _, full_summary = dafl_run
  workdir = str(tmp_path / 'run')
  config = dafl_config(**{'report.phase_timing_reps': 0})  # phase timing never touches the state
  stop_at(monkeypatch, 0)
  summary = train_and_evaluate(config, workdir)
  assert summary.stopped_by_signal == signal.SIGTERM and summary.values['steps'] == 1
  assert checkpoint_steps(workdir) == [1]
  assert capsys.readouterr().out.count('stopped at step 1 (checkpoint saved)') == 1
  monkeypatch.undo()
  summary = train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert 'resuming from the checkpoint at step 1' in out and 'teacher top-1' not in out  # not re-evaluated
  assert summary.values['finished'] is True and checkpoint_steps(workdir) == [1, 2, 4]
  # Generator, student (params, optimiser states, BN statistics) and the replay pool.
  final = restore_arrays(workdir, 4)
  assert any(k.startswith("['generator']") for k in final) and any(k.startswith("['replay']") for k in final)
  assert_bitwise_equal(final, restore_arrays(full, 4))
  assert_same_run_metrics(read_metrics(workdir), read_metrics(full))
  for key in ('teacher_top1', 'student_top1_best', 'student_top1_final', 'steps'):
    assert summary.values[key] == full_summary.values[key]


def test_phases_are_timed_once_per_run(tmp_path, monkeypatch):
  """The first start measures the phase fractions and keeps them in the workdir; a resumed run
  reads them back instead of compiling and timing every phase again."""
  measured = []
  monkeypatch.setattr(timing, 'time_phases', lambda *args: measured.append(1) or {'synth': 0.25, 'kd': 0.75})
  args = (None, None, None, None, None, None, str(tmp_path))
  assert timing.phase_fractions(*args, resumed=False) == {'synth': 0.25, 'kd': 0.75} and len(measured) == 1
  assert timing.phase_fractions(*args, resumed=True) == {'synth': 0.25, 'kd': 0.75} and len(measured) == 1
  assert read_json(str(tmp_path), 'phase_fractions.json') == {'synth': 0.25, 'kd': 0.75}
  assert timing.phase_fractions(*args, resumed=False) and len(measured) == 2  # a new run measures again
