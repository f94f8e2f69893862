#!/usr/bin/env bash
# One machine with one or more GPUs: the job as one process that drives all of them (default),
# or as one process per GPU joined by jax.distributed (NUM_PROCESSES=N, through
# launch/local_multiprocess.sh: the multi-process code path of a cluster, on one machine).
#
#   bash launch/gpu/single_node.sh [--dry-run] [--setup] CONFIG WORKDIR [FLAGS...]
#
#   --setup   first install the environment with CUDA (idempotent): launch/setup.sh, then
#             jax[JAX_CUDA] at the version of requirements.txt (JAX_CUDA default cuda12)
#
# Environment: NUM_PROCESSES (default 1), PYTHON (default python), XLA_PYTHON_CLIENT_MEM_FRACTION
# (default 0.90 of each GPU's memory for JAX). Rerunning the same command resumes from WORKDIR;
# SIGTERM (Ctrl-C too) makes the trainer checkpoint before it exits.
set -euo pipefail

# quote, run, require: shared with the other launch scripts.
# shellcheck source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

dry_run=0
setup=0
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --setup) setup=1 ;;
    -h | --help) usage ;;
    *) echo "error: unknown option $1" >&2; usage ;;
  esac
  shift
done
if [[ $# -lt 2 ]]; then
  echo "error: need CONFIG WORKDIR, e.g. configs/softvq_b64.py /data/runs/softvq_b64" >&2
  usage
fi
cd "$(dirname "$0")/../.."
python="${PYTHON:-python}"
num_processes="${NUM_PROCESSES:-1}"
if ! [[ "$num_processes" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NUM_PROCESSES must be a positive integer, got '$num_processes'" >&2
  exit 2
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
echo "softvq-jax: $num_processes process(es) on this machine's GPUs;" \
  "XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION"

if ((setup)); then
  jax_version="$(sed -n 's/^jax==//p' requirements.txt)"
  run bash launch/setup.sh
  run "$python" -m pip install --quiet "jax[${JAX_CUDA:-cuda12}]==$jax_version"
fi

if ((num_processes == 1)); then
  cmd=("$python" -m softvq_jax.main "--config=$1" "--workdir=$2" "${@:3}")
  if ((dry_run)); then
    run "${cmd[@]}"
  else
    echo "+ $(quote "${cmd[@]}")"
    exec "${cmd[@]}"
  fi
else
  flags=(--platform=gpu)
  if ((dry_run)); then
    flags+=(--dry-run)
  fi
  echo "+ $(quote bash launch/local_multiprocess.sh "${flags[@]}" "$num_processes" "$@")"
  exec bash launch/local_multiprocess.sh "${flags[@]}" "$num_processes" "$@"
fi
