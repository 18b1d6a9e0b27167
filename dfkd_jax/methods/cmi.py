"""CMI: Contrastive Model Inversion (Fang et al., IJCAI 2021; zju-vipa/CMI ``CMISynthesizer``).

Every synthesis call re-initialises the generator G (weights N(0, 0.02), biases 0, BN scales
N(1, 0.02)), draws latents z ~ N(0, I) and optimises both with a fresh Adam(lr_g, (0.5, 0.999))
for ``g_steps`` steps towards random sorted labels y. Per step, with x = G(z) ∈ [0, 1] and two
views, each with per-image random parameters and normalised after augmenting,

  global v_g = RandomCrop(size, padding 4) + flip,   local v_l = RandomResizedCrop(scale (0.25, 1)) + flip,

the loss is

  L = bn · Σ_l (‖σ²_run,l − σ²_l(v_g)‖₂ + ‖μ_run,l − μ_l(v_g)‖₂) + oh · CE(T(v_g), y)
    + adv · (−(1/N) Σ_n [argmax S = argmax T]_n · KL(p_T ‖ p_S)_n)          (T = 1, S in eval mode)
    + cr · L_cr,

where L_cr contrasts instance features. f(v) concatenates the per-image spatial means of the inputs
of every teacher BatchNorm (``cmi.feature_layers``: of the named modules instead; ResNet-34 uses
layer1..layer4), the projection head h (Linear(d, d), ReLU, Linear(d, ``head_dim``), L2-normalised;
own Adam(lr_g), never reset) maps local rows [f(v_l); cached local] and global rows [f(v_g); cached
global] (``negatives`` rows sampled from the memory bank, only from its filled part), and

  L_cr = mean_{i ≤ N} ℓ_i + mean_{i > N} ℓ_i,  ℓ_i = CE(h_local h_globalᵀ / cr_T, i)  (global rows detached).

The iterate with the lowest L (before its update) is kept: its images x (pre-augmentation) go to
the replay pool, its [f(v_l) ‖ f(v_g)] rows to the memory bank, a FIFO of ``bank_size`` (40,960)
rows on device initialised N(0, 1). The student then distils from the pool
(``engines/inversion.py``). The generator's running BN statistics are never read (synthesis runs it
in train mode and the student reads the pool), so they are not kept.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfkd_jax import data, losses, models, optim
from dfkd_jax.engines import common, inversion, inversion_terms
from dfkd_jax.models import hooks
from dfkd_jax.models.generators import reset_params
from dfkd_jax.models.layers import Linear
from dfkd_jax.run.job import TRACE
from dfkd_jax.synth import augment
from dfkd_jax.synth import bank as bank_lib

_LOCAL_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect ratios, as CMI's local view


class ProjectionHead(nn.Module):
  """CMI ``MLPHead(dim_in, dim_feat)``: Linear(d, hidden) -> ReLU -> Linear(hidden, features), then
  x / max(‖x‖₂, 1e-12) per row (``F.normalize``). Torch default initialisation."""
  hidden: int
  features: int

  @nn.compact
  def __call__(self, x):
    x = Linear(self.features, name='head.2')(nn.relu(Linear(self.hidden, name='head.0')(x)))
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def make_job(config, mesh):
  s = common.setup(config, mesh)
  w, cfg = config.loss, config.cmi
  batch, teacher, shape = config.synthesis_batch_size, s.teacher.model, s.student_input_shape
  generator = models.create(config.generator.arch, **config.generator.kwargs)
  nz_shape = models.input_shape(config.generator.arch, **config.generator.kwargs)
  params_template, stats_template = inversion_terms.generator_template(generator, nz_shape)
  feature_layers = tuple(cfg.feature_layers)

  def feature_taps(view: common.TeacherView) -> list:
    """The taps CMI's features are read from: the named modules' inputs, or every BN's."""
    return view.named if feature_layers else view.bn

  def features(view: common.TeacherView):
    return hooks.concat_spatial_means(feature_taps(view))

  dim = sum(t.spatial_mean.shape[1] for t in feature_taps(common.abstract_view(s, feature_layers)))
  head = ProjectionHead(hidden=dim, features=cfg.head_dim)
  tx_g = optim.torch_adam(config.optimizer_g.lr, config.optimizer_g.betas)
  tx_head = optim.torch_adam(config.optimizer_g.lr)  # torch's default betas

  def init(key):
    head_key, bank_key = jax.random.split(key)
    return {'head': optim.create_state(tx_head, head.init(head_key, jnp.zeros((1, dim)))['params'],
                                       apply_fn=head.apply, batch_stats={}),
            'bank': bank_lib.init(bank_key, cfg.bank_size, 2 * dim)}

  def draw(method_state, ctx, key):
    params_key, z_key, target_key = jax.random.split(key, 3)
    return {'generator': reset_params(params_template, params_key),
            'z': common.latent(z_key, (batch,) + nz_shape, mesh),
            'targets': inversion_terms.draw_targets(target_key, batch, config.num_classes)}

  def begin(method_state, ctx, drawn):
    variables = {'generator': drawn['generator'], 'z': drawn['z']}
    return {'variables': variables, 'opt': tx_g.init(variables), 'targets': jnp.sort(drawn['targets'])}

  def step_draw(method_state, ctx, key):
    bank_key, key = jax.random.split(key)
    global_key, local_key = jax.random.split(key)
    local = {'boxes': augment.sample_resized_crop_boxes(local_key, batch, shape[:2], scale=cfg.local_scale,
                                                        ratio=_LOCAL_RATIO)}
    if cfg.flip:
      local['flips'] = augment.draw_flips(jax.random.fold_in(local_key, 1), batch)
    return {'negatives': bank_lib.draw_rows(method_state['bank'], bank_key, cfg.negatives),
            'global': augment.draw_crop_flip(global_key, jax.random.fold_in(global_key, 1), batch,
                                             padding=cfg.crop_padding, flip=cfg.flip),
            'local': local}

  def objective(variables, head_params, targets, cached, valid, ctx, drawn):
    x, _ = inversion_terms.generate(generator, variables['generator'], stats_template, variables['z'])
    global_view = augment.apply_crop_flip(x, drawn['global'], padding=cfg.crop_padding)
    local_view = augment.resized_crop(x, drawn['local']['boxes'])
    if cfg.flip:
      local_view = augment.mirror(local_view, drawn['local']['flips'])
    global_view, local_view = (data.normalize(v, config.dataset) for v in (global_view, local_view))
    t = common.teacher_view(teacher, ctx.teacher, global_view, feature_layers=feature_layers)
    terms = {'bn': losses.bn_statistics_loss(t.bn_moments, t.bn_running), 'oh': losses.cross_entropy(t.logits, targets)}
    trace = {'targets': targets, 'z': variables['z'], 'g_output': x, 'global_view': global_view,
             'local_view': local_view, 't_out': t.logits, 'bn_terms': inversion_terms.bn_terms(t)}
    if w.adv:
      s_logits = inversion_terms.student_logits(ctx, global_view)
      terms['adv'] = losses.masked_adversarial_kl(s_logits, t.logits, 1.0)
      trace.update(s_out=s_logits, mask=jnp.argmax(s_logits, -1) == jnp.argmax(t.logits, -1))
    global_features = features(t)
    local_features = features(common.teacher_view(teacher, ctx.teacher, local_view, feature_layers=feature_layers))
    cached_local, cached_global = jnp.split(cached, 2, axis=1)
    project = lambda f: head.apply({'params': head_params}, f)
    # The bank rows are constants: projected on their own, their input gradient is never formed.
    local_rows = jnp.concatenate([project(local_features), project(cached_local)])
    global_rows = jax.lax.stop_gradient(project(jnp.concatenate([global_features, cached_global])))
    terms['cr'] = losses.cmi_contrastive_loss(local_rows, global_rows, temperature=cfg.cr_temperature,
                                              num_current=batch, cached_valid=valid)
    total = sum(w[name] * value for name, value in terms.items())
    inversion_loss = sum(w[name] * value for name, value in terms.items() if name != 'cr')
    candidate = {'images': x, 'features': jnp.concatenate([local_features, global_features], axis=1)}
    trace.update({'global_feature': global_features, 'local_feature': local_features, 'cached_feature': cached,
                  'cr_logits': local_rows @ global_rows.T / cfg.cr_temperature,
                  **{f'loss_{name}': value for name, value in terms.items()}, 'loss_inv': inversion_loss})
    metrics = {f'train/loss_{name}': value for name, value in terms.items()}
    return total, (candidate, dict(metrics, **{f'{TRACE}{name}': value for name, value in trace.items()}))

  def step(carry, method_state, ctx, drawn):
    cached, valid = bank_lib.rows(method_state['bank'], drawn['negatives'])
    head_state = method_state['head']
    (loss, (candidate, metrics)), (grads, head_grads) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        carry['variables'], head_state.params, carry['targets'], cached, valid, ctx, drawn)
    variables, opt_state = optim.apply_step(tx_g, carry['variables'], carry['opt'], grads)
    method_state = dict(method_state, head=head_state.apply_gradients(grads=head_grads))
    metrics[f'{TRACE}updated'] = variables  # the generator and latents after the step
    return inversion.Step(dict(carry, variables=variables, opt=opt_state), method_state, loss, candidate, metrics)

  def finish(carry, method_state, best, ctx):
    return dict(method_state, bank=bank_lib.add(method_state['bank'], best['features'])), best['images']

  stages = [inversion.Stage(config.g_steps, step, draw=step_draw)]
  synthesizer = inversion.Synthesizer(init=init, begin=begin, stages=stages, finish=finish, draw=draw)
  return inversion.make_job(config, mesh, s, synthesizer)
