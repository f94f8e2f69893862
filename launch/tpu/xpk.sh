#!/usr/bin/env bash
# The same job on a GKE TPU cluster through xpk (JobSet + Kueue): one container per TPU host,
# restarted after a preemption (MAX_RESTARTS), resuming from the last checkpoint in WORKDIR.
#
#   bash launch/tpu/xpk.sh [--dry-run] run CONFIG WORKDIR [FLAGS...]
#   bash launch/tpu/xpk.sh [--dry-run] logs
#   bash launch/tpu/xpk.sh [--dry-run] delete
#
# Environment: CLUSTER (an xpk cluster), WORKLOAD (the job's name), TPU_TYPE (e.g.
# v5litepod-16) for run; optional PROJECT, ZONE, NUM_SLICES (default 1), MAX_RESTARTS
# (default 3), DOCKER_IMAGE (an image with the environment installed; otherwise xpk layers this
# checkout on BASE_DOCKER_IMAGE, default python:3.11, and each host installs it at start).
# WORKDIR must be on GCS (gs://...).
set -euo pipefail

# quote, run, require: shared with the other launch scripts.
# shellcheck source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
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
  [CLUSTER]="the xpk cluster, e.g. export CLUSTER=softvq-v5e (xpk cluster create ...)"
  [WORKLOAD]="the workload (job) name, e.g. export WORKLOAD=softvq-b64"
  [TPU_TYPE]="the slice type of each host group, e.g. export TPU_TYPE=v5litepod-16"
)

require CLUSTER WORKLOAD
where=("--cluster=$CLUSTER")
if [[ -n "${PROJECT:-}" ]]; then
  where+=("--project=$PROJECT")
fi
if [[ -n "${ZONE:-}" ]]; then
  where+=("--zone=$ZONE")
fi

case "$action" in
  run)
    require TPU_TYPE
    if [[ $# -lt 2 ]]; then
      echo "error: run needs CONFIG WORKDIR, e.g. run configs/softvq_b64.py gs://BUCKET/runs/softvq_b64" >&2
      exit 2
    fi
    if [[ "$2" != gs://* ]]; then
      echo "error: WORKDIR must be a gs:// path (got '$2'): every host writes its part of each checkpoint there" >&2
      exit 2
    fi
    job="bash launch/tpu/worker.sh exec $(quote "$@")"
    if [[ -n "${DOCKER_IMAGE:-}" ]]; then
      image=("--docker-image=$DOCKER_IMAGE")
    else
      image=("--base-docker-image=${BASE_DOCKER_IMAGE:-python:3.11}"
             "--script-dir=$(cd "$(dirname "$0")/../.." && pwd)")
      job="bash launch/tpu/worker.sh setup && $job"
    fi
    run xpk workload create "${where[@]}" --workload="$WORKLOAD" --tpu-type="$TPU_TYPE" \
      --num-slices="${NUM_SLICES:-1}" --max-restarts="${MAX_RESTARTS:-3}" "${image[@]}" \
      --command="$job" ;;
  logs)
    run kubectl logs --follow --prefix --max-log-requests=64 \
      --selector="jobset.sigs.k8s.io/jobset-name=$WORKLOAD" ;;
  delete)
    run xpk workload delete "${where[@]}" --workload="$WORKLOAD" ;;
  *) echo "error: unknown command '$action'" >&2; usage ;;
esac
