r"""CuDFKD on CIFAR-10/100 with the reference settings (ljrprocc/DataFree @ bf3096b,
``scripts/cudfkd/*.sh`` as they are at that commit).

  python -m dfkd_jax.main --config configs/cudfkd_cifar.py:dataset=cifar10,pair=resnet34-resnet18 --workdir W \
      --config.teacher.checkpoint=checkpoints/pretrained/cifar10_resnet34.pth --config.data_dir=TFDS_DIR

Every script: ``DCGAN_Generator_CIFAR10`` (nz 512, depth 2) re-initialised once, Adam(1e-3, (0.9,
0.99)), one generator step per ``--kd_steps_interval 10`` student steps, ``--ep_steps 400`` (40
iterations per epoch), ``--lmda_ent -20 --oh 1 --bn 1 --adv_type kl``, the 'log' self-paced weight;
student SGD (lr 0.1, momentum 0.9, wd 1e-4), CosineAnnealingLR(T_max = epochs), fresh samples, no
replay. Which script each config follows (the adversarial weight starts at adv and grows by
grad_adv after every epoch strictly between begin and end x epochs):

| dataset, teacher | script ``scripts/cudfkd/...`` | batch | epochs | adv + grad | begin/end | T | loss | lambda_0 |
|---|---|---|---|---|---|---|---|---|
| cifar10, ResNet-34/VGG-11 | ``cudfkd_cifar10_resnet34_resnet18.sh`` | 512 | 250 | 0 + 0.5 | 0.25/0.75 | 20 | L1 | 2 |
| cifar10, WRN-40-2 | ``cudfkd_cifar10_wrn402_wrn161.sh`` | 1024 | 250 | 0.5 + 0.05 | 0.25/0.75 | 20 | KL | 2 |
| cifar100, ResNet-34/VGG-11 | ``cudfkd_cifar100_resnet34_resnet18.sh`` | 768 | 400 | 0 + 0.35 | 0.2/0.8 | 5 | L1 | 1 |
| cifar100, WRN-40-2 | ``cudfkd_cifar100_wrn402_wrn161.sh`` | 1024 | 500 | 0 + 0.12 | 0.2/0.75 | 2 | KL | 1 |

alpha (lambda's growth per student step) is 1e-4 on CIFAR-10 and 2e-5 otherwise (``datafree_kd.py``
at bf3096b). The reference's ``--memory`` replay option is not reproduced. README: 95.28 (r34/r18),
88.77 (w40-2/w16-1) on CIFAR-10. ``runlocal`` for a smoke test (random teacher).
"""
from dfkd_jax import configlib

# (dataset, WRN teacher?) -> (batch, epochs, adv, grad_adv, begin, end, T, loss, lambda_0) of the
# pinned script named in the docstring's table.
_SCRIPTS = {
    ('cifar10', False): (512, 250, 0.0, 0.5, 0.25, 0.75, 20.0, 'l1', 2.0),
    ('cifar10', True): (1024, 250, 0.5, 0.05, 0.25, 0.75, 20.0, 'kl', 2.0),
    ('cifar100', False): (768, 400, 0.0, 0.35, 0.2, 0.8, 5.0, 'l1', 1.0),
    ('cifar100', True): (1024, 500, 0.0, 0.12, 0.2, 0.75, 2.0, 'kl', 1.0),
}


def get_config(arg=None):
  c, arg = configlib.cifar_distillation('cudfkd', arg)
  configlib.inversion_settings(c, crop_padding=0, flip=False)  # fresh samples, no augmentation
  c.pool.dtype = 'float32'
  c.generator = dict(arch='cudfkd_generator', kwargs=dict(nz=512, ngf=64, img_size=32, nc=3, d=2))
  c.g_steps, c.kd_steps = 1, 10
  c.optimizer_g = dict(lr=1e-3, betas=(0.9, 0.99))
  batch, epochs, adv, grad_adv, begin, end, t, kd_loss, lambda_0 = _SCRIPTS[
      arg.dataset, c.teacher.arch.startswith('wrn')]
  c.batch_size = c.synthesis_batch_size = batch
  c.kd = dict(loss=kd_loss, temperature=t)
  c.loss = dict(lmda_ent=-20.0, adv=adv, oh=1.0, bn=1.0)
  c.cudfkd = dict(adv_type='kl', curriculum='log', grad_adv=grad_adv, begin_fraction=begin, end_fraction=end,
                  lambda_0=lambda_0, lambda_alpha=1e-4 if arg.dataset == 'cifar10' else 2e-5,
                  entropy_temperature=t)
  configlib.finish_cifar(c, arg, num_epochs=epochs)
  if arg.runlocal:
    c.synthesis_batch_size, c.kd_steps = 8, 2
  return c
