"""What the command line prints, as the tests read it: absl log records and the one-line error."""
from __future__ import annotations

import re

# An absl log record's first line: severity, date, time, thread, file:line.
LOG_RECORD = re.compile(r'([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w.]+:\d+\] (.*)')


def logged(stderr: str, severity: str = 'IW') -> list[str]:
  """The messages of the log records in ``stderr`` of the given severities."""
  return [m.group(2) for m in map(LOG_RECORD.fullmatch, stderr.splitlines()) if m and m.group(1) in severity]


def one_line_error(result, code: int = 2) -> str:
  """The single stderr line of a failed run (the progress bar and notes and warnings logged before
  aside), after checking the exit code and that no traceback was printed."""
  lines = [line for line in result.stderr.splitlines()
           if line.strip() and not line.startswith('[') and not LOG_RECORD.fullmatch(line)]
  assert result.returncode == code, (result.returncode, result.stderr[-3000:])
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-3000:]
  assert 'Traceback' not in result.stderr + result.stdout
  return lines[0]
