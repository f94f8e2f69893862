#!/usr/bin/env bash
# Installs everything softvq-jax needs on a fresh machine; safe to run again.
#   bash launch/setup.sh          # run the jobs
#   bash launch/setup.sh --dev    # also the test requirements
set -euo pipefail
cd "$(dirname "$0")/.."

requirements=requirements.txt
if [[ "${1:-}" == "--dev" ]]; then
  requirements=requirements-dev.txt
elif [[ -n "${1:-}" ]]; then
  echo "usage: bash launch/setup.sh [--dev]" >&2
  exit 2
fi

python -m pip install --quiet --disable-pip-version-check -r "$requirements"
python -m pip install --quiet --disable-pip-version-check --no-deps -e .
