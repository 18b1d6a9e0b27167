r"""DFND with the reference setting: CIFAR-10/100 ResNet-34 -> ResNet-18, ImageNet (resized to 32x32) as
the unlabelled data from the wild.

  python -m dfkd_jax.main --config configs/dfnd_cifar.py:dataset=cifar10 --workdir W \
      --config.teacher.checkpoint=checkpoints/dfnd/teacher_cifar10.pt --config.data_dir=TFDS_DIR

Needs prepared tfds ``imagenet_resized/32x32`` (or ``--config.unlabelled.source=folder:DIR``) and the
dataset's test split for evaluation. Reference (huawei ``DEMC/DFND``; its script does not run, see
``dfkd_jax/methods/dfnd.py``): the 600,000 images with the lowest teacher CE, KD at T=4 plus the
noise-adaptation term (Adam 1e-3), SGD 0.1 (wd 5e-4) at batch 256 (``DFND-train.py:208``; the 512 of
its line 209 only sets the epoch count) for 33 epochs with steps at 40% and
80%, random crop and flip. The matrix's diagonal is the teacher's test accuracy (``eval``) unless
``--config.dfnd.teacher_accuracy`` is given. The Huawei code normalises CIFAR-100 with the CIFAR-10
constants (``cifar100_huawei``). Reported: 94.02% / 76.35% (teachers 94.85% / 77.34%).
``:runlocal`` smoke-tests the config anywhere (a random teacher, the offline MNIST pool in 3 channels).
"""
from dfkd_jax import configlib
from dfkd_jax.data import unlabelled
from dfkd_jax.errors import UserError


def get_config(arg=None):
  arg = configlib.parse_arg(arg, dataset='cifar10', runlocal=False)
  if arg.dataset not in ('cifar10', 'cifar100'):
    raise UserError(f'dataset must be cifar10 or cifar100, not {arg.dataset!r}')
  c = configlib.base(method='dfnd', dataset='cifar10' if arg.dataset == 'cifar10' else 'cifar100_huawei',
                     num_classes=10 if arg.dataset == 'cifar10' else 100, image_size=32, in_channels=3,
                     eval_data=f'tfds:{arg.dataset}')
  c.teacher = dict(checkpoint=f'checkpoints/dfnd/teacher_{arg.dataset}.pt', arch='resnet34')
  c.student = dict(arch='resnet18', kwargs={})
  c.unlabelled = dict(source='tfds:imagenet_resized/32x32', split='train')
  c.dfnd = dict(num_select=600000, teacher_accuracy=0.0, accuracy_estimate='eval', noise_weight=1.0,
                optimizer_noise=dict(name='adam', lr=1e-3))
  c.kd = dict(temperature=4.0)
  c.augment = dict(crop_padding=4, flip=True)
  c.pool_normalization = 'teacher'  # 'imagenet': the reference's constants (see dfkd_jax/methods/dfnd.py)
  c.batch_size = 256
  c.num_epochs = 33
  c.optimizer_s = dict(name='sgd', lr=0.1, momentum=0.9, weight_decay=5e-4, schedule='multistep', milestones=(13, 27))
  for cadence in (c.eval, c.checkpoint):
    cadence.update(configlib.cadence(every_epochs=1))  # 600,000 // 256 = 2,343 steps
  if arg.runlocal:
    c.teacher.checkpoint = 'random'
    c.eval.data = ''
    c.dfnd.accuracy_estimate = 'confidence'
    c.unlabelled = unlabelled.mnist_mix_config(small=True)
    c.dfnd.num_select = 64
    c.batch_size, c.num_epochs = 16, 1
    c.eval.batch_size = 16
    c.log.every_steps = 1
    c.report.phase_timing_reps = 1
  return c
