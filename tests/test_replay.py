"""The replay command's own behaviour (what every adapter relies on): reading a fixture folder,
relative errors, the report's lines, and one-line errors for folders it cannot replay. The
per-method replays are in tests/test_replay_*.py."""
import json
import os
import shutil
import types

import numpy as np
import pytest

from cli_output import one_line_error
from dfkd_jax.replay import __main__ as replay_cli
from dfkd_jax.replay import compare, fixture

TRAJECTORIES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'trajectories')


def test_relative_error_is_against_the_largest_reference_magnitude():
  expected = np.array([100.0, 0.001, -50.0], np.float32)
  actual = expected + np.array([0.0, 0.01, 0.0], np.float32)  # 10x off on a tiny entry
  assert compare.relative_error(actual, expected) == pytest.approx(0.01 / 100.0, rel=1e-4)
  assert compare.relative_error(np.zeros(2), np.zeros(2)) == 0.0
  assert compare.relative_error(np.array([0.5]), np.zeros(1)) == 0.5  # absolute where the reference is 0
  assert compare.relative_error(np.array([1.0]), np.array(1.0)) == 0.0  # (1,) against a scalar
  assert compare.relative_error(np.ones(3), np.ones(2)) == float('inf')
  assert compare.relative_error(np.array([np.nan]), np.ones(1)) == float('inf')
  assert compare.relative_error(np.array([3, 4]), np.array([3, 4])) == 0.0  # integers: exact
  assert compare.relative_error(np.array([3, 5]), np.array([3, 4])) == 1.0


def test_report_lines_name_each_deviation_and_end_with_the_count():
  report = compare.Report(1e-4)
  report.check('it0_g0_loss', np.array([1.0]), np.array([1.0 + 1e-6]), single_pass=True)
  report.check('it1_student/fc.weight', np.ones(3), np.ones(3) * 1.001)
  report.skip('it1_student/bn1.num_batches_tracked', 'a counter')
  lines = report.lines()
  assert not report.ok and report.worst == pytest.approx(0.001 / 1.001, rel=1e-6)
  assert lines[0].startswith('it1_student/fc.weight: relative error 0.000999')
  assert lines[1] == 'not compared (1): a counter'
  assert lines[-1] == '2 quantities compared, worst relative error 0.000999'
  # A single forward pass gets a tenth of the tolerance.
  assert report.compared[0].tolerance == pytest.approx(1e-5)
  assert not compare.Report().ok  # nothing compared is not a pass


def test_fixture_reads_names_iterations_and_substeps():
  loaded = fixture.load(os.path.join(TRAJECTORIES, 'cmi_dafl'))
  assert loaded.draw_order[:2] == ['it0_g0_z', 'it0_g1_z'] and 'draw_order' not in loaded.draws
  assert loaded.iterations() == 2 and loaded.substeps(0, 'g') == 2 and loaded.substeps(0, 's') == 2
  assert 'fc.weight' in loaded.entries('it1_student')
  assert loaded.setting('settings', 'nz') == 16


def _run(argv, capsys):
  """The command in this process: (result with returncode/stdout/stderr as one_line_error reads it)."""
  code = replay_cli.main(argv)
  out, err = capsys.readouterr()
  return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)


@pytest.mark.parametrize('make, message', [
    (lambda d: None, 'is not a folder'),
    (lambda d: os.makedirs(d), 'is not a trajectory fixture: it has no config.json, draws.npz, trace.npz'),
])
def test_a_folder_that_is_not_a_fixture_is_one_line(tmp_path, capsys, make, message):
  folder = str(tmp_path / 'f')
  make(folder)
  result = _run([folder], capsys)
  assert result.stdout == '' and message in one_line_error(result)


def test_a_fixture_of_an_unsupported_reference_is_one_line(tmp_path, capsys):
  folder = str(tmp_path / 'other')
  shutil.copytree(os.path.join(TRAJECTORIES, 'cmi_dafl'), folder)
  with open(os.path.join(folder, 'config.json')) as f:
    settings = json.load(f)
  settings.update(reference='someone/else@1234567', method_flag='newmethod')
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(settings, f)
  result = _run([folder], capsys)
  assert result.stdout == ''
  assert 'no replay for someone/else@1234567 newmethod (dfkd_jax replays: ' in one_line_error(result)


def test_bad_options_are_one_line(capsys):
  folder = os.path.join(TRAJECTORIES, 'cmi_dafl')
  assert '--tolerance must be > 0' in one_line_error(_run([folder, '--tolerance', '0'], capsys))
  result = _run([folder, '--set', 'no_equals_sign'], capsys)
  assert "--set expects FIELD=VALUE, got 'no_equals_sign'" in one_line_error(result)


def test_overrides_parse_literals_else_strings():
  parsed = replay_cli.parse_overrides(['a.b=1', 'c=False', 'd=x', 'e=1e-3'])
  assert parsed == {'a.b': 1, 'c': False, 'd': 'x', 'e': 1e-3}
