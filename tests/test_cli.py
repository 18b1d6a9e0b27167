"""The console scripts of setup.cfg exist after ``pip install -e .`` and answer --help."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

# Installed next to the interpreter (a venv's bin/), else wherever PATH has them.
_BIN = os.path.dirname(sys.executable)


def _script(name: str) -> str:
  path = shutil.which(name, path=os.pathsep.join([_BIN, os.environ.get('PATH', '')]))
  if path is None:
    pytest.fail(f'console script {name} not found; run pip install -e . (setup.cfg [options.entry_points])')
  return path


@pytest.mark.parametrize('name, flag, expected', [
    ('dfkd-jax', '--helpshort', '--workdir'),
    ('dfkd-jax-convert', '--help', '--source'),
])
def test_console_script_help(name, flag, expected):
  result = subprocess.run([_script(name), flag], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert expected in result.stdout + result.stderr


def test_after_a_reported_error_only_the_closed_event_loop_echo_is_dropped(monkeypatch, capsys):
  """main._drop_abandoned_orbax_work (installed once the CLI has printed its one-line error): the
  "Event loop is closed" that an abandoned Orbax reader raises in asyncio's call_soon_threadsafe
  is dropped whichever hook reports it; any other error still prints."""
  import asyncio
  import logging
  import types

  from dfkd_jax import main
  monkeypatch.setattr(sys, 'unraisablehook', sys.unraisablehook)
  monkeypatch.setattr(sys, 'excepthook', sys.excepthook)
  asyncio_filters = list(logging.getLogger('asyncio').filters)
  try:
    main._drop_abandoned_orbax_work()
    loop = asyncio.new_event_loop()
    loop.close()
    with pytest.raises(RuntimeError, match='Event loop is closed') as closed:
      loop.call_soon_threadsafe(print)
    echo = closed.value
    sys.excepthook(RuntimeError, echo, echo.__traceback__)
    sys.unraisablehook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=echo, exc_traceback=echo.__traceback__,
                                             err_msg=None, object=None))
    assert capsys.readouterr().err == ''
    elsewhere = RuntimeError('Event loop is closed')  # same words, not raised by asyncio: kept
    sys.excepthook(RuntimeError, elsewhere, None)
    assert 'RuntimeError: Event loop is closed' in capsys.readouterr().err
  finally:
    logging.getLogger('asyncio').filters[:] = asyncio_filters
