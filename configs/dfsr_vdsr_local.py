r"""DFSR offline: data-free distillation of a half-width VDSR student from the VDSR teacher trained
here on scikit-image's sample photographs (``configs/teacher_vdsr_local.py``).

  python -m dfkd_jax.main --config configs/teacher_vdsr_local.py --workdir workdirs/teacher_vdsr_local
  python -m dfkd_jax.main --config configs/dfsr_vdsr_local.py --workdir workdirs/dfsr_vdsr_local

Per-scale generators (x2, x3, x4, 48x48 network inputs), the reference's losses (``reconw`` 1), no
progressive depth. The student has the teacher's 3 residual blocks at half width. The reference's
80 epochs x 120 iterations x 50 student steps at batch 128 with SGD 0.1 are cut to 4 epochs x 10
iterations x 10 student steps at batch 8 with Adam (3e-4) to fit a shared 2-core CPU. At the end
``WORKDIR/sr_eval.json`` (and the final line) give bicubic, teacher and student PSNR/SSIM on the
held-out photographs ``camera``, ``chelsea``, ``coffee``. Variants: ``:runlocal`` (a random teacher, a
few steps).
"""
from dfkd_jax import configlib


def dfsr_config(*, runlocal: bool):
  """The local DFSR config (shared with ``configs/dfsr_vdsr.py``'s runlocal)."""
  c = configlib.base(method='dfsr', dataset='none', num_classes=None, image_size=48, in_channels=1, eval_data='')
  c.sr_eval = dict(data='skimage:camera,chelsea,coffee', crop=240, scales=(2, 3, 4))
  c.teacher = dict(checkpoint='workdirs/teacher_vdsr_local/model', arch='vdsr')
  c.student = dict(arch='vdsr_half', kwargs=dict(num_blocks=3))
  c.dfsr = dict(scales=(2, 3, 4), latent=256, gw=1.0, reconw=1.0, inc_num=1, inc_step=0, boundary='replicate',
                reference_rounding=False)
  c.batch_size = 8
  c.kd_steps = 10
  c.optimizer_s = dict(name='adam', lr=3e-4, schedule='multistep', milestones=(3,), gamma=0.1, clip_norm=0.4)
  c.optimizer_g = dict(name='adam', lr=1e-5, schedule='multistep', milestones=(10,), gamma=0.1)
  configlib.set_schedule(c, num_epochs=4, iters_per_epoch=10, checkpoints_per_run=2)
  if runlocal:
    c.teacher.checkpoint = 'random'
    c.batch_size, c.kd_steps = 8, 2
    configlib.set_schedule(c, num_epochs=2, iters_per_epoch=2, checkpoints_per_run=2)
    c.sr_eval.crop = 48
    c.report.phase_timing_reps = 1
  return c


def get_config(arg=None):
  arg = configlib.parse_arg(arg, runlocal=False)
  return dfsr_config(runlocal=arg.runlocal)
