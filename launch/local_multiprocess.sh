#!/usr/bin/env bash
# Runs one job as N JAX processes on this machine, joined over a localhost coordinator: the same
# entry point and the same multi-process code paths as a pod or a cluster (tests use it on CPU).
#
#   bash launch/local_multiprocess.sh [--dry-run] [--platform=cpu|gpu] N CONFIG WORKDIR [FLAGS...]
#
#   --platform=cpu   each process gets DEVICES_PER_PROCESS (default 1) CPU devices
#   --platform=gpu   process i sees GPU i only (CUDA_VISIBLE_DEVICES=i)
#   FLAGS            more flags for softvq_jax.main, e.g. --config.total_steps=100
#
# Environment: COORDINATOR_PORT (default: a free port), PYTHON (default python),
# LOG_DIR (default WORKDIR/logs): processes 1..N-1 log there, process 0 to this terminal.
# SIGINT/SIGTERM are passed on to every process (the trainers checkpoint on SIGTERM); if one
# process fails the others are stopped. Rerunning the same command resumes from WORKDIR.
set -euo pipefail

# quote, run, require: shared with the other launch scripts.
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

dry_run=0
platform=cpu
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --platform=cpu | --platform=gpu) platform="${1#--platform=}" ;;
    -h | --help) usage ;;
    *) echo "error: unknown option $1" >&2; usage ;;
  esac
  shift
done
if [[ $# -lt 3 ]]; then
  echo "error: need N CONFIG WORKDIR (got $# argument(s))" >&2
  usage
fi
num_processes="$1" config="$2" workdir="$3"
shift 3
if ! [[ "$num_processes" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: N must be a positive integer, got '$num_processes'" >&2
  exit 2
fi

cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
port="${COORDINATOR_PORT:-}"
if [[ -z "$port" ]]; then
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')"
fi
if [[ "$workdir" == *://* ]]; then
  log_dir="${LOG_DIR:-logs}"
else
  log_dir="${LOG_DIR:-$workdir/logs}"
fi

# XLA_FLAGS without any device-count flag of the caller's: this script sets the count.
xla_flags=""
for flag in ${XLA_FLAGS:-}; do
  [[ "$flag" == --xla_force_host_platform_device_count=* ]] || xla_flags+="$flag "
done

build_command() {  # process index -> cmd (array)
  local env_vars=("JAX_COORDINATOR_ADDRESS=localhost:$port" "JAX_NUM_PROCESSES=$num_processes"
                  "JAX_PROCESS_ID=$1")
  if [[ "$platform" == cpu ]]; then
    env_vars+=("JAX_PLATFORMS=cpu"
               "XLA_FLAGS=${xla_flags}--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}")
  else
    env_vars+=("CUDA_VISIBLE_DEVICES=$1")
  fi
  cmd=(env "${env_vars[@]}" "$python" -m softvq_jax.main "--config=$config" "--workdir=$workdir"
       "${main_flags[@]}")
}

main_flags=("$@")
echo "softvq-jax: $num_processes process(es) on $platform, coordinator localhost:$port"
for ((i = 0; i < num_processes; i++)); do
  build_command "$i"
  if ((i == 0)); then
    echo "+ $(quote "${cmd[@]}")"
  else
    echo "+ $(quote "${cmd[@]}") > $log_dir/process_$i.log 2>&1"
  fi
done
if ((dry_run)); then
  exit 0
fi

mkdir -p "$log_dir"
pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
}
trap 'stop_all' INT TERM
for ((i = 0; i < num_processes; i++)); do
  build_command "$i"
  if ((i == 0)); then
    "${cmd[@]}" &
  else
    "${cmd[@]}" >"$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done

# Wait for all; the first failure stops the rest, and its exit status is ours.
status=0
remaining=("${pids[@]}")
while ((${#remaining[@]} > 0)); do
  code=0
  finished=""
  wait -n -p finished "${remaining[@]}" || code=$?
  if [[ -z "$finished" ]]; then  # a signal ended the wait (the trap passed it on): keep waiting
    continue
  fi
  left=()
  for pid in "${remaining[@]}"; do
    if [[ "$pid" != "$finished" ]]; then
      left+=("$pid")
    fi
  done
  remaining=("${left[@]}")
  if ((code != 0 && status == 0)); then
    status=$code
    echo "softvq-jax: a process exited with status $code; stopping the others" >&2
    stop_all
  fi
done
exit "$status"
