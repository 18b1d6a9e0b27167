#!/usr/bin/env bash
# Cloud TPU VMs and pod slices for dfkd_jax, from the launching machine (your laptop or a
# CPU VM with gcloud): create through a queued resource, install, run on every worker,
# follow logs, stop, delete. The worker side is launch/tpu_worker.sh.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# What `pip install -e .` and `python -m dfkd_jax.main` need on the workers.
PROJECT_FILES=(dfkd_jax configs launch setup.cfg pyproject.toml README.md)
WORKER_ENV=()

tpu_options() {
  required_option TPU_NAME --tpu-name NAME "Name of the TPU VM (node); pod slices have one node with several workers."
  required_option ZONE --zone ZONE "Zone of the TPU, e.g. us-west4-a."
  option PROJECT --project ID "Google Cloud project (default: gcloud's configured one)."
}

remote_dir_option() {
  option REMOTE_DIR --remote-dir DIR "Project copy on each worker, relative to the home directory." dfkd
}

queued_resource_option() {
  option QUEUED_RESOURCE --queued-resource NAME "Name of the queued resource (default: TPU_NAME-qr)."
}

# `~` would reach the workers quoted, hence unexpanded.
check_remote_dir() {
  [[ $REMOTE_DIR != "~"* ]] || die "--remote-dir is relative to the home directory already: drop the ~"
}

# Fills in the default that depends on TPU_NAME, once the flags are parsed.
resolve_queued_resource() {
  QUEUED_RESOURCE=${QUEUED_RESOURCE:-$TPU_NAME-qr}
}

# Sets CMD to `gcloud compute tpus ARGS...` in the chosen zone and project.
tpus_command() {
  CMD=(gcloud compute tpus "$@" --zone="$ZONE")
  if [[ -n $PROJECT ]]; then
    CMD+=(--project="$PROJECT")
  fi
}

# tpu_ssh WORKER SHELL_LINE: runs the line on one worker (0, 1, ...) or on all of them at once.
tpu_ssh() {
  tpus_command tpu-vm ssh "$TPU_NAME" --worker="$1" --command="$2"
  run "${CMD[@]}"
}

# tpu_worker WORKER ARGS...: runs launch/tpu_worker.sh ARGS in the project copy on WORKER,
# with the WORKER_ENV variables set.
tpu_worker() {
  local worker=$1 words=()
  shift
  if ((${#WORKER_ENV[@]})); then
    words=(env "${WORKER_ENV[@]}")
  fi
  words+=(bash launch/tpu_worker.sh "$@")
  check_remote_dir
  tpu_ssh "$worker" "cd $(quote_word "$REMOTE_DIR") && $(quote_command "${words[@]}")"
}

# Runtime image per TPU generation, as listed in the Cloud TPU docs.
default_runtime_version() {
  case $1 in
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

# Polls the queued resource until its node is ready; a request can wait in the queue for hours.
wait_until_active() {
  local state
  tpus_command queued-resources describe "$QUEUED_RESOURCE" --format='value(state.state)'
  if dry_run; then
    quote_command "${CMD[@]}"
    return 0
  fi
  while true; do
    state=$("${CMD[@]}")
    case $state in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDING | SUSPENDED) die "queued resource $QUEUED_RESOURCE is $state: delete it and create it again" ;;
    esac
    log "queued resource $QUEUED_RESOURCE is ${state:-not visible yet}; next check in ${POLL_SECONDS}s"
    sleep "$POLL_SECONDS"
  done
}

cmd_create() {
  describe "[options]" \
    "Request a TPU VM or pod slice through a queued resource (spot with --spot), and optionally wait until it is ACTIVE."
  tpu_options
  required_option ACCELERATOR_TYPE --accelerator-type TYPE "TPU type and size, e.g. v5litepod-32, v5p-64, v6e-16, v4-32."
  option RUNTIME_VERSION --runtime-version VERSION "TPU software image (default: the one for the accelerator's generation, e.g. v2-alpha-tpuv5-lite for v5litepod-*)."
  queued_resource_option
  switch SPOT --spot "Spot capacity: much cheaper, preemptible at any time."
  switch WAIT --wait "Wait until the queued resource is ACTIVE."
  option POLL_SECONDS --poll-seconds N "Seconds between state checks with --wait." 60
  example "  launch/tpu.sh create --tpu-name dfkd-pod --zone us-west4-a --accelerator-type v5litepod-32 --spot --wait"
  parse_args "$@"
  resolve_queued_resource
  require_count POLL_SECONDS
  if [[ -z $RUNTIME_VERSION ]]; then
    RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR_TYPE") ||
      die "no default runtime version for $ACCELERATOR_TYPE: give --runtime-version"
  fi
  local create=(queued-resources create "$QUEUED_RESOURCE" --node-id="$TPU_NAME"
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
  if enabled SPOT; then
    create+=(--spot)
  fi
  tpus_command "${create[@]}"
  run "${CMD[@]}"
  if enabled WAIT; then
    wait_until_active
  fi
}

cmd_status() {
  describe "[options]" \
    "Show the queued resource, whose state is WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, FAILED, SUSPENDING or SUSPENDED (spot capacity taken back)."
  tpu_options
  queued_resource_option
  example "  launch/tpu.sh status --tpu-name dfkd-pod --zone us-west4-a"
  parse_args "$@"
  resolve_queued_resource
  tpus_command queued-resources describe "$QUEUED_RESOURCE"
  run "${CMD[@]}"
}

cmd_setup() {
  describe "[options]" \
    "Copy the project to every worker and install it there: Python >= 3.12 (provisioned with uv if the image lacks it), a venv, pip install -U 'jax[tpu]' and the project. Run it again after changing the code."
  tpu_options
  remote_dir_option
  option EXTRAS --extras LIST "Comma-separated extras of setup.cfg to install too: torch, tensorboard, tensorflow, test."
  option PYTHON_VERSION --python-version X.Y "Python of the venv on the workers." 3.12
  example "  launch/tpu.sh setup --tpu-name dfkd-pod --zone us-west4-a --extras tensorboard"
  parse_args "$@"
  local install=(install --python-version="$PYTHON_VERSION")
  if [[ -n $EXTRAS ]]; then
    install+=(--extras="$EXTRAS")
  fi
  check_remote_dir
  tpu_ssh all "mkdir -p $(quote_word "$REMOTE_DIR")"
  tpus_command tpu-vm scp --recurse "${PROJECT_FILES[@]/#/$REPO_DIR/}" "$TPU_NAME:$REMOTE_DIR" --worker=all
  run "${CMD[@]}"
  tpu_worker all "${install[@]}"
}

cmd_run() {
  describe "[options] -- [MAIN_FLAGS...]" \
    "Start python -m dfkd_jax.main --jax_distributed on every worker, in the background, all with the same gs:// workdir (computed here once). Running it again with the same --workdir resumes from the latest checkpoint."
  tpu_options
  remote_dir_option
  required_option CONFIG --config FILE[:ARG] "Config file, relative to the repository root, e.g. configs/dafl_mnist.py."
  workdir_options
  list_option WORKER_ENV --env NAME=VALUE "Environment variable for the run, e.g. TFDS_DATA_DIR=gs://BUCKET/tensorflow_datasets."
  extra_args "MAIN_FLAGS..." "More flags for dfkd_jax.main, e.g. --config.total_steps=2000."
  example "  launch/tpu.sh run --tpu-name dfkd-pod --zone us-west4-a --config configs/dafl_mnist.py \\
      --workdir-root gs://my-bucket/dfkd --env TFDS_DATA_DIR=gs://my-bucket/tensorflow_datasets"
  parse_args "$@"
  local assignment
  for assignment in "${WORKER_ENV[@]}"; do
    [[ $assignment =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes NAME=VALUE (got '$assignment')"
  done
  resolve_workdir
  [[ $WORKDIR == gs://* ]] || die "--workdir must be a gs:// path that every worker can read and write (got '$WORKDIR')"
  report_workdir
  tpu_worker all start -- --config="$CONFIG" --workdir="$WORKDIR" --jax_distributed "${EXTRA_ARGS[@]}"
}

cmd_logs() {
  describe "[options]" \
    "Follow the output of the run on one worker (process 0 logs the metrics), or on all of them with --worker all."
  tpu_options
  remote_dir_option
  option TPU_WORKER --worker N "Worker index, or all." 0
  option LOG_LINES --lines N "Number of past lines to show first." 100
  switch NO_FOLLOW --no-follow "Print the last lines and return."
  example "  launch/tpu.sh logs --tpu-name dfkd-pod --zone us-west4-a"
  parse_args "$@"
  local tail_args=(logs --lines="$LOG_LINES")
  if enabled NO_FOLLOW; then
    tail_args+=(--no-follow)
  fi
  tpu_worker "$TPU_WORKER" "${tail_args[@]}"
}

cmd_stop() {
  describe "[options]" \
    "Stop the run on every worker: SIGTERM to its process group (the run saves a checkpoint and exits), SIGKILL if it is still there after the timeout. Frees the TPU chips for the next run."
  tpu_options
  remote_dir_option
  example "  launch/tpu.sh stop --tpu-name dfkd-pod --zone us-west4-a"
  parse_args "$@"
  tpu_worker all stop
}

cmd_delete() {
  describe "[options]" \
    "Delete the TPU VM or pod slice together with its queued resource (gcloud asks for confirmation unless --yes)."
  tpu_options
  queued_resource_option
  switch YES --yes "Do not ask for confirmation."
  example "  launch/tpu.sh delete --tpu-name dfkd-pod --zone us-west4-a --yes"
  parse_args "$@"
  resolve_queued_resource
  # --force deletes the node first; without it a queued resource with a live node stays.
  local delete=(queued-resources delete "$QUEUED_RESOURCE" --force)
  if enabled YES; then
    delete+=(--quiet)
  fi
  tpus_command "${delete[@]}"
  run "${CMD[@]}"
}

describe "COMMAND [options]" "Run dfkd_jax on a Cloud TPU VM or pod slice, from the launching machine. Commands:
  create   request the TPU VM or pod slice through a queued resource (--spot, --wait)
  status   show the queued resource's state
  setup    copy the project to every worker and install it (Python >= 3.12, venv, jax[tpu])
  run      start dfkd_jax.main on every worker with one shared gs:// workdir
  logs     follow the run's output on a worker
  stop     stop the run on every worker
  delete   delete the TPU and its queued resource
Every command takes the options below; 'launch/tpu.sh COMMAND --help' lists the others."
tpu_options
example "  export TPU_NAME=dfkd-pod ZONE=us-west4-a
  launch/tpu.sh create --accelerator-type v5litepod-32 --spot --wait
  launch/tpu.sh setup
  launch/tpu.sh run --config configs/dafl_mnist.py --workdir-root gs://my-bucket/dfkd
  launch/tpu.sh logs
  launch/tpu.sh stop
  launch/tpu.sh delete"
dispatch "create status setup run logs stop delete" "$@"
