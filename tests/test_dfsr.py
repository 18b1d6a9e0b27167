"""DFSR and SR teacher training: generator sizes, progressive depth, the reference rounding's zero
gradient, SR evaluation against bicubic, the PSNR evaluator, a few fused iterations on tiny configs,
and a whole tiny DFSR run."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from config_files import load_config
from conftest import compilations
from dfkd_jax import methods, models
from dfkd_jax.convert import model_dir
from dfkd_jax.errors import UserError
from dfkd_jax.methods import dfsr
from dfkd_jax.run import evaluation, outputs, parallel
from dfkd_jax.run.job import compile_job
from dfkd_jax.sr import evaluation as sr_eval
from dfkd_jax.sr import ops as sr_ops
from dfkd_jax.train import train_and_evaluate


@pytest.fixture(scope='module')
def tiny_teacher(tmp_path_factory):
  """A converted-model directory of a 1-block VDSR (random weights): a cheap teacher."""
  model = models.create('vdsr', num_blocks=1)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 48, 48, 1)))
  path = str(tmp_path_factory.mktemp('teacher') / 'vdsr1')
  model_dir.save(path, 'vdsr', variables, num_classes=None, dataset='none', model_kwargs={'num_blocks': 1})
  return path


def tiny_dfsr_config(teacher, **dfsr_overrides):
  config = load_config('dfsr_vdsr_local')
  config.teacher.checkpoint = teacher
  config.student.kwargs.num_blocks = 1
  config.batch_size, config.kd_steps = 2, 1
  config.dfsr.update(dfsr_overrides)
  return config


def run_iterations(config, n=2):
  mesh = parallel.make_mesh(2)
  job = methods.get(config.method).make_job(config, mesh)
  init, step, _ = compile_job(job, mesh, jax.random.key(0))
  state = init(jax.random.key(0))
  before = jax.device_get(state)
  frozen = jax.device_put(job.frozen, parallel.replicated(mesh))
  sharding = parallel.data_sharded(mesh)
  for i in range(n):
    batch = None if job.next_batch is None else {k: jax.device_put(v, sharding) for k, v in job.next_batch(i).items()}
    state, metrics = step(state, frozen, jax.random.key(1), batch)
  assert compilations(step) == 1
  return job, before, jax.device_get(state), jax.device_get(metrics), frozen


def all_changed(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: not np.array_equal(x, y), a, b)))


@pytest.mark.slow
def test_dfsr_iterations_update_student_and_generators(tiny_teacher):
  job, before, after, metrics, frozen = run_iterations(tiny_dfsr_config(tiny_teacher))
  assert all(np.isfinite(v).all() for v in metrics.values()), metrics
  assert {'train/student_loss', 'train/generator_loss', 'train/loss_recon'} <= set(metrics)
  assert all_changed(before['student'].params, after['student'].params)
  # the generator of each drawn scale moves (the others only once they have Adam moments)
  moved = [not np.array_equal(before['generators'].params[k]['l1.0']['kernel'],
                              after['generators'].params[k]['l1.0']['kernel']) for k in ('x2', 'x3', 'x4')]
  assert any(moved)
  teacher = jax.device_get(frozen)
  for a, b in zip(jax.tree.leaves(teacher), jax.tree.leaves(jax.device_get(job.frozen))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_reference_rounding_leaves_only_the_direct_reconstruction_gradient(tiny_teacher):
  # With the reference's 1/255 rounding of every resize and no reconstruction term, no gradient
  # reaches the generators: Adam with zero gradients leaves them unchanged.
  config = tiny_dfsr_config(tiny_teacher, scales=(2,), reference_rounding=True, reconw=0.0)
  _, before, after, _, _ = run_iterations(config, n=1)
  for a, b in zip(jax.tree.leaves(before['generators'].params), jax.tree.leaves(after['generators'].params)):
    np.testing.assert_array_equal(a, b)
  config = tiny_dfsr_config(tiny_teacher, scales=(2,), reference_rounding=False, reconw=0.0)
  _, before, after, _, _ = run_iterations(config, n=1)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before['generators'].params),
                                                      jax.tree.leaves(after['generators'].params)))


def test_generator_sizes_must_fit_every_scale(tiny_teacher):
  config = tiny_dfsr_config(tiny_teacher)
  config.image_size = 40
  with pytest.raises(UserError, match='multiple of 4'):
    dfsr.make_job(config, parallel.make_mesh(1))


def test_stage_depth_and_inactive_blocks():
  depths = [int(dfsr.stage_depth(e, 18, 3, 2)) for e in range(8)]
  assert depths == [6, 6, 12, 12, 18, 18, 18, 18]
  assert [int(dfsr.stage_depth(e, 18, 1, 0)) for e in range(3)] == [18, 18, 18]
  old = {'input': {'kernel': jnp.zeros(2)}, 'residual_layer.0.conv': {'kernel': jnp.zeros(2)},
         'residual_layer.1.conv': {'kernel': jnp.zeros(2)}}
  new = jax.tree.map(lambda x: x + 1, old)
  kept = dfsr.keep_inactive_blocks(new, old, 1)
  assert float(kept['input']['kernel'][0]) == 1 and float(kept['residual_layer.0.conv']['kernel'][0]) == 1
  assert float(kept['residual_layer.1.conv']['kernel'][0]) == 0


@pytest.mark.slow
def test_vdsr_depth_argument_is_the_shallower_network():
  deep, shallow = models.create('vdsr_half', num_blocks=4), models.create('vdsr_half', num_blocks=2)
  x = jax.random.uniform(jax.random.key(0), (1, 12, 12, 1))
  variables = deep.init(jax.random.key(1), x)
  np.testing.assert_allclose(deep.apply(variables, x, depth=jnp.asarray(2)), shallow.apply(variables, x),
                             rtol=1e-5, atol=1e-6)


def test_sr_eval_identity_network_scores_as_bicubic():
  image = np.random.default_rng(0).integers(0, 256, (36, 36, 3)).astype(np.uint8)
  result = sr_eval.evaluate(lambda variables, x: x, {}, {'noise': image}, 2)
  assert result['psnr'] == pytest.approx(result['bicubic_psnr'])
  assert result['ssim'] == pytest.approx(result['bicubic_ssim'])
  hr = jnp.asarray(sr_eval.luma01(image))[None]
  lr = sr_ops.imresize(hr, 0.5)
  assert lr.shape == (1, 18, 18, 1)
  expected = sr_ops.psnr(sr_ops.imresize(lr, 2) * 255, hr * 255, shave=2)[0]
  assert result['bicubic_psnr'] == pytest.approx(float(expected), rel=1e-5)


def test_luma_and_patches():
  white = np.full((4, 4, 3), 255, np.uint8)
  np.testing.assert_allclose(sr_eval.luma01(white), 235 / 255, rtol=1e-6)
  patches = sr_eval.random_patches([np.zeros((10, 12, 1), np.float32)], 3, 8, np.random.default_rng(0))
  assert patches.shape == (3, 8, 8, 1)
  with pytest.raises(UserError, match='smaller'):
    sr_eval.random_patches([np.zeros((5, 5, 1), np.float32)], 1, 8, np.random.default_rng(0))


@pytest.mark.slow
def test_sr_teacher_training_iterations():
  config = load_config('teacher_vdsr_local')
  config.model.kwargs.num_blocks = 1
  config.batch_size = 2
  _, before, after, metrics, _ = run_iterations(config)
  assert np.isfinite(metrics['train/loss'])
  assert all_changed(before['model'].params, after['model'].params)


@pytest.mark.slow
def test_psnr_evaluator_scores_the_identity_as_bicubic():
  evaluator = evaluation.PSNR('skimage:camera,chelsea,coffee', (2, 4), crop=48, max_images=2)
  prepared = evaluator.prepare(None, None)
  assert prepared.data == 'camera,chelsea x2,4'
  images = sr_eval.load_images('skimage:camera,chelsea', 48)
  bicubic = np.mean([sr_eval.evaluate(lambda v, x: x, {}, images, s)['bicubic_psnr'] for s in (2, 4)])
  np.testing.assert_allclose(prepared.measure(lambda v, x: x, {})['psnr'], bicubic, rtol=1e-6)


@pytest.mark.slow
def test_dfsr_run_reports_psnr_during_training(tiny_teacher, tmp_path):
  """A whole (tiny) DFSR run: the student's PSNR at the evaluation cadence in metrics.jsonl and as
  best/final in summary.json; sr_eval.json and the summary hold the final evaluation."""
  config = tiny_dfsr_config(tiny_teacher)
  config.mesh.num_devices = 2
  config.sr_eval.scales = (2,)
  summary = train_and_evaluate(config, str(tmp_path))
  evals = [r['eval/student_psnr'] for r in outputs.read_metrics(tmp_path) if 'eval/student_psnr' in r]
  assert evals and all(np.isfinite(evals))
  values = outputs.read_json(tmp_path / 'summary.json')
  assert values['student_psnr_final'] == evals[-1] and values['student_psnr_best'] == max(evals)
  assert 'student_top1_final' not in values and values['teacher_psnr'] is not None
  results = outputs.read_json(tmp_path / 'sr_eval.json')
  assert values['student_psnr'] == results['student_psnr'] == summary.results['student_psnr']
  assert os.path.isdir(tmp_path / 'student')
