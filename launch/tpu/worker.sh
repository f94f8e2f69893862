#!/usr/bin/env bash
# Runs on each TPU worker; launch/tpu/pod.sh calls it on all of them at once (ssh --worker=all).
#
#   bash launch/tpu/worker.sh setup                          # venv + requirements + jax[tpu]
#   bash launch/tpu/worker.sh start CONFIG WORKDIR [FLAGS...] # the job, in the background
#   bash launch/tpu/worker.sh logs                           # follow the job's log
#   bash launch/tpu/worker.sh stop                           # SIGTERM: checkpoint, then exit
#   bash launch/tpu/worker.sh exec CONFIG WORKDIR [FLAGS...]  # the job in the foreground (xpk)
#
# setup is idempotent (rerun it after changing the code or the requirements). The job joins the
# other workers through jax.distributed (SOFTVQ_JAX_DISTRIBUTED=1: JAX finds the TPU slice's
# coordinator itself). Environment: VENV (default ~/softvq-venv), LOG_DIR (default
# ~/softvq-jax-logs), PYTHON (the interpreter for a new venv; default the newest python3.1x).
set -euo pipefail
cd "$(dirname "$0")/../.."

# quote, run, require: shared with the other launch scripts.
# shellcheck source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

venv="${VENV:-$HOME/softvq-venv}"
log_dir="${LOG_DIR:-$HOME/softvq-jax-logs}"
log="$log_dir/job.log"
pid_file="$log_dir/job.pid"

running_pid() {  # prints the job's pid if it is alive
  if [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
    cat "$pid_file"
  fi
}

activate() {  # the venv of setup, if there is one (a container image may bring its own python)
  if [[ -f "$venv/bin/activate" ]]; then
    # shellcheck disable=SC1091  # created by setup
    source "$venv/bin/activate"
  fi
}

setup() {
  if [[ ! -x "$venv/bin/python" ]]; then
    local python="${PYTHON:-}"
    if [[ -z "$python" ]]; then
      for candidate in python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null; then
          python="$candidate"
          break
        fi
      done
    fi
    if [[ -z "$python" ]]; then  # Ubuntu 22.04 TPU images ship 3.10; the project needs >= 3.11
      sudo apt-get update -qq
      sudo apt-get install -y -qq python3.11 python3.11-venv
      python=python3.11
    fi
    "$python" -m venv "$venv"
  fi
  activate
  bash launch/setup.sh
  local jax_version
  jax_version="$(sed -n 's/^jax==//p' requirements.txt)"
  python -m pip install --quiet --disable-pip-version-check "jax[tpu]==$jax_version"
  python -c 'import jax, softvq_jax; print("softvq-jax", softvq_jax.__version__, "jax", jax.__version__)'
}

start() {
  if [[ $# -lt 2 ]]; then
    echo "error: start needs CONFIG WORKDIR" >&2
    exit 2
  fi
  local pid
  pid="$(running_pid)"
  if [[ -n "$pid" ]]; then
    echo "error: a job is already running on $(hostname) (pid $pid); stop it first" >&2
    exit 1
  fi
  activate
  mkdir -p "$log_dir"
  local cmd=(python -m softvq_jax.main "--config=$1" "--workdir=$2" "${@:3}")
  echo "+ SOFTVQ_JAX_DISTRIBUTED=1 $(quote "${cmd[@]}")" | tee -a "$log"
  SOFTVQ_JAX_DISTRIBUTED=1 nohup "${cmd[@]}" >>"$log" 2>&1 </dev/null &
  echo "$!" >"$pid_file"
  echo "started on $(hostname): pid $!, log $log"
}

exec_job() {
  if [[ $# -lt 2 ]]; then
    echo "error: exec needs CONFIG WORKDIR" >&2
    exit 2
  fi
  activate
  local cmd=(python -m softvq_jax.main "--config=$1" "--workdir=$2" "${@:3}")
  echo "+ SOFTVQ_JAX_DISTRIBUTED=1 $(quote "${cmd[@]}")"
  SOFTVQ_JAX_DISTRIBUTED=1 exec "${cmd[@]}"
}

stop() {
  local pid
  pid="$(running_pid)"
  if [[ -z "$pid" ]]; then
    echo "no job running on $(hostname)"
    return
  fi
  kill -TERM "$pid"
  echo "sent SIGTERM to pid $pid on $(hostname); waiting for its checkpoint"
  while kill -0 "$pid" 2>/dev/null; do
    sleep 2
  done
  echo "stopped"
}

case "${1:-}" in
  setup) setup ;;
  start) shift; start "$@" ;;
  exec) shift; exec_job "$@" ;;
  logs) exec tail -n +1 -F "$log" ;;
  stop) stop ;;
  *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
