"""PU compression: Positive-Unlabeled Compression on the Cloud (Xu et al., NeurIPS 2019).

A handful of labelled training images (the positives P) and a large unlabelled pool U that holds
some images of the teacher's distribution among many others (ImageNet for a CIFAR-10 teacher).

Stage 1, selection. A PU classifier g is the teacher's trunk with a new head on its multi-scale
features: f(x) = [GAP(relu(o_1(x))), ..., GAP(relu(o_K(x)))], the global average pools of the
outputs of ``pu.feature_modules`` (ResNet-34: layer1..layer4, 64+128+256+512 = 960 features),
then a squeeze-and-excitation layer  f ⊙ σ(W₂ relu(W₁ f))  (no biases, reduction 16) and a linear
score g(x) = w·(…) + b. g is trained with the non-negative PU risk (``losses.nnpu_risk``,
sigmoid loss, class prior π, β = 0, γ = 1); the images of U with g(x) > 0 are selected
(``pu.selection='positive'``), or the π·|U| best-scored ones (``'prior'``), or those per class of
the teacher's prediction (``'balanced'``), see ``select``. π is ``pu.prior`` when > 0, otherwise
estimated (``estimate_prior``).

Stage 2, robust distillation on the labelled images plus the selected ones (the reference's
``label_train_subset + unlabel_positive_set``; ``pu.distill_labelled=False``: the selected ones
only): class weight sets w_k (inverse teacher class mass over the distillation data,
``losses.inverse_mass_class_weights``, plus ``perturb_num`` perturbed copies,
``losses.perturbed_class_weights``: w + ε·U(0, 1) as the reference with ``pu.perturbation='additive'``,
or w·(1 + ε·U(−1, 1)) with 'relative') and the student loss  max_k (1/N) Σ_n w_k[ŷ_n] · KL(p_t ‖ p_s) · T
at T = 1 (``losses.robust_kd``).

Reference (huawei ``DEMC/pu_compress``, ``docs/reference_semantics.md#pu-compression``) and what differs here:
- each selector step draws a batch of P and a batch of U; the reference draws mixed batches from
  P ∪ U (0.08% positives with CIFAR-10 + ImageNet, so most of its batches hold no positive); the
  risk estimates the same expectation. Both are randomly cropped and flipped as the reference's
  (``config.augment``) unless ``pu.augment_selector=False``; scoring the pool and the class masses
  use the images as they are (the reference scores and weighs randomly cropped and flipped ones);
- the trunk is fine-tuned with the head when ``pu.train_backbone`` (the reference), starting from
  a copy of the teacher, its BatchNorm in train mode on the concatenated P and U batch; otherwise
  it stays frozen (eval mode) and only the head learns;
- the class prior can be estimated instead of fixed (0.21 in the reference);
- the learning rates drop at the configured milestones; the reference's ``scheduler.step()`` at the
  start of each epoch (``train_model.py``) drops them one epoch earlier (epochs 49/99/149);
- the two stages are two loop jobs (``run.stages``): stage 1 runs in ``WORKDIR/stage1`` with its
  own checkpoints (a preempted selector resumes), and its final state gives π, the pool's scores
  g(x) and the last risk, from which stage 2 is built. Re-running the command (after a crash, or
  to resume stage 2) restores the finished selector instead of training it again; changing one of
  the config fields it depends on (``_stage1_key``) trains it again.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dfkd_jax import losses, optim
from dfkd_jax.data import unlabelled
from dfkd_jax.engines import common, selected_kd
from dfkd_jax.errors import UserError
from dfkd_jax.models import hooks
from dfkd_jax.models.layers import Linear
from dfkd_jax.run import parallel
from dfkd_jax.run.job import Job, Phase, Stage, Stages
from dfkd_jax.synth import augment


class SEHead(nn.Module):
  """Squeeze-and-excitation on a feature vector, then a linear score:
  g = Linear(1)(f ⊙ σ(W₂ relu(W₁ f))) with bias-free W₁ (C -> C // reduction), W₂ (-> C)."""
  reduction: int = 16

  @nn.compact
  def __call__(self, f: jax.Array) -> jax.Array:
    c = f.shape[-1]
    gate = Linear(c, use_bias=False, name='se.fc.2')(nn.relu(Linear(max(1, c // self.reduction), use_bias=False,
                                                                    name='se.fc.0')(f)))
    return Linear(1, name='fc')(f * nn.sigmoid(gate))[:, 0]


def multiscale_features(model, variables, x, modules, train: bool):
  """(f(x), new batch_stats): GAP(relu(output)) of each module in ``modules``, concatenated."""
  if train and 'batch_stats' in variables:
    (_, maps), updates = hooks.apply_with_output_taps(model, variables, x, modules, train=True,
                                                     mutable=['batch_stats'])
  else:
    (_, maps), updates = hooks.apply_with_output_taps(model, variables, x, modules, train=train), {}
  pooled = [jnp.mean(nn.relu(m), axis=tuple(range(1, m.ndim - 1))) for m in maps]
  return jnp.concatenate(pooled, axis=-1), updates.get('batch_stats', variables.get('batch_stats'))


def estimate_prior(features_p: np.ndarray, features_u: np.ndarray, seed: int, steps: int = 500,
                   l2: float = 1e-3) -> float:
  """Class prior π of the positives in U, from a probabilistic P-vs-U classifier (Elkan & Noto,
  2008, in the case-control form).

  A logistic regression h on standardised features separates P (label 1) from U (label 0). For a
  positive x that no negative resembles, f_U(x) = π f_P(x), so its odds are
  r(x) = h/(1 − h) = n_P f_P(x) / (n_U f_U(x)) = n_P / (n_U π). Hence π̂ = n_P / (n_U · mean r),
  with the mean over held-out positives (two folds of P; U is shared). Assumes the positives are
  separable from the negatives; overlap biases π̂ upwards.
  """
  rng = np.random.default_rng([seed, 3])
  mean, std = features_u.mean(0), features_u.std(0) + 1e-6
  fp, fu = jnp.asarray((features_p - mean) / std), jnp.asarray((features_u - mean) / std)
  folds = np.array_split(rng.permutation(len(fp)), 2)

  def fit(train_p):
    x = jnp.concatenate([train_p, fu])
    y = jnp.concatenate([jnp.ones(len(train_p)), jnp.zeros(len(fu))])

    def loss(params):
      z = x @ params['w'] + params['b']
      return jnp.mean(optax.sigmoid_binary_cross_entropy(z, y)) + l2 * jnp.sum(params['w'] ** 2)

    tx = optim.torch_adam(0.05)
    params = {'w': jnp.zeros(x.shape[1]), 'b': jnp.zeros(())}

    @jax.jit
    def step(carry, _):
      params, opt = carry
      return optim.apply_step(tx, params, opt, jax.grad(loss)(params)), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params

  estimates = []
  for held, train in (folds, folds[::-1]):
    params = fit(fp[train])
    odds = jnp.exp(fp[held] @ params['w'] + params['b'])  # h / (1 - h) of a logistic model
    estimates.append(len(train) / (len(fu) * float(jnp.mean(odds))))
  return float(np.clip(np.mean(estimates), 1e-3, 1 - 1e-3))


def selector_job(config, mesh, s: common.Setup, positives: np.ndarray, pool: np.ndarray) -> Job:
  """Stage 1: nnPU training of trunk + SE head, a loop job. Each step draws ``pu.batch_p``
  positives (at most all of them, rounded down to a multiple of the device count) and ``pu.batch_u``
  pool images (a generator fixed by (seed, step)), cropped and flipped on device with
  ``pu.augment_selector`` (the offsets and flips are the phase's draws); its results are π, where π
  came from, the scores g(x) of the whole pool under the final selector and its last risk. The phase
  traces the selector's input, its scores (positives first) and the objective's gradient in them."""
  cfg = config.pu
  modules = tuple(cfg.feature_modules)
  model, head, teacher_variables = s.teacher.model, SEHead(cfg.se_reduction), s.teacher.variables
  prior, prior_source = class_prior(config, mesh, s, positives, pool)
  # As many positives as there are, up to pu.batch_p, in a batch that splits over the devices.
  batch_p = min(cfg.batch_p, len(positives)) // mesh.devices.size * mesh.devices.size
  if not batch_p:
    raise UserError(f'pu: {len(positives)} labelled positives are fewer than the {mesh.devices.size} devices')
  parallel.check_batch(cfg.batch_u, mesh, 'pu.batch_u')
  num_features = jax.eval_shape(lambda x: multiscale_features(model, teacher_variables, x, modules, False)[0],
                                jax.ShapeDtypeStruct((2,) + pool.shape[1:], jnp.float32)).shape[-1]
  schedule = optim.make_schedule(cfg.optimizer, 1, cfg.steps)
  tx = optim.make_optimizer(cfg.optimizer, schedule)
  if not cfg.train_backbone:
    tx = optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()}, {'trunk': 'freeze', 'head': 'train'})

  def init(key):
    params = {'trunk': teacher_variables['params'],
              'head': head.init(key, jnp.zeros((1, num_features)))['params']}
    return {'step': jnp.zeros((), jnp.int32),
            'selector': optim.create_state(tx, params, batch_stats=teacher_variables.get('batch_stats')),
            'risk': jnp.zeros(())}  # the last step's nnPU risk, for the selection report

  def score(params, batch_stats, x, train):
    variables = {'params': params['trunk'], **({'batch_stats': batch_stats} if batch_stats is not None else {})}
    f, batch_stats = multiscale_features(model, variables, x, modules, train)
    return head.apply({'params': params['head']}, f), batch_stats

  padding, flip = (config.augment.crop_padding, config.augment.flip) if cfg.augment_selector else (0, False)

  def draw(key, state):
    del state
    return augment.draw_crop_flip(*jax.random.split(key), batch_p + cfg.batch_u, padding=padding, flip=flip)

  def step(state, frozen, drawn, batch):
    selector, num_p = state['selector'], batch['positives'].shape[0]
    images = jnp.concatenate([batch['positives'], batch['unlabelled']])
    x = selected_kd.to_input(augment.apply_crop_flip(images, drawn, padding=padding), config.dataset)
    risk_of = lambda g: losses.nnpu_risk(g[:num_p], g[num_p:], prior, beta=cfg.beta, gamma=cfg.gamma)

    def objective(params):
      g, new_stats = score(params, selector.batch_stats, x, cfg.train_backbone)
      objective, risk = risk_of(g)
      return objective, (new_stats, objective, risk, g)

    grads, (batch_stats, objective, risk, g) = jax.grad(objective, has_aux=True)(selector.params)
    return dict(state, selector=selector.apply_gradients(grads=grads, batch_stats=batch_stats), risk=risk), {
        'train/nnpu_objective': objective, 'train/nnpu_risk': risk, 'train/lr': schedule(selector.step),
        'trace/images': x, 'trace/scores': g, 'trace/dobjective_dscores': jax.grad(lambda g: risk_of(g)[0])(g)}

  def next_batch(step):
    rng = np.random.default_rng([config.seed, 4, step])
    xp = positives[rng.choice(len(positives), batch_p, replace=False)]
    xu = pool[rng.choice(len(pool), cfg.batch_u, replace=False)]
    i, n = jax.process_index(), jax.process_count()
    return {'positives': np.split(xp, n)[i], 'unlabelled': np.split(xu, n)[i]}

  def on_finish(state):
    selector = state['selector']
    scores = selected_kd.map_batches(lambda x: score(selector.params, selector.batch_stats, x, False)[0], pool,
                                     config, mesh)
    return {'prior': prior, 'prior_source': prior_source, 'scores': scores,
            'selector_risk': float(jax.device_get(state['risk']))}

  return Job(init=init, phases=[Phase('select', step, draw)], frozen={}, num_steps=cfg.steps, evaluators=(),
             next_batch=next_batch, on_finish=on_finish,
             notes=[f'pu: class prior {prior:.4f} ({prior_source}); {len(positives)} labelled positives'])


def select(scores: np.ndarray, prior: float, rule: str, teacher_logits: np.ndarray | None = None) -> np.ndarray:
  """Boolean mask of the selected pool images (ties: lower index).

  'positive': g(x) > 0 (the reference); 'prior': the round(π·|U|) highest scores (as many as the
  class prior says U holds); 'balanced': among the images the teacher assigns to class c, the
  round(π·|U|/C) highest scores, for every class c (a selector trained on a handful of positives
  per class ranks some classes far below others; this keeps every class in the selection).
  """
  if rule == 'positive':
    return scores > 0
  mask = np.zeros(len(scores), bool)
  if rule == 'prior':
    mask[np.argsort(-scores, kind='stable')[:int(round(prior * len(scores)))]] = True
    return mask
  if rule == 'balanced':
    labels, num_classes = np.argmax(teacher_logits, -1), teacher_logits.shape[-1]
    per_class = int(round(prior * len(scores) / num_classes))
    for c in range(num_classes):
      of_class = np.flatnonzero(labels == c)
      mask[of_class[np.argsort(-scores[of_class], kind='stable')[:per_class]]] = True
    return mask
  raise UserError(f"pu.selection must be 'positive', 'prior' or 'balanced', not {rule!r}")


def class_prior(config, mesh, s: common.Setup, positives: np.ndarray, pool: np.ndarray) -> tuple[float, str]:
  """π from ``pu.prior`` (> 0) or ``estimate_prior`` on the teacher's multi-scale features."""
  if config.pu.prior > 0:
    if not config.pu.prior < 1:
      raise UserError(f'pu.prior={config.pu.prior} must be in (0, 1)')
    return float(config.pu.prior), 'config'
  modules = tuple(config.pu.feature_modules)
  features = lambda x: multiscale_features(s.teacher.model, s.teacher.variables, x, modules, False)[0]
  fp, fu = (selected_kd.map_batches(features, images, config, mesh) for images in (positives, pool))
  return estimate_prior(fp, fu, config.seed), 'estimated'


STAGE1 = 'stage1'  # stage 1 runs in WORKDIR/stage1


def _stage1_key(config, pool_size: int) -> str:
  """What stage 1's result depends on: the teacher, the data, the selector's settings, the seed."""
  fields = {name: config.get(name) for name in ('teacher', 'unlabelled', 'seed', 'image_size', 'in_channels',
                                                  'num_classes', 'data_dir')}
  pu = {k: v for k, v in config.pu.to_dict().items() if k not in ('selection', 'perturb_num', 'perturb_eps',
                                                                     'class_weight_power', 'perturbation',
                                                                     'distill_labelled')}
  text = json.dumps({'fields': fields, 'pu': pu, 'pool_size': pool_size}, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def class_weight_sets(config, mesh, s: common.Setup, images_u8: np.ndarray, uniforms) -> jax.Array:
  """The robust KD's weight sets (1 + ``pu.perturb_num``, C): the inverse teacher class masses over
  ``images_u8`` (the distillation data) and their perturbations by ``uniforms`` (U(0, 1))."""
  t_probs = jax.nn.softmax(selected_kd.teacher_logits(s, images_u8, config, mesh) / config.kd.temperature, axis=-1)
  weights = losses.inverse_mass_class_weights(jnp.asarray(t_probs), power=config.pu.class_weight_power)
  return losses.perturbed_class_weights(weights, uniforms, epsilon=config.pu.perturb_eps,
                                        perturbation=config.pu.perturbation)


def distillation_job(config, mesh, s: common.Setup, images_u8: np.ndarray, class_weights, **job_kw) -> Job:
  """Stage 2: robust KD of the student on ``images_u8`` (uint8 NHWC) with ``class_weights``; its
  phase traces each weight set's loss, the per-sample weights and the index of the set it steps on."""
  temperature, class_weights = config.kd.temperature, jnp.asarray(class_weights)

  def loss_fn(student_logits, teacher_logits, _):
    loss = losses.robust_kd(student_logits, teacher_logits, class_weights, temperature)
    set_losses, sample_weights = losses.robust_kd_set_losses(student_logits, teacher_logits, class_weights,
                                                             temperature)
    return loss, {'trace/set_losses': set_losses, 'trace/sample_weights': sample_weights,
                  'trace/selected_set': jnp.argmax(set_losses)}

  return selected_kd.make_job(config, mesh, s, images_u8, loss_fn, **job_kw)


def make_job(config, mesh) -> Stages:
  """PU's two stages: the selector (``WORKDIR/stage1``), then the distillation on its selection."""
  s = common.setup(config, mesh)
  cfg = config.pu
  labelled = unlabelled.labelled_subset(cfg.labelled_data, cfg.labelled_split, cfg.labelled_per_class,
                                        config.num_classes, config.seed, config.get('data_dir'))
  positives = selected_kd.to_model_resolution(labelled.images, config)
  pool = unlabelled.load_pool(config.unlabelled, config.seed, config.get('data_dir'))
  images = selected_kd.to_model_resolution(pool.images, config)

  def distillation(selector: Mapping[str, Any]) -> Job:
    prior = selector['prior']
    logits = selected_kd.teacher_logits(s, images, config, mesh) if cfg.selection == 'balanced' else None
    selected = select(selector['scores'], prior, cfg.selection, logits)
    if not selected.any() and not cfg.distill_labelled:
      raise UserError('pu: the selector kept no unlabelled image (g(x) <= 0 everywhere); raise pu.prior or pu.steps')
    chosen = np.concatenate([positives, images[selected]]) if cfg.distill_labelled else images[selected]
    rep = selected_kd.selection_report(pool, selected, prior=prior, prior_source=selector['prior_source'],
                                       selector_risk=selector['selector_risk'], labelled=len(positives),
                                       distilled=len(chosen))
    uniforms = losses.draw_class_weight_perturbations(jax.random.fold_in(jax.random.key(config.seed), 5),
                                                      cfg.perturb_num, config.num_classes)
    weights = class_weight_sets(config, mesh, s, chosen, uniforms)
    rep['class_weights'] = np.asarray(weights).round(4).tolist()
    return distillation_job(config, mesh, s, chosen, weights, report=rep, notes=[selected_kd.selection_note('pu', rep)])

  return [Stage(STAGE1, lambda _: selector_job(config, mesh, s, positives, images),
                key=_stage1_key(config, len(images))),
          Stage('distillation', distillation)]
