"""Building blocks of the config files in ``configs/`` (big_vision style).

Every config file has ``get_config(arg=None)``; ``arg`` is ``key=value`` pairs or bare flags
separated by commas (``configs/x.py:runlocal,seed=3``), parsed by ``parse_arg`` against typed
defaults. ``base()`` holds what every job shares: seed, dataset, mesh, logging, evaluation,
checkpointing and reporting.
"""
from __future__ import annotations

import ml_collections

from dfkd_jax.errors import UserError, check_choice


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """``'runlocal,seed=3'`` -> ConfigDict(runlocal=True, seed=3, <other defaults>).

  Values take the type of their default; unknown names and bad values are one-line errors.
  """
  out = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    name, eq, value = item.partition('=')
    name = name.strip()
    if name not in defaults:
      raise UserError(f"unknown config argument {name!r}; this config accepts: {', '.join(sorted(defaults))}")
    default = defaults[name]
    if not eq:
      if not isinstance(default, bool):
        raise UserError(f'config argument {name!r} needs a value ({name}=...)')
      out[name] = True
    elif isinstance(default, bool):
      if value.lower() not in ('true', 'false', '1', '0'):
        raise UserError(f'config argument {name}={value!r} must be true or false')
      out[name] = value.lower() in ('true', '1')
    else:
      try:
        out[name] = type(default)(value) if default is not None else value
      except ValueError:
        raise UserError(f'config argument {name}={value!r} must be a {type(default).__name__}') from None
  return ml_collections.ConfigDict(out)


def base(*, method: str, dataset: str, num_classes: int, image_size: int, in_channels: int,
         eval_data: str, eval_split: str = 'test') -> ml_collections.ConfigDict:
  """The fields every job has."""
  c = ml_collections.ConfigDict()
  c.method = method
  c.seed = 0
  c.dataset = dataset              # normalisation constants (dfkd_jax.data.NORMALIZATION)
  c.num_classes = num_classes
  c.image_size = image_size
  c.in_channels = in_channels
  c.data_dir = ''                  # tfds data_dir ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets)
  # Devices (-1: all), BatchNorm statistics over the 'global' batch or 'per_device' (as PyTorch
  # DDP), arrays of at least fsdp_min_mb MiB split over the devices (0: none): dfkd_jax.run.parallel.
  c.mesh = ml_collections.ConfigDict({'num_devices': -1, 'batch_norm': 'global', 'fsdp_min_mb': 0.0})
  # Cadences, resolved against the job when the run starts (dfkd_jax.run.cadence): every_steps
  # (wins when > 0), else the shortest of every_epochs, per_run (times in the run) and at_most_steps.
  c.log = ml_collections.ConfigDict(cadence(at_most_steps=50))
  c.eval = ml_collections.ConfigDict({'data': eval_data, 'split': eval_split, 'batch_size': 500,
                                      **cadence(at_most_steps=500)})
  c.checkpoint = ml_collections.ConfigDict({'keep': 3, 'async_save': True, **cadence(at_most_steps=500)})
  c.report = ml_collections.ConfigDict({'tensorboard': False, 'sample_grid': True, 'phase_timing_reps': 3})
  # A non-finite loss or state: 'stop' (a NumericalError naming them; the last checkpoint is
  # good) or 'skip' (keep the previous state, count it in train/skipped_updates).
  c.numerics = ml_collections.ConfigDict({'on_nonfinite': 'stop'})
  # The model a run exports (WORKDIR/student, WORKDIR/model): the 'final' one, or the one of the
  # 'best' evaluation (written when it is measured; summary.json's exported/exported_step say which).
  c.export = 'final'
  return c


def mnist_distillation(method: str) -> ml_collections.ConfigDict:
  """MNIST distillation from the embedded LeNet-5 teacher to LeNet-5-half, evaluated on the 500
  held-out embedded digits (``--config.eval.data=idx:DIR --config.eval.split=test`` for the real
  10,000-image test set). Method configs fill in the generator, losses and schedule."""
  c = base(method=method, dataset='mnist', num_classes=10, image_size=32, in_channels=1,
           eval_data='embedded_mnist', eval_split='heldout')
  c.teacher = ml_collections.ConfigDict({'checkpoint': 'embedded:lenet5_mnist', 'arch': ''})
  c.student = ml_collections.ConfigDict({'arch': 'lenet5_half', 'kwargs': {}})
  return c


def cadence(*, every_steps: int = 0, every_epochs: float = 0.0, per_run: int = 0,
            at_most_steps: int = 0) -> dict:
  """The fields of one cadence (``dfkd_jax.run.cadence``), all present and typed, so that any of
  them can be overridden on the command line."""
  return {'every_steps': every_steps, 'every_epochs': float(every_epochs), 'per_run': per_run,
          'at_most_steps': at_most_steps}


def set_schedule(c: ml_collections.ConfigDict, *, num_epochs: int, iters_per_epoch: int,
                 evals_per_run: int | None = None, checkpoints_per_run: int = 4) -> None:
  """Outer iterations = epochs x iterations per epoch; evaluation every epoch (or
  ``evals_per_run`` times), a checkpoint ``checkpoints_per_run`` times, a log line at least once an
  epoch. Resolved when the run starts, so they follow ``--config.num_epochs`` and the like."""
  c.num_epochs, c.iters_per_epoch = num_epochs, iters_per_epoch
  c.eval.update(cadence(every_epochs=1 if evals_per_run is None else 0, per_run=evals_per_run or 0))
  c.checkpoint.update(cadence(per_run=checkpoints_per_run))
  c.log.every_epochs = 1


def runlocal(c: ml_collections.ConfigDict, batch_size: int = 32) -> None:
  """Shrinks a config to a few iterations for smoke tests and CPU debugging."""
  c.batch_size = batch_size
  set_schedule(c, num_epochs=2, iters_per_epoch=2, checkpoints_per_run=2)
  c.log.every_steps = 1
  c.eval.batch_size = 100
  c.report.phase_timing_reps = 1


# Teacher -> student pairs of the reference scripts (CMI framework and its forks).
CIFAR_PAIRS = ('resnet34-resnet18', 'vgg11-resnet18', 'wrn40_2-wrn16_1', 'wrn40_2-wrn16_2', 'wrn40_2-wrn40_1')


def cifar_distillation(method: str, arg: str | None, **extra_args) -> tuple[ml_collections.ConfigDict,
                                                                           ml_collections.ConfigDict]:
  """CIFAR-10/100 distillation with the reference repos' pairs. Arguments (``:a=b,c``):
  ``dataset`` cifar10|cifar100, ``pair`` TEACHER-STUDENT (one of ``CIFAR_PAIRS``), ``runlocal``.

  The teacher is the CMI framework's file layout ``checkpoints/pretrained/{dataset}_{teacher}.pth``
  (the Dropbox zoo format), converted on the fly; override with ``--config.teacher.checkpoint``.
  Evaluation reads the prepared tfds test split (``--config.data_dir``). ``runlocal`` uses a random
  teacher and tiny batches so the config can be smoke-tested anywhere.
  """
  arg = parse_arg(arg, dataset='cifar10', pair='wrn40_2-wrn16_1', runlocal=False, **extra_args)
  check_choice('dataset', arg.dataset, ('cifar10', 'cifar100'))
  check_choice('pair', arg.pair, CIFAR_PAIRS)
  teacher, student = arg.pair.split('-')
  c = base(method=method, dataset=arg.dataset, num_classes=10 if arg.dataset == 'cifar10' else 100,
           image_size=32, in_channels=3, eval_data=f'tfds:{arg.dataset}')
  c.teacher = ml_collections.ConfigDict({'checkpoint': f'checkpoints/pretrained/{arg.dataset}_{teacher}.pth',
                                         'arch': teacher})
  c.student = ml_collections.ConfigDict({'arch': student, 'kwargs': {}})
  c.eval.batch_size = 500
  if arg.runlocal:
    c.teacher.checkpoint = 'random'
    c.eval.data = ''
  return c, arg


def cmi_generator_settings(c: ml_collections.ConfigDict, nz: int) -> None:
  """The CMI framework's GenerativeSynthesizer: ``LargeGenerator(nz)`` (Sigmoid output through the
  normaliser), Adam(1e-3, betas (0.5, 0.999)), student SGD(lr, 0.9, wd 1e-4) with a per-epoch
  cosine over the epochs, 400 student steps per epoch (``--ep_steps 400``), batch 256."""
  c.generator = ml_collections.ConfigDict({'arch': 'cmi_large_generator', 'output': 'unit', 'sample_mode': 'eval',
                                           'kwargs': {'nz': nz, 'img_size': 32, 'nc': 3}})
  c.student_batch = 'fresh'
  c.g_steps = 1
  c.batch_size = 256
  c.optimizer_g = ml_collections.ConfigDict({'name': 'adam', 'lr': 1e-3, 'betas': (0.5, 0.999)})
  c.optimizer_s = ml_collections.ConfigDict({'name': 'sgd', 'lr': 0.1, 'momentum': 0.9, 'weight_decay': 1e-4,
                                             'schedule': 'cosine'})


def inversion_settings(c: ml_collections.ConfigDict, *, crop_padding: int = 4, flip: bool = True) -> None:
  """What the inversion methods (``engines/inversion.py``) share in the CMI framework: the student
  distils at T=20 from a replay pool of every synthesised image (uint8: the references' 8-bit PNG
  round trip) read with the standard train augmentation (RandomCrop(padding) + horizontal flip),
  SGD(0.1, momentum 0.9, wd 1e-4) with a per-epoch cosine; no synthesis-only warm-up."""
  c.pool = ml_collections.ConfigDict({'capacity': 0, 'dtype': 'uint8', 'insert_views': 0, 'teacher_logits': False})
  c.kd_augment = ml_collections.ConfigDict({'crop_padding': crop_padding, 'flip': flip})
  c.warmup_epochs = 0
  c.kd = ml_collections.ConfigDict({'loss': 'kl', 'temperature': 20.0})
  c.optimizer_s = ml_collections.ConfigDict({'name': 'sgd', 'lr': 0.1, 'momentum': 0.9, 'weight_decay': 1e-4,
                                             'schedule': 'cosine'})


def finish_cifar(c: ml_collections.ConfigDict, arg, *, num_epochs: int, student_steps_per_epoch: int = 400) -> None:
  """Epoch accounting of the CMI framework (``ep_steps // kd_steps`` generator steps per epoch),
  or the runlocal shrink."""
  set_schedule(c, num_epochs=num_epochs, iters_per_epoch=max(1, student_steps_per_epoch // c.kd_steps))
  if arg.runlocal:
    runlocal(c, batch_size=8)
