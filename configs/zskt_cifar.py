r"""ZSKT on CIFAR-10/100 with the reference settings.

  python -m dfkd_jax.main --config configs/zskt_cifar.py:dataset=cifar10,pair=wrn40_2-wrn16_1 --workdir W \
      --config.teacher.checkpoint=checkpoints/pretrained/cifar10_wrn40_2.pth --config.data_dir=TFDS_DIR

``variant=cmi`` (default): the CMI framework script (``--kd_steps 5 --adv 1``, LargeGenerator nz 256).
``variant=original``: polo5/ZeroShotKnowledgeTransfer (ZSKT generator, batch 128, 80,000 pseudo-batches,
1 generator + 10 student steps each, Adam with cosine over all pseudo-batches, clip 5, attention
transfer beta 250 on the WRN groups; WRN pairs only). ``runlocal`` for a smoke test (random teacher).
"""
from dfkd_jax import configlib
from dfkd_jax.errors import UserError


def get_config(arg=None):
  c, arg = configlib.cifar_distillation('zskt', arg, variant='cmi')
  c.variant = arg.variant
  c.loss = dict(adv=1.0)
  if arg.variant == 'original':
    if not c.teacher.arch.startswith('wrn'):
      raise UserError('zskt variant=original uses attention on the WRN groups: choose a wrn40_2-* pair')
    c.generator = dict(arch='zskt_generator', kwargs=dict(nz=100), output='normalized', sample_mode='train')
    c.student_batch, c.g_steps, c.kd_steps = 'reuse', 1, 10
    c.batch_size = 128
    c.kd = dict(loss='kl', temperature=1.0, reduction='mean', attention_beta=250.0,
                attention_modules=('block1', 'block2', 'block3'))
    c.optimizer_g = dict(name='adam', lr=1e-3, schedule='cosine', per_step=True, clip_norm=5.0)
    c.optimizer_s = dict(name='adam', lr=2e-3, schedule='cosine', per_step=True, clip_norm=5.0)
    configlib.set_schedule(c, num_epochs=80, iters_per_epoch=1000)
    if arg.runlocal:
      configlib.runlocal(c, batch_size=8)
  else:
    configlib.cmi_generator_settings(c, nz=256)
    c.kd_steps = 5
    c.kd = dict(loss='kl', temperature=20.0, reference_temperature_bug=False)
    configlib.finish_cifar(c, arg, num_epochs=200)
  return c
