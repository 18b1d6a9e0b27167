"""What the replays of generator-adversarial methods (``engines/generative.py``) share: the job's
state from the fixture's initial weights, one outer iteration phase by phase with recorded
latents, and the comparisons of models and optimiser states by the reference's key names. Not an
adapter itself (``adapters.MODULES`` lists the modules that are)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dfkd_jax.errors import UserError
from dfkd_jax.replay import harness
from dfkd_jax.replay.compare import Report
from dfkd_jax.replay.fixture import Fixture
from dfkd_jax.run.job import Job


def _with_weights(train_state, variables: dict, what: str):
  """``train_state`` holding ``variables`` (the reference's initial weights) instead of its own;
  a layout that does not fit the job's model is a one-line error."""
  params, stats = variables['params'], variables.get('batch_stats', {})
  for mine, theirs, part in ((train_state.params, params, 'parameters'),
                             (train_state.batch_stats, stats, 'BN statistics')):
    shapes = lambda tree: jax.tree.map(lambda a: tuple(np.shape(a)), tree)
    if shapes(mine) != shapes(theirs):
      raise UserError(f"the fixture's initial {what} {part} do not fit the replayed model's layout")
  cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)
  return train_state.replace(params=cast(params), batch_stats=cast(stats))


def initial_state(job: Job, student_variables: dict, generator_variables: dict) -> dict:
  """The job's initial state with the fixture's student and generator weights (optimiser states
  fresh: zero moments and step counts, as the reference's new optimisers)."""
  state = jax.jit(job.init)(jax.random.key(0))
  return dict(state, student=_with_weights(state['student'], student_variables, 'student'),
              generator=_with_weights(state['generator'], generator_variables, 'generator'))


def stacked(fixture: Fixture, names: list[str]) -> np.ndarray:
  """The recorded draws ``names`` stacked along a new leading (step) axis, as float32."""
  return np.stack([np.asarray(fixture.draw(n), np.float32) for n in names])


BN_BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')


def tracked(state_dict: dict) -> dict:
  """``state_dict`` less torch's BN step counters, which dfkd_jax does not keep
  (``harness.check_state_dict`` lists the recorded ones as not compared)."""
  return {k: v for k, v in state_dict.items() if not k.endswith(harness.UNTRACKED_SUFFIXES)}


def params_by_reference_name(to_state_dict, train_state, tree) -> dict:
  """A params-shaped ``tree`` (e.g. an optimiser moment) by the reference's parameter keys, in the
  reference's layouts: ``to_state_dict`` of ``train_state`` holding ``tree`` as its params."""
  return {k: v for k, v in to_state_dict(train_state.replace(params=tree)).items() if not k.endswith(BN_BUFFERS)}


def check_optimizer_state(report: Report, fixture: Fixture, prefix: str, opt_state, by_name,
                          fields: dict[str, str]) -> None:
  """Compares a recorded torch optimiser state ``<prefix>/<param>/<field>`` with ours: ``fields``
  maps each torch field to the optax state field holding it ('momentum_buffer': 'trace',
  'exp_avg': 'mu', 'exp_avg_sq': 'nu', 'step': 'count'); ``by_name(tree)`` names a params-shaped
  tree by the reference's keys (``params_by_reference_name``)."""
  named = {}
  for torch_field, optax_field in fields.items():
    value = _optax_field(opt_state, optax_field)
    if value is None:
      raise UserError(f'{fixture.root}: {prefix} records {torch_field}, which the replayed optimiser does not keep')
    if optax_field == 'count':  # torch keeps one step counter per parameter
      named[torch_field] = {k: np.float32(value) for k in by_name(_optax_field(opt_state, 'mu'))}
    else:
      named[torch_field] = by_name(value)
  for key, expected in fixture.entries(prefix).items():
    param, _, torch_field = key.rpartition('/')
    actual = named.get(torch_field, {}).get(param)
    report.check(f'{prefix}/{key}', np.full(np.shape(expected), np.inf) if actual is None else actual, expected)


def _optax_field(opt_state, field: str):
  """``field`` of the first optax state in ``opt_state`` that has it; a step ``count`` is the one
  kept beside the Adam moments (schedules keep their own counters)."""
  owner = 'mu' if field == 'count' else field
  found = [node for node in jax.tree.leaves(opt_state, is_leaf=lambda n: hasattr(n, '_fields'))
           if hasattr(node, '_fields') and owner in node._fields]
  return getattr(found[0], field) if found else None
