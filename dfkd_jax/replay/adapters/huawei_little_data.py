"""Replay of huawei-noah DEMC's little-data methods through ``dfkd_jax.methods.dfnd`` and
``dfkd_jax.methods.pu``: DFND (``DFND/DFND-train.py``: KD with the noise-adaptation matrix on given
images) and PU compression (``pu_compress``: stage 1, the nnPU selector on labelled positives and
unlabelled images; stage 2, robust KD with perturbed class weights).

The fixtures give each batch as uint8 pixels (augmentation replaced by identity), so the engines'
crop/flip draws are empty; the selections themselves (DFND's confidence top-k, PU's g(x) > 0 over
a pool) are not recorded and the recorded batches stand for the selected images. The networks
come from the fixture's ``init_*.pth`` through the production converter (which reads their width
off the shapes).
"""
from __future__ import annotations

import os
import re

import jax
import ml_collections
import numpy as np
import optax

from dfkd_jax import configlib, data
from dfkd_jax.convert import api, naming
from dfkd_jax.engines import common
from dfkd_jax.errors import UserError
from dfkd_jax.methods import dfnd, pu
from dfkd_jax.models import TorchLayout
from dfkd_jax.replay import harness
from dfkd_jax.replay.compare import Report
from dfkd_jax.replay.fixture import Fixture

describe = 'huawei-noah DEMC DFND (DFND-train.py) and pu_compress (train_pu, robust KD train)'

_REFERENCE = 'Data-Efficient-Model-Compression'
# pu_compress normalises CIFAR-10 and the unlabelled images with these (main.py:106-120).
_PU_DATASET = 'cifar10'
_PU_FEATURES = ('layer1', 'layer2', 'layer3', 'layer4')  # ResNet34_PU pools layer1..layer4 (model.py)
_SE_REDUCTION = 16  # SELayer(960)'s default reduction
_PU_HEAD = ('se.', 'fc.')  # the PU model's keys outside the trunk


def matches(fixture: Fixture) -> bool:
  reference = str(fixture.settings.get('reference', ''))
  return _REFERENCE in reference and ('DFND' in reference or 'pu_compress' in reference)


def replay(fixture: Fixture, report: Report, overrides: dict) -> None:
  if 'DFND' in fixture.setting('reference'):
    _replay_dfnd(fixture, report, overrides)
  else:
    _replay_pu(fixture, report, overrides)


# --- shared -------------------------------------------------------------------------------------

def _pixels(fixture: Fixture, name: str) -> np.ndarray:
  """A recorded uint8 NCHW batch as the engines' uint8 NHWC."""
  return harness.nhwc(fixture.draw(name))


def _check_identity_augmentation(fixture: Fixture) -> None:
  if 'identity' not in str(fixture.setting('augmentation')):
    raise UserError(f'{fixture.root}: augmentation {fixture.settings["augmentation"]!r} (dfkd_jax replays these '
                    'fixtures with the crop/flip replaced by identity; no crop/flip draws are recorded)')


def _arch(fixture: Fixture, model: str) -> str:
  """The CIFAR ResNet named by ``<model>.arch_reference`` (``model.ResNet34(10)`` -> resnet34)."""
  reference = str(fixture.setting(model, 'arch_reference'))
  found = re.search(r'\bResNet(18|34|50)\(', reference)
  if not found:
    raise UserError(f'{fixture.root}: {model} {reference!r} (dfkd_jax replays the CIFAR ResNet-18/34/50 here)')
  return f'resnet{found.group(1)}'


def _config(fixture: Fixture, method: str, dataset: str, num_classes: int) -> ml_collections.ConfigDict:
  """The fields both methods share: the teacher (the fixture's ``init_teacher.pth``), the student
  (its width read off ``init_student.pth``), image size, identity augmentation, one device."""
  _check_identity_augmentation(fixture)
  if dataset not in data.NORMALIZATION:
    raise UserError(f'{fixture.root}: dataset {dataset!r} has no dfkd_jax normalisation constants')
  student = api.convert_state_dict(fixture.init_state_dict('student'), _arch(fixture, 'student'), num_classes,
                                   what='init_student.pth')
  image_size = int(student.model_kwargs.get('image_size', 32))
  c = configlib.base(method=method, dataset=dataset, num_classes=num_classes, image_size=image_size,
                     in_channels=int(student.model_kwargs.get('in_channels', 3)), eval_data='')
  c.teacher = ml_collections.ConfigDict({'checkpoint': os.path.join(fixture.root, 'init_teacher.pth'),
                                         'arch': _arch(fixture, 'teacher')})
  c.student = ml_collections.ConfigDict({'arch': student.arch, 'kwargs': dict(student.model_kwargs)})
  c.augment = ml_collections.ConfigDict({'crop_padding': 0, 'flip': False})
  c.mesh.num_devices = 1
  return c


def _sgd(settings: dict, milestones) -> dict:
  if settings.get('type') != 'SGD' or settings.get('nesterov', False) or settings.get('dampening', 0):
    raise UserError(f'optimizer {settings} (dfkd_jax replays plain SGD with momentum here)')
  return dict(name='sgd', lr=float(settings['lr']), momentum=float(settings['momentum']),
              weight_decay=float(settings['weight_decay']), schedule='multistep', milestones=tuple(milestones))


def _student_state(job, fixture: Fixture, config) -> dict:
  """``job.init``'s state with the student of ``init_student.pth`` (fresh SGD momentum, as torch's)."""
  state = jax.jit(job.init)(jax.random.key(0))
  student = harness.variables(config.student.arch, fixture.init_state_dict('student'), config.num_classes,
                              **config.student.kwargs)
  state['student'] = state['student'].replace(params=student['params'], batch_stats=student['batch_stats'])
  return state


def _tracked(state_dict: dict) -> dict:
  """``state_dict`` less torch's BN step counters, which dfkd_jax does not keep (the export writes 0)."""
  return {k: v for k, v in state_dict.items() if not k.endswith(harness.UNTRACKED_SUFFIXES)}


def _check_student(report: Report, fixture: Fixture, prefix: str, config, state: dict) -> None:
  harness.check_state_dict(report, fixture, prefix, _tracked(harness.state_dict(
      config.student.arch, jax.device_get(state['student'].variables), **config.student.kwargs)))


def _check_kd_pass(report: Report, fixture: Fixture, name: str, metrics: dict, first: bool) -> None:
  """The selected-KD phase's input and both networks' logits (the teacher's always from its
  initial weights, a single pass)."""
  report.check(f'{name}images', harness.nchw(metrics['trace/images']), fixture.expected(f'{name}images'),
               single_pass=True)
  report.check(f'{name}student_logits', metrics['trace/student_logits'], fixture.expected(f'{name}student_logits'),
               single_pass=first)
  report.check(f'{name}teacher_logits', metrics['trace/teacher_logits'], fixture.expected(f'{name}teacher_logits'),
               single_pass=True)


# --- DFND ---------------------------------------------------------------------------------------

def _dfnd_epochs(num_select: int) -> tuple[int, tuple[int, int]]:
  """(epochs, 0-based lr milestones) of ``main()``: ``for e in range(1, int(40000/num_select*512))``
  with ``adjust_learning_rate``'s drops at e >= max/200*80 and e >= max/200*160."""
  last = int(40000 / num_select * 512)
  first_at = lambda fraction: next((e for e in range(1, last) if e >= last / 200.0 * fraction), last)
  return last - 1, (first_at(80.0) - 1, first_at(160.0) - 1)


def dfnd_config(fixture: Fixture) -> ml_collections.ConfigDict:
  args = fixture.setting('script_args')
  num_classes = int(fixture.setting('n_classes'))
  c = _config(fixture, 'dfnd', args['dataset'], num_classes)
  # The reference normalises the pool with ImageNet's constants (DFND-train.py:49-50).
  c.pool_normalization = 'imagenet'
  noise = fixture.setting('optimizer_noise')
  if noise.get('type') != 'Adam' or tuple(noise.get('betas', (0.9, 0.999))) != (0.9, 0.999) or \
     float(noise.get('eps', 1e-8)) != 1e-8:
    raise UserError(f'{fixture.root}: optimizer_noise {noise} (dfkd_jax replays torch Adam with default betas/eps)')
  c.dfnd = dict(num_select=int(args['num_select']), teacher_accuracy=float(fixture.setting('teacher_acc')),
                accuracy_estimate='eval', noise_weight=1.0, optimizer_noise=dict(name='adam', lr=float(noise['lr'])))
  c.kd = dict(temperature=float(fixture.setting('T')))
  c.batch_size = int(fixture.setting('batch_size'))
  c.num_epochs, milestones = _dfnd_epochs(int(args['num_select']))
  c.optimizer_s = _sgd(fixture.setting('optimizer'), milestones)
  c.eval.batch_size = c.batch_size
  return c


def _square_theta(theta: np.ndarray) -> np.ndarray:
  """The reference's θ (C, C − 1) as dfkd_jax's (C, C), whose unused diagonal is 0."""
  c = theta.shape[0]
  out = np.zeros((c, c), theta.dtype)
  out[~np.eye(c, dtype=bool)] = theta.reshape(-1)
  return out


def _off_diagonal(theta: np.ndarray) -> np.ndarray:
  c = theta.shape[0]
  return np.asarray(theta)[~np.eye(c, dtype=bool)].reshape(c, c - 1)


def _kd_passes(report: Report, fixture: Fixture, job, state, batches, tag: str):
  """Runs ``job``'s kd phase on each recorded batch and checks what every KD pass records; yields
  (k, the trace prefix it<k>_<tag>, whether it is the first pass, its metrics, the state after it)."""
  apply = harness.phase_applies(job)['kd']
  frozen = jax.device_put(job.frozen)
  for k, images in enumerate(batches):
    state, metrics = apply(state, frozen, {}, {'images': images})
    metrics = jax.device_get(metrics)
    name, first = f'it{k}_{tag}', k == 0
    _check_kd_pass(report, fixture, name, metrics, first)
    yield k, name, first, metrics, state


def _replay_dfnd(fixture: Fixture, report: Report, overrides: dict) -> None:
  config = harness.with_overrides(dfnd_config(fixture), overrides)
  mesh = harness.mesh()
  iterations = fixture.iterations()
  batches = [_pixels(fixture, f'it{k}_pixels_u8') for k in range(iterations)]
  s = common.setup(config, mesh)
  accuracy = float(config.dfnd.teacher_accuracy)
  job = dfnd.distillation_job(config, mesh, s, np.concatenate(batches), accuracy)
  state = _student_state(job, fixture, config)
  theta = _square_theta(fixture.init_state_dict('noise_adaptation')['noise_adaptation'])
  state['aux'] = state['aux'].replace(params={'theta': theta})
  for k, name, first, metrics, state in _kd_passes(report, fixture, job, state, batches, ''):
    report.check(f'{name}teacher_pred', np.argmax(metrics['trace/teacher_logits'], -1),
                 fixture.expected(f'{name}teacher_pred'))
    report.check(f'{name}noise_layer', metrics['trace/noise_transition'], fixture.expected(f'{name}noise_layer'),
                 single_pass=first)
    report.check(f'{name}output_s_adaptation', metrics['trace/noise_adapted_probs'],
                 fixture.expected(f'{name}output_s_adaptation'), single_pass=first)
    report.check(f'{name}loss_kd', metrics['train/loss_kd'], fixture.expected(f'{name}loss_kd'), single_pass=first)
    report.check(f'{name}loss_nll', metrics['train/loss_noise'], fixture.expected(f'{name}loss_nll'),
                 single_pass=first)
    for total in ('loss_total', 'loss_list_item'):
      report.check(name + total, metrics['train/student_loss'], fixture.expected(name + total), single_pass=first)
    if first and 'lr_epoch1' in fixture.trace:
      report.check('lr_epoch1', np.float64(metrics['train/lr_student']), fixture.expected('lr_epoch1'))
    aux = jax.device_get(state['aux'])
    report.check(f'{name}noise_adaptation', _off_diagonal(aux.params['theta']),
                 fixture.expected(f'{name}noise_adaptation'))
    adam = next(x for x in jax.tree.leaves(aux.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                if isinstance(x, optax.ScaleByAdamState))
    for field, moment in (('exp_avg', adam.mu), ('exp_avg_sq', adam.nu)):
      report.check(f'{name}noise_adam/{field}', _off_diagonal(moment['theta']),
                   fixture.expected(f'{name}noise_adam/{field}'))
    _check_student(report, fixture, f'{name}student', config, state)


# --- PU compression -----------------------------------------------------------------------------

def pu_config(fixture: Fixture) -> ml_collections.ConfigDict:
  args, stage1 = fixture.setting('script_args'), fixture.setting('stage1')
  if stage1.get('loss_func') != 'sigmoid(-x)':
    raise UserError(f"{fixture.root}: stage1.loss_func {stage1.get('loss_func')!r} (dfkd_jax's nnPU uses sigmoid(-x))")
  c = _config(fixture, 'pu', _PU_DATASET, int(args['num_classes']))
  steps = int(fixture.setting('steps_per_stage'))
  batch = int(fixture.setting('batch_size'))
  num_positives = len(fixture.draw('it0_pu_pos_labels'))
  # The reference's MultiStepLR milestones count epochs; an epoch here is the recorded steps.
  c.pu = dict(labelled_data='', labelled_split='train', labelled_per_class=int(args['pos_num']),
              prior=float(stage1['prior']), beta=float(stage1['beta']), gamma=float(stage1['gamma']),
              feature_modules=_PU_FEATURES, se_reduction=_SE_REDUCTION, train_backbone=True, steps=steps,
              batch_p=num_positives, batch_u=batch - num_positives,
              optimizer=_sgd(stage1['optimizer'], (50 * steps, 100 * steps, 150 * steps)),
              perturb_num=int(args['perturb_num']), perturb_eps=float(args['epsilon']), class_weight_power=1.0,
              selection='positive', augment_selector=True, distill_labelled=True, perturbation='additive')
  c.kd = dict(temperature=1.0)  # kdloss's and get_class_weight's default T
  c.batch_size = batch
  c.num_epochs = 1
  c.optimizer_s = _sgd(fixture.setting('stage2', 'optimizer'), (50, 100, 150))
  c.eval.batch_size = batch
  return c


def _split_pu_model(state_dict: dict) -> tuple[dict, dict]:
  """(trunk keys, head keys ``se.*``/``fc.*``) of a ResNet34_PU state_dict."""
  head = {k: v for k, v in state_dict.items() if k.startswith(_PU_HEAD)}
  return {k: v for k, v in state_dict.items() if k not in head}, head


def _selector_params(fixture: Fixture, config, state: dict, teacher) -> dict:
  """The selector's trunk and head from ``init_pu_model.pth`` (the trunk is a ResNet-34 without its
  classifier, which the selector never reads: the teacher's stands in)."""
  trunk_sd, head_sd = _split_pu_model(fixture.init_state_dict('pu_model'))
  teacher_sd = harness.state_dict(teacher.metadata['arch'], teacher.variables, **teacher.metadata['model_kwargs'])
  classifier = {k: v for k, v in teacher_sd.items() if k.startswith('linear.')}
  trunk = harness.variables(teacher.metadata['arch'], {**trunk_sd, **classifier}, config.num_classes,
                            **teacher.metadata['model_kwargs'])
  head = naming.torch_to_flax(head_sd, {'params': state['selector'].params['head']}, TorchLayout(),
                              what='init_pu_model.pth (se.*, fc.*)')['params']
  return {'trunk': trunk['params'], 'head': head}, trunk['batch_stats']


def _selector_state_dict(teacher, selector) -> dict:
  variables = {'params': selector.params['trunk'], 'batch_stats': selector.batch_stats}
  trunk = harness.state_dict(teacher.metadata['arch'], jax.device_get(variables), **teacher.metadata['model_kwargs'])
  head = naming.flax_to_torch({'params': jax.device_get(selector.params['head'])}, TorchLayout())
  return _tracked({**trunk, **head})


def _replay_selector(fixture: Fixture, report: Report, config, mesh, s: common.Setup) -> None:
  """Stage 1: the selector's steps on the recorded P and U batches, then its eval-mode scores of
  the validation batch (through the production scoring of the pool)."""
  num_p = config.pu.batch_p
  val = _pixels(fixture, 'val_pixels_u8')
  job = pu.selector_job(config, mesh, s, _pixels(fixture, 'it0_pu_pixels_u8')[:num_p], val)
  apply = harness.phase_applies(job)['select']
  state = jax.jit(job.init)(jax.random.key(0))
  params, batch_stats = _selector_params(fixture, config, state, s.teacher)
  state['selector'] = state['selector'].replace(params=params, batch_stats=batch_stats)
  for k in range(fixture.iterations()):
    pixels, perm = _pixels(fixture, f'it{k}_pu_pixels_u8'), fixture.draw(f'it{k}_pu_perm')
    # The reference feeds [positives, unlabelled][perm]; dfkd_jax scores positives then unlabelled.
    state, metrics = apply(state, {}, {}, {'positives': pixels[:num_p], 'unlabelled': pixels[num_p:]})
    metrics = jax.device_get(metrics)
    name, first = f'it{k}_pu_', k == 0
    report.check(f'{name}images', harness.nchw(metrics['trace/images'])[perm], fixture.expected(f'{name}images'),
                 single_pass=True)
    report.check(f'{name}scores', metrics['trace/scores'][perm, None], fixture.expected(f'{name}scores'),
                 single_pass=first)
    report.check(f'{name}dloss_dscores', metrics['trace/dobjective_dscores'][perm, None],
                 fixture.expected(f'{name}dloss_dscores'), single_pass=first)
    if config.pu.beta == 0:  # PULoss's value is R⁺ − β on the non-negative branch: the risk at β = 0
      report.check(f'{name}loss', metrics['train/nnpu_risk'], fixture.expected(f'{name}loss'), single_pass=first)
    else:
      report.skip(f'{name}loss', "PULoss's value R⁺ − β on its non-negative branch (β ≠ 0): dfkd_jax reports the risk")
    for labels in ('labels_raw', 'labels_pm1'):
      report.skip(f'{name}{labels}', 'the ±1 relabelling of a mixed batch: dfkd_jax takes P and U as separate batches')
    if first:
      report.check('pu_lr_after_scheduler_step', np.float64(metrics['train/lr']),
                   fixture.expected('pu_lr_after_scheduler_step'))
    harness.check_state_dict(report, fixture, f'{name}model', _selector_state_dict(s.teacher, state['selector']))
  scores = job.on_finish(state)['scores']
  report.check('val_pu_scores_eval', np.asarray(scores)[:, None], fixture.expected('val_pu_scores_eval'))
  report.skip('val_pu_images', 'the validation input: the same normalisation as it<k>_pu_images, compared there')
  report.skip('val_pu_labels_pm1', 'the validation labels: all positive, dfkd_jax has no selector validation')
  report.skip('val_pu_loss', 'the selector validation loss: dfkd_jax has no selector validation phase')


def _perturbations(fixture: Fixture, count: int) -> np.ndarray:
  """perturb()'s ``np.random.rand`` draws as (perturb_num, C) U(0, 1)."""
  return np.stack([fixture.draw(f'perturb{j}_rand') for j in range(count)]).astype(np.float32)


def _replay_robust_kd(fixture: Fixture, report: Report, config, mesh, s: common.Setup) -> None:
  """Stage 2: the class weight sets over the distillation batches, then the robust KD steps."""
  iterations = fixture.iterations()
  batches = [_pixels(fixture, f'it{k}_rkd_pixels_u8') for k in range(iterations)]
  images = np.concatenate(batches)
  uniforms = _perturbations(fixture, config.pu.perturb_num)
  weights = jax.device_get(pu.class_weight_sets(config, mesh, s, images, uniforms))
  report.check('class_weight', weights[0], fixture.expected('class_weight'))
  for j in range(len(weights)):
    report.check(f'class_weights_{j}', weights[j], fixture.expected(f'class_weights_{j}'))
  job = pu.distillation_job(config, mesh, s, images, weights)
  state = _student_state(job, fixture, config)
  for k, name, first, metrics, state in _kd_passes(report, fixture, job, state, batches, 'rkd_'):
    for j in range(len(weights)):
      report.check(f'{name}sample_weights_{j}', metrics['trace/sample_weights'][j],
                   fixture.expected(f'{name}sample_weights_{j}'))
      report.check(f'{name}loss_w{j}', metrics['trace/set_losses'][j], fixture.expected(f'{name}loss_w{j}'),
                   single_pass=first)
    report.check(f'{name}selected', metrics['trace/selected_set'], fixture.expected(f'{name}selected'))
    if first:
      report.check('rkd_lr', np.float64(metrics['train/lr_student']), fixture.expected('rkd_lr'))
    _check_student(report, fixture, f'it{k}_student', config, state)
  why = ("train()'s validation epoch and best-epoch restore (it returns the weights of its best validation "
         "accuracy by strict '>', here the initial student): dfkd_jax evaluates on its own cadence and exports "
         "the final (or best, config.export) student")
  for name in ('rkd_val_images', 'rkd_val_acc', 'rkd_returned_state_is_last_step', 'rkd_returned_state_is_init'):
    report.skip(name, why)


def _replay_pu(fixture: Fixture, report: Report, overrides: dict) -> None:
  config = harness.with_overrides(pu_config(fixture), overrides)
  mesh = harness.mesh()
  s = common.setup(config, mesh)
  _replay_selector(fixture, report, config, mesh, s)
  _replay_robust_kd(fixture, report, config, mesh, s)
