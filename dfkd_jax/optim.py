"""Optimisers, learning-rate schedules and train states, with the reference (PyTorch) semantics.

The references step their learning rates once per epoch; ``per_epoch`` turns a schedule of the
epoch index into a schedule of the optimiser step, so optax reproduces those staircases exactly.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import optax
from flax.training import train_state

from dfkd_jax.errors import UserError


def torch_sgd(learning_rate, momentum: float = 0.9, weight_decay: float = 0.0,
              nesterov: bool = False) -> optax.GradientTransformation:
  """``torch.optim.SGD``: g <- g + wd * theta (coupled L2, on every parameter, BN and biases
  included); b <- momentum * b + g (no dampening); theta <- theta - lr * b."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))


def torch_adam(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 0.0) -> optax.GradientTransformation:
  """``torch.optim.Adam`` (eps outside the sqrt; weight decay coupled as L2, as torch does)."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))


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
  if kind == 'constant':
    epoch_fn = constant(cfg.lr)
  elif kind == 'cosine':
    epoch_fn = cosine_annealing(cfg.lr, cfg.get('t_max', None) or num_epochs, cfg.get('eta_min', 0.0))
  elif kind == 'multistep':
    epoch_fn = multistep(cfg.lr, tuple(cfg.milestones), cfg.get('gamma', 0.1))
  else:
    raise UserError(f"unknown schedule {kind!r}: use 'constant', 'cosine' or 'multistep'")
  return per_epoch(epoch_fn, steps_per_epoch)


def make_optimizer(cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
  """``cfg.name`` in {'sgd', 'adam'} with the reference hyper-parameter names."""
  name = cfg.get('name', 'sgd')
  if name == 'sgd':
    tx = torch_sgd(schedule, momentum=cfg.get('momentum', 0.9), weight_decay=cfg.get('weight_decay', 0.0))
  elif name == 'adam':
    b1, b2 = cfg.get('betas', (0.9, 0.999))
    tx = torch_adam(schedule, b1=b1, b2=b2, weight_decay=cfg.get('weight_decay', 0.0))
  else:
    raise UserError(f"unknown optimizer {name!r}: use 'sgd' or 'adam'")
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
