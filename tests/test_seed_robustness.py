"""Seed robustness at small scale (issue #20): the DAFL MNIST default, shortened to ITERATIONS
iterations (its cosine schedules over that length), on each of SEEDS.

What a knife-edge default looked like: DAFL's own loop ended at 19.7% on one platform and 92.3% on
another for the same seed; the default without ``generator.range_penalty`` let the generator settle
on blobs darker than black on some seeds (``train/loss_range`` about 0.1 to the end), and the
student then left a class unlearnt (docs/results.md, "DAFL on MNIST"). The band is measured, not
guessed (BAND's comment). 150 iterations are too few for every class (worst classes 6-72% there;
63-90% after the default's 600), so this checks for a collapse and for the dark mode, not the bar.
Not a timing test; the embedded teacher, evaluated on the 500 held-out digits it ships with."""
import json
import os

import pytest

from config_files import load_config
from dfkd_jax.train import train_and_evaluate

SEEDS = (0, 1, 2)
ITERATIONS = 150
# Measured with this test on one 2-core AMD EPYC (AVX-512), seeds 0, 1, 2: final top-1 0.866, 0.858,
# 0.712 (jax 0.12.1) and 0.868, 0.928, 0.880 (jax 0.10.2), train/loss_range at the end <= 0.0003.
# The same 150 iterations with the penalty's weight at 1e-6 (the mode left free, the term logged; the
# CLI, one device), jax 0.10.2 seeds 2 and 3 (the default's failures before the penalty): top-1 0.652 and 0.502,
# worst class 0.06, loss_range 0.100 and 0.094. Upper bound: the teacher's 0.984 on these digits.
BAND = {'top1': (0.6, 0.984), 'loss_range_max': 0.03}


@pytest.mark.slow
@pytest.mark.parametrize('seed', SEEDS)
def test_the_short_dafl_default_lands_in_its_band_on_every_seed(seed, tmp_path):
  config = load_config('dafl_mnist', None, **{'seed': seed, 'num_epochs': 3, 'iters_per_epoch': ITERATIONS // 3,
                                              'eval.per_run': 1, 'checkpoint.per_run': 1,
                                              'mesh.num_devices': 1})
  train_and_evaluate(config, str(tmp_path))
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  final = [r for r in records if 'eval/student_top1' in r][-1]
  loss_range = [r for r in records if 'train/loss_range' in r][-1]
  assert final['step'] == loss_range['step'] == ITERATIONS
  top1, out_of_range = final['eval/student_top1'], loss_range['train/loss_range']
  print(f'seed {seed}: top-1 {top1:.3f}, worst class {final["eval/student_worst_class_top1"]:.2f}, '
        f'loss_range {out_of_range:.4f}')
  assert BAND['top1'][0] <= top1 <= BAND['top1'][1]
  assert out_of_range <= BAND['loss_range_max']
