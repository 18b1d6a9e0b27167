"""How often a run logs, evaluates and checkpoints, resolved when the run starts.

A config states each cadence (``config.log``, ``config.eval``, ``config.checkpoint``) in the units
it means, not in steps computed when the config is built, so that overriding ``num_epochs``,
``iters_per_epoch`` or ``num_steps`` on the command line moves every cadence with the run:

  - ``every_steps``: a step interval; when > 0 it wins over the fields below (what
    ``--config.eval.every_steps=N`` asks for, or a config whose epoch length is data-dependent);
  - otherwise the shortest interval of those given (> 0):
    ``every_epochs`` (float) -> round(every_epochs x steps per epoch) steps,
    ``per_run`` (that many times in the run) -> num_steps // per_run steps,
    ``at_most_steps`` -> that many steps (a bound: "every epoch, at most 50 steps apart").

Every interval is at least 1 step. An evaluation cadence with no field set means no evaluation;
logging and checkpointing need one. An event also happens at the run's last step (the loop's rule).
"""
from __future__ import annotations

import dataclasses

from dfkd_jax.errors import UserError

FIELDS = ('every_steps', 'every_epochs', 'per_run', 'at_most_steps')


@dataclasses.dataclass(frozen=True)
class Cadences:
  """Step intervals; ``eval`` 0 means never."""
  log: int
  eval: int
  checkpoint: int


def interval(spec, *, num_steps: int, steps_per_epoch: int, name: str) -> int:
  """The step interval of one cadence ``spec`` (a mapping with ``FIELDS``; absent ones are 0), 0 if
  none is given. ``name`` (e.g. 'eval') names the config group in errors."""
  values = {field: spec.get(field, 0) or 0 for field in FIELDS}
  for field, value in values.items():
    if value < 0:
      raise UserError(f'{name}.{field}={value} must be >= 0 (0: not given)')
  if values['every_steps']:
    return int(values['every_steps'])
  candidates = []
  if values['every_epochs']:
    candidates.append(max(1, round(values['every_epochs'] * steps_per_epoch)))
  if values['per_run']:
    candidates.append(max(1, num_steps // int(values['per_run'])))
  if values['at_most_steps']:
    candidates.append(int(values['at_most_steps']))
  return min(candidates, default=0)


def resolve(config, *, num_steps: int, steps_per_epoch: int | None = None) -> Cadences:
  """The cadences of ``config`` for a job of ``num_steps`` outer iterations. An epoch is
  ``steps_per_epoch`` of them, by default num_steps // config.num_epochs (what every epoch-counted
  job runs: epochs of a fixed number of iterations, a data-dependent one for PU and DFND), or 1 for
  a job counted in steps. Raises UserError for a negative field, or a log/checkpoint cadence with
  none given."""
  if steps_per_epoch is None:
    steps_per_epoch = max(1, num_steps // config.num_epochs) if config.get('num_epochs') else 1
  shape = dict(num_steps=num_steps, steps_per_epoch=steps_per_epoch)
  out = {name: interval(config[name], name=name, **shape) for name in ('log', 'eval', 'checkpoint')}
  for name in ('log', 'checkpoint'):
    if not out[name]:
      raise UserError(f'{name} has no cadence: set one of {", ".join(f"{name}.{f}" for f in FIELDS)} to > 0')
  return Cadences(**out)


def is_due(step: int, every: int, num_steps: int) -> bool:
  """Whether an event with interval ``every`` (0: never) happens after ``step``: every ``every``
  steps and at the last one."""
  return bool(every) and (step % every == 0 or step == num_steps)
