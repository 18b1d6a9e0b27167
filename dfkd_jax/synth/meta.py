"""The meta-learned generator of Fast (Fang et al., AAAI 2022), shared by the methods built on it
(Fast, SSD-KD): each synthesis call adapts a clone θ' of the meta-generator θ and fresh latents z
for a few inner Adam steps, then takes one meta step on θ.

  FOMAML ('fomaml'): the meta gradient is Σ_k ∇_θ' L_k, the inner gradients summed over the call's
    steps, each evaluated before its inner update;
  Reptile ('reptile'): the meta gradient is (θ − θ'_final) · scale.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dfkd_jax import optim

RULES = ('fomaml', 'reptile')


def inner_step(objective, carry, key, tx, rule: str):
  """One inner step of a synthesis call on ``carry['variables'] = {'generator': θ', 'z': z}``:
  the loss and its gradients before the update, FOMAML's running sum of the θ' gradients
  (``carry['meta_grad']``), then one step of the inner Adam ``tx`` (a parameter group each for θ'
  and z, ``optim.torch_adam_groups``). ``objective(variables, key) -> (loss, aux)``; ``key`` is
  passed through (a PRNG key or the step's draws). Returns (carry, loss, aux)."""
  variables = carry['variables']
  (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(variables, key)
  if rule == 'fomaml':
    carry = dict(carry, meta_grad=jax.tree.map(jnp.add, carry['meta_grad'], grads['generator']))
  variables, opt = optim.apply_step(tx, variables, carry['opt'], grads)
  return dict(carry, variables=variables, opt=opt), loss, aux


def meta_gradient(meta_params, carry, rule: str, reptile_scale: float):
  """The gradient of the call's single meta step: FOMAML's summed inner gradients, or Reptile's
  (θ − θ'_final) · scale."""
  if rule == 'fomaml':
    return carry['meta_grad']
  return jax.tree.map(lambda meta, fast: (meta - fast) * reptile_scale, meta_params, carry['variables']['generator'])
