"""Where a run or a benchmark ran: the record every ``summary.json`` and results file carries.

Timings from different machines are not comparable (a 2-core AVX2 VM and a 32-core AVX-512 server
differ by 10x or more; the jax/XLA version moves them by tens of percent), and floating-point
rounding, hence a training trajectory, differs between CPUs and library versions. So a run's
summary and every benchmark's table carry ``describe()`` (rendered by ``markdown``), and results
accumulated across runs are kept apart by ``machine_key``.

``describe`` imports neither jax nor torch (versions come from the installed distributions), so a
script may call it before it sets ``XLA_FLAGS``.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
# The vector-unit flags of /proc/cpuinfo that decide float32 matmul/conv throughput.
VECTOR_FLAGS = ('fma', 'avx2', 'avx512f', 'avx512_bf16', 'amx_tile', 'amx_bf16', 'amx_int8')
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'torch')
# The fields that identify a machine (and software) for results accumulated over several runs.
KEY_FIELDS = ('cpu', 'vector_flags', 'cpu_count', 'affinity_count', 'python') + PACKAGES


def _cpuinfo() -> tuple[str, list[str]]:
  """(CPU model name, vector flags present), from the first processor of /proc/cpuinfo."""
  model, flags = platform.processor() or platform.machine(), []
  try:
    with open('/proc/cpuinfo') as f:
      lines = f.read().split('\n\n')[0].splitlines()
  except OSError:
    return model, flags
  fields = dict(line.split(':', 1) for line in lines if ':' in line)
  fields = {k.strip(): v.strip() for k, v in fields.items()}
  present = set(fields.get('flags', fields.get('Features', '')).split())
  return fields.get('model name', model), [f for f in VECTOR_FLAGS if f in present]


def _git_commit() -> str:
  """HEAD of the checkout dfkd_jax runs from ('unknown' for an installed copy), '-dirty' when
  tracked files have changes."""
  try:
    git = lambda *args: subprocess.run(['git', '-C', ROOT, *args], capture_output=True, text=True,
                                       check=True).stdout.strip()
    return git('rev-parse', '--short=12', 'HEAD') + ('-dirty' if git('status', '--porcelain', '-uno') else '')
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def describe() -> dict:
  """Where this process runs: CPU model and vector flags, core counts (all, and usable by this
  process), Python and library versions (None for a library not installed), git commit, UTC date."""
  cpu, flags = _cpuinfo()
  info = {'cpu': cpu, 'vector_flags': flags, 'cpu_count': os.cpu_count(),
          'affinity_count': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
          'python': platform.python_version()}
  for name in PACKAGES:
    try:
      info[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      info[name] = None
  info['commit'] = _git_commit()
  info['date_utc'] = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
  return info


def _machine_text(info: dict) -> str:
  flags = ' '.join(info['vector_flags']) or 'no AVX2/AVX-512/AMX flags'
  versions = ', '.join(f'{name} {info[name]}' for name in PACKAGES if info.get(name))
  return (f"{info['cpu']} ({flags}), {info['cpu_count']} cores ({info['affinity_count']} usable); "
          f"Python {info['python']}, {versions}")


def machine_key(info: dict) -> str:
  """One string naming the machine and software (not the commit or date): rows with different keys
  were measured on different machines or versions and are never merged."""
  return _machine_text({k: info.get(k) for k in KEY_FIELDS})


def markdown(info: dict) -> str:
  """The one-line record for the top of a results file."""
  return f"Machine: {_machine_text(info)}; commit {info['commit']}; {info['date_utc']}."
