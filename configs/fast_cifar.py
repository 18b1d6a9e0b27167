r"""Fast (FastMeta) on CIFAR-10/100 with the reference settings (zju-vipa/Fast-Datafree
``scripts/fast_cifar.sh``; "modify --dataset (and nothing else) to apply to CIFAR10").

  python -m dfkd_jax.main --config configs/fast_cifar.py:dataset=cifar100,pair=wrn40_2-wrn16_1,steps=10 --workdir W \
      --config.teacher.checkpoint=checkpoints/pretrained/cifar100_wrn40_2.pth --config.data_dir=TFDS_DIR

``steps`` picks Fast-2 (lr_z 0.015, lr_g 5e-3), Fast-5 (0.01, 3e-3) or Fast-10 (0.01, 2e-3, the
default); the pair picks the loss weights: ``pair=resnet34-resnet18`` adv 1.33 / bn 10 / oh 0.5,
``pair=vgg11-resnet18`` 1.0 / 10 / 0.5, the WRN-40-2 pairs (``pair=wrn40_2-wrn16_2``,
``pair=wrn40_2-wrn40_1``) 1.1 / 10 / 0.4. All scripts: FOMAML (``--is_maml 1``), bn_mmt 0.9,
reset_l0 at epoch 120 + warm-up, the CMI ``Generator`` (nz 256), synthesis batch 256, 220 epochs of
one synthesis call and 400 student steps (batch 256, SGD lr 0.2, momentum 0.9, wd 1e-4, T 20), the
first 20 synthesis-only, then CosineAnnealingLR(T_max 200, eta_min 2e-4). The README's Fast-10
CIFAR-10 figures: 94.05 (r34/r18), 90.53 (vgg11/r18), 89.29 (w40-2/w16-1), 92.51 (w40-2/w40-1),
92.45 (w40-2/w16-2). ``runlocal`` for a smoke test (random teacher).
"""
from dfkd_jax import configlib
from dfkd_jax.errors import UserError

# g_steps -> (lr_z, lr_g) of the Fast-2/5/10 scripts.
_STEPS = {2: (0.015, 5e-3), 5: (0.01, 3e-3), 10: (0.01, 2e-3)}
# teacher -> (adv, bn, oh).
_WEIGHTS = {'resnet34': (1.33, 10.0, 0.5), 'vgg11': (1.0, 10.0, 0.5), 'wrn40_2': (1.1, 10.0, 0.4)}


def get_config(arg=None):
  c, arg = configlib.cifar_distillation('fast', arg, steps=10)
  if arg.steps not in _STEPS:
    raise UserError(f'steps must be 2, 5 or 10 (Fast-2/5/10), not {arg.steps}')
  configlib.inversion_settings(c)
  c.optimizer_s.update(lr=0.2, t_max=200, eta_min=2e-4)
  c.generator = dict(arch='cmi_generator', kwargs=dict(nz=256, ngf=64, img_size=32, nc=3))
  c.batch_size, c.synthesis_batch_size = 256, 256
  c.g_steps, c.kd_steps = arg.steps, 400
  lr_z, lr_g = _STEPS[arg.steps]
  c.optimizer_g = dict(lr=lr_g, betas=(0.5, 0.999))
  adv, bn, oh = _WEIGHTS[c.teacher.arch]
  c.loss = dict(bn=bn, oh=oh, adv=adv)
  c.fast = dict(meta='fomaml', reptile_scale=67.0, lr_z=lr_z, bn_mmt=0.9, reset_l0=True, reset_l0_epoch=120,
                crop_padding=4, flip=True)
  c.warmup_epochs = 20
  configlib.finish_cifar(c, arg, num_epochs=220)
  if arg.runlocal:  # one synthesis call per epoch, as the default
    configlib.set_schedule(c, num_epochs=4, iters_per_epoch=1, checkpoints_per_run=2)
    c.synthesis_batch_size, c.g_steps, c.kd_steps = 8, 2, 2
    c.warmup_epochs, c.fast.reset_l0_epoch = 1, 1
  return c
