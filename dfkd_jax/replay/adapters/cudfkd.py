"""Replay of ljrprocc/DataFree's CuDFKD (``ProbSynthesizer`` + the curriculum ``train``) through
``dfkd_jax.methods.cudfkd``.

Each recorded outer iteration is the first generator/student block of an epoch: the state is
placed at that epoch (the engine's outer iteration ``epoch x iters_per_epoch``, the student's step
count = the reference's ``global_iter``), the synth phase runs the recorded latents of the
generator steps and of the student batches, and the kd phase reads those batches in order.
"""
from __future__ import annotations

import jax
import numpy as np

from dfkd_jax import losses
from dfkd_jax.errors import UserError
from dfkd_jax.methods import cudfkd
from dfkd_jax.replay import harness
from dfkd_jax.replay.adapters import inversion_fixtures as common
from dfkd_jax.replay.compare import Report
from dfkd_jax.replay.fixture import Fixture

describe = 'ljrprocc/DataFree CuDFKD (ProbSynthesizer, curriculum train)'

# ProbSynthesizer's generator optimiser: Adam(G, lr_g, betas=[0.9, 0.99]) (datafree/synthesis/cudfkd.py).
_GENERATOR_BETAS = (0.9, 0.99)
_CURRICULA = {'curr_log': 'log', 'none': 'none'}


def matches(fixture: Fixture) -> bool:
  return (fixture.settings.get('reference_repo') == 'ljrprocc/DataFree'
          and 'DCGAN_Generator_CIFAR10' in str(fixture.settings.get('generator', {}).get('cls', '')))


def _only(fixture: Fixture, name: str) -> int:
  """The single entry of a per-generator list setting (one generator: ``--no_feature``)."""
  values = fixture.setting(name)
  if len(values) != 1:
    raise UserError(f'{fixture.root}: {name} = {values} (dfkd_jax replays CuDFKD with one generator, L = 1)')
  return int(values[0])


def config_of(fixture: Fixture):
  s = fixture.settings
  unsupported = {'memory': bool(s.get('memory')), 'act != 0': float(s.get('act', 0.0)) != 0.0,
                 'generator cond': bool(s['generator'].get('cond')),
                 'generator type != wider': s['generator'].get('type', 'wider') != 'wider',
                 'generator widen_factor != 1': s['generator'].get('widen_factor', 1) != 1}
  named = [name for name, present in unsupported.items() if present]
  if named:
    raise UserError(f'{fixture.root}: CuDFKD setting(s) dfkd_jax does not support: {", ".join(named)}')
  curriculum = fixture.setting('curr_option')
  if curriculum not in _CURRICULA:
    raise UserError(f'{fixture.root}: curr_option {curriculum!r} (dfkd_jax replays {", ".join(_CURRICULA)})')
  c = common.base_config(fixture, 'cudfkd')
  c.pool.dtype = 'float32'
  c.kd_augment.update(crop_padding=0, flip=False)
  g = fixture.setting('generator')
  c.generator = dict(arch='cudfkd_generator', kwargs=dict(nz=g['nz'], ngf=g['ngf'], img_size=g['img_size'],
                                                          nc=g['nc'], d=g['d']))
  c.g_steps, c.kd_steps = _only(fixture, 'g_steps_interval'), _only(fixture, 'kd_steps_interval')
  c.optimizer_g = dict(lr=float(fixture.setting('lr_g')), betas=_GENERATOR_BETAS)
  temperature = float(fixture.setting('T'))
  c.kd = dict(loss=fixture.setting('loss'), temperature=temperature)
  c.loss = dict(lmda_ent=float(fixture.setting('lmda_ent')), adv=float(fixture.setting('adv')),
                oh=float(fixture.setting('oh')), bn=float(fixture.setting('bn')))
  c.cudfkd = dict(adv_type=fixture.setting('adv_type'), entropy_temperature=temperature,
                  grad_adv=float(fixture.setting('grad_adv')), begin_fraction=float(fixture.setting('begin_fraction')),
                  end_fraction=float(fixture.setting('end_fraction')), curriculum=_CURRICULA[curriculum],
                  lambda_0=float(fixture.setting('lambda_0')), lambda_alpha=float(fixture.setting('alpha')))
  c.num_epochs = int(fixture.setting('epochs'))
  c.iters_per_epoch = int(fixture.setting('ep_steps')) // c.kd_steps
  return c


def _synth_draws(fixture: Fixture, it: int, g_steps: int, kd_steps: int) -> dict:
  latents = lambda tag, n: np.stack([fixture.draw(f'it{it}_{tag}{j}_z') for j in range(n)])
  # it<k>_s<i>_targets: drawn by the reference's sample() and never used (it only advances the RNG).
  return {'begin': {'sample_z': latents('s', kd_steps)}, 'stages': [{'z': latents('g', g_steps)}]}


def _kd_draws(kd_steps: int, batch: int) -> dict:
  """The pool holds exactly the kd_steps fresh batches in order; student step i reads batch i."""
  return {'indices': np.arange(kd_steps * batch, dtype=np.int32).reshape(kd_steps, batch), 'augment': {}}


_G_TERMS = ('x', 't_logits', 's_logits', 'p_mean', 'loss_ent', 'loss_oh', 'loss_bn_per_hook', 'loss_bn', 'loss_adv',
            'loss', 'adv_weight')


def _check_generator_steps(report: Report, fixture: Fixture, it: int, metrics: dict) -> None:
  for j in range(fixture.substeps(it, 'g')):
    name = f'it{it}_g{j}_'
    for term in _G_TERMS:
      if name + term not in fixture.trace:
        continue
      actual = metrics[f'trace/{term}'][j]
      report.check(name + term, harness.nchw(actual) if term == 'x' else actual, fixture.expected(name + term),
                   single_pass=(it, j) == (0, 0) and term != 'x')
    report.skip(name + 'loss_act', 'the activation term: weight act = 0 (checked; dfkd_jax has no such term)')


def _check_student_steps(report: Report, fixture: Fixture, it: int, metrics: dict, config, steps_before: int):
  common.check_kd(report, fixture, it, metrics, common.student_lr_schedule(config), steps_before,
                  single_pass=it == 0)
  kd_loss = losses.kd_kl if config.kd.loss == 'kl' else None
  for s in range(fixture.substeps(it, 's')):
    name = f'it{it}_s{s}_'
    s_out, t_out = metrics['trace/s_out'][s], metrics['trace/t_out'][s]
    loss = (kd_loss(s_out, t_out, config.kd.temperature) if kd_loss else losses.l1_logits(s_out, t_out))
    lam = cudfkd.curriculum_lambda(steps_before + s, lambda_0=config.cudfkd.lambda_0, alpha=config.cudfkd.lambda_alpha)
    report.check(name + 'real_loss_s', loss, fixture.expected(name + 'real_loss_s'))
    report.check(name + 'lamda', np.float64(lam), fixture.expected(name + 'lamda'))
    report.check(name + 'v', losses.curriculum_weight(loss, lam), fixture.expected(name + 'v'))
    report.skip(name + 'g', "curr_v's g: computed by the reference and never used")


def replay(fixture: Fixture, report: Report, overrides: dict) -> None:
  config = harness.with_overrides(config_of(fixture), overrides)
  job, applies = common.build_job(config)
  state = common.initial_state(job, fixture, config)
  generator = common.generator_variables(fixture, config)
  state['method'] = dict(state['method'], generator=generator['params'], batch_stats=generator['batch_stats'])
  ramp = dict(initial=config.loss.adv, step=config.cudfkd.grad_adv if config.cudfkd.curriculum != 'none' else 0.0,
              num_epochs=config.num_epochs, begin_fraction=config.cudfkd.begin_fraction,
              end_fraction=config.cudfkd.end_fraction)
  for it, entry in enumerate(fixture.setting('outer_iterations')):
    epoch, steps_before = int(entry['epoch']), int(entry['global_iter_before'])
    state = common.at_iteration(state, epoch * config.iters_per_epoch, steps_before)
    report.check(f'it{it}_adv_before', np.float64(cudfkd.adv_weight(epoch, **ramp)),
                 fixture.expected(f'it{it}_adv_before'))
    draws = _synth_draws(fixture, it, config.g_steps, config.kd_steps)
    state, metrics = applies['synth'](state, job.frozen, draws, None)
    _check_generator_steps(report, fixture, it, jax.device_get(metrics))
    state, metrics = applies['kd'](state, job.frozen, _kd_draws(config.kd_steps, config.batch_size), None)
    _check_student_steps(report, fixture, it, jax.device_get(metrics), config, steps_before)
    report.check(f'it{it}_global_iter_after', np.int64(state['student'].step),
                 fixture.expected(f'it{it}_global_iter_after'))
    report.check(f'it{it}_adv_after', np.float64(cudfkd.adv_weight(epoch + 1, **ramp)),
                 fixture.expected(f'it{it}_adv_after'))
    method = jax.device_get(state['method'])
    common.check_generator(report, fixture, f'it{it}_generator', config,
                           {'params': method['generator'], 'batch_stats': method['batch_stats']})
    common.check_student(report, fixture, f'it{it}_student', config, jax.device_get(state))
  common.check_adam(report, fixture, 'final_generator_opt', config, jax.device_get(state['method']['opt']))
