"""Replays of zju-vipa/CMI's inversion synthesizers: ``DeepInvSyntheiszer`` (``--method deepinv``,
``methods/deepinv.py``) and ``CMISynthesizer`` (``--method cmi``, ``methods/cmi.py``), each
``synthesize()`` followed by ``datafree_kd.train`` (the engine's ``synth`` and ``kd`` phases,
``engines/inversion.py``).

The dfkd_jax config is built from ``config.json`` alone: sizes, weights, optimisers and step
counts are read from it; the constants the reference hard-codes are the reference's (jitter
image side // 8, crop padding 4, CMI's local scale (0.25, 1), clip to the valid pixel range).
Reproduce-the-reference flag switched on: ``deepinv.best='last'`` (the reference keeps its final
iterate through tensor aliasing; dfkd_jax's default keeps the lowest-loss one).

Draws, recorded -> dfkd_jax: ``it<k>_pixels`` / ``it<k>_z`` (NCHW -> NHWC) and the raw
``it<k>_targets`` -> the synth phase's ``begin``; CMI's ``it<k>_reset/<param>`` -> the re-drawn
generator (converted from the reference's names); per synthesis step ``jitter_off1/off2/flip_u``
-> ``{'shift', 'flip'}``, or CMI's ``global_crop/global_flip/local_box/local_flip/bank_idx`` ->
``{'global', 'local', 'negatives'}`` (bank rows padded to ``n_neg``: the rows past the bank's
fill are masked by the arithmetic); per student step the recorded DataLoader (``pool_perm`` at each
epoch start, batches in order) -> the pool slots read, ``pool_crop/pool_flip`` -> the crop/flip.

Each call's pool is compared with the reference's PNG codes and the kd phase then reads the
reference's codes (``_checked_pool``: 8-bit truncation turns a 1e-7 deviation across a code
boundary into 1/255). Not compared, with the reason in the report: the reference's aliasing flag,
torch's ``num_batches_tracked`` and CMI's generator BN running statistics (never read).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from dfkd_jax import configlib, data, methods
from dfkd_jax.errors import UserError
from dfkd_jax.replay import harness
from dfkd_jax.replay.compare import Report
from dfkd_jax.replay.fixture import Fixture
from dfkd_jax.run.job import TRACE
from dfkd_jax.synth import pool as pool_lib

describe = 'zju-vipa/CMI DeepInvSyntheiszer (--method deepinv) and CMISynthesizer (--method cmi)'

_REFERENCE = 'zju-vipa/CMI'
_METHODS = ('deepinv', 'cmi')
_CROP_PADDING = 4          # the pool reader's and CMI's global view RandomCrop(size, padding=4)
_LOCAL_SCALE = (0.25, 1.0)  # CMI's local view RandomResizedCrop scale
_TORCH_ADAM_BETAS = (0.9, 0.999)
_BN_BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')


def matches(fixture: Fixture) -> bool:
  return (str(fixture.settings.get('reference', '')).startswith(_REFERENCE)
          and fixture.settings.get('method_flag') in _METHODS)


# ------------------------------------------------------------------------------------------------
# The dfkd_jax config a fixture's settings mean
# ------------------------------------------------------------------------------------------------

def _betas(fixture: Fixture, *path: str) -> tuple[float, float]:
  return tuple(float(b) for b in fixture.setting(*path, 'betas'))


def build_config(fixture: Fixture):
  """The dfkd_jax config of the fixture's run, with the reproduce-the-reference flags on."""
  st = fixture.setting('settings')
  method = fixture.setting('method_flag')
  channels, height, width = (int(v) for v in st['img_size'])
  if height != width:
    raise UserError(f'{fixture.root}: img_size {st["img_size"]} is not square; dfkd_jax takes square images')
  c = configlib.base(method=method, dataset=st['dataset'], num_classes=int(st['num_classes']), image_size=height,
                     in_channels=channels, eval_data='')
  c.teacher = {'checkpoint': os.path.join(fixture.root, 'init_teacher.pth'), 'arch': st['teacher']}
  c.student = {'arch': st['student'], 'kwargs': {}}
  configlib.inversion_settings(c, crop_padding=_CROP_PADDING, flip=True)
  c.kd.temperature = float(st['T'])
  optimizer = fixture.setting('student_optimizer')
  if optimizer['type'] != 'torch.optim.SGD' or optimizer.get('nesterov') or optimizer.get('dampening'):
    raise UserError(f'{fixture.root}: student optimizer {optimizer["type"]} (nesterov/dampening) is not replayed; '
                    'dfkd_jax replays plain SGD with momentum')
  c.optimizer_s.update(lr=float(optimizer['lr']), momentum=float(optimizer['momentum']),
                       weight_decay=float(optimizer['weight_decay']))
  c.batch_size, c.synthesis_batch_size = int(st['batch_size']), int(st['synthesis_batch_size'])
  c.g_steps, c.kd_steps = int(st['g_steps']), int(st['kd_steps'])
  iterations = int(st['outer_iterations'])
  if int(st.get('current_epoch', 0)) != 0:
    raise UserError(f'{fixture.root}: current_epoch {st["current_epoch"]}: only epoch-0 recordings are replayed')
  # Every recorded iteration is in epoch 0 (the student's cosine is stepped once per epoch).
  configlib.set_schedule(c, num_epochs=int(st['epochs']), iters_per_epoch=iterations)
  c.pool.capacity = iterations * c.synthesis_batch_size
  if method == 'deepinv':
    _deepinv_settings(c, fixture, st, height)
  else:
    _cmi_settings(c, fixture, st, height)
  return c


def _deepinv_settings(c, fixture: Fixture, st: dict, side: int) -> None:
  c.optimizer_g = {'lr': float(st['lr_g']), 'betas': _betas(fixture, 'pixel_optimizer'), 'schedule': 'constant',
                   'warmup_steps': 0}
  c.loss = {'bn': float(st['bn']), 'first_bn_multiplier': 1.0, 'oh': float(st['oh']), 'adv': float(st['adv']),
            'adv_form': 'neg_js', 'tv_l1': float(st['tv']), 'tv_l2': 0.0, 'l2': float(st['l2']),
            'l2_per_example': False}
  # jitter_and_flip(lim=1/8): a roll of up to side // 8 pixels; clip_images after every step.
  c.deepinv = {'jitter': side // 8, 'flip': True, 'clip': True, 'prior_on': 'inputs', 'targets': 'random_sorted',
               'low_res_steps': 0, 'best': 'last'}


def _cmi_settings(c, fixture: Fixture, st: dict, side: int) -> None:
  if fixture.setting('architectures', 'generator', 'name') != 'Generator':
    raise UserError(f'{fixture.root}: generator {fixture.setting("architectures", "generator", "name")!r} is not '
                    "replayed; dfkd_jax's CMI uses the CMI framework's Generator (cmi_generator)")
  if _betas(fixture, 'head_optimizer') != _TORCH_ADAM_BETAS:
    raise UserError(f'{fixture.root}: head optimizer betas {_betas(fixture, "head_optimizer")}; dfkd_jax trains the '
                    f'projection head with torch Adam defaults {_TORCH_ADAM_BETAS}, as the reference')
  c.generator = {'arch': 'cmi_generator',
                 'kwargs': {'nz': int(st['nz']), 'ngf': int(st['ngf']), 'img_size': side, 'nc': c.in_channels}}
  c.optimizer_g = {'lr': float(st['lr_g']), 'betas': _betas(fixture, 'generator_and_z_optimizer')}
  c.loss = {'bn': float(st['bn']), 'oh': float(st['oh']), 'adv': float(st['adv']), 'cr': float(st['cr'])}
  c.cmi = {'cr_temperature': float(st['cr_T']), 'bank_size': int(st['bank_size']), 'negatives': int(st['n_neg']),
           'head_dim': int(st['head_dim']), 'feature_layers': tuple(st['feature_layers'] or ()),
           'crop_padding': _CROP_PADDING, 'local_scale': _LOCAL_SCALE, 'flip': True}


# ------------------------------------------------------------------------------------------------
# Initial state
# ------------------------------------------------------------------------------------------------

def _student(state, config, fixture: Fixture):
  variables = harness.variables(config.student.arch, fixture.init_state_dict('student'), config.num_classes)
  student = state['student']
  if any(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(student.opt_state)):
    raise AssertionError('a fresh SGD state is expected to be all zeros')
  return student.replace(params=variables['params'], batch_stats=variables.get('batch_stats', {}))


def _head_params(fixture: Fixture) -> dict:
  """CMI's MLPHead (``head.0``, ``head.2`` Linear layers) in the projection head's Flax layout."""
  state_dict = fixture.init_state_dict('head')
  return {layer: {'kernel': jnp.asarray(state_dict[f'{layer}.weight']).T,
                  'bias': jnp.asarray(state_dict[f'{layer}.bias'])} for layer in ('head.0', 'head.2')}


def _initial_state(job, config, fixture: Fixture):
  state = job.init(jax.random.key(0))
  state = dict(state, student=_student(state, config, fixture))
  if config.method == 'cmi':
    method = state['method']
    head = method['head']
    head = head.replace(params=_head_params(fixture), opt_state=head.tx.init(_head_params(fixture)))
    bank = dict(method['bank'], items=jnp.asarray(fixture.draw('init_bank_init'), jnp.float32))
    state['method'] = dict(method, head=head, bank=bank)
  return state


# ------------------------------------------------------------------------------------------------
# Recorded draws -> the phases' draw pytrees
# ------------------------------------------------------------------------------------------------

def _stack(steps: list[dict]) -> dict:
  return jax.tree.map(lambda *a: jnp.stack(a), *steps)


def _generator_reset(fixture: Fixture, config, it: int) -> dict:
  """The generator variables ``reset_model`` left in call ``it``: its parameters re-drawn, BN
  buffers as initialised (nothing reads them: the generator runs in train mode)."""
  state_dict = dict(fixture.init_state_dict('generator'))
  prefix = f'it{it}_reset/'
  reset = {name[len(prefix):]: value for name, value in fixture.draws.items() if name.startswith(prefix)}
  if not reset:
    raise UserError(f'{fixture.root}: draws.npz has no {prefix}<param> (the generator reset_model drew)')
  state_dict.update(reset)
  return harness.variables(config.generator.arch, state_dict, **config.generator.kwargs)


def synth_draws(fixture: Fixture, config, state, it: int) -> dict:
  """The synth phase's draws of call ``it`` from the recording."""
  name = lambda what: f'it{it}_{what}'
  targets = jnp.asarray(fixture.draw(name('targets')), jnp.int32)
  steps = range(config.g_steps)
  if config.method == 'deepinv':
    begin = {'x': jnp.asarray(harness.nhwc(fixture.draw(name('pixels')))), 'targets': targets}
    stage = [{'shift': jnp.asarray([fixture.draw(name(f'g{j}_jitter_off1')), fixture.draw(name(f'g{j}_jitter_off2'))],
                                   jnp.int32),
              'flip': jnp.asarray(fixture.draw(name(f'g{j}_flip_u')) > 0.5)} for j in steps]
  else:
    begin = {'generator': _generator_reset(fixture, config, it)['params'], 'z': jnp.asarray(fixture.draw(name('z'))),
             'targets': targets}
    stage = [_cmi_step_draws(fixture, config, state, name, j) for j in steps]
  return {'begin': begin, 'stages': [_stack(stage)]}


def _cmi_step_draws(fixture: Fixture, config, state, name, j: int) -> dict:
  rows = np.asarray(fixture.draw(name(f'g{j}_bank_idx')), np.int32).reshape(-1)
  filled = int(pool_lib.size(state['method']['bank']))
  if len(rows) != min(config.cmi.negatives, filled):
    raise UserError(f'{fixture.root}: {name(f"g{j}_bank_idx")} has {len(rows)} rows where the bank, {filled} rows '
                    f'filled, gives min(n_neg={config.cmi.negatives}, {filled}): the bank edge case is not replayed')
  # Padding rows (past the bank's fill) are masked out by the arithmetic; any distinct rows do.
  unused = [r for r in range(config.cmi.bank_size) if r not in set(rows.tolist())]
  negatives = np.concatenate([rows, unused[:config.cmi.negatives - len(rows)]]).astype(np.int32)
  recorded = lambda what, dtype: jnp.asarray(fixture.draw(name(f'g{j}_{what}')), dtype)
  return {'negatives': jnp.asarray(negatives),
          'global': {'offsets': recorded('global_crop', jnp.int32), 'flips': recorded('global_flip', bool)},
          'local': {'boxes': recorded('local_box', jnp.int32), 'flips': recorded('local_flip', bool)}}


def kd_draws(fixture: Fixture, config, pool_size: int, it: int) -> dict:
  """The kd phase's draws of iteration ``it``: the reference's DataLoader over the pool (a fresh
  loader per call, a new recorded permutation at each epoch start) and its crops and flips."""
  batch, order, position, indices = config.batch_size, None, 0, []
  for j in range(config.kd_steps):
    perm_name = f'it{it}_s{j}_pool_perm'
    if order is None or position >= len(order):
      order, position = np.asarray(fixture.draw(perm_name), np.int32), 0
      if len(order) != pool_size:
        raise UserError(f'{fixture.root}: {perm_name} permutes {len(order)} images; the pool holds {pool_size}')
    elif perm_name in fixture.draws:
      raise UserError(f'{fixture.root}: {perm_name} starts an epoch mid-way through the last one')
    if position + batch > len(order):
      raise UserError(f'{fixture.root}: student step {j} of iteration {it} reads a short last batch (pool of '
                      f'{pool_size} images, batch {batch}); dfkd_jax reads full batches across epochs')
    indices.append(order[position:position + batch])
    position += batch
  recorded = lambda what, dtype: jnp.asarray(np.stack([fixture.draw(f'it{it}_s{j}_{what}')
                                                       for j in range(config.kd_steps)]), dtype)
  return {'indices': jnp.asarray(np.stack(indices)),
          'augment': {'offsets': recorded('pool_crop', jnp.int32), 'flips': recorded('pool_flip', bool)}}


# ------------------------------------------------------------------------------------------------
# Comparisons
# ------------------------------------------------------------------------------------------------

def _image(x) -> np.ndarray:
  return harness.nchw(np.asarray(x))


def _check_synth(report: Report, fixture: Fixture, config, metrics: dict, it: int) -> None:
  trace = lambda what: np.asarray(metrics[f'{TRACE}{what}'])
  report.check(f'it{it}_targets_sorted', trace('targets')[0], fixture.expected(f'it{it}_targets_sorted'))
  per_step = {'deepinv': {'inputs': 'inputs', 'inputs_aug': 'inputs_aug', 't_out': 't_out', 's_out': 's_out',
                          'loss_bn': 'loss_bn', 'loss_oh': 'loss_oh', 'loss_adv': 'loss_adv', 'loss_tv': 'loss_tv_l1',
                          'loss_l2': 'loss_l2', 'loss': 'loss', 'best_cost': 'best_loss', 'bn_terms': 'bn_terms'},
              'cmi': {'z': 'z', 'g_output': 'g_output', 'global_view': 'global_view', 'local_view': 'local_view',
                      't_out': 't_out', 's_out': 's_out', 'mask': 'mask', 'loss_bn': 'loss_bn', 'loss_oh': 'loss_oh',
                      'loss_adv': 'loss_adv', 'loss_inv': 'loss_inv', 'loss_cr': 'loss_cr', 'loss': 'loss',
                      'best_cost': 'best_loss', 'bn_terms': 'bn_terms', 'global_feature': 'global_feature',
                      'local_feature': 'local_feature'}}[config.method]
  for j in range(fixture.substeps(it, 'g')):
    first = it == 0 and j == 0  # one forward pass from the initial weights and draws
    for recorded, ours in per_step.items():
      name = f'it{it}_g{j}_{recorded}'
      if name in fixture.trace:
        value = trace(ours)[j]
        report.check(name, _image(value) if value.ndim == 4 else value, fixture.expected(name), single_pass=first)
    if config.method == 'cmi':
      _check_contrastive(report, fixture, metrics, it, j, single_pass=first)
  kept = trace('kept')
  if config.method == 'deepinv':
    report.check(f'it{it}_best_inputs_pixel', _image(kept), fixture.expected(f'it{it}_best_inputs_pixel'))
    final = data.normalize(jnp.asarray(kept), config.dataset)  # best='last': the final iterate, back to its space
    report.check(f'it{it}_final_inputs', _image(final), fixture.expected(f'it{it}_final_inputs'))
    report.skip(f'it{it}_best_inputs_is_final_iterate',
                "a fact about the reference's tensor aliasing (what deepinv.best='last' reproduces)")


def _check_contrastive(report: Report, fixture: Fixture, metrics: dict, it: int, j: int, single_pass: bool) -> None:
  """CMI's contrastive quantities of step ``j``: the bank rows, and the logits and per-row losses
  restricted to the real rows (dfkd_jax pads the negatives to n_neg and masks the padding)."""
  cached = np.asarray(metrics[f'{TRACE}cached_feature'][j])
  expected_cached = fixture.expected(f'it{it}_g{j}_cached_feature')
  rows = expected_cached.shape[0]
  report.check(f'it{it}_g{j}_cached_feature', cached[:rows], expected_cached)
  batch = np.asarray(metrics[f'{TRACE}local_feature']).shape[1]
  logits = np.asarray(metrics[f'{TRACE}cr_logits'][j], np.float64)[:batch + rows, :batch + rows]
  report.check(f'it{it}_g{j}_cr_logits', logits, fixture.expected(f'it{it}_g{j}_cr_logits'), single_pass=single_pass)
  shifted = logits - logits.max(axis=1, keepdims=True)
  per_row = -(np.diagonal(shifted) - np.log(np.exp(shifted).sum(axis=1)))
  report.check(f'it{it}_g{j}_loss_cr_rows', per_row, fixture.expected(f'it{it}_g{j}_loss_cr_rows'),
               single_pass=single_pass)


def _check_cmi_call(report: Report, fixture: Fixture, config, state, metrics: dict, it: int) -> None:
  """What CMI keeps after call ``it``: the best iterate, the final latent and generator, the bank
  and the head."""
  method, batch = state['method'], config.synthesis_batch_size
  losses = np.asarray(metrics[f'{TRACE}loss'])
  report.check(f'it{it}_best_step', np.asarray(np.argmin(losses)), fixture.expected(f'it{it}_best_step'))
  report.check(f'it{it}_best_cost', np.asarray(metrics[f'{TRACE}best_loss'])[-1], fixture.expected(f'it{it}_best_cost'))
  bank = jax.device_get(method['bank'])
  added = (int(bank['next']) - batch + np.arange(batch)) % config.cmi.bank_size  # the rows this call wrote
  report.check(f'it{it}_best_features', bank['items'][added], fixture.expected(f'it{it}_best_features'))
  report.check(f'it{it}_bank/data', bank['items'], fixture.expected(f'it{it}_bank/data'))
  report.check(f'it{it}_bank/ptr', bank['next'], fixture.expected(f'it{it}_bank/ptr'))
  report.check(f'it{it}_bank/n_updates', bank['filled'], fixture.expected(f'it{it}_bank/n_updates'))
  updated = jax.tree.map(lambda a: np.asarray(a[-1]), metrics[f'{TRACE}updated'])
  report.check(f'it{it}_z_final', updated['z'], fixture.expected(f'it{it}_z_final'))
  variables = dict(_generator_reset(fixture, config, it), params=updated['generator'])
  generator = harness.state_dict(config.generator.arch, variables, **config.generator.kwargs)
  for key, expected in fixture.entries(f'it{it}_generator').items():
    name = f'it{it}_generator/{key}'
    if key.endswith(_BN_BUFFERS):
      report.skip(name, "generator BN running statistics: updated by the reference's train-mode forwards but never "
                        'read (dfkd_jax does not keep them)')
    else:
      report.check(name, generator.get(key, np.full(np.shape(expected), np.inf)), expected)
  head = jax.device_get(method['head'].params)
  ours = {f'{layer}.{kind}': (p['kernel'].T if kind == 'weight' else p['bias'])
          for layer, p in head.items() for kind in ('weight', 'bias')}
  harness.check_state_dict(report, fixture, f'it{it}_head', ours)


def _momentum(student):
  """The SGD momentum buffers in the student's opt_state (the subtree shaped like its params)."""
  structure = jax.tree.structure(student.params)
  found = [t for t in jax.tree.leaves(student.opt_state, is_leaf=lambda t: jax.tree.structure(t) == structure)
           if jax.tree.structure(t) == structure]
  if len(found) != 1:
    raise AssertionError(f'expected one momentum tree in the student optimiser state, found {len(found)}')
  return found[0]


def _check_kd(report: Report, fixture: Fixture, config, state, metrics: dict, drawn: dict, it: int) -> None:
  trace = lambda what: np.asarray(metrics[f'{TRACE}{what}'])
  for j in range(fixture.substeps(it, 's')):
    name = lambda what: f'it{it}_s{j}_{what}'
    report.check(name('pool_indices'), np.asarray(drawn['indices'][j]), fixture.expected(name('pool_indices')))
    report.check(name('images'), _image(trace('images')[j]), fixture.expected(name('images')))
    for recorded, ours in (('t_out', 't_out'), ('s_out', 's_out'), ('loss_s', 'loss')):
      report.check(name(recorded), trace(ours)[j], fixture.expected(name(recorded)))
  student = jax.device_get(state['student'])
  arch = config.student.arch
  ours = {k: v for k, v in harness.state_dict(arch, student.variables).items()
          if not k.endswith(harness.UNTRACKED_SUFFIXES)}
  harness.check_state_dict(report, fixture, f'it{it}_student', ours)
  report.check(f'it{it}_lr', np.asarray(metrics['train/lr_student']), fixture.expected(f'it{it}_lr'))
  recorded = fixture.entries(f'it{it}_opt_student')
  if recorded:
    momentum = harness.state_dict(arch, dict(student.variables, params=_momentum(student)))
    for key, expected in recorded.items():
      param = key.removesuffix('/momentum_buffer')
      report.check(f'it{it}_opt_student/{key}', momentum.get(param, np.full(np.shape(expected), np.inf)), expected)


def _checked_pool(report: Report, fixture: Fixture, state, it: int):
  """Compares the pool after call ``it`` with the reference's PNGs, then continues from the
  reference's codes: the 8-bit truncation turns a float deviation across a code boundary into a
  whole code (1/255), so the kd phase is checked on the pool the reference read, and the
  synthesis that filled it by the comparison here and of the kept images."""
  pool = state['pool']
  filled = int(pool_lib.size(pool))
  expected = fixture.expected(f'it{it}_pool/images_uint8')
  report.check(f'it{it}_pool/images_uint8', np.asarray(pool['items'][:filled]), expected)
  if expected.shape != pool['items'][:filled].shape:
    return state
  return dict(state, pool=dict(pool, items=pool['items'].at[:filled].set(jnp.asarray(expected, pool['items'].dtype))))


def replay(fixture: Fixture, report: Report, overrides: dict) -> None:
  config = harness.with_overrides(build_config(fixture), overrides)
  mesh = harness.mesh()
  job = methods.get(config.method).make_job(config, mesh)
  applies = harness.phase_applies(job)
  state, frozen = _initial_state(job, config, fixture), job.frozen
  for it in range(fixture.iterations()):
    state, metrics = applies['synth'](state, frozen, synth_draws(fixture, config, state, it), None)
    metrics = jax.device_get(metrics)
    _check_synth(report, fixture, config, metrics, it)
    if config.method == 'cmi':
      _check_cmi_call(report, fixture, config, state, metrics, it)
    state = _checked_pool(report, fixture, state, it)
    filled = int(pool_lib.size(state['pool']))
    drawn = kd_draws(fixture, config, filled, it)
    state, metrics = applies['kd'](state, frozen, drawn, None)
    _check_kd(report, fixture, config, state, jax.device_get(metrics), drawn, it)
    state = dict(state, step=state['step'] + 1)
