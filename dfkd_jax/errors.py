"""User-facing errors: anything a user can fix is raised as ``UserError`` with a one-line message;
the CLI prints it without a traceback (``--verbose`` shows the traceback) and exits non-zero."""


class UserError(Exception):
  """An error caused by the user's input (config, files, data, environment), with a one-line
  message that says what is wrong and, where possible, how to fix it."""

  exit_code = 2


class StopRequested(BaseException):
  """SIGTERM arrived before training started: the run stops at once, with nothing new to save.

  A BaseException (like KeyboardInterrupt) so that no ``except Exception`` on the way, e.g. around
  a checkpoint read, mistakes it for a failure of what it interrupted."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum
