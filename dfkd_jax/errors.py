"""User-facing errors: anything a user can fix is raised as ``UserError`` with a one-line message;
the CLI prints it without a traceback (``--verbose`` shows the traceback) and exits non-zero."""


class UserError(Exception):
  """An error caused by the user's input (config, files, data, environment), with a one-line
  message that says what is wrong and, where possible, how to fix it."""

  exit_code = 2
