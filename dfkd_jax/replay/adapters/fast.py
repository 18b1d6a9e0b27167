"""Replay of zju-vipa/Fast-Datafree's ``FastMetaSynthesizer`` (+ ``datafree_kd.train``) through
``dfkd_jax.methods.fast``.

Each recorded outer iteration is one epoch's synthesis call (and its student steps after the
warm-up): the state is placed at that call (the reference harness presets ``synth.ep``; the
skipped epochs' student steps set the student's step count, hence its learning rate), then the
synth and kd phases run on the recorded latents, targets, ``reset_l0`` weights, augmentation and
pool reads.
"""
from __future__ import annotations

import jax
import numpy as np

from dfkd_jax.errors import UserError
from dfkd_jax.methods import fast
from dfkd_jax.models.generators import RESET_L0_MODULES
from dfkd_jax.replay import harness
from dfkd_jax.replay.adapters import inversion_fixtures as common
from dfkd_jax.replay.compare import Report
from dfkd_jax.replay.fixture import Fixture

describe = 'zju-vipa/Fast-Datafree FastMetaSynthesizer'

# Constants of the reference code (not arguments): the inner and meta Adams' betas
# (fast_meta.py), reset_l0 at call 120 + warmup (fast_meta.py), the student's
# CosineAnnealingLR(optimizer, 200, eta_min=2e-4) (datafree_kd.py:324) and Reptile's scale.
_BETAS = (0.5, 0.999)
_RESET_L0_EPOCH = 120
_T_MAX, _ETA_MIN = 200, 2e-4
_REPTILE_SCALE = 67.0


def matches(fixture: Fixture) -> bool:
  return (fixture.settings.get('reference_repo') == 'zju-vipa/Fast-Datafree'
          and str(fixture.settings.get('generator', {}).get('cls', '')).endswith('generator.Generator'))


def config_of(fixture: Fixture):
  if int(fixture.settings.get('reset_bn', 0)):
    raise UserError(f'{fixture.root}: Fast reset_bn=1 (dfkd_jax replays reset_l0 only)')
  c = common.base_config(fixture, 'fast')
  g = fixture.setting('generator')
  c.generator = dict(arch='cmi_generator', kwargs=dict(nz=g['nz'], ngf=g['ngf'], img_size=g['img_size'], nc=g['nc']))
  c.g_steps, c.kd_steps = int(fixture.setting('g_steps')), int(fixture.setting('kd_steps'))
  c.optimizer_g = dict(lr=float(fixture.setting('lr_g')), betas=_BETAS)
  c.loss = dict(bn=float(fixture.setting('bn')), oh=float(fixture.setting('oh')), adv=float(fixture.setting('adv')))
  c.fast = dict(meta='fomaml' if int(fixture.setting('is_maml')) else 'reptile', reptile_scale=_REPTILE_SCALE,
                lr_z=float(fixture.setting('lr_z')), bn_mmt=float(fixture.setting('bn_mmt')),
                reset_l0=bool(int(fixture.setting('reset_l0'))), reset_l0_epoch=_RESET_L0_EPOCH, crop_padding=4,
                flip=True)
  c.optimizer_s.update(t_max=_T_MAX, eta_min=_ETA_MIN)
  c.warmup_epochs = int(fixture.setting('warmup'))
  c.num_epochs = int(fixture.setting('epochs'))
  c.iters_per_epoch = int(fixture.setting('ep_steps')) // c.kd_steps
  return c


def _reset_draws(fixture: Fixture, it: int, config, meta_params) -> dict:
  """``reset_l0``'s new ``l1.0`` and ``conv_blocks.0`` values: the recorded weights (biases 0), or
  zeros when the iteration records none (the reset does not fire and nothing reads them)."""
  recorded = {f'{m}.weight': fixture.draws[f'it{it}_reset_l0_{m}.weight'] for m in RESET_L0_MODULES
              if f'it{it}_reset_l0_{m}.weight' in fixture.draws}
  if not recorded:
    return {m: jax.tree.map(np.zeros_like, meta_params[m]) for m in RESET_L0_MODULES}
  biases = {f'{m}.bias': np.zeros_like(meta_params[m]['bias']) for m in RESET_L0_MODULES}
  return common.generator_subtree(config, meta_params, dict(recorded, **biases))


def _synth_draws(fixture: Fixture, it: int, config, meta_params) -> dict:
  steps = [common.crop_flip_draws(fixture, f'it{it}_g{j}_aug_') for j in range(config.g_steps)]
  return {'begin': {'z': fixture.draw(f'it{it}_z'), 'targets': fixture.draw(f'it{it}_targets').astype(np.int32),
                    'reset_l0': _reset_draws(fixture, it, config, meta_params)},
          'stages': [common.stacked(steps)]}


def replay(fixture: Fixture, report: Report, overrides: dict) -> None:
  config = harness.with_overrides(config_of(fixture), overrides)
  job, applies = common.build_job(config)
  state = common.initial_state(job, fixture, config)
  state['method'] = dict(state['method'], generator=common.generator_variables(fixture, config)['params'])
  steps_per_epoch = config.iters_per_epoch * config.kd_steps
  lr_schedule = common.student_lr_schedule(config)
  first = True
  for it, entry in enumerate(fixture.setting('outer_iterations')):
    call = int(entry['synth_ep_before'])  # the reference's 1-based call counter before its increment
    steps_before = max(int(entry['epoch']) - config.warmup_epochs, 0) * steps_per_epoch
    state = common.at_iteration(state, call, steps_before)
    draws = _synth_draws(fixture, it, config, jax.device_get(state['method']['generator']))
    state, metrics = applies['synth'](state, job.frozen, draws, None)
    common.check_synthesis_steps(report, fixture, f'it{it}_', jax.device_get(metrics), first)
    report.check(f'it{it}_adv_on', np.bool_(fast.adversarial(call, config)), fixture.expected(f'it{it}_adv_on'))
    report.check(f'it{it}_reset_l0_fired', np.bool_(config.fast.reset_l0 and call == fast.reset_l0_call(config)),
                 fixture.expected(f'it{it}_reset_l0_fired'))
    state, metrics = applies['kd'](state, job.frozen, common.pool_kd_draws(
        fixture, it, config.kd_steps, config.batch_size) if entry['kd'] else common.skipped_kd_draws(config), None)
    if entry['kd']:
      common.check_kd(report, fixture, it, jax.device_get(metrics), lr_schedule, steps_before)
    host = jax.device_get(state)
    report.check(f'it{it}_synth_ep_after', np.int64(call + 1), fixture.expected(f'it{it}_synth_ep_after'))
    common.check_pool(report, fixture, f'it{it}_pool', host['pool'])
    common.check_hooks(report, fixture, f'it{it}_hooks', host['method']['bn_ema'])
    common.check_generator(report, fixture, f'it{it}_generator', config, {'params': host['method']['generator']},
                           no_running_stats='the meta-generator is never run forward (only its clones are): its BN '
                                            'buffers are never updated nor read, and dfkd_jax keeps none')
    common.check_adam(report, fixture, f'it{it}_meta_opt', config, host['method']['meta_opt'])
    report.check(f'it{it}_meta_opt_lr', np.float64(config.optimizer_g.lr * config.g_steps),
                 fixture.expected(f'it{it}_meta_opt_lr'))
    common.check_student(report, fixture, f'it{it}_student', config, host)
    first = False

