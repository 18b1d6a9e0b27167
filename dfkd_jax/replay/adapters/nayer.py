"""Replay of tmtuan1307/NAYER (``NAYER.synthesize`` with ``NLGenerator``, + ``datafree_kd.train``)
through ``dfkd_jax.methods.nayer``.

Each recorded outer iteration is one reference epoch: its batches (``l<b>``) are the engine's
synthesis calls of that epoch, each with the recorded generator re-creation, noisy layers,
remainder labels and augmentation; the student steps (``s<i>``) follow the epoch's last batch
(``nayer.kd_every_batch=False``). The label embedding (``draws.npz: label_emb``) is handed to the
method as the ``.npy`` file a user gives.
"""
from __future__ import annotations

import os
import tempfile

import jax
import numpy as np

from dfkd_jax.errors import UserError
from dfkd_jax.methods import nayer
from dfkd_jax.models.generators import noisy_layers
from dfkd_jax.replay import harness
from dfkd_jax.replay.adapters import inversion_fixtures as common
from dfkd_jax.replay.compare import Report
from dfkd_jax.replay.fixture import Fixture

describe = 'tmtuan1307/NAYER (NLGenerator)'

# The generator's Adam betas, a constant of the reference code (synthesis/nayer.py).
_BETAS = (0.5, 0.999)
_NO_RUNNING_STATS = ("NAYER's generator always runs in train mode: its BN buffers are never read, and dfkd_jax "
                     'keeps none')


def matches(fixture: Fixture) -> bool:
  return (fixture.settings.get('reference_repo') == 'tmtuan1307/NAYER'
          and 'NLGenerator' in str(fixture.settings.get('generator', {}).get('cls', '')))


def config_of(fixture: Fixture, label_embedding: str):
  c = common.base_config(fixture, 'nayer')
  g = fixture.setting('generator')
  if g['nl'] != c.num_classes or g['sbz'] != c.synthesis_batch_size:
    raise UserError(f'{fixture.root}: NLGenerator nl={g["nl"]}, sbz={g["sbz"]} (dfkd_jax builds it with nl = '
                    f'num_classes = {c.num_classes}, sbz = synthesis_batch_size = {c.synthesis_batch_size})')
  c.generator = dict(arch='nayer_generator', kwargs=dict(ngf=g['ngf'], img_size=g['img_size'], nc=g['nc'],
                                                         le_emb_size=g['le_emb_size'], le_size=g['le_size']))
  c.g_steps, c.kd_steps = int(fixture.setting('g_steps')), int(fixture.setting('kd_steps'))
  c.optimizer_g = dict(lr=float(fixture.setting('lr_g')), betas=_BETAS)
  c.loss = dict(bn=float(fixture.setting('bn')), oh=float(fixture.setting('oh')), adv=float(fixture.setting('adv')))
  warmup, warmup_loops, loops = (int(fixture.setting(k)) for k in ('warmup', 'gwp_loops', 'g_loops'))
  c.nayer = dict(label_embedding=label_embedding, bn_mmt=float(fixture.setting('bn_mmt')),
                 g_life=int(fixture.setting('g_life')), warmup_g_loops=warmup_loops, crop_padding=4, flip=True,
                 kd_every_batch=False, reference_student_train_mode=True)
  epochs = int(fixture.setting('epochs'))
  c.optimizer_s.update(t_max=epochs - warmup, eta_min=float(fixture.setting('eta_min')))
  c.iters_per_epoch = loops
  if warmup * warmup_loops % loops:
    raise UserError(f'{fixture.root}: warmup x gwp_loops = {warmup * warmup_loops} warm-up batches is not a whole '
                    f'number of engine epochs of g_loops = {loops} batches')
  c.warmup_epochs = warmup * warmup_loops // loops
  c.num_epochs = c.warmup_epochs + epochs - warmup
  return c


def _synth_draws(fixture: Fixture, it: int, batch: int, config, template: dict, recreate: bool) -> dict:
  prefix = f'it{it}_l{batch}_'
  noisy = {}
  for m in noisy_layers(template):  # re_init_le: N(0, 1) weights, zero biases
    noisy[f'{m}.weight'] = fixture.draw(f'{prefix}{m}.weight')
    noisy[f'{m}.bias'] = np.zeros_like(template[m]['bias'])
  fresh = (common.generator_variables(fixture, config, 'generator_reinit')['params'] if recreate
           else jax.tree.map(np.zeros_like, template))
  steps = [common.crop_flip_draws(fixture, f'{prefix}g{j}_aug_') for j in range(config.g_steps)]
  return {'begin': {'generator': fresh, 'noisy': common.generator_subtree(config, template, noisy),
                    'remainder': fixture.draw(f'{prefix}targets_rem').astype(np.int32)},
          'stages': [common.stacked(steps)]}


def _check_batch(report: Report, fixture: Fixture, prefix: str, metrics: dict, config, call: int, first: bool):
  common.check_synthesis_steps(report, fixture, prefix, metrics, first)
  remainder = fixture.draw(f'{prefix}targets_rem')
  report.check(prefix + 'targets', np.asarray(nayer.balanced_targets(remainder, config.synthesis_batch_size,
                                                                      config.num_classes)),
               fixture.expected(prefix + 'targets'))
  report.skip(prefix + 'le1', "a harness flag (the noisy layers' draws were served), not a computed quantity")
  for j in range(config.g_steps):
    name = f'{prefix}g{j}_student_train_mode'
    if name in fixture.trace:
      report.check(name, np.bool_(nayer.student_train_mode(call, config)), fixture.expected(name))


def replay(fixture: Fixture, report: Report, overrides: dict) -> None:
  with tempfile.TemporaryDirectory() as tmp:
    label_embedding = os.path.join(tmp, 'label_embedding.npy')
    np.save(label_embedding, fixture.draw('label_emb'))
    config = harness.with_overrides(config_of(fixture, label_embedding), overrides)
    job, applies = common.build_job(config)
  state = common.initial_state(job, fixture, config)
  state['method'] = dict(state['method'], generator=common.generator_variables(fixture, config)['params'])
  schedule = nayer.schedule_of(config)
  lr_schedule = common.student_lr_schedule(config)
  first = True
  for it, entry in enumerate(fixture.setting('outer_iterations')):
    epoch = int(entry['epoch'])
    calls = schedule.calls_of_epoch(epoch)
    steps_before = max(epoch - schedule.warmup, 0) * config.kd_steps
    for b, call in enumerate(calls):
      state = common.at_iteration(state, call, steps_before)
      recreate = b == 0 and bool(fixture.trace.get(f'it{it}_generator_reinit', False))
      if b == 0:
        report.check(f'it{it}_generator_reinit', np.bool_(schedule.recreate(call)),
                     np.bool_(fixture.trace.get(f'it{it}_generator_reinit', False)))
      draws = _synth_draws(fixture, it, b, config, jax.device_get(state['method']['generator']), recreate)
      state, metrics = applies['synth'](state, job.frozen, draws, None)
      _check_batch(report, fixture, f'it{it}_l{b}_', jax.device_get(metrics), config, call, first)
      common.check_hooks(report, fixture, f'it{it}_l{b}_hooks', jax.device_get(state['method']['bn_ema']))
      last = b == len(calls) - 1
      kd_draws = (common.pool_kd_draws(fixture, it, config.kd_steps, config.batch_size) if last and entry['kd']
                  else common.skipped_kd_draws(config))
      state, metrics = applies['kd'](state, job.frozen, kd_draws, None)
      if last and entry['kd']:
        common.check_kd(report, fixture, it, jax.device_get(metrics), lr_schedule, steps_before)
      first = False
    host = jax.device_get(state)
    report.check(f'it{it}_synth_ep_after', np.int64(schedule.epoch(calls[-1]) + 1),
                 fixture.expected(f'it{it}_synth_ep_after'))
    common.check_pool(report, fixture, f'it{it}_pool', host['pool'])
    common.check_generator(report, fixture, f'it{it}_generator', config, {'params': host['method']['generator']},
                           _NO_RUNNING_STATS)
    common.check_student(report, fixture, f'it{it}_student', config, host)
