r"""DFSR with the reference setting: VDSR teacher -> half-width VDSR student, x2/x3/x4, evaluated on the
standard SR test sets when you supply them.

  python -m dfkd_jax.main --config configs/dfsr_vdsr.py:testset=Set5 --workdir W \
      --config.teacher.checkpoint=checkpoints/vdsr/model_vdsr.pth --config.sr_eval.data=folder:data/sr/Set5

The teacher is the reference's DataParallel VDSR state_dict (``module.`` prefix, converted on the
fly). ``testset`` (Set5, Set14, B100, Urban100) names the default folder ``data/sr/<testset>`` of HR
images (PNG/BMP/JPEG); evaluation makes the LR inputs with MATLAB-compatible bicubic and reports PSNR/SSIM
on Y with the scale shaved (``WORKDIR/sr_eval.json``). Reference (huawei ``DEMC/DFSR`` README demo):
``--stu_step 50 --reconw 1.0 --inc_num 1 --inc_step 0 --input_size 48 --iter 120 --latent 256 --lr_G 1e-5
--model_type half --nEpochs 80``, batch 128, SGD 0.1 (momentum 0.9, wd 1e-4, clip 0.4) with x0.1 every
10 epochs, Adam generators with the same steps. Reported (Set5 x2/x3/x4): 37.20 / 33.13 / 30.71 dB
(teacher 37.59 / 33.75 / 31.40, bicubic 33.69 / 30.41 / 28.43). ``inc_num=6`` (an argument) turns on
progressive depth. ``:runlocal`` smoke-tests the config anywhere (a random teacher, a few steps).
"""
from dfkd_jax import configlib
from dfkd_jax.errors import UserError

TESTSETS = ('Set5', 'Set14', 'B100', 'Urban100')


def get_config(arg=None):
  arg = configlib.parse_arg(arg, testset='Set5', inc_num=1, runlocal=False)
  if arg.testset not in TESTSETS:
    raise UserError(f"testset must be one of {', '.join(TESTSETS)}, not {arg.testset!r}")
  c = configlib.base(method='dfsr', dataset='none', num_classes=None, image_size=48, in_channels=1, eval_data='')
  c.sr_eval = dict(data=f'folder:data/sr/{arg.testset}', crop=0, scales=(2, 3, 4))
  c.teacher = dict(checkpoint='checkpoints/vdsr/model_vdsr.pth', arch='vdsr')
  c.student = dict(arch='vdsr_half', kwargs=dict(num_blocks=18))
  c.dfsr = dict(scales=(2, 3, 4), latent=256, gw=1.0, reconw=1.0, inc_num=arg.inc_num,
                inc_step=1 if arg.inc_num > 1 else 0, boundary='replicate', reference_rounding=False)
  c.batch_size = 128
  c.kd_steps = 50
  c.optimizer_s = dict(name='sgd', lr=0.1, momentum=0.9, weight_decay=1e-4, schedule='multistep',
                       milestones=tuple(range(10, 80, 10)), gamma=0.1, clip_norm=0.4)
  c.optimizer_g = dict(name='adam', lr=1e-5, schedule='multistep', milestones=tuple(range(10, 80, 10)), gamma=0.1)
  configlib.set_schedule(c, num_epochs=80, iters_per_epoch=120)
  if arg.runlocal:
    c.teacher.checkpoint = 'random'
    c.student.kwargs.num_blocks = 2
    c.sr_eval.update(data='skimage:camera', crop=48)
    c.batch_size, c.kd_steps = 8, 2
    configlib.set_schedule(c, num_epochs=2, iters_per_epoch=2, checkpoints_per_run=2)
    c.report.phase_timing_reps = 1
  return c
