r"""DFND on MNIST, LeNet-5 -> LeNet-5-half, from an offline unlabelled pool "in the wild".

  python -m dfkd_jax.main --config configs/dfnd_mnist.py --workdir workdirs/dfnd_mnist

Teacher: the embedded LeNet-5 (98.29% on the real MNIST test set). Unlabelled pool
(``dfkd_jax.data.unlabelled.mnist_mix``): the 4,500 embedded training digits without labels, 3,000
noise images, 10,000 patches of scikit-image's sample photographs and, with scikit-learn installed,
its 1,797 8x8 digits upsampled. The teacher keeps its 4,000 most confident images
(``WORKDIR/selection.json`` says how many are real digits); the student learns KD at T=4 plus the
noise-adaptation term, the matrix's diagonal set to the teacher's accuracy on the evaluation data. Add
``--config.eval.data=idx:../shared/data/mnist --config.eval.split=test`` for the real test set.
Variants: ``:runlocal`` (a small pool, a few steps).
"""
from dfkd_jax import configlib
from dfkd_jax.data import unlabelled


def get_config(arg=None):
  arg = configlib.parse_arg(arg, runlocal=False)
  c = configlib.mnist_distillation('dfnd')
  c.unlabelled = unlabelled.mnist_mix_config(small=arg.runlocal)
  c.dfnd = dict(num_select=4000, teacher_accuracy=0.0, accuracy_estimate='eval', noise_weight=1.0,
                optimizer_noise=dict(name='adam', lr=1e-3))
  c.kd = dict(temperature=4.0)
  c.augment = dict(crop_padding=2, flip=False)
  c.pool_normalization = 'teacher'  # the pool normalised as the teacher's data (see dfkd_jax/methods/dfnd.py)
  c.batch_size = 128
  c.num_epochs = 60
  c.optimizer_s = dict(name='adam', lr=1e-3, schedule='multistep', milestones=(24, 48), gamma=0.1)
  c.eval.update(configlib.cadence(every_epochs=5))  # 4,000 // 128 = 31 steps an epoch
  c.checkpoint.update(configlib.cadence(every_epochs=15))
  if arg.runlocal:
    c.dfnd.num_select = 256
    c.batch_size, c.num_epochs = 32, 2
    for cadence in (c.eval, c.checkpoint):
      cadence.update(configlib.cadence(every_epochs=1))
    c.eval.batch_size = 100
    c.log.every_steps = 1
    c.report.phase_timing_reps = 1
  return c
