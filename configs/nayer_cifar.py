r"""NAYER on CIFAR-10/100 with the reference settings (tmtuan1307/NAYER ``scripts/nayer_100.sh``).

  python -m dfkd_jax.main --config configs/nayer_cifar.py:dataset=cifar10,pair=resnet34-resnet18 --workdir W \
      --config.teacher.checkpoint=checkpoints/pretrained/cifar10_resnet34.pth --config.data_dir=TFDS_DIR \
      --config.nayer.label_embedding=cifar10_le.npy

``--batch_size 512 --synthesis_batch_size 400 --lr 0.2 --warmup 20 --epochs 120 --lr_g 4e-3 --adv 1.33
--bn 10 --oh 0.5 --g_steps 30 (CIFAR-10) / 40 (CIFAR-100) --g_life 10 --g_loops 2 --gwp_loops 10``
(NAYER_100), bn_mmt 0.9: 20 warm-up epochs of 10 batches of 400 images (no KD), then 100 epochs of
2 batches followed by 400 student steps (the reference's epoch: ``datafree_kd.py`` synthesises both
batches, then trains; SGD momentum 0.9, wd 1e-4, T 20, CosineAnnealingLR(T_max 100, eta_min
2e-4)). The engine counts 2 batches per epoch (its outer iterations; the kd phase runs in the
second), so the warm-up is ``warmup_epochs`` = 20 x 10 / 2 = 100 engine epochs and the run 200.
``--config.nayer.kd_every_batch=True --config.kd_steps=200`` takes 200 steps after each batch
instead. One deliberate difference: the reference calls ``student.train()`` after each batch, so
its second batch's adversarial forward runs the student in train mode (batch statistics, moving
its running ones); here it stays in eval mode, as the first batch's
(``--config.nayer.reference_student_train_mode=True`` for the reference's). ``epochs=220`` /
``epochs=320`` are NAYER_200 / NAYER_300. Label embeddings: the reference's CLIP ViT-B/32 text
features of the class names, saved as ``.npy`` [num_classes, 512] in label order (convert the
reference's pickles yourself; nothing is downloaded), or the seeded orthonormal fallback
(``dfkd_jax/methods/nayer.py``). ``runlocal`` for a smoke test (random teacher).
"""
from dfkd_jax import configlib


def get_config(arg=None):
  c, arg = configlib.cifar_distillation('nayer', arg, epochs=120)
  configlib.inversion_settings(c)
  warmup, warmup_loops, loops = 20, 10, 2
  c.optimizer_s.update(lr=0.2, t_max=arg.epochs - warmup, eta_min=2e-4)
  c.generator = dict(arch='nayer_generator', kwargs=dict(ngf=64, img_size=32, nc=3, le_emb_size=1000, le_size=512))
  c.batch_size, c.synthesis_batch_size = 512, 400
  c.g_steps, c.kd_steps = (30 if arg.dataset == 'cifar10' else 40), 400
  c.optimizer_g = dict(lr=4e-3, betas=(0.5, 0.999))
  c.loss = dict(bn=10.0, oh=0.5, adv=1.33)
  c.nayer = dict(label_embedding='', bn_mmt=0.9, g_life=10, warmup_g_loops=warmup_loops, crop_padding=4, flip=True,
                 kd_every_batch=False, reference_student_train_mode=False)
  c.warmup_epochs = warmup * warmup_loops // loops
  configlib.set_schedule(c, num_epochs=c.warmup_epochs + arg.epochs - warmup, iters_per_epoch=loops)
  if arg.runlocal:
    configlib.runlocal(c, batch_size=8)
    configlib.set_schedule(c, num_epochs=2, iters_per_epoch=loops, checkpoints_per_run=2)
    c.synthesis_batch_size, c.g_steps, c.kd_steps = 20, 2, 2
    c.warmup_epochs, c.nayer.warmup_g_loops = 1, 2
  return c
