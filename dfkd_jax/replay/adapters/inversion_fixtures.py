"""What the replays of the Fast, NAYER and CuDFKD fixtures share (one reference harness recorded
them, ``bench/trajectories/fast_cudfkd_nayer.py``; see each fixture's README): the dfkd_jax
config of a CMI-framework CIFAR distillation read from ``config.json``, the initial state with the
fixture's weights, the counters that place an outer iteration in the run, the recorded pool
reads mapped to the engine's kd draws, and the comparisons of what every one of them records
(student steps, state_dicts, Adam states, the ``bn_mmt`` hooks' EMAs).

Not a replay adapter itself (``adapters.MODULES`` does not list it).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dfkd_jax import configlib, data, methods, models
from dfkd_jax.engines import common, inversion_terms
from dfkd_jax.errors import UserError
from dfkd_jax.replay import harness
from dfkd_jax.replay.compare import Report
from dfkd_jax.replay.fixture import Fixture

# The student's KD loss in every fixture here: ``datafree.criterions.KLDiv(T)``, batchmean x T².
_KD_CRITERION = 'KLDiv'


def image_shape(fixture: Fixture) -> tuple[int, int]:
  """(image size, channels) from ``img_size`` ([C, H, W], or a side for 3-channel images)."""
  size = fixture.setting('img_size')
  if isinstance(size, int):
    return size, 3
  channels, height, width = size
  if height != width:
    raise UserError(f'{fixture.root}: non-square images {height}x{width} (dfkd_jax synthesises square ones)')
  return height, channels


def base_config(fixture: Fixture, method: str) -> ml_collections.ConfigDict:
  """The CMI-framework CIFAR distillation of ``config.json``: dataset, classes, teacher (the
  fixture's ``init_teacher.pth``, converted by the production loader) and student architectures,
  batch sizes, the student's SGD and its KD loss. Methods fill in the rest."""
  dataset = fixture.setting('dataset')
  if dataset not in data.NORMALIZATION:
    raise UserError(f'{fixture.root}: dataset {dataset!r} has no dfkd_jax normalisation constants')
  if _KD_CRITERION not in fixture.settings.get('criterion', _KD_CRITERION):
    raise UserError(f"{fixture.root}: student criterion {fixture.settings['criterion']!r} (dfkd_jax replays "
                    'KLDiv(T) batchmean x T² here)')
  size, channels = image_shape(fixture)
  c = configlib.base(method=method, dataset=dataset, num_classes=int(fixture.setting('num_classes')),
                     image_size=size, in_channels=channels, eval_data='')
  c.teacher = ml_collections.ConfigDict({'checkpoint': os.path.join(fixture.root, 'init_teacher.pth'),
                                         'arch': fixture.setting('teacher')})
  c.student = ml_collections.ConfigDict({'arch': fixture.setting('student'), 'kwargs': {}})
  configlib.inversion_settings(c)
  c.kd.temperature = float(fixture.setting('T'))
  c.optimizer_s.update(lr=float(fixture.setting('lr')), momentum=float(fixture.setting('momentum')),
                       weight_decay=float(fixture.setting('weight_decay')))
  c.batch_size = int(fixture.setting('batch_size'))
  c.synthesis_batch_size = int(fixture.setting('synthesis_batch_size'))
  c.mesh.num_devices = 1
  return c


def build_job(config):
  """The method's production job on one device and its phases' jitted ``apply``."""
  job = methods.get(config.method).make_job(config, harness.mesh())
  return job, harness.phase_applies(job)


def initial_state(job, fixture: Fixture, config) -> dict:
  """``job.init``'s state with the student from ``init_student.pth`` (its optimiser state is fresh:
  the SGD momentum starts empty, as the reference's)."""
  state = jax.jit(job.init)(jax.random.key(0))
  student = harness.variables(config.student.arch, fixture.init_state_dict('student'), config.num_classes)
  state['student'] = state['student'].replace(params=student['params'], batch_stats=student.get('batch_stats', {}))
  return state


def generator_kwargs(config) -> dict:
  """``config.generator.kwargs`` with what a method adds when it builds its generator (NAYER's
  ``nl`` and ``sbz``)."""
  kwargs = dict(config.generator.kwargs)
  if config.generator.arch == 'nayer_generator':
    kwargs.update(nl=config.num_classes, sbz=config.synthesis_batch_size)
  return kwargs


def generator_variables(fixture: Fixture, config, name: str = 'generator') -> dict:
  """The Flax variables of ``init_<name>.pth`` as ``config.generator``'s architecture."""
  return harness.variables(config.generator.arch, fixture.init_state_dict(name), None, **generator_kwargs(config))


def generator_subtree(config, template: dict, recorded: dict) -> dict:
  """Flax params of the generator modules named in ``recorded`` (reference key -> array, e.g. a
  re-drawn layer), converted by substituting them into the state_dict of params ``template``."""
  kwargs = generator_kwargs(config)
  model = models.create(config.generator.arch, **kwargs)
  _, stats = inversion_terms.generator_template(model, models.input_shape(config.generator.arch, **kwargs))
  current = harness.state_dict(config.generator.arch, {'params': template, 'batch_stats': stats}, **kwargs)
  params = harness.variables(config.generator.arch, dict(current, **recorded), None, **kwargs)['params']
  return {m: params[m] for m in sorted({key.rsplit('.', 1)[0] for key in recorded})}


def at_iteration(state: dict, call: int, student_steps: int) -> dict:
  """``state`` placed at outer iteration ``call`` with ``student_steps`` student steps taken before
  (the reference harness presets its epoch counters instead of running the skipped epochs; every
  other part of the state carries over)."""
  student = state['student']
  opt_state = optax.tree_utils.tree_set(student.opt_state, count=jnp.asarray(student_steps, jnp.int32))
  return dict(state, step=jnp.asarray(call, jnp.int32),
              student=student.replace(step=jnp.asarray(student_steps, jnp.int32), opt_state=opt_state))


def crop_flip_draws(fixture: Fixture, prefix: str) -> dict:
  """``augment.draw_crop_flip``'s values from the recorded ``<prefix>crop_dy/_crop_dx/_flip``."""
  offsets = np.stack([fixture.draw(f'{prefix}crop_dy'), fixture.draw(f'{prefix}crop_dx')], axis=-1)
  return {'offsets': offsets.astype(np.int32), 'flips': fixture.draw(f'{prefix}flip').astype(bool)}


def stacked(trees: list) -> dict:
  """Pytrees of arrays stacked along a new leading axis (per-step draws of a scanned stage)."""
  return jax.tree.map(lambda *leaves: np.stack(leaves), *trees)


def pool_kd_draws(fixture: Fixture, it: int, kd_steps: int, batch: int) -> dict:
  """The kd phase's draws of iteration ``it`` from the recorded pool reads: each pass over the pool
  starts with a new ``it<k>_s<i>_perm`` (the reference's shuffled loader), whose next ``batch``
  entries (pool indices in order of addition, the engine's slots) step i reads, augmented by
  ``_crop_dy/_crop_dx/_flip``."""
  indices, order, position = [], None, 0
  for s in range(kd_steps):
    if f'it{it}_s{s}_perm' in fixture.draws:
      order, position = fixture.draws[f'it{it}_s{s}_perm'], 0
    if order is None or position + batch > len(order):
      raise UserError(f'{fixture.root}: student step it{it}_s{s} reads a batch the recorded pool order does not '
                      f'hold (a short last batch, which the engine does not take)')
    indices.append(order[position:position + batch])
    position += batch
  augment = stacked([crop_flip_draws(fixture, f'it{it}_s{s}_') for s in range(kd_steps)])
  return {'indices': np.asarray(indices, np.int32), 'augment': augment}


def skipped_kd_draws(config) -> dict:
  """The kd draws of an iteration whose student steps are skipped (warm-up): the right shapes,
  read by nothing."""
  shape = (config.kd_steps, config.batch_size)
  return {'indices': np.zeros(shape, np.int32),
          'augment': {'offsets': np.zeros(shape + (2,), np.int32), 'flips': np.zeros(shape, bool)}}


def check_kd(report: Report, fixture: Fixture, it: int, metrics: dict, lr_schedule, first_step: int,
             single_pass: bool = False) -> None:
  """The kd phase's per-step trace against ``it<k>_s<i>_images/_t_logits/_s_logits/_loss_s/_lr``
  (the learning rate from the student's schedule at its step count)."""
  for s in range(fixture.substeps(it, 's')):
    name = f'it{it}_s{s}_'
    one = single_pass and s == 0
    report.check(name + 'images', harness.nchw(metrics['trace/images'][s]), fixture.expected(name + 'images'))
    report.check(name + 't_logits', metrics['trace/t_out'][s], fixture.expected(name + 't_logits'), single_pass=one)
    report.check(name + 's_logits', metrics['trace/s_out'][s], fixture.expected(name + 's_logits'), single_pass=one)
    report.check(name + 'loss_s', metrics['trace/loss'][s], fixture.expected(name + 'loss_s'), single_pass=one)
    report.check(name + 'lr', np.float64(lr_schedule(first_step + s)), fixture.expected(name + 'lr'))


def student_lr_schedule(config):
  """The student's learning rate as a function of its step count, as the engine builds it."""
  return common.student_optimizer(config, config.iters_per_epoch * config.kd_steps)[1]


def _tracked(state_dict: dict) -> dict:
  """A converted state_dict less torch's BN step counters (``harness.check_state_dict`` lists the
  recorded ones as not compared: no dfkd_jax update reads them)."""
  return {k: v for k, v in state_dict.items() if not k.endswith(harness.UNTRACKED_SUFFIXES)}


def check_student(report: Report, fixture: Fixture, prefix: str, config, state: dict) -> None:
  harness.check_state_dict(report, fixture, prefix,
                           _tracked(harness.state_dict(config.student.arch, state['student'].variables)))


def check_adam(report: Report, fixture: Fixture, prefix: str, config, adam_state, step_offset: int = 0) -> None:
  """A torch Adam's ``<prefix>/<param>/{step,exp_avg,exp_avg_sq}`` against optax's Adam state
  (moments converted to the generator's reference names and layouts)."""
  adam = next(s for s in jax.tree.leaves(adam_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
              if isinstance(s, optax.ScaleByAdamState))
  kwargs = generator_kwargs(config)
  moments = {'exp_avg': harness.state_dict(config.generator.arch, {'params': adam.mu}, **kwargs),
             'exp_avg_sq': harness.state_dict(config.generator.arch, {'params': adam.nu}, **kwargs)}
  for key, expected in fixture.entries(prefix).items():
    param, _, field = key.rpartition('/')
    if field == 'step':
      report.check(f'{prefix}/{key}', np.asarray(int(adam.count) + step_offset, expected.dtype), expected)
    else:
      report.check(f'{prefix}/{key}', moments[field].get(param, np.full(expected.shape, np.inf)), expected)


def check_hooks(report: Report, fixture: Fixture, prefix: str, bn_ema: dict) -> None:
  """The ``bn_mmt`` hooks' ``<prefix>/<h>/mmt_mean|mmt_var`` (h in the teacher's BN order) against
  the EMA of ``inversion_terms.bn_ema_*``."""
  recorded = fixture.entries(prefix)
  for h in range(len(recorded) // 2):
    report.check(f'{prefix}/{h}/mmt_mean', bn_ema['mean'][h], recorded[f'{h}/mmt_mean'])
    report.check(f'{prefix}/{h}/mmt_var', bn_ema['var'][h], recorded[f'{h}/mmt_var'])
  if len(recorded) != 2 * len(bn_ema['mean']):
    report.check(f'{prefix}/*', np.array([np.inf]), np.zeros(len(recorded)))


_BN_BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')


def check_generator(report: Report, fixture: Fixture, prefix: str, config, variables: dict,
                    no_running_stats: str = '') -> None:
  """The recorded generator ``<prefix>/*`` against Flax ``variables`` of ``config.generator``. A
  method that keeps no running statistics (``variables`` without 'batch_stats') names why in
  ``no_running_stats``; the recorded BN buffers are then listed as not compared."""
  actual = _tracked(harness.state_dict(config.generator.arch, variables, **generator_kwargs(config)))
  if 'batch_stats' in variables:
    harness.check_state_dict(report, fixture, prefix, actual)
    return
  for key, expected in fixture.entries(prefix).items():
    if key.endswith(_BN_BUFFERS):
      report.skip(f'{prefix}/{key}', no_running_stats)
    else:
      report.check(f'{prefix}/{key}', actual.get(key, np.full(expected.shape, np.inf)), expected)


_G_TERMS = ('x', 'z', 't_logits', 's_logits', 'loss_bn_per_hook', 'loss_bn', 'loss_oh', 'loss_adv', 'loss')


def check_synthesis_steps(report: Report, fixture: Fixture, prefix: str, metrics: dict, first: bool) -> None:
  """The per-step trace ``<prefix>g<j>_<term>`` of one synthesis batch (Fast, NAYER) and
  ``<prefix>best_step`` (the engine keeps the first lowest loss). ``first``: the run's first
  batch, whose first step is a single forward pass from the initial weights."""
  for j in range(len(metrics['trace/loss'])):
    name = f'{prefix}g{j}_'
    for term in _G_TERMS:
      if name + term in fixture.trace:
        actual = metrics[f'trace/{term}'][j]
        report.check(name + term, harness.nchw(actual) if term == 'x' else actual, fixture.expected(name + term),
                     single_pass=first and j == 0 and term not in ('x', 'z'))
  report.check(prefix + 'best_step', np.int64(np.argmin(metrics['trace/loss'])), fixture.expected(prefix + 'best_step'))


def check_pool(report: Report, fixture: Fixture, name: str, pool: dict) -> None:
  """The recorded uint8 pool (every image so far, in order of addition) against the engine's."""
  expected = fixture.expected(name)
  report.check(name, harness.nchw(np.asarray(pool['items'])[:len(expected)]), expected)
