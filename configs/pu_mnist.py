r"""PU compression on MNIST, LeNet-5 -> LeNet-5-half: 10 labelled digits per class as positives and an
offline unlabelled pool.

  python -m dfkd_jax.main --config configs/pu_mnist.py --workdir workdirs/pu_mnist

Teacher: the embedded LeNet-5 (98.29% on the real MNIST test set). Positives: 10 images per class of
the embedded training digits. Unlabelled pool: as ``configs/dfnd_mnist.py`` (4,500 unlabelled real
digits among noise, photograph patches and upsampled 8x8 digits). Stage 1 trains the nnPU selector
(an SE head on the pooled outputs of the LeNet trunk's three convolutions and its hidden fully
connected layer; the trunk stays frozen here: fine-tuning it with Adam collapsed the selector to
"all negative" in our runs) with the class prior estimated from the data (``--config.pu.prior=0.23``
to fix it). It keeps, for each class the teacher predicts, the π·|U|/10 best-scored pool images
(``pu.selection=balanced``: with 100 positives the selector ranks some classes far below others,
and the reference's g(x) > 0, ``--config.pu.selection=positive``, leaves them out; measured 87.3%
against at most 70.3% with g(x) > 0, see ``benchmarks/results/little_data.md``;
``WORKDIR/selection.json`` says how many selected images are real digits); stage 2 distils with the
robust, class-reweighted KD on the selected images only, with relatively perturbed class weights and
an unaugmented selector (``pu.distill_labelled=False``, ``pu.perturbation=relative``,
``pu.augment_selector=False``: the setting measured there; ``configs/pu_cifar.py`` has the
reference's). Add ``--config.eval.data=idx:../shared/data/mnist --config.eval.split=test`` for
the real test set. Variants: ``:runlocal`` (a small pool, a few steps).
"""
from dfkd_jax import configlib
from dfkd_jax.data import unlabelled


def get_config(arg=None):
  arg = configlib.parse_arg(arg, runlocal=False)
  c = configlib.mnist_distillation('pu')
  c.unlabelled = unlabelled.mnist_mix_config(small=arg.runlocal)
  c.pu = dict(labelled_data='embedded_mnist', labelled_split='train', labelled_per_class=10,
              prior=0.0, beta=0.0, gamma=1.0, feature_modules=('features.0', 'features.3', 'features.6', 'fc.0'),
              se_reduction=16, train_backbone=False, steps=800, batch_p=100, batch_u=256,
              optimizer=dict(name='adam', lr=3e-3, schedule='constant'),
              perturb_num=1, perturb_eps=0.1, class_weight_power=1.0, selection='balanced',
              augment_selector=False, distill_labelled=False, perturbation='relative')
  c.kd = dict(temperature=1.0)
  c.augment = dict(crop_padding=2, flip=False)
  c.batch_size = 128
  c.num_epochs = 60
  c.optimizer_s = dict(name='adam', lr=1e-3, schedule='multistep', milestones=(24, 48), gamma=0.1)
  # Step cadences: an epoch's length depends on how many images the selector keeps.
  c.eval.every_steps = 155
  c.checkpoint.every_steps = 465
  if arg.runlocal:
    c.pu.steps, c.pu.batch_u = 6, 64
    c.batch_size, c.num_epochs = 32, 2
    c.eval.every_steps = c.checkpoint.every_steps = 8
    c.eval.batch_size = 100
    c.log.every_steps = 1
    c.report.phase_timing_reps = 1
  return c
