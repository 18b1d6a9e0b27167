#!/usr/bin/env bash
#SBATCH --job-name=dfkd
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --open-mode=append
# dfkd_jax on a SLURM GPU cluster. `submit` runs on the login node: it computes the workdir
# once and hands this file to sbatch with the `job` command, which runs inside the
# allocation and starts dfkd_jax.main with srun, one process per GPU (default) or per node.
# The #SBATCH lines above are defaults for `sbatch launch/slurm.sh job ...`; `submit`
# overrides them on the sbatch command line.
set -euo pipefail
# sbatch runs a spool copy of this file: then find launch/ from the job's working
# directory, the repository (`submit` passes --chdir).
launch_dir=$(dirname "${BASH_SOURCE[0]}")
if [[ ! -f $launch_dir/common.sh ]]; then
  launch_dir=$PWD/launch
fi
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
. "$launch_dir/common.sh"

# Options that `submit` passes on to `job`.
job_options() {
  required_option CONFIG --config FILE[:ARG] "Config file, relative to the repository root, e.g. configs/dafl_mnist.py."
  option PROCESS_PER --process-per gpu\|node "One process per GPU, or one per node driving all its GPUs." gpu
  option GPUS_PER_NODE --gpus-per-node N "GPUs on each node." "${SLURM_GPUS_ON_NODE:-8}"
  option PYTHON_BIN --python PATH "Python with dfkd_jax installed (sbatch passes on the submitting shell's PATH, so an activated venv works)." python
}

check_job_options() {
  require_choice PROCESS_PER gpu node
  require_count GPUS_PER_NODE
}

cmd_submit() {
  describe "[options] -- [MAIN_FLAGS...]" \
    "On the login node: compute the workdir once (timestamped unless given) and submit this script with sbatch. Submitting again with the same --workdir resumes from the latest checkpoint."
  job_options
  workdir_options
  option NODES --nodes N "Number of nodes." 1
  option CPUS_PER_TASK --cpus-per-task N "CPUs per task (default: the cluster's)."
  option PARTITION --partition NAME "SLURM partition."
  option ACCOUNT --account NAME "SLURM account."
  option TIME_LIMIT --time TIME "Time limit, e.g. 2-00:00:00."
  option JOB_NAME --job-name NAME "Job name." dfkd
  switch REQUEUE --requeue "Let SLURM requeue the job after preemption or a node failure; it resumes from the workdir."
  extra_args "MAIN_FLAGS..." "More flags for dfkd_jax.main, e.g. --config.total_steps=2000."
  example "  launch/slurm.sh submit --nodes 4 --partition gpu --config configs/dafl_mnist.py \\
      --workdir-root /scratch/\$USER/dfkd --requeue"
  parse_args "$@"
  check_job_options
  require_count NODES
  resolve_workdir
  # The job runs from the repository: anchor a relative workdir where it was meant.
  if [[ $WORKDIR != /* && $WORKDIR != *://* ]]; then
    WORKDIR=$PWD/$WORKDIR
  fi
  report_workdir
  local tasks_per_node=$GPUS_PER_NODE
  if [[ $PROCESS_PER == node ]]; then
    tasks_per_node=1
  fi
  local sbatch=(sbatch --job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node="$tasks_per_node"
    --gpus-per-node="$GPUS_PER_NODE" --chdir="$REPO_DIR")
  local name
  for name in CPUS_PER_TASK PARTITION ACCOUNT TIME_LIMIT; do
    if [[ -n ${!name} ]]; then
      sbatch+=("$(flag_of "$name")=${!name}")
    fi
  done
  if enabled REQUEUE; then
    sbatch+=(--requeue)
  fi
  local job=("$LAUNCH_DIR/slurm.sh" job --config="$CONFIG" --workdir="$WORKDIR" --process-per="$PROCESS_PER"
    --gpus-per-node="$GPUS_PER_NODE" --python="$PYTHON_BIN")
  if ((${#EXTRA_ARGS[@]})); then
    job+=(-- "${EXTRA_ARGS[@]}")
  fi
  run "${sbatch[@]}" "${job[@]}"
}

cmd_job() {
  describe "[options] -- [MAIN_FLAGS...]" \
    "Inside the allocation (this is the sbatch script): srun starts python -m dfkd_jax.main --jax_distributed on every task; jax.distributed reads the coordinator, process count and index from SLURM. With --process-per node it also passes --local_device_ids=0,...,N-1, since auto-detection would give each process only GPU SLURM_LOCALID."
  job_options
  required_option WORKDIR --workdir DIR "Workdir on a shared file system (or gs://); the same one resumes the run."
  extra_args "MAIN_FLAGS..." "More flags for dfkd_jax.main."
  example "  sbatch --nodes 2 --ntasks-per-node 1 --gpus-per-node 8 launch/slurm.sh job \\
      --process-per node --config configs/dafl_mnist.py --workdir /scratch/\$USER/dfkd/run1"
  parse_args "$@"
  check_job_options
  local main=("$PYTHON_BIN" -m dfkd_jax.main --jax_distributed)
  if [[ $PROCESS_PER == node ]]; then
    [[ ${SLURM_NTASKS_PER_NODE:-1} == 1 ]] ||
      die "--process-per node needs one task per node (sbatch --ntasks-per-node=1), this job has $SLURM_NTASKS_PER_NODE"
    main+=(--local_device_ids="$(seq -s , 0 $((GPUS_PER_NODE - 1)))")
  fi
  cd "$REPO_DIR" # config paths are relative to the repository
  run srun --kill-on-bad-exit=1 "${main[@]}" --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA_ARGS[@]}"
}

describe "COMMAND [options]" "Run dfkd_jax on a SLURM GPU cluster. Commands:
  submit   on the login node: compute the workdir once and sbatch this script
  job      inside the allocation: srun dfkd_jax.main, one process per GPU or per node
'launch/slurm.sh COMMAND --help' lists each command's options."
example "  launch/slurm.sh submit --nodes 2 --config configs/dafl_mnist.py --workdir-root /scratch/\$USER/dfkd
  launch/slurm.sh submit --nodes 2 --process-per node --config configs/dafl_mnist.py --workdir /scratch/\$USER/dfkd/run1"
dispatch "submit job" "$@"
