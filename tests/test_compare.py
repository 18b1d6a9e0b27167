"""``python -m dfkd_jax.compare``: the per-run table, the per-config seed statistics, the PNG, and
one-line errors, on workdirs written as the loop writes them."""
import json
import os
import types

import numpy as np
import pytest
from PIL import Image

from cli_output import one_line_error
from dfkd_jax import compare


def make_workdir(root, name, *, method='dafl', seed=0, accuracies=(0.5, 0.7, 0.9, 0.8), finished=True, lr=0.1):
  workdir = os.path.join(root, name)
  os.makedirs(workdir)
  config = {'method': method, 'seed': seed, 'teacher': {'checkpoint': 'embedded:lenet5_mnist'},
            'optimizer_s': {'lr': lr}}
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config, f)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for i, a in enumerate(accuracies):
      f.write(json.dumps({'step': 10 * (i + 1), 'train/loss': 1.0}) + '\n')
      f.write(json.dumps({'step': 10 * (i + 1), 'eval/student_top1': a, 'time/elapsed_s': 5.0 * (i + 1)}) + '\n')
  if finished:
    summary = {'steps': 10 * len(accuracies), 'wall_s': 30.0, 'train_s': 20.0, 'peak_rss_mb': 900.0,
               'synth_s': 5.0, 'kd_s': 15.0, 'machine': {'cpu': 'Test CPU', 'vector_flags': ['fma', 'avx2'],
                                                         'jax': '0.12.1'}}
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f)
  return workdir


def _run(argv, capsys):
  code = compare.main(argv)
  out, err = capsys.readouterr()
  return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)


def test_table_leads_with_final_and_groups_seeds(tmp_path, capsys):
  root = str(tmp_path)
  make_workdir(root, 'dafl_s0', seed=0, accuracies=(0.5, 0.7, 0.9, 0.8))
  make_workdir(root, 'dafl_s1', seed=1, accuracies=(0.4, 0.6, 0.7, 0.6))
  make_workdir(root, 'other', seed=0, lr=0.2, accuracies=(0.2, 0.3), finished=False)
  png = str(tmp_path / 'curves.png')
  result = _run([os.path.join(root, 'dafl_*'), os.path.join(root, 'other'), '--png', png], capsys)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0].startswith('| method | seed | teacher | final | last-3 mean | best |')
  row = lines[2].split(' | ')
  assert row[:6] == ['| dafl', '0', 'embedded:lenet5_mnist', '80.00', '80.00', '90.00']  # last 3: .7 .9 .8
  assert '2.00' in row and '25/75' in row and 'Test CPU (avx2), jax 0.12.1' in row  # 40 it / 20 s
  unfinished = lines[4].split(' | ')
  assert unfinished[3:8] == ['30.00', '25.00', '30.00', '10', '-']  # wall: the last evaluation's
  # Seeds 0 and 1 share a config (the lr-0.2 run does not): mean ± std (min) of final = .8 and .6.
  seeds = [line for line in lines if line.startswith('| dafl | 0, 1 |')]
  assert len(seeds) == 1 and '| 70.00 ± 14.14 [60.00, 80.00] |' in seeds[0]
  assert result.stdout.strip().endswith(f'wrote {png}')
  image = np.asarray(Image.open(png))
  assert image.shape[0] > 300 and image.std() > 0


@pytest.mark.parametrize('setup, message', [
    (lambda root: None, 'matches no workdir'),
    (lambda root: os.makedirs(os.path.join(root, 'w')), 'is not a training workdir (no config.json)'),
])
def test_not_a_workdir_is_one_line(tmp_path, capsys, setup, message):
  setup(str(tmp_path))
  result = _run([os.path.join(str(tmp_path), 'w*')], capsys)
  assert message in one_line_error(result)
