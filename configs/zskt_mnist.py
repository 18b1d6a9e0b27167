r"""ZSKT on MNIST, LeNet-5 -> LeNet-5-half, with the original's semantics (attention transfer).

  python -m dfkd_jax.main --config configs/zskt_mnist.py --workdir workdirs/zskt_mnist

Per pseudo-batch: one generator step (−KL), then 10 student steps on that batch (KL + 250 x
attention transfer on the outputs of the two conv blocks); Adam for both, cosine over all
pseudo-batches, gradient norm clipped at 5 (polo5/ZeroShotKnowledgeTransfer). The generator is the
DAFL-layout ``GeneratorA`` (the ZSKT generator is fixed to 3 channels). ``:runlocal`` for a smoke run.
"""
from dfkd_jax import configlib


def get_config(arg=None):
  arg = configlib.parse_arg(arg, runlocal=False)
  c = configlib.mnist_distillation('zskt')
  c.variant = 'original'
  c.generator = dict(arch='dfad_generator', kwargs=dict(nz=100, img_size=32, nc=1), output='normalized')
  c.student_batch = 'reuse'
  c.g_steps, c.kd_steps = 1, 10
  c.batch_size = 64  # the original's 128 halved, so that 600 pseudo-batches fit in ~10 minutes here
  c.loss = dict(adv=1.0)
  c.kd = dict(loss='kl', temperature=1.0, reduction='mean', attention_beta=250.0,
              attention_modules=('features.0', 'features.3'))
  c.optimizer_g = dict(name='adam', lr=1e-3, schedule='cosine', per_step=True, clip_norm=5.0)
  c.optimizer_s = dict(name='adam', lr=2e-3, schedule='cosine', per_step=True, clip_norm=5.0)
  configlib.set_schedule(c, num_epochs=12, iters_per_epoch=50, evals_per_run=12)
  if arg.runlocal:
    configlib.runlocal(c)
  return c
