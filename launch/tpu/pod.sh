#!/usr/bin/env bash
# A TPU VM or pod slice from this machine: create it, set up every worker, run a job on all
# workers, stream its log, stop it, delete the TPU. Every gcloud command is printed first.
#
#   bash launch/tpu/pod.sh [--dry-run] create            # TPU VM / pod slice (QUEUED=1: queued resource)
#   bash launch/tpu/pod.sh [--dry-run] setup             # copy this checkout, install (idempotent)
#   bash launch/tpu/pod.sh [--dry-run] run CONFIG WORKDIR [FLAGS...]   # all workers, then logs
#   bash launch/tpu/pod.sh [--dry-run] logs              # stream worker WORKER's log (default 0)
#   bash launch/tpu/pod.sh [--dry-run] stop              # SIGTERM on all workers: checkpoint, exit
#   bash launch/tpu/pod.sh [--dry-run] delete            # delete the TPU (and queued resource)
#   bash launch/tpu/pod.sh [--dry-run] up CONFIG WORKDIR [FLAGS...]    # create + setup + run
#
# Environment: TPU_NAME, ZONE (always); ACCELERATOR_TYPE (e.g. v4-32, v5litepod-16) and
# RUNTIME_VERSION (e.g. tpu-ubuntu2204-base for v4, v2-alpha-tpuv5-lite for v5e) for create;
# optional PROJECT, SPOT=1 (spot capacity), QUEUED=1 (queued resource QUEUED_RESOURCE, default
# TPU_NAME), WORKER (logs), REMOTE_DIR (default softvq-jax, in each worker's home).
# WORKDIR must be on GCS (gs://...): every worker writes its part of each checkpoint there.
# After a preemption, `up` again with the same WORKDIR: the job resumes from its last checkpoint.
set -euo pipefail

# quote, run, require: shared with the other launch scripts.
# shellcheck source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

usage() {
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

dry_run=0
if [[ "${1:-}" == --dry-run ]]; then
  dry_run=1
  shift
fi
if [[ $# -lt 1 ]]; then
  usage
fi
action="$1"
shift

declare -A help=(
  [TPU_NAME]="the TPU VM or pod slice name, e.g. export TPU_NAME=softvq-v4-32"
  [ZONE]="its zone, e.g. export ZONE=us-central2-b"
  [ACCELERATOR_TYPE]="the slice type, e.g. export ACCELERATOR_TYPE=v4-32"
  [RUNTIME_VERSION]="the TPU software version, e.g. export RUNTIME_VERSION=tpu-ubuntu2204-base (v4) or v2-alpha-tpuv5-lite (v5e)"
)

require TPU_NAME ZONE
repo="$(cd "$(dirname "$0")/../.." && pwd)"
remote_dir="${REMOTE_DIR:-softvq-jax}"
queued_resource="${QUEUED_RESOURCE:-$TPU_NAME}"
where=("--zone=$ZONE")
if [[ -n "${PROJECT:-}" ]]; then
  where+=("--project=$PROJECT")
fi
tpu_vm=(gcloud compute tpus tpu-vm)
queued=(gcloud compute tpus queued-resources)

all_workers() {  # command line -> runs on every worker at once
  run "${tpu_vm[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"
}

create() {
  require ACCELERATOR_TYPE RUNTIME_VERSION
  local spot=()
  if [[ "${SPOT:-0}" == 1 ]]; then
    spot=(--spot)
  fi
  if [[ "${QUEUED:-0}" == 1 ]]; then
    local state=""
    if ((!dry_run)); then
      state="$("${queued[@]}" describe "$queued_resource" "${where[@]}" \
               --format='value(state.state)' 2>/dev/null || true)"
    fi
    case "$state" in
      ACTIVE) echo "queued resource $queued_resource is ACTIVE: nothing to create" ;;
      WAITING_FOR_RESOURCES | PROVISIONING | ACCEPTED | CREATING) echo "queued resource $queued_resource is $state" ;;
      "")
        run "${queued[@]}" create "$queued_resource" --node-id="$TPU_NAME" "${where[@]}" \
          --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${spot[@]}" ;;
      *)  # FAILED, SUSPENDED (preempted): start over
        run "${queued[@]}" delete "$queued_resource" "${where[@]}" --force --quiet
        run "${queued[@]}" create "$queued_resource" --node-id="$TPU_NAME" "${where[@]}" \
          --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${spot[@]}" ;;
    esac
    echo "# waiting until the queued resource is ACTIVE:"
    echo "+ $(quote "${queued[@]}" describe "$queued_resource" "${where[@]}" --format='value(state.state)')"
    if ((!dry_run)); then
      until [[ "$("${queued[@]}" describe "$queued_resource" "${where[@]}" \
                   --format='value(state.state)')" == ACTIVE ]]; do
        sleep 30
      done
    fi
  else
    local state=""
    if ((!dry_run)); then
      state="$("${tpu_vm[@]}" describe "$TPU_NAME" "${where[@]}" --format='value(state)' \
               2>/dev/null || true)"
    fi
    case "$state" in
      READY | CREATING) echo "TPU $TPU_NAME is $state: nothing to create" ;;
      "")
        run "${tpu_vm[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
          --version="$RUNTIME_VERSION" "${spot[@]}" ;;
      *)  # PREEMPTED, TERMINATED, ...: start over
        run "${tpu_vm[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
        run "${tpu_vm[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
          --version="$RUNTIME_VERSION" "${spot[@]}" ;;
    esac
  fi
}

setup() {
  # This checkout as it is (uncommitted edits included), without git data or outputs.
  local tarball="${TMPDIR:-/tmp}/softvq-jax-$TPU_NAME.tar.gz"
  run tar -czf "$tarball" -C "$repo" --exclude=./.git --exclude=./workdir --exclude=__pycache__ \
    --exclude='*.egg-info' .
  run "${tpu_vm[@]}" scp "$tarball" "$TPU_NAME:softvq-jax.tar.gz" "${where[@]}" --worker=all
  all_workers "set -e; rm -rf $remote_dir.new; mkdir -p $remote_dir.new; tar -xzf softvq-jax.tar.gz -C $remote_dir.new; rm -rf $remote_dir; mv $remote_dir.new $remote_dir; bash $remote_dir/launch/tpu/worker.sh setup"
}

check_job_args() {
  if [[ $# -lt 2 ]]; then
    echo "error: $action needs CONFIG WORKDIR, e.g. $action configs/softvq_b64.py gs://BUCKET/runs/softvq_b64" >&2
    exit 2
  fi
  if [[ "$2" != gs://* ]]; then
    echo "error: WORKDIR must be a gs:// path (got '$2'): every worker writes its part of each checkpoint there" >&2
    exit 2
  fi
}

start_job() {
  check_job_args "$@"
  local args
  args=" $(quote "$@")"
  all_workers "bash $remote_dir/launch/tpu/worker.sh start$args"
  logs
}

logs() {
  echo "# streaming worker ${WORKER:-0}'s log (Ctrl-C stops the stream, not the job)"
  run "${tpu_vm[@]}" ssh "$TPU_NAME" "${where[@]}" --worker="${WORKER:-0}" \
    --command="bash $remote_dir/launch/tpu/worker.sh logs"
}

delete() {
  if [[ "${QUEUED:-0}" == 1 ]]; then
    run "${queued[@]}" delete "$queued_resource" "${where[@]}" --force --quiet
  else
    run "${tpu_vm[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
  fi
}

case "$action" in
  create) create ;;
  setup) setup ;;
  run) start_job "$@" ;;
  logs) logs ;;
  stop) all_workers "bash $remote_dir/launch/tpu/worker.sh stop" ;;
  delete) delete ;;
  up)
    check_job_args "$@"
    create
    setup
    start_job "$@" ;;
  *) echo "error: unknown command '$action'" >&2; usage ;;
esac
