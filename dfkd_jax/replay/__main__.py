"""Command line: ``python -m dfkd_jax.replay FIXTURE_DIR [--tolerance R] [--set FIELD=VALUE ...] [--verbose]``.

Replays a trajectory recorded from the reference code through dfkd_jax's method code with the
recorded draws and compares every recorded quantity (``dfkd_jax.replay``). Prints one line per
quantity that deviates (its trace name, which carries the iteration and sub-step, and its relative
error), the recorded quantities not compared with the reason, and ``N quantities compared, worst
relative error E``. ``--set`` changes a field of the dfkd_jax config the replay builds from the
fixture (e.g. ``--set kd.reference_temperature_bug=False`` shows what the default's deviation from
the reference does). Exit status: 0 if every quantity is within tolerance, 1 if one is not, 2 for a
folder that is not a fixture or records a method or setting dfkd_jax does not support (one line,
``error: ...``; ``--verbose`` adds the traceback).
"""
from __future__ import annotations

import argparse
import ast
import sys
import traceback

from dfkd_jax.errors import UserError
from dfkd_jax.replay import adapters, compare, fixture

PROG = 'python -m dfkd_jax.replay'


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[1])
  parser.add_argument('fixture', metavar='FIXTURE_DIR', help='a trajectory fixture folder')
  parser.add_argument('--tolerance', type=float, default=compare.TOLERANCE,
                      help='largest relative error per array (max|a - r| / max|r|) of a trajectory; single '
                           f'forward passes from the initial weights get {compare.SINGLE_PASS_FACTOR:g} of it '
                           f'(default {compare.TOLERANCE:g})')
  parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='FIELD=VALUE',
                      help="a dotted config field of the replay's dfkd_jax config and its value (a Python "
                           'literal, else a string); repeatable')
  parser.add_argument('--verbose', action='store_true', help='show tracebacks for errors')
  return parser


def parse_overrides(items: list[str]) -> dict:
  """``['a.b=1', 'c=x']`` -> ``{'a.b': 1, 'c': 'x'}`` (values are Python literals, else strings)."""
  out = {}
  for item in items:
    name, sep, value = item.partition('=')
    if not sep or not name.strip():
      raise UserError(f'--set expects FIELD=VALUE, got {item!r}')
    try:
      out[name.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[name.strip()] = value.strip()
  return out


def replay(path, tolerance: float = compare.TOLERANCE, overrides: dict | None = None) -> compare.Report:
  """Replays the fixture at ``path`` (its dfkd_jax config changed by ``overrides``, dotted fields);
  returns the report of every comparison."""
  report = compare.Report(tolerance)
  loaded = fixture.load(path)
  adapters.find(loaded).replay(loaded, report, dict(overrides or {}))
  return report


def main(argv: list[str] | None = None) -> int:
  """Runs the command ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
  args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
  try:
    report = replay(args.fixture, args.tolerance, parse_overrides(args.overrides))
  except UserError as e:
    if args.verbose:
      traceback.print_exc()
    print(f'error: {e}', file=sys.stderr)
    return e.exit_code
  print('\n'.join(report.lines()), flush=True)
  return 0 if report.ok else 1


if __name__ == '__main__':
  sys.exit(main())
