r"""CMI on CIFAR-10/100 with the reference settings (zju-vipa/CMI
``scripts/cmi/scratch_cmi_cifar10_wrn402_wrn161.sh``).

  python -m dfkd_jax.main --config configs/cmi_cifar.py:dataset=cifar10,pair=wrn40_2-wrn16_1 --workdir W \
      --config.teacher.checkpoint=checkpoints/pretrained/cifar10_wrn40_2.pth --config.data_dir=TFDS_DIR

``--batch_size 128 --synthesis_batch_size 256 --lr 0.1 --kd_steps 400 --ep_steps 400 --g_steps 200 --lr_g 1e-3
--adv 0.5 --bn 1 --oh 1 --cr 0.8 --cr_T 0.1 --T 20``, 200 epochs (one synthesis call per epoch, 51,200
images in all, 80,000 student steps), student SGD with a cosine over the epochs; the CMI ``Generator``
(nz 256, ngf 64) re-initialised per call, projection head to 256 dimensions, memory bank of 40,960
rows, 4,096 negatives per step. Features are the spatial means of every BatchNorm input, or for a
ResNet-34 teacher the inputs of layer1..layer4, as ``datafree_kd.py`` does. The README's CMI figure
for this pair is ~88.8% (scratch). The paper's adversarial-CMI headline (90.01%) also starts from
50,000 pre-inverted images, which are not shipped. A full run is hours on a GPU. ``runlocal`` for a
smoke test (random teacher).
"""
from dfkd_jax import configlib


def get_config(arg=None):
  c, arg = configlib.cifar_distillation('cmi', arg)
  configlib.inversion_settings(c)
  c.generator = dict(arch='cmi_generator', kwargs=dict(nz=256, ngf=64, img_size=32, nc=3))
  c.batch_size, c.synthesis_batch_size = 128, 256
  c.g_steps, c.kd_steps = 200, 400
  c.optimizer_g = dict(lr=1e-3, betas=(0.5, 0.999))
  c.loss = dict(bn=1.0, oh=1.0, adv=0.5, cr=0.8)
  c.cmi = dict(cr_temperature=0.1, bank_size=40960, negatives=4096, head_dim=256,
               feature_layers=('layer1', 'layer2', 'layer3', 'layer4') if c.teacher.arch == 'resnet34' else (),
               crop_padding=4, local_scale=(0.25, 1.0), flip=True)
  configlib.finish_cifar(c, arg, num_epochs=200)
  if arg.runlocal:  # one synthesis call per epoch, as the default
    configlib.set_schedule(c, num_epochs=4, iters_per_epoch=1, checkpoints_per_run=2)
    c.synthesis_batch_size, c.g_steps, c.kd_steps = 8, 2, 2
    c.cmi.bank_size, c.cmi.negatives = 64, 16
  return c
