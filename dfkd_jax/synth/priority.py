"""A fixed-capacity replay buffer with class-aware admission and prioritised sampling, held on
device as a dict of arrays (so it lives in a method's state, is checkpointed with it and resumes
exactly). SSD-KD (``methods/ssdkd.py``) keeps its small synthetic set in it.

Layout: ``{'items': pytree of (capacity, ...) arrays, 'label': (capacity,) int32 class,
'score': (capacity,) float32 admission score, 'priority': (capacity,) float32, 'valid':
(capacity,) bool, 'stamp': (capacity,) int32 admission number of the entry, 'admitted': int32
entries admitted so far}``.

Admission (``admission_slots``), for a batch of new entries with their classes and scores:
  'fifo'      a ring: every entry is admitted, overwriting the oldest.
  'balanced'  a per-class quota ⌈capacity / classes⌉; entries are taken in the order given, each:
              buffer not full and its class under quota: the first free slot;
              its class at quota: it replaces the lowest-score entry of its class (the oldest of
                equal scores) if its own score is at least that one's, else it is discarded;
              buffer full and its class under quota: it replaces the lowest-score entry of the
                most represented class.
The balanced rule keeps the class histogram flat and, inside a class, the highest scores.

Sampling (Schaul et al., "Prioritized Experience Replay", ICLR 2016), over the valid entries:
  P(i) = p_i^α / Σ_k p_k^α;  w_i = (n·P(i))^(−β) / max_j (n·P(j))^(−β) = (min_j P(j) / P(i))^β,
  the max over the buffer (or over the drawn batch: ``importance_weights``' ``normaliser``).
Indices come from uniforms u ∈ [0, 1) drawn apart (the replay seam: ``jax.random.uniform``) by
inverting the cumulative sum: 'stratified' splits the mass into ``batch`` equal segments and takes
one point per segment (the paper's rule), 'independent' takes ``batch`` independent points
(sampling with replacement). New entries get the largest priority of the buffer ('max', so each is
replayed soon) or its mean ('mean'); 1 in an empty buffer.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dfkd_jax.errors import UserError

POLICIES = ('balanced', 'fifo')
SAMPLERS = ('stratified', 'independent', 'uniform')
NEW_PRIORITIES = ('max', 'mean')
NORMALISERS = ('buffer', 'batch')


def init(capacity: int, items: Any) -> dict:
  """An empty buffer of ``capacity`` entries shaped like ``items`` (a pytree of
  ``jax.ShapeDtypeStruct`` or arrays, one entry each)."""
  if capacity < 1:
    raise UserError(f'buffer capacity must be >= 1, got {capacity}')
  return {'items': jax.tree.map(lambda a: jnp.zeros((capacity,) + tuple(a.shape), a.dtype), items),
          'label': jnp.zeros((capacity,), jnp.int32), 'score': jnp.zeros((capacity,), jnp.float32),
          'priority': jnp.zeros((capacity,), jnp.float32), 'valid': jnp.zeros((capacity,), bool),
          'stamp': jnp.zeros((capacity,), jnp.int32), 'admitted': jnp.zeros((), jnp.int32)}


def capacity(buffer: dict) -> int:
  return buffer['label'].shape[0]


def size(buffer: dict) -> jax.Array:
  """Valid entries (int32)."""
  return jnp.sum(buffer['valid'], dtype=jnp.int32)


def class_counts(buffer: dict, num_classes: int) -> jax.Array:
  """(num_classes,) int32 valid entries per class."""
  return jnp.zeros((num_classes,), jnp.int32).at[buffer['label']].add(buffer['valid'].astype(jnp.int32))


def quota(capacity_: int, num_classes: int) -> int:
  """Entries a class may hold under the 'balanced' policy: ⌈capacity / classes⌉."""
  return -(-capacity_ // num_classes)


# ------------------------------------------------------------------------------------------------
# Admission
# ------------------------------------------------------------------------------------------------

def _weakest(score, stamp, eligible) -> jax.Array:
  """The eligible slot with the lowest score, the oldest (lowest stamp) of equal scores."""
  big = jnp.iinfo(jnp.int32).max
  lowest = jnp.min(jnp.where(eligible, score, jnp.inf))
  return jnp.argmin(jnp.where(eligible & (score == lowest), stamp, big)).astype(jnp.int32)


def admission_slots(buffer: dict, labels: jax.Array, scores: jax.Array, *, num_classes: int,
                    policy: str) -> jax.Array:
  """(n,) int32 slot each new entry goes to, −1 if discarded, taking the entries in the order given
  (the module docstring's rules; a later entry may replace an earlier one of the same batch)."""
  cap, n = capacity(buffer), labels.shape[0]
  if policy not in POLICIES:
    raise UserError(f"buffer policy must be one of {', '.join(POLICIES)}, not {policy!r}")
  if n > cap:
    raise UserError(f'cannot admit {n} entries at once into a buffer of {cap}; raise the budget or lower the batch')
  if policy == 'fifo':
    return ((buffer['admitted'] + jnp.arange(n)) % cap).astype(jnp.int32)
  limit = quota(cap, num_classes)

  def admit(carry, new):
    label, score, valid, stamp, counts, admitted = carry
    c, s = new
    under = counts[c] < limit
    full = jnp.all(valid)
    free = jnp.argmin(valid).astype(jnp.int32)
    own = _weakest(score, stamp, valid & (label == c))
    richest = jnp.argmax(counts)
    other = _weakest(score, stamp, valid & (label == richest))
    slot = jnp.where(under, jnp.where(full, other, free), jnp.where(s >= score[own], own, -1))
    taken = slot >= 0
    at = jnp.maximum(slot, 0)
    counts = counts.at[label[at]].add(jnp.where(taken & valid[at], -1, 0)).at[c].add(jnp.where(taken, 1, 0))
    carry = (label.at[at].set(jnp.where(taken, c, label[at])), score.at[at].set(jnp.where(taken, s, score[at])),
             valid.at[at].set(valid[at] | taken), stamp.at[at].set(jnp.where(taken, admitted, stamp[at])),
             counts, admitted + taken)
    return carry, slot

  start = (buffer['label'], buffer['score'], buffer['valid'], buffer['stamp'], class_counts(buffer, num_classes),
           buffer['admitted'])
  _, slots = jax.lax.scan(admit, start, (labels.astype(jnp.int32), scores.astype(jnp.float32)))
  return slots


def new_priority(buffer: dict, rule: str) -> jax.Array:
  """The priority of newly admitted entries: the buffer's largest ('max') or mean ('mean'), 1 if
  it is empty."""
  if rule not in NEW_PRIORITIES:
    raise UserError(f"new-entry priority must be one of {', '.join(NEW_PRIORITIES)}, not {rule!r}")
  valid, priority = buffer['valid'], buffer['priority']
  if rule == 'max':
    value = jnp.max(jnp.where(valid, priority, -jnp.inf))
  else:
    value = jnp.sum(jnp.where(valid, priority, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
  return jnp.where(jnp.any(valid), value, 1.0)


def write(buffer: dict, slots: jax.Array, items: Any, labels: jax.Array, scores: jax.Array,
          priority: jax.Array) -> dict:
  """``buffer`` with entry k of (items, labels, scores) written to ``slots[k]`` (−1: dropped) at
  ``priority``; stamps count admissions in order. Slots must be distinct (``admission_slots``
  gives a slot to at most one entry of the batch once its later duplicates are dropped)."""
  cap = capacity(buffer)
  taken = slots >= 0
  # A later entry of the batch may take the slot of an earlier one: only the last write survives.
  later = jnp.triu(slots[:, None] == slots[None, :], k=1) & taken[None, :]
  keep = taken & ~jnp.any(later, axis=1)
  target = jnp.where(keep, slots, cap)  # out of range: dropped
  order = buffer['admitted'] + jnp.cumsum(taken) - 1
  put = lambda stored, new: stored.at[target].set(new.astype(stored.dtype), mode='drop')
  return {'items': jax.tree.map(put, buffer['items'], items),
          'label': put(buffer['label'], labels), 'score': put(buffer['score'], scores),
          'priority': put(buffer['priority'], jnp.broadcast_to(priority, slots.shape)),
          'valid': put(buffer['valid'], jnp.ones(slots.shape, bool)), 'stamp': put(buffer['stamp'], order),
          'admitted': buffer['admitted'] + jnp.sum(taken, dtype=jnp.int32)}


# ------------------------------------------------------------------------------------------------
# Prioritised sampling
# ------------------------------------------------------------------------------------------------

def probabilities(priority: jax.Array, valid: jax.Array, alpha: float) -> jax.Array:
  """P(i) = p_i^α / Σ_k p_k^α over the valid entries, 0 elsewhere (α = 0: uniform)."""
  mass = jnp.where(valid, jnp.power(jnp.maximum(priority, 0.0), alpha), 0.0)
  return mass / jnp.maximum(jnp.sum(mass), jnp.finfo(jnp.float32).tiny)


def indices(probs: jax.Array, uniforms: jax.Array, sampler: str) -> jax.Array:
  """(batch,) int32 entries drawn from ``probs`` by inverting its cumulative sum at ``uniforms``
  (batch,) in [0, 1): 'stratified' (point k in segment [k, k + 1) / batch), 'independent', or
  'uniform' (``probs`` is then taken as given: pass α = 0)."""
  if sampler not in SAMPLERS:
    raise UserError(f"sampler must be one of {', '.join(SAMPLERS)}, not {sampler!r}")
  batch = uniforms.shape[0]
  points = (jnp.arange(batch) + uniforms) / batch if sampler == 'stratified' else uniforms
  cdf = jnp.cumsum(probs)
  drawn = jnp.searchsorted(cdf, points * cdf[-1], side='right')
  last = jnp.max(jnp.where(probs > 0, jnp.arange(probs.shape[0]), 0))  # rounding can land past the end
  return jnp.minimum(drawn, last).astype(jnp.int32)


def importance_weights(probs: jax.Array, valid: jax.Array, drawn: jax.Array, beta: jax.Array, *,
                       normaliser: str = 'buffer') -> jax.Array:
  """w_i = (n·P(i))^(−β) / max_j (n·P(j))^(−β): over the valid entries j of the buffer
  (``normaliser='buffer'``, PER's and OpenAI baselines' reading: (min_j P(j) / P(i))^β, 1 for the
  least likely entry) or over the drawn batch ('batch', as e.g. Dopamine: the batch's largest
  weight is 1, so the weights cannot all become tiny when one entry's priority is near 0)."""
  if normaliser not in NORMALISERS:
    raise UserError(f"importance-weight normaliser must be one of {', '.join(NORMALISERS)}, not {normaliser!r}")
  drawn_probs = probs[drawn]
  if normaliser == 'buffer':
    smallest = jnp.min(jnp.where(valid & (probs > 0), probs, jnp.inf))
  else:
    smallest = jnp.min(drawn_probs)
  return jnp.power(smallest / drawn_probs, beta)


def annealed_beta(beta0: float, progress: jax.Array) -> jax.Array:
  """β from β₀ at progress 0 linearly to 1 at progress 1 (clipped)."""
  return beta0 + (1.0 - beta0) * jnp.clip(progress, 0.0, 1.0)


def update_priorities(priority: jax.Array, drawn: jax.Array, values: jax.Array, eps: float) -> jax.Array:
  """Priorities of the entries ``drawn`` set to ``values`` + ε (an entry drawn several times gets
  the largest of its values, whatever the order)."""
  return priority.at[drawn].set(-jnp.inf).at[drawn].max(values + eps)
