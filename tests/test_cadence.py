"""Log, evaluation and checkpoint cadences (``dfkd_jax.run.cadence``), resolved when a run starts.

- Every config in ``configs/`` (default and ``:runlocal``) logs, evaluates and checkpoints at the
  same steps as when the cadences were fixed in steps at config time (``OLD``, recorded from that code).
- Overriding ``num_epochs`` / ``iters_per_epoch`` / ``num_steps`` moves every cadence; an explicit
  ``every_steps`` wins; a bad value is a one-line UserError.
- A short run: metrics.jsonl has evaluations and ``checkpoints/`` has checkpoints at the resolved steps.
"""
from __future__ import annotations

import glob
import os

import pytest

import config_files
from dfkd_jax.errors import UserError
from dfkd_jax.run import cadence
from dfkd_jax.run.outputs import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Computed by the code before cadences were resolved at run time (configlib.set_schedule fixed
# log_every_steps, eval.every_steps, checkpoint.every_steps when the config was built):
# config -> (outer iterations, iterations per epoch, log, eval, checkpoint interval in steps; eval 0 = never).
# PU's epoch length depends on its selection (None): its cadences are in steps.
OLD = {
    'cmi_cifar': (200, 1, 1, 1, 50),
    'cmi_cifar:runlocal': (4, 1, 1, 1, 2),
    'cmi_mnist': (64, 4, 4, 4, 16),
    'cmi_mnist:runlocal': (4, 2, 1, 2, 2),
    'cudfkd_cifar': (10000, 40, 40, 40, 2500),
    'cudfkd_cifar:runlocal': (4, 2, 1, 2, 2),
    'cudfkd_mnist': (350, 10, 10, 10, 87),
    'cudfkd_mnist:runlocal': (4, 2, 1, 2, 2),
    'dafl_cifar': (16000, 80, 50, 80, 4000),
    'dafl_cifar:runlocal': (4, 2, 1, 2, 2),
    'dafl_mnist': (600, 100, 50, 50, 150),
    'dafl_mnist:runlocal': (4, 2, 1, 2, 2),
    'deepinv_cifar': (200, 1, 1, 1, 50),
    'deepinv_cifar:runlocal': (4, 1, 1, 1, 2),
    'deepinv_mnist': (64, 4, 4, 4, 16),
    'deepinv_mnist:runlocal': (4, 2, 1, 2, 2),
    'dfad_cifar': (16000, 80, 50, 80, 4000),
    'dfad_cifar:runlocal': (4, 2, 1, 2, 2),
    'dfad_mnist': (600, 50, 50, 50, 150),
    'dfad_mnist:runlocal': (4, 2, 1, 2, 2),
    'dfnd_cifar': (38643, 1171, 50, 1171, 1171),
    'dfnd_cifar:runlocal': (4, 4, 1, 1171, 4),
    'dfnd_mnist': (1860, 31, 50, 155, 465),
    'dfnd_mnist:runlocal': (16, 8, 1, 8, 8),
    'dfq_cifar': (8000, 40, 40, 40, 2000),
    'dfq_cifar:runlocal': (4, 2, 1, 2, 2),
    'dfq_mnist': (450, 30, 30, 50, 112),
    'dfq_mnist:runlocal': (4, 2, 1, 2, 2),
    'dfsr_vdsr': (9600, 120, 50, 120, 2400),
    'dfsr_vdsr:runlocal': (4, 2, 2, 2, 2),
    'dfsr_vdsr_local': (40, 10, 10, 10, 20),
    'dfsr_vdsr_local:runlocal': (4, 2, 2, 2, 2),
    'fast_cifar': (220, 1, 1, 1, 55),
    'fast_cifar:runlocal': (4, 1, 1, 1, 2),
    'fast_mnist': (92, 4, 4, 4, 23),
    'fast_mnist:runlocal': (4, 2, 1, 2, 2),
    'nayer_cifar': (400, 2, 2, 2, 100),
    'nayer_cifar:runlocal': (4, 2, 1, 2, 2),
    'nayer_mnist': (76, 2, 2, 2, 19),
    'nayer_mnist:runlocal': (4, 2, 1, 2, 2),
    'pu_cifar': (None, None, 50, 50, 250),
    'pu_cifar:runlocal': (None, None, 1, 50, 4),
    'pu_mnist': (None, None, 50, 155, 465),
    'pu_mnist:runlocal': (None, None, 1, 8, 8),
    'ssdkd_cifar': (220, 1, 1, 1, 55),
    'ssdkd_cifar:runlocal': (4, 1, 1, 1, 2),
    'ssdkd_mnist': (92, 4, 4, 4, 23),
    'ssdkd_mnist:runlocal': (4, 2, 1, 2, 2),
    'teacher_lenet5_mnist': (2800, 70, 50, 700, 700),
    'teacher_lenet5_mnist:runlocal': (70, 70, 10, 35, 35),
    'teacher_resnet8_mnist': (2100, 70, 50, 700, 700),
    'teacher_resnet8_mnist:runlocal': (70, 70, 10, 35, 35),
    'teacher_vdsr_local': (400, 1, 50, 0, 100),
    'teacher_vdsr_local:runlocal': (3, 1, 1, 0, 1),
    'zskt_cifar': (16000, 80, 50, 80, 4000),
    'zskt_cifar:runlocal': (4, 2, 1, 2, 2),
    'zskt_mnist': (600, 50, 50, 50, 150),
    'zskt_mnist:runlocal': (4, 2, 1, 2, 2),
}


def load_config(name: str, arg: str | None = None):
  return config_files.load_config(name, arg)


def resolve(config) -> cadence.Cadences:
  """The cadences of a config whose run length is ``num_epochs`` x ``iters_per_epoch``."""
  return cadence.resolve(config, num_steps=config.num_epochs * config.iters_per_epoch,
                         steps_per_epoch=config.iters_per_epoch)


def due_steps(every: int, num_steps: int) -> list[int]:
  return [s for s in range(1, num_steps + 1) if cadence.is_due(s, every, num_steps)]


def test_old_table_covers_every_config():
  names = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))}
  assert set(OLD) == {n for name in names for n in (name, f'{name}:runlocal')}


@pytest.mark.parametrize('variant', sorted(OLD))
def test_every_config_keeps_its_cadences(variant):
  name, _, arg = variant.partition(':')
  config = load_config(name, arg or None)
  num_steps, steps_per_epoch, *old = OLD[variant]
  if num_steps is None:  # step cadences: the same whatever the run's length
    for shape in ((1000, 10), (37, 3)):
      new = cadence.resolve(config, num_steps=shape[0], steps_per_epoch=shape[1])
      assert (new.log, new.eval, new.checkpoint) == tuple(old)
    return
  if 'iters_per_epoch' in config:
    assert (num_steps, steps_per_epoch) == (config.num_epochs * config.iters_per_epoch, config.iters_per_epoch)
  new = cadence.resolve(config, num_steps=num_steps, steps_per_epoch=steps_per_epoch)
  # The steps at which each event happens (an interval beyond the run's length only fires at its end).
  for kind, before, now in zip(('log', 'eval', 'checkpoint'), old, (new.log, new.eval, new.checkpoint)):
    assert due_steps(now, num_steps) == due_steps(before, num_steps), (kind, before, now)


def test_overriding_num_epochs_moves_every_cadence():
  """The issue's numbers: dafl_mnist (600 iterations, 100 an epoch, 12 evaluations, 4 checkpoints)."""
  config = load_config('dafl_mnist')
  assert resolve(config) == cadence.Cadences(log=50, eval=50, checkpoint=150)
  config.num_epochs = 60  # was: 120 evaluations, 40 checkpoints
  every = resolve(config)
  assert every == cadence.Cadences(log=50, eval=500, checkpoint=1500)
  assert (len(due_steps(every.eval, 6000)), len(due_steps(every.checkpoint, 6000))) == (12, 4)
  config.num_epochs = 1  # was: no checkpoint before the end (every 150 of 100 steps)
  every = resolve(config)
  assert every == cadence.Cadences(log=50, eval=8, checkpoint=25)
  assert due_steps(every.checkpoint, 100) == [25, 50, 75, 100]
  config.num_epochs, config.iters_per_epoch = 6, 20  # a log line every epoch when an epoch is short
  assert resolve(config) == cadence.Cadences(log=20, eval=10, checkpoint=30)


def test_iters_per_epoch_and_num_steps_move_cadences():
  fast = load_config('fast_mnist')  # evaluation every epoch, 4 checkpoints
  fast.iters_per_epoch = 10
  assert resolve(fast) == cadence.Cadences(log=10, eval=10, checkpoint=57)
  teacher = load_config('teacher_lenet5_mnist')  # every 10 epochs (an epoch: num_steps // num_epochs)
  assert cadence.resolve(teacher, num_steps=1000) == cadence.Cadences(50, 250, 250)
  vdsr = load_config('teacher_vdsr_local')  # num_steps: 4 checkpoints, 8 log lines at most 50 apart
  assert cadence.resolve(vdsr, num_steps=40, steps_per_epoch=1) == cadence.Cadences(5, 0, 10)
  assert cadence.resolve(vdsr, num_steps=4000, steps_per_epoch=1) == cadence.Cadences(50, 0, 1000)


def test_explicit_every_steps_wins():
  config = load_config('dafl_mnist')
  config.log.every_steps, config.eval.every_steps, config.checkpoint.every_steps = 3, 7, 1000
  config.num_epochs = 60
  assert resolve(config) == cadence.Cadences(log=3, eval=7, checkpoint=1000)


@pytest.mark.parametrize('field,value,message', [
    ('eval.per_run', -1, 'eval.per_run=-1 must be >= 0 (0: not given)'),
    ('checkpoint.every_epochs', -0.5, 'checkpoint.every_epochs=-0.5 must be >= 0 (0: not given)'),
    ('checkpoint.per_run', 0, 'checkpoint has no cadence: set one of checkpoint.every_steps, '
                              'checkpoint.every_epochs, checkpoint.per_run, checkpoint.at_most_steps to > 0'),
])
def test_bad_values_are_one_line_errors(field, value, message):
  config = load_config('dafl_mnist')
  group, leaf = field.split('.')
  config[group][leaf] = value
  with pytest.raises(UserError) as e:
    resolve(config)
  assert str(e.value) == message


@pytest.mark.slow
def test_a_short_run_evaluates_and_checkpoints_at_the_resolved_steps(tmp_path):
  """dafl_mnist:runlocal stretched to 3 epochs of 2 iterations: evaluation every epoch (2, 4, 6), a
  checkpoint twice in the run (3, 6), a log line every step."""
  from dfkd_jax.train import train_and_evaluate
  config = load_config('dafl_mnist', 'runlocal')
  config.num_epochs = 3
  config.mesh.num_devices, config.report.phase_timing_reps, config.report.sample_grid = 1, 0, False
  summary = train_and_evaluate(config, str(tmp_path))
  assert summary.values['steps'] == 6
  records = read_metrics(tmp_path)
  assert [r['step'] for r in records if 'train/student_loss' in r] == [1, 2, 3, 4, 5, 6]
  assert [r['step'] for r in records if 'eval/student_top1' in r] == [2, 4, 6]
  assert sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit()) == [3, 6]
