#!/usr/bin/env bash
# A multi-node GPU job under SLURM: one process per node, each driving the node's GPUs, joined by
# jax.distributed. softvq_jax.distributed starts it when SLURM_NTASKS > 1 and JAX's SLURM
# detection takes the coordinator (first node of SLURM_STEP_NODELIST), the process count
# (SLURM_NTASKS) and the process id (SLURM_PROCID) from the variables srun sets.
#
#   bash launch/gpu/slurm.sh [--dry-run] CONFIG WORKDIR [FLAGS...]
#
# Outside an allocation it submits itself with sbatch; inside one (sbatch ran it) it starts the
# job with srun. Environment for the submission: NODES (default 2), GPUS_PER_NODE (default 8),
# TIME (default 24:00:00), optional PARTITION, ACCOUNT, JOB_NAME (default softvq-jax); for the
# job: VENV (a virtual environment to activate on every node), PYTHON (default python).
# WORKDIR must be on a file system every node sees (or gs://). The job is requeued after a
# preemption and gets SIGTERM 300 s before its time limit: the trainer checkpoints and exits
# with status 75, on which this script requeues the job (scontrol requeue), and the requeued
# job resumes from WORKDIR.
set -euo pipefail

# quote, run, require: shared with the other launch scripts.
# shellcheck source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

usage() {
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

dry_run=0
if [[ "${1:-}" == --dry-run ]]; then
  dry_run=1
  shift
fi
if [[ $# -lt 2 ]]; then
  echo "error: need CONFIG WORKDIR, e.g. configs/sit_xl_softvq_b64.py /shared/runs/sit_b64" >&2
  usage
fi
config="$1" workdir="$2"
shift 2

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  # Submit: this script again, as the batch script of a NODES-node allocation.
  script="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
  options=(--job-name="${JOB_NAME:-softvq-jax}" --nodes="${NODES:-2}" --ntasks-per-node=1
           --gpus-per-node="${GPUS_PER_NODE:-8}" --exclusive --time="${TIME:-24:00:00}"
           --requeue --signal=TERM@300 --output="slurm-%x-%j.out"
           --chdir="$(cd "$(dirname "$0")/../.." && pwd)")
  if [[ -n "${PARTITION:-}" ]]; then
    options+=(--partition="$PARTITION")
  fi
  if [[ -n "${ACCOUNT:-}" ]]; then
    options+=(--account="$ACCOUNT")
  fi
  run sbatch "${options[@]}" "$script" "$config" "$workdir" "$@"
  exit 0
fi

# Inside the allocation (the batch script runs on the first node).
for name in SLURM_JOB_NUM_NODES SLURM_JOB_NODELIST; do
  if [[ -z "${!name:-}" ]]; then
    echo "error: $name is not set: run inside a SLURM allocation (sbatch sets it) or submit" \
      "from a login node without SLURM_JOB_ID set" >&2
    exit 2
  fi
done
if [[ -n "${VENV:-}" ]]; then
  echo "+ source $VENV/bin/activate"
  # shellcheck disable=SC1091  # the user's environment
  source "$VENV/bin/activate"
fi
echo "softvq-jax: $SLURM_JOB_NUM_NODES node(s) ($SLURM_JOB_NODELIST), one process each; job $SLURM_JOB_ID"
status=0
run srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  "${PYTHON:-python}" -m softvq_jax.main "--config=$config" "--workdir=$workdir" "$@" || status=$?
# 75: training stopped at SIGTERM (the time limit's warning) with its checkpoint written.
if ((status == 75)); then
  echo "softvq-jax: stopped before the last step; requeueing job $SLURM_JOB_ID to resume it"
  run scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
