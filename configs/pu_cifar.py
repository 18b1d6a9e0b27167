r"""PU compression with the reference setting: CIFAR-10 ResNet-34 -> ResNet-18, 100 labelled CIFAR-10
training images per class as positives, ImageNet (resized to 32x32) as the unlabelled data.

  python -m dfkd_jax.main --config configs/pu_cifar.py --workdir W \
      --config.teacher.checkpoint=checkpoints/pu/resnet34.pth --config.data_dir=TFDS_DIR

Needs prepared tfds ``cifar10`` and ``imagenet_resized/32x32`` (or ``--config.unlabelled.source=folder:DIR``
/ ``npz:PATH`` for another unlabelled set). Reference (huawei ``DEMC/pu_compress`` @ c9d35ae, ``main.py``):
stage 1 nnPU on the teacher's layer1..layer4 pooled features with an SE layer, prior 0.21, SGD 1e-3
(wd 5e-3) for 170 epochs of batch 4096 with steps at 50/100/150 (here: 128 positives + 4,096
unlabelled per step, 313 steps per ImageNet epoch), on randomly cropped and flipped images
(``pu.augment_selector``); stage 2 robust KD at T=1 on the 1,000 labelled images plus the selected
ones (``pu.distill_labelled``) with the inverse class masses and one additively perturbed weight set,
w + 0.1·U(0, 1) (``pu.perturbation='additive'``; 'relative' perturbs w·(1 + 0.1·U(−1, 1))), SGD 0.1
(wd 5e-4) for 200 epochs of batch 2048, steps at 50/100/150. Reported: 93.75% (teacher 95.61%).
Stage 1 is hours on an accelerator: its result is kept in ``WORKDIR/pu_stage1.npz`` once trained,
so a re-run (resume) skips it (a crash during stage 1 repeats it). ``:runlocal`` smoke-tests the
config anywhere (a random teacher, the offline MNIST pool in 3 channels, a few steps).
"""
from dfkd_jax import configlib
from dfkd_jax.data import unlabelled

IMAGENET_STEPS_PER_EPOCH = 313  # 1,281,167 / 4,096


def get_config(arg=None):
  arg = configlib.parse_arg(arg, runlocal=False)
  c = configlib.base(method='pu', dataset='cifar10', num_classes=10, image_size=32, in_channels=3,
                     eval_data='tfds:cifar10')
  c.teacher = dict(checkpoint='checkpoints/pu/resnet34.pth', arch='resnet34')
  c.student = dict(arch='resnet18', kwargs={})
  c.unlabelled = dict(source='tfds:imagenet_resized/32x32', split='train')
  epochs = IMAGENET_STEPS_PER_EPOCH
  c.pu = dict(labelled_data='tfds:cifar10', labelled_split='train', labelled_per_class=100, prior=0.21,
              beta=0.0, gamma=1.0, feature_modules=('layer1', 'layer2', 'layer3', 'layer4'), se_reduction=16,
              train_backbone=True, steps=170 * epochs, batch_p=128, batch_u=4096,
              optimizer=dict(name='sgd', lr=1e-3, momentum=0.9, weight_decay=5e-3, schedule='multistep',
                             milestones=(50 * epochs, 100 * epochs, 150 * epochs)),
              perturb_num=1, perturb_eps=0.1, class_weight_power=1.0, selection='positive',
              augment_selector=True, distill_labelled=True, perturbation='additive')
  c.kd = dict(temperature=1.0)
  c.augment = dict(crop_padding=4, flip=True)
  c.batch_size = 2048
  c.num_epochs = 200
  c.optimizer_s = dict(name='sgd', lr=0.1, momentum=0.9, weight_decay=5e-4, schedule='multistep',
                       milestones=(50, 100, 150))
  c.eval.every_steps = 50  # step cadences: an epoch's length depends on the selection
  c.checkpoint.every_steps = 250
  if arg.runlocal:
    c.teacher.checkpoint = 'random'
    c.eval.data = ''
    c.unlabelled = unlabelled.mnist_mix_config(small=True)
    c.pu.update(labelled_data='embedded_mnist', labelled_per_class=2, steps=2, batch_p=8, batch_u=16,
                selection='prior')  # two selector steps may score nothing positive
    c.batch_size, c.num_epochs = 8, 1
    c.eval.batch_size = 16
    c.checkpoint.every_steps = 4
    c.log.every_steps = 1
    c.report.phase_timing_reps = 1
  return c
