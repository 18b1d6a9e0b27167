"""Command line: ``python -m dfkd_jax.replay FIXTURE_DIR [--tolerance R] [--verbose]``.

Replays a trajectory recorded from the reference code through dfkd_jax's method code with the
recorded draws and compares every recorded quantity (``dfkd_jax.replay``). Prints one line per
quantity that deviates (its trace name, which carries the iteration and sub-step, and its relative
error), the recorded quantities not compared with the reason, and ``N quantities compared, worst
relative error E``. Exit status: 0 if every quantity is within tolerance, 1 if one is not, 2 for a
folder that is not a fixture or records a method or setting dfkd_jax does not support (one line,
``error: ...``; ``--verbose`` adds the traceback).
"""
from __future__ import annotations

import argparse
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
  parser.add_argument('--verbose', action='store_true', help='show tracebacks for errors')
  return parser


def replay(path, tolerance: float = compare.TOLERANCE) -> compare.Report:
  """Replays the fixture at ``path``; returns the report of every comparison."""
  report = compare.Report(tolerance)
  loaded = fixture.load(path)
  adapters.find(loaded).replay(loaded, report)
  return report


def main(argv: list[str] | None = None) -> int:
  """Runs the command ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
  args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
  try:
    report = replay(args.fixture, args.tolerance)
  except UserError as e:
    if args.verbose:
      traceback.print_exc()
    print(f'error: {e}', file=sys.stderr)
    return e.exit_code
  print('\n'.join(report.lines()), flush=True)
  return 0 if report.ok else 1


if __name__ == '__main__':
  sys.exit(main())
