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

Stage 2, robust distillation on the selected images: class weight sets w_k (inverse teacher class
mass, plus ``perturb_num`` perturbed copies, ``losses.robust_kd_class_weights``) and the
student loss  max_k (1/N) Σ_n w_k[ŷ_n] · KL(p_t ‖ p_s) · T  at T = 1 (``losses.robust_kd``).

Reference (huawei ``DEMC/pu_compress``, reference_semantics §2.11) and what differs here:
- each selector step draws a batch of P and a batch of U; the reference draws mixed batches from
  P ∪ U (0.08% positives with CIFAR-10 + ImageNet, so most of its batches hold no positive); the
  risk estimates the same expectation;
- the trunk is fine-tuned with the head when ``pu.train_backbone`` (the reference), starting from
  a copy of the teacher, its BatchNorm in train mode on the concatenated P and U batch; otherwise
  it stays frozen (eval mode) and only the head learns;
- the class prior can be estimated instead of fixed (0.21 in the reference);
- stage 1 runs while the job is built and its result (π, the pool's scores g(x), the last risk) is
  kept in ``WORKDIR/pu_stage1.npz`` with a key of the config fields it depends on: re-running the
  command (after a crash, or to resume stage 2) reads it instead of training the selector again;
  changing one of those fields retrains it. Stage 2 is the loop's job.
"""
from __future__ import annotations

import hashlib
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from dfkd_jax import losses, optim
from dfkd_jax.run import outputs
from dfkd_jax.models import hooks
from dfkd_jax.data import unlabelled
from dfkd_jax.errors import UserError
from dfkd_jax.engines import common
from dfkd_jax.engines import selected_kd
from dfkd_jax.models.layers import Linear


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

    tx = optax.adam(0.05)
    params = {'w': jnp.zeros(x.shape[1]), 'b': jnp.zeros(())}

    @jax.jit
    def step(carry, _):
      params, opt = carry
      updates, opt = tx.update(jax.grad(loss)(params), opt)
      return (optax.apply_updates(params, updates), opt), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params

  estimates = []
  for held, train in (folds, folds[::-1]):
    params = fit(fp[train])
    odds = jnp.exp(fp[held] @ params['w'] + params['b'])  # h / (1 - h) of a logistic model
    estimates.append(len(train) / (len(fu) * float(jnp.mean(odds))))
  return float(np.clip(np.mean(estimates), 1e-3, 1 - 1e-3))


def train_selector(config, mesh, s: common.Setup, positives: np.ndarray, pool: np.ndarray, prior: float):
  """Stage 1: nnPU training of trunk + SE head; returns (scores g(x) on the pool, last risk)."""
  cfg = config.pu
  modules = tuple(cfg.feature_modules)
  model, head = s.teacher.model, SEHead(cfg.se_reduction)
  to_input = lambda u8: selected_kd.normalized(u8, config)
  probe, _ = multiscale_features(model, s.teacher.variables, to_input(pool[:2]), modules, False)
  params = {'trunk': s.teacher.variables['params'], 'head': head.init(jax.random.key(config.seed), probe)['params']}
  batch_stats = s.teacher.variables.get('batch_stats')
  schedule = optim.make_schedule(cfg.optimizer, 1, cfg.steps)
  tx = optim.make_optimizer(cfg.optimizer, schedule)
  if not cfg.train_backbone:
    tx = optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()}, {'trunk': 'freeze', 'head': 'train'})
  opt_state = tx.init(params)

  def score(params, batch_stats, x, train):
    variables = {'params': params['trunk'], **({'batch_stats': batch_stats} if batch_stats is not None else {})}
    f, batch_stats = multiscale_features(model, variables, x, modules, train)
    return head.apply({'params': params['head']}, f), batch_stats

  @jax.jit
  def step(params, batch_stats, opt_state, xp, xu):
    def objective(params):
      g, new_stats = score(params, batch_stats, jnp.concatenate([xp, xu]), cfg.train_backbone)
      objective, risk = losses.nnpu_risk(g[:len(xp)], g[len(xp):], prior, beta=cfg.beta, gamma=cfg.gamma)
      return objective, (new_stats, risk)

    grads, (batch_stats, risk) = jax.grad(objective, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, risk

  rng = np.random.default_rng([config.seed, 4])
  batch_p = min(cfg.batch_p, len(positives))
  risk = jnp.nan
  for t in range(cfg.steps):
    xp = positives[rng.choice(len(positives), batch_p, replace=False)]
    xu = pool[rng.choice(len(pool), cfg.batch_u, replace=False)]
    params, batch_stats, opt_state, risk = step(params, batch_stats, opt_state, to_input(xp), to_input(xu))
    if (t + 1) % max(1, cfg.steps // 5) == 0:
      print(f'pu stage 1: step {t + 1}/{cfg.steps}, nnPU risk {float(risk):.4f}', flush=True)
  scores = selected_kd.map_batches(lambda x: score(params, batch_stats, x, False)[0], pool, config, mesh)
  return scores, float(risk)


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


STAGE1_FILE = 'pu_stage1.npz'


def _stage1_key(config, pool_size: int) -> str:
  """What stage 1's result depends on: the teacher, the data, the selector's settings, the seed."""
  fields = {name: config.get(name) for name in ('teacher', 'unlabelled', 'seed', 'image_size', 'in_channels',
                                                  'num_classes', 'data_dir')}
  pu = {k: v for k, v in config.pu.to_dict().items() if k not in ('selection', 'perturb_num', 'perturb_eps',
                                                                     'class_weight_power')}
  text = json.dumps({'fields': fields, 'pu': pu, 'pool_size': pool_size}, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def stage1(config, mesh, s: common.Setup, positives: np.ndarray, images: np.ndarray,
           workdir: str | None) -> tuple[float, str, np.ndarray, float]:
  """(π, where π came from, scores g(x) on the pool, the selector's last risk), read from
  ``WORKDIR/pu_stage1.npz`` when an earlier run of the same stage 1 wrote it."""
  path = epath.Path(workdir) / STAGE1_FILE if workdir else None
  key = _stage1_key(config, len(images))
  if path is not None and path.exists():
    with path.open('rb') as f:
      saved = dict(np.load(f, allow_pickle=False))
    if str(saved['key']) == key:
      print(f'pu stage 1: read from {path}', flush=True)
      return float(saved['prior']), str(saved['prior_source']), saved['scores'], float(saved['risk'])
    print(f'pu stage 1: {path} was made with other settings; training the selector again', flush=True)
  prior, prior_source = class_prior(config, mesh, s, positives, images)
  print(f'pu: class prior {prior:.4f} ({prior_source}); {len(positives)} labelled positives', flush=True)
  scores, risk = train_selector(config, mesh, s, positives, images, prior)
  if path is not None and outputs.is_writer():
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(STAGE1_FILE + '.partial')
    with partial.open('wb') as f:
      np.savez(f, key=key, prior=prior, prior_source=prior_source, scores=np.asarray(scores), risk=risk)
    partial.replace(path)
  return prior, prior_source, scores, risk


def make_job(config, mesh, workdir: str | None = None):
  """The PU job; ``workdir`` keeps stage 1's result (see the module docstring)."""
  s = common.setup(config, mesh)
  cfg = config.pu
  labelled = unlabelled.labelled_subset(cfg.labelled_data, cfg.labelled_split, cfg.labelled_per_class,
                                        config.num_classes, config.seed, config.get('data_dir'))
  positives = selected_kd.to_model_resolution(labelled.images, config)
  pool = unlabelled.load_pool(config.unlabelled, config.seed, config.get('data_dir'))
  images = selected_kd.to_model_resolution(pool.images, config)
  prior, prior_source, scores, risk = stage1(config, mesh, s, positives, images, workdir)
  logits = selected_kd.teacher_logits(s, images, config, mesh) if cfg.selection == 'balanced' else None
  selected = select(scores, prior, cfg.selection, logits)
  if not selected.any():
    raise UserError('pu: the selector kept no unlabelled image (g(x) <= 0 everywhere); raise pu.prior or pu.steps')
  rep = selected_kd.selection_report(pool, selected, prior=prior, prior_source=prior_source, selector_risk=risk,
                                     labelled=len(positives))
  selected_kd.print_selection('pu', rep)

  chosen = images[selected]
  t_probs = jax.nn.softmax(selected_kd.teacher_logits(s, chosen, config, mesh) / config.kd.temperature, axis=-1)
  weights = losses.robust_kd_class_weights(
      jnp.asarray(t_probs), num_perturbations=cfg.perturb_num, epsilon=cfg.perturb_eps,
      key=jax.random.fold_in(jax.random.key(config.seed), 5), power=cfg.class_weight_power)
  rep['class_weights'] = np.asarray(weights).round(4).tolist()
  temperature = config.kd.temperature

  def loss_fn(student_logits, teacher_logits, _):
    return losses.robust_kd(student_logits, teacher_logits, weights, temperature), {}

  return selected_kd.make_job(config, mesh, s, chosen, loss_fn, report_values=rep)
