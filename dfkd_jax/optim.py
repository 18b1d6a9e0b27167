"""Optimisers, learning-rate schedules and train states, with the reference (PyTorch) semantics.

The references step their learning rates once per epoch; ``per_epoch`` turns a schedule of the
epoch index into a schedule of the optimiser step, so optax reproduces those staircases exactly.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from dfkd_jax.errors import check_choice


def torch_sgd(learning_rate, momentum: float = 0.9, weight_decay: float = 0.0,
              nesterov: bool = False) -> optax.GradientTransformation:
  """``torch.optim.SGD``: g <- g + wd * theta (coupled L2, on every parameter, BN and biases
  included); b <- momentum * b + g (no dampening); theta <- theta - lr * b."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))


def torch_adam(learning_rate, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               weight_decay: float | None = None) -> optax.GradientTransformation:
  """``torch.optim.Adam(lr, betas, eps, weight_decay)``: eps outside the sqrt, weight decay coupled
  as L2 (g <- g + wd * theta), as torch does. ``learning_rate`` is a float or a schedule of the step.

  A configured optimiser (``make_optimizer``) always passes ``weight_decay``, 0 included, and its
  state then has the decay's slot; ``None`` is Adam alone (the synthesis optimisers, PU's
  selector), whose state has none. Build it once and ``init`` a fresh state where the references
  build a new optimiser (e.g. per synthesis call).
  """
  adam = optax.adam(learning_rate, b1=betas[0], b2=betas[1], eps=eps)
  return adam if weight_decay is None else optax.chain(optax.add_decayed_weights(weight_decay), adam)


def torch_adam_groups(learning_rates: dict[str, Any], betas: tuple[float, float] = (0.9, 0.999)
                      ) -> optax.GradientTransformation:
  """One ``torch.optim.Adam`` over a dict of parameter trees with a parameter group per key:
  subtree ``k`` is updated at ``learning_rates[k]`` (e.g. Fast's generator at lr_g and its latents
  at lr_z). Each group's moments and step count are its own, as in torch."""
  labels = lambda params: {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}
  return optax.partition({k: torch_adam(lr, betas) for k, lr in learning_rates.items()}, labels)


def apply_step(tx: optax.GradientTransformation, params, opt_state, grads):
  """One optimiser step on bare parameters (no TrainState); returns (params, opt_state)."""
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def per_epoch(epoch_schedule: Callable, steps_per_epoch: int) -> optax.Schedule:
  """lr(step) = epoch_schedule(step // steps_per_epoch): a staircase stepped once per epoch."""
  return lambda step: epoch_schedule(step // steps_per_epoch)


def cosine_annealing(base_lr: float, t_max: int, eta_min: float = 0.0) -> Callable:
  """``CosineAnnealingLR``: lr(e) = eta_min + (base - eta_min) * (1 + cos(pi * e / T_max)) / 2."""
  return lambda e: eta_min + (base_lr - eta_min) * (1 + jnp.cos(jnp.pi * e / t_max)) / 2


def multistep(base_lr: float, milestones: Sequence[int], gamma: float = 0.1) -> Callable:
  """``MultiStepLR``: lr(e) = base * gamma ** #{m in milestones : m <= e}."""
  ms = jnp.asarray(sorted(milestones) or [math.inf])
  return lambda e: base_lr * gamma ** jnp.sum(e >= ms)


def constant(base_lr: float) -> Callable:
  return lambda e: jnp.asarray(base_lr, jnp.float32)


def make_schedule(cfg, steps_per_epoch: int, num_epochs: int) -> optax.Schedule:
  """A per-optimiser-step schedule from a config with ``lr`` and ``schedule`` in
  {'constant', 'cosine', 'multistep'} (+ ``milestones``, ``gamma``, ``eta_min``, ``t_max``).

  Stepped once per epoch as the references do, or once per step with ``per_step=True`` (ZSKT's
  cosine over all pseudo-batches; milestones and t_max then count steps).
  """
  if cfg.get('per_step', False):
    steps_per_epoch, num_epochs = 1, steps_per_epoch * num_epochs
  kind = cfg.get('schedule', 'constant')
  check_choice('schedule', kind, ('constant', 'cosine', 'multistep'))
  if kind == 'constant':
    epoch_fn = constant(cfg.lr)
  elif kind == 'cosine':
    epoch_fn = cosine_annealing(cfg.lr, cfg.get('t_max', None) or num_epochs, cfg.get('eta_min', 0.0))
  else:
    epoch_fn = multistep(cfg.lr, tuple(cfg.milestones), cfg.get('gamma', 0.1))
  return per_epoch(epoch_fn, steps_per_epoch)


def make_optimizer(cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
  """``cfg.name`` in {'sgd', 'adam'} with the reference hyper-parameter names."""
  name = cfg.get('name', 'sgd')
  check_choice('optimizer name', name, ('sgd', 'adam'))
  if name == 'sgd':
    tx = torch_sgd(schedule, momentum=cfg.get('momentum', 0.9), weight_decay=cfg.get('weight_decay', 0.0))
  else:
    tx = torch_adam(schedule, cfg.get('betas', (0.9, 0.999)), weight_decay=cfg.get('weight_decay', 0.0))
  if cfg.get('clip_norm', None):
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  return tx


class TrainState(train_state.TrainState):
  """``params``, ``opt_state``, ``step`` and the model's ``batch_stats`` (may be empty)."""
  batch_stats: Any = None

  @property
  def variables(self) -> dict:
    """The ``{'params', 'batch_stats'}`` dict that ``apply_fn`` takes."""
    if self.batch_stats:
      return {'params': self.params, 'batch_stats': self.batch_stats}
    return {'params': self.params}


def create_state(tx: optax.GradientTransformation, params, *, apply_fn=None, batch_stats=None) -> TrainState:
  """The one TrainState builder: step 0, ``tx``'s fresh state for ``params``; ``apply_fn`` and
  ``batch_stats`` for a model (None for bare parameters, e.g. a matrix trained beside the student)."""
  return TrainState.create(apply_fn=apply_fn, params=params, tx=tx, batch_stats=batch_stats)


def init_state(model, tx: optax.GradientTransformation, key, input_shape, *, train_init: bool = True) -> TrainState:
  """``create_state`` for ``model`` initialised from ``key`` on a dummy batch of ``input_shape``
  (the parameters do not depend on the batch; ``train_init`` picks the mode ``init`` traces)."""
  variables = model.init(key, jnp.zeros((2,) + tuple(input_shape)), train=train_init)
  return create_state(tx, variables['params'], apply_fn=model.apply, batch_stats=variables.get('batch_stats', {}))
