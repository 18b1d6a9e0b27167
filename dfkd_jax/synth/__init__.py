"""What inversion methods keep across synthesis steps and calls, as pytrees of arrays that live in
the method state (so they are checkpointed with it and resume exactly): the replay pool of
synthesised images (``pool``), CMI's feature memory bank (``bank``), and the best-iterate selection
carried through an inner optimisation ``lax.scan`` (``init_best`` / ``keep_best``)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def init_best(candidate) -> tuple[jax.Array, object]:
  """The selection carry before the first inner step: (best loss +inf, zeros shaped like
  ``candidate``, any pytree of arrays)."""
  return jnp.asarray(jnp.inf, jnp.float32), jax.tree.map(jnp.zeros_like, candidate)


def keep_best(best: tuple[jax.Array, object], loss: jax.Array, candidate) -> tuple[jax.Array, object]:
  """Updates the carry ``best = (best_loss, best_candidate)`` with this step's ``loss`` (the total
  loss evaluated before the step's update) and ``candidate`` (what that loss was computed on, e.g.
  pre-augmentation images and bank features).

  The candidate replaces the best one only if ``loss < best_loss``, as the references'
  ``if best_cost > loss``: ties keep the earlier iterate and a NaN loss is never selected (if every
  loss is NaN the carry keeps ``init_best``'s zeros, where CMI would keep its first iterate).
  """
  best_loss, best_candidate = best
  loss = jnp.asarray(loss, jnp.float32)
  better = loss < best_loss
  chosen = jax.tree.map(lambda new, old: jnp.where(better, new, old), candidate, best_candidate)
  return jnp.where(better, loss, best_loss), chosen
