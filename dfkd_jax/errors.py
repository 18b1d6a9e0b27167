"""User-facing errors: anything a user can fix is raised as ``UserError`` with a one-line message;
the CLI prints it without a traceback (``--verbose`` shows the traceback) and exits non-zero."""


class UserError(Exception):
  """An error caused by the user's input (config, files, data, environment), with a one-line
  message that says what is wrong and, where possible, how to fix it."""

  exit_code = 2


def check_choice(name: str, value, choices) -> None:
  """Raises a ``UserError`` "<name> must be one of a, b, not 'x'" unless ``value`` is one of
  ``choices`` (any iterable of strings, e.g. the keys of a dict of implementations)."""
  choices = tuple(choices)
  if value not in choices:
    raise UserError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


class StopRequested(BaseException):
  """SIGTERM arrived before training started: the run stops at once, with nothing new to save.

  A BaseException (like KeyboardInterrupt) so that no ``except Exception`` on the way, e.g. around
  a checkpoint read, mistakes it for a failure of what it interrupted."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum
