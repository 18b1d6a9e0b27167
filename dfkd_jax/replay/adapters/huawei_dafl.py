"""Replays of the original DAFL: huawei-noah Efficient-Computing ``Data-Efficient-Model-Compression/
DAFL/DAFL-train.py`` (its training body: one generator forward, the teacher's and the student's
losses, one backward, an Adam step of G and a step of S), through ``methods/dafl.py`` with
``variant='huawei'`` (``engines/generative.py``: the synth and kd phases share the batch).

The generator's initial weights come from the fixtures' weights rule (``replay.weights_rule``) on
the keys and base seed in ``config.json``; the teacher and student from ``init_*.pth``. The
recorded ``l1.0.weight`` digest (row and column sums, sum of squares, a strided sample) is compared
in place of that weight.
"""
from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from dfkd_jax import configlib, methods, models
from dfkd_jax.convert import api
from dfkd_jax.errors import UserError
from dfkd_jax.replay import harness, weights_rule
from dfkd_jax.replay.adapters import generative_run
from dfkd_jax.replay.compare import Report
from dfkd_jax.replay.fixture import Fixture

describe = 'huawei-noah DAFL (DAFL-train.py)'

# The reference's model classes -> dfkd_jax architectures (sizes read off the weights).
ARCHS = {'lenet.LeNet5': 'lenet5', 'lenet.LeNet5Half': 'lenet5_half', 'resnet.ResNet18': 'resnet18',
         'resnet.ResNet34': 'resnet34'}
# DAFL-train.py's --dataset -> (dfkd_jax dataset: its normalisation constants, classes). The
# reference normalises CIFAR-100 with the CIFAR-10 constants (DAFL-train.py:121-124).
DATASETS = {'MNIST': ('mnist', 10), 'cifar10': ('cifar10', 10), 'cifar100': ('cifar100_huawei', 100)}
# The student's learning rate: x0.1 at epochs 800 and 1600 on CIFAR (adjust_learning_rate, constants
# of DAFL-train.py); constant on MNIST.
CIFAR_MILESTONES = (800, 1600)
L1 = 'l1.0.weight'


def matches(fixture: Fixture) -> bool:
  reference = str(fixture.settings.get('reference', ''))
  return reference.startswith('huawei-noah/Efficient-Computing') and reference.rstrip('/').endswith('/DAFL')


def _arch(fixture: Fixture, model: str) -> str:
  reference = str(fixture.setting(model, 'arch_reference')).split('(')[0].strip()
  if reference not in ARCHS:
    raise UserError(f'{fixture.root}: {model} {reference!r} is not one of the DAFL models dfkd_jax replays '
                    f"({', '.join(ARCHS)})")
  return ARCHS[reference]


def _optimizer(fixture: Fixture, name: str, cifar: bool) -> dict:
  opt = fixture.setting(name)
  if opt['type'] == 'Adam' and not opt.get('weight_decay') and opt.get('eps', 1e-8) == 1e-8:
    return {'name': 'adam', 'lr': opt['lr'], 'betas': tuple(opt['betas']), 'schedule': 'constant'}
  if opt['type'] == 'SGD' and not opt.get('nesterov') and not opt.get('dampening'):
    return {'name': 'sgd', 'lr': opt['lr'], 'momentum': opt['momentum'], 'weight_decay': opt['weight_decay'],
            **({'schedule': 'multistep', 'milestones': CIFAR_MILESTONES} if cifar else {'schedule': 'constant'})}
  raise UserError(f'{fixture.root}: {name} {opt} (dfkd_jax replays Adam without weight decay, or plain SGD)')


def build_config(fixture: Fixture) -> ml_collections.ConfigDict:
  """The dfkd_jax config of the fixture's ``DAFL-train.py`` arguments."""
  args = fixture.setting('script_args')
  if args['dataset'] not in DATASETS:
    raise UserError(f"{fixture.root}: --dataset {args['dataset']} (dfkd_jax replays {', '.join(DATASETS)})")
  eps = fixture.setting('generator', 'bn_eps')
  if sorted(eps.values()) != [1e-5, 1e-5, 0.8, 0.8]:
    raise UserError(f'{fixture.root}: generator BN eps {eps} (the DAFL generator has 1e-5 outside, 0.8 inside)')
  dataset, num_classes = DATASETS[args['dataset']]
  c = configlib.base(method='dafl', dataset=dataset, num_classes=num_classes, image_size=args['img_size'],
                     in_channels=args['channels'], eval_data='')
  c.variant = 'huawei'
  c.teacher = ml_collections.ConfigDict({'checkpoint': os.path.join(fixture.root, 'init_teacher.pth'),
                                         'arch': _arch(fixture, 'teacher')})
  c.student = ml_collections.ConfigDict({'arch': _arch(fixture, 'student'), 'kwargs': {}})
  c.generator = ml_collections.ConfigDict({
      'arch': 'dafl_generator', 'output': 'normalized', 'sample_mode': 'train',
      'kwargs': {'nz': args['latent_dim'], 'img_size': args['img_size'], 'nc': args['channels']}})
  c.student_batch, c.g_steps, c.kd_steps = 'reuse', 1, 1
  c.batch_size = args['batch_size']
  c.loss = {'oh': args['oh'], 'ie': args['ie'], 'a': args['a']}
  c.kd = {'loss': 'kl', 'temperature': 1.0, 'reduction': 'batchmean'}
  cifar = args['dataset'] != 'MNIST'
  c.optimizer_g = _optimizer(fixture, 'optimizer_G', cifar)
  c.optimizer_s = _optimizer(fixture, 'optimizer_S', cifar)
  configlib.set_schedule(c, num_epochs=args['n_epochs'], iters_per_epoch=max(fixture.setting('iterations'), 1))
  return c


def _digest(weight: np.ndarray, stride: int) -> dict[str, np.ndarray]:
  """The recorded summary of a large weight: row/column sums and sum of squares (float64), and
  every ``stride``-th entry of the flattened weight."""
  w64 = np.asarray(weight, np.float64)
  return {'row_sum': w64.sum(1), 'col_sum': w64.sum(0), 'sum_sq': np.sum(w64 * w64),
          'flat_sample': np.asarray(weight).reshape(-1)[::stride], 'flat_sample_stride': np.int64(stride)}


def replay(fixture: Fixture, report: Report, overrides: dict) -> None:
  config = build_config(fixture)
  student = api.convert_state_dict(fixture.init_state_dict('student'), config.student.arch, config.num_classes,
                                   what='the fixture student')
  config.student.kwargs = dict(student.model_kwargs)
  config = harness.with_overrides(config, overrides)
  generator_kw = dict(config.generator.kwargs)
  rule = fixture.setting('generator', 'keys')
  seed = fixture.settings['generator'].get('weights_rule_base_seed', weights_rule.DEFAULT_BASE_SEED)
  job = methods.get('dafl').make_job(config, harness.mesh())
  state = generative_run.initial_state(
      job, student.variables,
      harness.variables(config.generator.arch, weights_rule.state_dict(rule, seed), None, **generator_kw))
  applies = harness.phase_applies(job)
  student_sd = lambda ts: harness.state_dict(config.student.arch, ts.variables, num_classes=config.num_classes,
                                             **config.student.kwargs)
  for k in range(fixture.setting('iterations')):
    state, synth = applies['synth'](state, job.frozen, {'z': generative_run.stacked(fixture, [f'it{k}_z'])}, None)
    state, kd = applies['kd'](state, job.frozen, {}, None)
    synth, kd = jax.device_get(synth), jax.device_get(kd)
    t_logits = synth['trace/t_out'][0]
    softmax = np.exp(t_logits - t_logits.max(1, keepdims=True))
    ours = {'gen_imgs': harness.nchw(synth['trace/g_output'][0]), 'teacher_logits': t_logits,
            'teacher_features': synth['trace/t_feat'][0], 'teacher_pred': np.argmax(t_logits, 1),
            'softmax_o_T': (softmax / softmax.sum(1, keepdims=True)).mean(0),  # p̄ of the ie term
            'student_logits': kd['trace/s_out'][0],
            'loss_oh': synth['trace/loss_oh'][0], 'loss_ie': synth['trace/loss_ie'][0],
            'loss_a': synth['trace/loss_a'][0], 'loss_kd': kd['trace/student_loss'][0],
            'loss_total': synth['trace/generator_loss'][0] + kd['trace/student_loss'][0]}
    for name, value in ours.items():
      # The first iteration's forward passes start from the initial weights.
      report.check(f'it{k}_{name}', value, fixture.expected(f'it{k}_{name}'), single_pass=k == 0)
    if k == 0 and 'lr_S_epoch0' in fixture.trace:
      report.check('lr_S_epoch0', np.asarray(kd['train/lr_student']), fixture.expected('lr_S_epoch0'))
    generator = harness.state_dict(config.generator.arch, state['generator'].variables, **generator_kw)
    harness.check_state_dict(report, fixture, f'it{k}_generator', generative_run.tracked(generator))
    digest = fixture.entries(f'it{k}_generator_digest/{L1}')
    if digest:
      for name, value in _digest(generator[L1], int(digest['flat_sample_stride'])).items():
        report.check(f'it{k}_generator_digest/{L1}/{name}', value, digest[name])
    harness.check_state_dict(report, fixture, f'it{k}_student', generative_run.tracked(student_sd(state['student'])),
                             layout=models.get_spec(config.student.arch).torch)  # e.g. LeNet-5's Huawei names
