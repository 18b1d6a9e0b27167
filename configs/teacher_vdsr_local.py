r"""Trains a VDSR teacher briefly on patches of scikit-image's bundled sample photographs (offline).

  python -m dfkd_jax.main --config configs/teacher_vdsr_local.py --workdir workdirs/teacher_vdsr_local

Multi-scale (x2, x3, x4) VDSR on 48x48 luma patches of 11 photographs; ``camera``, ``chelsea`` and
``coffee`` are held out for evaluation (PSNR/SSIM against bicubic per scale in
``WORKDIR/sr_eval.json``). The trained model goes to ``WORKDIR/model``, the teacher of
``configs/dfsr_vdsr_local.py``. To fit a shared 2-core CPU the network has 3 residual blocks instead
of VDSR's 18 (``--config.model.kwargs.num_blocks=18`` for the full one) and trains for 400 steps of
8 patches with Adam. Variants: ``:runlocal`` (a few steps).
"""
import ml_collections

from dfkd_jax import configlib

TRAIN_PHOTOS = ('astronaut,rocket,stereo_motorcycle,hubble_deep_field,immunohistochemistry,retina,coins,moon,'
                'brick,grass,gravel')
HELDOUT_PHOTOS = 'camera,chelsea,coffee'


def sr_config(method: str) -> ml_collections.ConfigDict:
  """The fields of the local SR configs: luma 48x48 inputs, no classification evaluation, held-out
  photographs for PSNR/SSIM."""
  c = configlib.base(method=method, dataset='none', num_classes=None, image_size=48, in_channels=1, eval_data='')
  c.sr_eval = dict(data=f'skimage:{HELDOUT_PHOTOS}', crop=240, scales=(2, 3, 4))
  return c


def get_config(arg=None):
  arg = configlib.parse_arg(arg, runlocal=False)
  c = sr_config('sr_supervised')
  c.model = dict(arch='vdsr', kwargs=dict(num_blocks=3))
  c.sr_data = dict(train=f'skimage:{TRAIN_PHOTOS}', patch_size=48, scales=(2, 3, 4))
  c.batch_size = 8
  c.num_steps = 400
  c.optimizer = dict(name='adam', lr=5e-4, schedule='multistep', milestones=(300,), gamma=0.1, clip_norm=1.0)
  c.eval.update(configlib.cadence())  # no classification evaluation
  c.checkpoint.update(configlib.cadence(per_run=4))
  c.log.per_run = 8  # and at most 50 steps apart
  if arg.runlocal:
    c.num_steps, c.batch_size = 3, 8
    c.checkpoint.every_steps = c.log.every_steps = 1
    c.sr_eval.crop = 48
  return c
