"""Each generator-adversarial method runs a few fused iterations on a tiny config: metrics are
finite, generator and student change, the teacher does not, and the step is traced once."""

import jax
import numpy as np
import pytest

from config_files import load_config
from conftest import compilations
from dfkd_jax import methods
from dfkd_jax.run import parallel
from dfkd_jax.run.job import compile_job


@pytest.mark.slow
@pytest.mark.parametrize('name', ['dafl_mnist', 'zskt_mnist', 'dfad_mnist', 'dfq_mnist'])
def test_method_iterations(name):
  config = load_config(name)
  config.batch_size = 8
  mesh = parallel.make_mesh(2)
  job = methods.get(config.method).make_job(config, mesh)
  init, step, _ = compile_job(job, mesh, jax.random.key(0))
  state = init(jax.random.key(0))
  before = jax.device_get(state)
  frozen = jax.device_put(job.frozen, parallel.replicated(mesh))
  teacher_before = jax.device_get(frozen)
  for _ in range(3):
    state, metrics = step(state, frozen, jax.random.key(1), None)
  metrics = jax.device_get(metrics)
  assert compilations(step) == 1, 'the iteration was compiled more than once'
  assert int(state['step']) == 3
  assert metrics and all(np.isfinite(v).all() for v in metrics.values()), metrics
  assert 'train/generator_loss' in metrics and 'train/student_loss' in metrics
  after = jax.device_get(state)
  for part in ('generator', 'student'):
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before[part].params, after[part].params)
    assert all(jax.tree.leaves(changed)), f'{part} parameters did not all change'
  for a, b in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(jax.device_get(frozen))):
    np.testing.assert_array_equal(a, b)


def _zskt_phases(**overrides):
  """ZSKT's original variant on a BN student (wrn16_1) at batch 8: one synth phase from drawn
  latents; returns (job, state before, state after synth, its draws, kd apply)."""
  config = load_config('zskt_cifar', 'runlocal,variant=original', **overrides)
  job = methods.get('zskt').make_job(config, parallel.make_mesh(1))
  state = jax.jit(job.init)(jax.random.key(0))
  synth, kd = job.phases
  draws = synth.draw(jax.random.key(1), state)
  after, _ = jax.jit(synth.apply)(state, job.frozen, draws, None)
  return job, state, after, draws, jax.jit(kd.apply)


@pytest.mark.slow
def test_zskt_original_trains_on_the_regenerated_batch_with_a_train_mode_student():
  """polo5's pseudo-batch: the student is in train mode in the generator step (batch statistics,
  running statistics updated, parameters untouched), then learns from G_{k+1}(z_k), the same latent
  through the updated generator (train mode), not the batch made before the update."""
  job, before, after, draws, kd = _zskt_phases()
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before['student'].batch_stats,
                         after['student'].batch_stats)
  assert all(jax.tree.leaves(changed)), 'the generator step left the student BN statistics'
  jax.tree.map(np.testing.assert_array_equal, before['student'].params, after['student'].params)
  _, metrics = kd(after, job.frozen, {}, None)
  g = after['generator']
  regenerated, _ = g.apply_fn({'params': g.params, 'batch_stats': g.batch_stats}, draws['z'][-1], train=True,
                              mutable=['batch_stats'])
  for images in metrics['trace/images']:  # every student step of the pseudo-batch
    np.testing.assert_allclose(images, regenerated, rtol=1e-5, atol=1e-5)
  stale, _ = before['generator'].apply_fn(before['generator'].variables, draws['z'][-1], train=True,
                                          mutable=['batch_stats'])
  assert not np.allclose(metrics['trace/images'][0], stale, atol=1e-3)


@pytest.mark.slow
def test_zskt_flags_restore_the_stale_batch_and_eval_mode_student():
  job, before, after, _, kd = _zskt_phases(student_batch='reuse', synth_student_bn='eval')
  jax.tree.map(np.testing.assert_array_equal, before['student'].batch_stats, after['student'].batch_stats)
  _, metrics = kd(after, job.frozen, {}, None)
  np.testing.assert_array_equal(metrics['trace/images'][0], after['handoff']['images'])


def test_config_deviations_follow_the_reference_scripts():
  """DFQ r34 -> r18 on CIFAR-100 passes --T 1 (its script); the original DAFL evaluates CIFAR-100
  with the CIFAR-10 constants; ZSKT's original variant regenerates its pseudo-batch."""
  assert load_config('dfq_cifar', 'dataset=cifar100,pair=resnet34-resnet18').kd.temperature == 1.0
  assert load_config('dfq_cifar', 'dataset=cifar100,pair=wrn40_2-wrn16_1').kd.temperature == 20.0
  assert load_config('dafl_cifar', 'dataset=cifar100,variant=huawei').dataset == 'cifar100_huawei'
  assert load_config('dafl_cifar', 'dataset=cifar100').dataset == 'cifar100'
  for name, arg in (('zskt_mnist', None), ('zskt_cifar', 'variant=original')):
    config = load_config(name, arg)
    assert (config.student_batch, config.synth_student_bn) == ('regenerate', 'train'), name


def _dead_dafl(revive: bool):
  """The DAFL default at batch 8 with a dead generator: its last convolution's kernel 0 and bias 100,
  so every pixel is tanh(100) = 1 exactly and every gradient is exactly 0. Returns (job, state)."""
  config = load_config('dafl_mnist', **{'batch_size': 8, 'replay.capacity': 16, 'generator.revive_when_dead': revive})
  job = methods.get('dafl').make_job(config, parallel.make_mesh(1))
  state = jax.jit(job.init)(jax.random.key(0))
  params = jax.device_get(state['generator'].params)
  last = params['conv_blocks2.3']
  params['conv_blocks2.3'] = {'kernel': np.zeros_like(last['kernel']), 'bias': np.full_like(last['bias'], 100.0)}
  return job, dict(state, generator=state['generator'].replace(params=params))


@pytest.mark.slow
def test_a_dead_generator_is_revived_only_with_its_switch():
  """generator.revive_when_dead: an iteration whose generator gradient is exactly 0 marks it dead;
  the next one starts from the freshly drawn variables of its draws (then takes its step). Off, the
  dead generator never moves again. The switch leaves the latents as they were."""
  runs = {}
  for revive in (False, True):
    job, state = _dead_dafl(revive)
    dead = jax.device_get(state['generator'].params)
    synth = job.phases[0]
    apply = jax.jit(synth.apply)
    draws, metrics = [], []
    for i in range(2):
      draws.append(jax.device_get(synth.draw(jax.random.key(i), state)))
      state, m = apply(state, job.frozen, draws[-1], None)
      metrics.append(jax.device_get(m))
    runs[revive] = (dead, jax.device_get(state), draws, metrics)
  for i in range(2):
    np.testing.assert_array_equal(runs[False][2][i]['z'], runs[True][2][i]['z'])
  dead, after, _, metrics = runs[False]
  assert [float(m['train/generator_grad_norm']) for m in metrics] == [0.0, 0.0]
  assert 'generator_dead' not in after and 'train/generator_revived' not in metrics[1]
  jax.tree.map(np.testing.assert_array_equal, after['generator'].params, dead)
  dead, after, draws, metrics = runs[True]
  assert float(metrics[0]['train/generator_grad_norm']) == 0 and float(metrics[0]['train/generator_revived']) == 0
  assert not any(np.any(a) for a in jax.tree.leaves(draws[0]['revived_generator']))  # alive: zeros drawn
  assert float(metrics[1]['train/generator_revived']) == 1 and float(metrics[1]['train/generator_grad_norm']) > 0
  assert not bool(after['generator_dead'])
  fresh = draws[1]['revived_generator']['params']
  lr = 0.2  # the config's lr_G at its first steps (cosine over 600 iterations), an upper bound on Adam's first step
  for name in ('l1.0', 'conv_blocks2.3'):
    moved = np.abs(after['generator'].params[name]['kernel'] - fresh[name]['kernel'])
    assert 0 < moved.max() <= lr * (1 + 1e-5), name
  assert np.abs(after['generator'].params['conv_blocks2.3']['bias']).max() < 1.0  # not the dead 100



def test_the_range_penalty_adds_its_weight_times_the_out_of_range_mass_of_the_images():
  """generator.range_penalty = w: the generator loss of the same step from the same state gains
  w x mean(relu(-u) + relu(u - 1)) of its images u in pixel units (the DAFL generator's output is the
  teacher's normalised input: u = x * 0.3081 + 0.1307), reported as train/loss_range; off, no term."""
  metrics = {}
  for weight in (0.0, 2.5):
    config = load_config('dafl_mnist', **{'batch_size': 8, 'replay.capacity': 16, 'generator.range_penalty': weight})
    job = methods.get('dafl').make_job(config, parallel.make_mesh(1))
    state = jax.jit(job.init)(jax.random.key(0))
    synth = job.phases[0]
    draws = synth.draw(jax.random.key(1), state)
    _, metrics[weight] = jax.device_get(jax.jit(synth.apply)(state, job.frozen, draws, None))
  assert 'train/loss_range' not in metrics[0.0]
  pixels = np.asarray(metrics[2.5]['trace/g_output'][0], np.float64) * 0.3081 + 0.1307
  out_of_range = np.mean(np.maximum(-pixels, 0) + np.maximum(pixels - 1, 0))
  assert out_of_range > 0.01  # a fresh generator's BN output reaches below pixel 0
  np.testing.assert_allclose(metrics[2.5]['train/loss_range'], out_of_range, rtol=1e-5)
  np.testing.assert_allclose(metrics[2.5]['trace/generator_loss'][0] - metrics[0.0]['trace/generator_loss'][0],
                             2.5 * out_of_range, rtol=1e-4)

@pytest.mark.slow
def test_replay_student_batch_draws_from_a_fifo_pool_of_synth_batches():
  """student_batch='replay': each synth phase appends its batch to a pool of ``replay.capacity``
  images (the oldest overwritten once full); every student step reads a uniform draw of filled slots
  and distils on them against the teacher's logits of those images."""
  config = load_config('dafl_mnist', **{'student_batch': 'replay', 'batch_size': 8, 'replay.capacity': 20})
  job = methods.get('dafl').make_job(config, parallel.make_mesh(1))
  synth, kd = job.phases
  synth_apply, kd_apply = jax.jit(synth.apply), jax.jit(kd.apply)
  state = jax.jit(job.init)(jax.random.key(0))
  batches = []
  for i in range(3):
    state, metrics = synth_apply(state, job.frozen, synth.draw(jax.random.key(i), state), None)
    batches.append(np.asarray(metrics['trace/g_output'][-1]))  # the DAFL generator's output is the teacher's input
    filled = min(8 * (i + 1), 20)
    assert int(state['replay']['filled']) == filled
    draws = jax.device_get(kd.draw(jax.random.key(10 + i), state))
    assert draws['index'].shape == (config.kd_steps, 8) and draws['index'].max() < filled
    assert len(np.unique(draws['index'])) > min(filled - 1, 8)  # across the filled slots, not one batch
  # 24 images through 20 slots: slots 0-3 hold the third batch's last 4, slots 4-19 the rest in order.
  expected = np.concatenate([batches[2][4:], batches[0][4:], batches[1], batches[2][:4]])
  np.testing.assert_array_equal(np.asarray(state['replay']['items']), expected)
  _, metrics = kd_apply(state, job.frozen, draws, None)
  np.testing.assert_array_equal(metrics['trace/images'], expected[draws['index']])
  teacher = job.teacher
  first_batch = expected[draws['index'][0]]
  t_logits = jax.jit(lambda x: teacher.apply_fn(teacher.variables(job.frozen), x, train=False))(first_batch)
  np.testing.assert_allclose(metrics['trace/t_out'][0], t_logits, rtol=1e-5, atol=1e-5)
