#!/usr/bin/env bash
# The GPU checks and measurements that are still open, most important first, within a
# time budget: what a short lease on one NVIDIA GPU should run. Each step appends its
# JSON lines to OUT_DIR/gpu.jsonl and its log to OUT_DIR/log.txt; a step that would start
# with less than a minute of the budget left is skipped and named in the log.
#
#   DEADLINE=540 bash benchmarks/gpu_checks.sh OUT_DIR
#
# DEADLINE: seconds for the whole script (default 540). What the steps measure and why
# is in benchmarks/README.md ("Open on a GPU").
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:?usage: DEADLINE=SECONDS bash benchmarks/gpu_checks.sh OUT_DIR}
mkdir -p "$out"
deadline=$(( SECONDS + ${DEADLINE:-540} ))
log="$out/log.txt"
results="$out/gpu.jsonl"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS_AT_MOST COMMAND...
  local name=$1 limit=$2
  shift 2
  local left=$(( deadline - SECONDS ))
  if (( left < 60 )); then
    echo "== $name: skipped, ${left}s left" | tee -a "$log"
    return
  fi
  if (( limit > left )); then
    limit=$left
  fi
  echo "== $name (at most ${limit}s)" | tee -a "$log"
  local start=$SECONDS
  local rc=0
  timeout "$limit" "$@" >>"$log" 2>&1 || rc=$?
  echo "== $name: rc $rc after $(( SECONDS - start ))s" | tee -a "$log"
}

bench() {  # bench NAME SECONDS_AT_MOST BENCH_ARGS...
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" python -m softvq_jax.bench --out "$results" "$@"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$log" 2>&1 || true
python -c "import jax; print(jax.__version__, jax.devices())" >>"$log" 2>&1 || true

# 1. The Pallas kernels against NumPy on this GPU (the suite skips them elsewhere).
step gpu-tests 150 env JAX_PLATFORMS=cuda python -m pytest -q -x -p no:cacheprovider \
  tests/test_short_attention.py tests/test_adaln.py tests/test_compute_casts.py -k gpu

# 2. SiT-XL training, the 0.45 MFU target. The default program has the linear biases in the
#    adaLN kernels since its last timing (estimated -2.5 ms per step).
bench sit-train 120 --what train --model SiT-XL --batch 256 --dtype bfloat16 --repeats 5

# 3. Tokenizer inference, the 0.60 MFU target, and the README rows that predate the float32
#    residual stream (estimated 4% slower).
bench tokenizer-b64 90 --what tokenizer --model softvq_b64 --batch 1,8,64 --dtype bfloat16

# 4. The ViT norm kernels in tokenizer training (opt-in until timed) against XLA's norms.
bench tok-train-xla 90 --what train --model softvq_b64 --batch 32 --dtype bfloat16 --repeats 5
bench tok-train-pallas 90 --what train --model softvq_b64 --batch 32 --dtype bfloat16 \
  --repeats 5 --adaln pallas

# 5. SiT-XL training: the bfloat16 residual option, then profiled with every GEMM as a Triton
#    fusion (which can take bias, GELU and casts) and with Triton GEMMs off (whether cuBLAS
#    took the bias and GELU as epilogues).
bench sit-train-bf16-residual 120 --what train --model SiT-XL --batch 256 --dtype bfloat16 \
  --repeats 5 --residual_dtype bfloat16
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_cublas_fallback=false" \
  bench sit-train-triton-gemms 150 --what train --model SiT-XL --batch 256 --dtype bfloat16 \
  --repeats 5 --profile "$out/profile_triton_gemms"
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" \
  bench sit-train-cublas-gemms 150 --what train --model SiT-XL --batch 256 --dtype bfloat16 \
  --repeats 5 --profile "$out/profile_cublas_gemms"

# 6. The kernels' tuning variants (short-attention tiles, late loads and warps; residual adaLN
#    backward rows, warps and programs), forward and backward at SiT-XL's training shape.
step kernel-sweep 150 python -m softvq_jax.kernel_sweep --out "$results"

# 7. SoftVQ-B-64 inference profiled with its exact GELU and with the opt-in tanh form.
bench tokenizer-b64-erf-profiled 90 --what tokenizer --model softvq_b64 --batch 64 \
  --dtype bfloat16 --profile "$out/profile_tokenizer_erf"
bench tokenizer-b64-tanh-profiled 90 --what tokenizer --model softvq_b64 --batch 64 \
  --dtype bfloat16 --inference_gelu tanh --profile "$out/profile_tokenizer_tanh"

# 8. The larger tokenizer, then the remaining released ones.
bench tokenizer-l64 90 --what tokenizer --model softvq_l64 --batch 64 --dtype bfloat16
bench tokenizers-all 300 --suite tokenizers
echo "== done, $(( deadline - SECONDS ))s of the budget left" | tee -a "$log"
