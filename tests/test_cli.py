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
