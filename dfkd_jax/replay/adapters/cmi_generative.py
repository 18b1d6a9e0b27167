"""Replays of the CMI framework's GAN baselines: zju-vipa/CMI ``datafree_kd.py --method
dafl|zskt|dfad|dfq`` (``GenerativeSynthesizer.synthesize`` then ``datafree_kd.train``), through
``methods/{dafl,zskt,dfad,dfq}.py`` with their CMI settings (``engines/generative.py``).

The reference computes every term of its one generator loss (bn, oh, adv, balance, act) whatever
the weights; each dfkd_jax method has the terms of its own loss, so a fixture giving weight to a
term the method lacks is a one-line error, and a recorded term of weight 0 that the method does
not compute is listed as not compared. The reference's student KD runs at T = 1 whatever ``--T``
says (``kd.reference_temperature_bug``, switched on here).
"""
from __future__ import annotations

import os

import ml_collections
import numpy as np

from dfkd_jax import configlib, data, methods
from dfkd_jax.errors import UserError
from dfkd_jax.replay import harness
from dfkd_jax.replay.adapters import generative_run
from dfkd_jax.replay.compare import Report
from dfkd_jax.replay.fixture import Fixture

describe = 'zju-vipa/CMI GenerativeSynthesizer baselines (--method dafl, zskt, dfad, dfq)'

# Per method: the reference's loss weight -> (dfkd_jax config.loss field, trace metric of the term).
TERMS = {
    'dafl': {'oh': ('oh', 'loss_oh'), 'balance': ('ie', 'loss_ie'), 'act': ('a', 'loss_a')},
    'zskt': {'adv': ('adv', 'loss_adv')},
    'dfad': {'adv': ('adv', 'loss_adv')},
    'dfq': {'bn': ('bn', 'loss_bn'), 'oh': ('oh', 'loss_oh'), 'adv': ('adv', 'loss_adv'),
            'balance': ('balance', 'loss_balance')},
}
# The reference's trace name of each loss weight's term.
TRACE_NAMES = {'bn': 'loss_bn', 'oh': 'loss_oh', 'adv': 'loss_adv', 'balance': 'loss_balance', 'act': 'loss_act'}


def matches(fixture: Fixture) -> bool:
  return (str(fixture.settings.get('reference', '')).startswith('zju-vipa/CMI')
          and fixture.settings.get('method_flag') in TERMS)


def _dataset(fixture: Fixture) -> str:
  """dfkd_jax's dataset name whose normalisation constants are the fixture's normaliser."""
  mean, std = fixture.setting('normalizer', 'mean'), fixture.setting('normalizer', 'std')
  for name, (m, s) in data.NORMALIZATION.items():
    if np.allclose(m, mean, rtol=0, atol=1e-7) and np.allclose(s, std, rtol=0, atol=1e-7):
      return name
  raise UserError(f'{fixture.root}: normaliser mean {mean} std {std} is not one of dfkd_jax\'s datasets '
                  f"({', '.join(data.NORMALIZATION)})")


def _require(fixture: Fixture, ok: bool, what: str) -> None:
  if not ok:
    raise UserError(f'{fixture.root}: {what} (dfkd_jax does not replay this setting)')


def build_config(fixture: Fixture) -> ml_collections.ConfigDict:
  """The dfkd_jax config of the fixture's settings (CMI's ``GenerativeSynthesizer`` and ``train``)."""
  st = fixture.setting('settings')
  method = st['method']
  channels, size, _ = st['img_size']
  _require(fixture, st['batch_size'] == st['synthesis_batch_size'],
           f"batch_size {st['batch_size']} != synthesis_batch_size {st['synthesis_batch_size']}")
  _require(fixture, st.get('current_epoch', 0) == 0, f"current_epoch {st.get('current_epoch')} (replays start at 0)")
  c = configlib.base(method=method, dataset=_dataset(fixture), num_classes=st['num_classes'], image_size=size,
                     in_channels=channels, eval_data='')
  c.teacher = ml_collections.ConfigDict({'checkpoint': os.path.join(fixture.root, 'init_teacher.pth'),
                                         'arch': st['teacher']})
  c.student = ml_collections.ConfigDict({'arch': st['student'], 'kwargs': {}})
  configlib.cmi_generator_settings(c, nz=st['nz'])
  c.generator.arch = st['generator']
  c.generator.kwargs = {'nz': st['nz'], 'ngf': st['ngf'], 'img_size': size, 'nc': channels}
  c.batch_size, c.g_steps, c.kd_steps = st['batch_size'], st['g_steps'], st['kd_steps']
  g_opt, s_opt = fixture.setting('generator_optimizer'), fixture.setting('student_optimizer')
  _require(fixture, g_opt['type'] == 'torch.optim.Adam' and g_opt['weight_decay'] == 0 and g_opt['eps'] == 1e-8,
           f'generator optimiser {g_opt}')
  c.optimizer_g.update(lr=g_opt['lr'], betas=tuple(g_opt['betas']))
  _require(fixture, s_opt['type'] == 'torch.optim.SGD' and not s_opt['nesterov'] and s_opt['dampening'] == 0,
           f'student optimiser {s_opt}')
  c.optimizer_s.update(lr=s_opt['lr'], momentum=s_opt['momentum'], weight_decay=s_opt['weight_decay'])
  weights = {name: st[name] for name in TRACE_NAMES}
  unsupported = [name for name, w in weights.items() if w and name not in TERMS[method]]
  _require(fixture, not unsupported, f"--method {method} with {', '.join(f'--{n} {weights[n]}' for n in unsupported)}")
  c.loss = {field: weights[name] for name, (field, _) in TERMS[method].items()}
  if method == 'dfad':
    c.kd = {'loss': 'l1'}
  else:  # the reference's criterion is KLDiv(T=1) whatever --T says: the flag reproduces it
    c.kd = {'loss': 'kl', 'temperature': st['T'], 'reference_temperature_bug': True}
  if method in ('dafl', 'zskt'):
    c.variant = 'cmi'
  configlib.set_schedule(c, num_epochs=st['epochs'], iters_per_epoch=st['outer_iterations'])
  return c


def replay(fixture: Fixture, report: Report, overrides: dict) -> None:
  config = harness.with_overrides(build_config(fixture), overrides)
  st = fixture.setting('settings')
  method = st['method']
  job = methods.get(method).make_job(config, harness.mesh())
  student_kw, generator_kw = {'num_classes': config.num_classes}, dict(config.generator.kwargs)
  state = generative_run.initial_state(
      job, harness.variables(config.student.arch, fixture.init_state_dict('student'), config.num_classes),
      harness.variables(config.generator.arch, fixture.init_state_dict('generator'), None, **generator_kw))
  applies = harness.phase_applies(job)
  student_sd = lambda ts: harness.state_dict(config.student.arch, ts.variables, **student_kw)
  generator_sd = lambda ts: harness.state_dict(config.generator.arch, ts.variables, **generator_kw)
  terms = {TRACE_NAMES[name]: metric for name, (_, metric) in TERMS[method].items()}
  if method == 'dfq':
    terms['bn_terms'] = 'bn_terms'
  for k in range(st['outer_iterations']):
    g_names = [f'it{k}_g{j}_z' for j in range(config.g_steps)]
    state, synth = applies['synth'](state, job.frozen, {'z': generative_run.stacked(fixture, g_names)}, None)
    for j in range(config.g_steps):
      prefix, first = f'it{k}_g{j}_', k == 0 and j == 0  # the first step: single passes from the initial weights
      check = lambda name, ours: report.check(prefix + name, harness.nchw(ours[j]), fixture.expected(prefix + name),
                                              single_pass=first)
      check('g_output', synth['trace/g_output'])
      check('t_out', synth['trace/t_out'])
      check('t_feat', synth['trace/t_feat'])
      if prefix + 's_out' in fixture.trace:
        check('s_out', synth['trace/s_out'])
      check('loss', synth['trace/generator_loss'])
      for name, metric in terms.items():
        check(name, synth[f'trace/{metric}'])
      for name in sorted((set(TRACE_NAMES.values()) | {'bn_terms'}) - set(terms)):
        if prefix + name in fixture.trace:
          report.skip(prefix + name, f'a term of weight 0 that dfkd_jax\'s {method} loss does not have')
    s_names = [f'it{k}_s{j}_z' for j in range(config.kd_steps)]
    state, kd = applies['kd'](state, job.frozen, {'z': generative_run.stacked(fixture, s_names)}, None)
    for j in range(config.kd_steps):
      prefix = f'it{k}_s{j}_'
      for name, metric in (('images', 'images'), ('t_out', 't_out'), ('s_out', 's_out'), ('loss_s', 'student_loss')):
        report.check(prefix + name, harness.nchw(kd[f'trace/{metric}'][j]), fixture.expected(prefix + name))
    report.check(f'it{k}_lr', np.asarray(kd['train/lr_student']), fixture.expected(f'it{k}_lr'))
    for part, to_sd in (('student', student_sd), ('generator', generator_sd)):
      harness.check_state_dict(report, fixture, f'it{k}_{part}', generative_run.tracked(to_sd(state[part])))
    for part, to_sd, fields in (
        ('student', student_sd, {'momentum_buffer': 'trace'}),
        ('generator', generator_sd, {'step': 'count', 'exp_avg': 'mu', 'exp_avg_sq': 'nu'})):
      if fixture.entries(f'it{k}_opt_{part}'):
        ts = state[part]
        generative_run.check_optimizer_state(
            report, fixture, f'it{k}_opt_{part}', ts.opt_state,
            lambda tree, ts=ts, to_sd=to_sd: generative_run.params_by_reference_name(to_sd, ts, tree), fields)
