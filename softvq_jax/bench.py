"""Throughput benchmarks: one JSON line per measurement, on whatever devices JAX sees.

  python -m softvq_jax.bench --what tokenizer --model softvq_b64 --batch 1,8,64 --dtype bfloat16
  python -m softvq_jax.bench --what sit --model SiT-XL --tokens 64 --channels 32 --batch 64
  python -m softvq_jax.bench --what pipeline --model softvq_b64 --steps 50 --cfg 1.5
  python -m softvq_jax.bench --what pipeline --model sdvae_f8 --steps 50 --cfg 1.5
  python -m softvq_jax.bench --what train --model SiT-XL --batch 32 --dtype bfloat16
  python -m softvq_jax.bench --what train --model softvq_b64 --batch 16 --dtype bfloat16
  python -m softvq_jax.bench --what memory --model SiT-XL --devices 256 --mesh fsdp=-1 --batch 256
  python -m softvq_jax.bench --what memory --model SiT-XL --topology v5e:16x16 --mesh fsdp=-1 --batch 256
  PYTHONPATH=.deps/cuda python -m softvq_jax.bench --what kernels --program encode --model softvq_b64 \
      --batch 64 --dtype bfloat16 --gpu_target h200

Protocol (the same for every measurement):
- Weights are random (no download); shapes are the released architectures'.
- The function is compiled ahead of time (``jit(...).lower(...).compile()``); its
  compile time is reported separately and the timed calls use that executable,
  so nothing recompiles. ``--warmup`` untimed calls, then ``--repeats`` timed
  calls, each ended by ``block_until_ready``; the median and spread are reported.
  Then ``--repeats`` calls are dispatched back to back and synchronised once
  (``*_pipelined`` fields): the steady state of a batch job, without the host
  round trip that a per-call sync adds to short programs. ``dispatch_s``: the median
  host time until a timed call returned, before its sync (argument handling and
  launch). Programs take their weights and train states as lists of arrays, as the
  ``Tokenizer``, ``Generator`` and training loop pass them.
- FLOPs per item are counted twice: analytically from the layer shapes (matmuls
  and attention, 2 FLOPs per multiply-add; what MFU conventionally counts) and by
  XLA's cost analysis of the whole program before the backend's passes (so GPU
  lines count the matmuls that become cuBLAS calls; it counts a loop body once,
  so it is omitted for sampling loops).
- The dense-matmul rate is measured in the same process, in the benchmark's
  dtype (``--matmul_size`` square operands), and every line reports achieved
  FLOP/s and its ratio to that rate (``fraction_of_matmul_rate``, from medians;
  ``..._best`` divides the fastest call's rate by the fastest matmul's, steadier
  on shared machines; ``..._paired``, on CPUs, is the median, over ``--repeats``
  more calls, of each call's rate over that of the matmul timed just before it, which
  a drift of the host's speed during the run moves less than the medians' quotient);
  ``mfu_nominal`` uses the chip's published dense peak where we know it.
- Generation pipeline: ``--steps`` Euler steps of the probability-flow ODE, all
  inside one compiled program, CFG (batch doubled) when ``--cfg`` > 1, then the
  tokenizer decoder (``--no-decode`` excludes it). A DiT ``--generator`` takes
  ``--steps`` deterministic DDIM steps instead, guided as the reference's
  ``forward_with_cfg``; as the ``--model`` of ``--what train`` a DiT trains on the
  diffusion loss. The 256-token baseline
  ``sdvae_f8`` is SiT-XL/2 on a 32x32x4 latent (the same matmuls as SiT-XL/1 on
  256 tokens of width 16) followed by a decoder with the SD-VAE layer shapes.
- Memory: ``program_memory_bytes``, what the compiled program needs per device (arguments,
  outputs, temporaries; the tokenizer line's is the larger of encode and decode), from
  XLA's memory analysis on every platform. ``process_peak_memory_bytes``: the device's
  high-water mark of the whole process so far (matmul and earlier lines included: JAX
  cannot reset it), where the platform reports one (GPUs, TPUs; null on CPUs).
- ``tiny: true`` (``--tiny``, tests of the benchmark itself): toy widths of the named
  architecture, and ``model``/``generator`` read ``tiny-NAME``.
- ``cudnn_attention_refused`` (only when not empty): the q shapes whose bfloat16
  attention cuDNN refused in the process, so that XLA's unfused attention ran.

``--what kernels`` times nothing: it compiles one of the programs above (``--program``)
for a GPU that need not be attached (``--gpu_target``: a bundled description or a
``GpuTargetConfig`` text file; needs the ``jax-cuda12-plugin``/``jax-cuda12-pjrt`` wheels
of the installed jax, which ``bash launch/setup.sh --dev`` puts in ``.deps/cuda``) and
reports the kernels XLA emitted (GEMM epilogues, fusions, bytes moved) and a roofline
estimate of their time (``hlo_kernels``), marked ``timed: false``. Every choice the models
make for GPUs (GELU epilogue, inference forms, compiler options) is made as on a GPU,
except that attention goes through XLA (cuDNN needs a device) and GEMMs through cuBLAS
(Triton GEMMs need autotuning on a device).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import statistics
import sys
import time
from typing import Any, Callable, Sequence

# Published dense bf16 and float32 (no TF32: what HIGHEST precision runs) peaks, FLOP/s,
# for mfu_nominal.
NOMINAL_PEAK = {
    ("NVIDIA H100 80GB HBM3", "bfloat16"): 989e12,
    ("NVIDIA H100 80GB HBM3", "float32"): 67e12,
    ("NVIDIA H200", "bfloat16"): 989e12,
    ("NVIDIA H200", "float32"): 67e12,
    ("NVIDIA A100-SXM4-80GB", "bfloat16"): 312e12,
    ("NVIDIA A100-SXM4-80GB", "float32"): 19.5e12,
    ("NVIDIA A100-SXM4-40GB", "bfloat16"): 312e12,
    ("NVIDIA A100-SXM4-40GB", "float32"): 19.5e12,
    ("TPU v4", "bfloat16"): 275e12,
    ("TPU v5 lite", "bfloat16"): 197e12,
    ("TPU v5e", "bfloat16"): 197e12,
    ("TPU v5p", "bfloat16"): 459e12,
    ("TPU v5", "bfloat16"): 459e12,  # the v5p's device_kind (the v5e's is "TPU v5 lite")
    ("TPU v6 lite", "bfloat16"): 918e12,
}

TOKENIZER_ALIASES = {
    "softvq_b64": "softvq-b-64", "softvq_bl64": "softvq-bl-64", "softvq_l64": "softvq-l-64",
    "softvq_b32": "softvq-b-32", "softvq_bl32": "softvq-bl-32", "softvq_l32": "softvq-l-32",
    "softvq_bl64_512": "softvq-bl-64-512", "softvq_l32_512": "softvq-l-32-512",
    "maetok_b128": "maetok-b-128", "maetok_b128_512": "maetok-b-128-512",
}
WHATS = ("tokenizer", "sit", "pipeline", "train", "memory", "matmul", "kernels")
KERNEL_PROGRAMS = ("encode", "decode", "sit", "pipeline", "train")
# GPU descriptions bundled for --what kernels (softvq_jax/gpu_targets/NAME.txtpb).
GPU_TARGETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets")
# Roofline assumptions of --what kernels, as fractions of the target's memory bandwidth and
# published dense peak: what the H200 profiles of 2026-11-26 reached (cuBLAS GEMMs about
# 730 of 989 TFLOP/s, streaming XLA fusions about 4.0 of 4.8 TB/s).
ASSUMED_BANDWIDTH_FRACTION = 0.83
ASSUMED_GEMM_FRACTION = 0.74

# ``--suite NAME``: the measurements behind the README table, most important first
# (a suite that runs out of time has still written its first lines to --out).
SUITES = {
    "accelerator": [
        "--what tokenizer --model softvq_b64 --batch 1,8,64 --dtype bfloat16",
        "--what train --model SiT-XL --batch 64 --dtype bfloat16 --repeats 5",
        "--what pipeline --model softvq_b64 --batch 64 --steps 50 --cfg 1.5 --dtype bfloat16 --repeats 3",
        "--what pipeline --model sdvae_f8 --batch 64 --steps 50 --cfg 1.5 --dtype bfloat16 --repeats 3",
        "--what sit --model SiT-XL --batch 64 --dtype bfloat16",
        "--what sit --model SiT-XL --tokens 256 --channels 16 --batch 64 --dtype bfloat16",
        "--what train --model softvq_b64 --batch 32 --dtype bfloat16 --repeats 5",
        "--what train --model softvq_b64 --batch 8 --dtype bfloat16 --objective full --repeats 3",
        "--what pipeline --model softvq_b64 --batch 64 --steps 50 --cfg 1.5 --dtype bfloat16 --repeats 3 --no-decode",
        "--what pipeline --model sdvae_f8 --batch 64 --steps 50 --cfg 1.5 --dtype bfloat16 --repeats 3 --no-decode",
        "--what tokenizer --model softvq_b64 --batch 64 --dtype bfloat16 --attention xla",
        "--what tokenizer --model softvq_b64 --batch 64 --dtype bfloat16 --attention einsum",
        # Opt-in, another function: the tanh GELU folded into fc1's epilogue.
        "--what tokenizer --model softvq_b64 --batch 64 --dtype bfloat16 --inference_gelu tanh",
        "--what tokenizer --model softvq_l64 --batch 64 --dtype bfloat16",
        "--what tokenizer --model softvq_bl64_512 --batch 8,64 --dtype bfloat16",
        "--what tokenizer --model softvq_b64 --batch 8 --dtype float32 --repeats 5",
        "--what train --model maetok_b128 --batch 8 --dtype bfloat16 --objective full --repeats 3",
    ],
    # Issue deliverable 1: every released tokenizer, both dtypes, batch 1/8/64.
    "tokenizers": [
        f"--what tokenizer --model {name} --batch 1,8,64 --dtype {dtype} --repeats 5 --warmup 1"
        for dtype in ("bfloat16", "float32") for name in TOKENIZER_ALIASES
    ],
    "cpu": [
        "--what tokenizer --model softvq_b64 --batch 8 --dtype float32 --repeats 3 --warmup 1",
        "--what sit --model SiT-XL --batch 8 --dtype float32 --repeats 3 --warmup 1",
    ],
}


def _bundled_targets() -> list[str]:
  if not os.path.isdir(GPU_TARGETS_DIR):
    return []
  return sorted(f[:-len(".txtpb")] for f in os.listdir(GPU_TARGETS_DIR) if f.endswith(".txtpb"))


# The measurements that read each model flag (kernels: those of its --program).
_TRAINING = ("train", "memory")
FLAG_SCOPE = {
    "--tokens": ("sit",) + _TRAINING, "--channels": ("sit",) + _TRAINING,
    "--size": ("tokenizer", "pipeline") + _TRAINING,
    "--steps": ("pipeline",), "--cfg": ("pipeline",), "--no-decode": ("pipeline",),
    "--generator": ("pipeline",),
    **{flag: _TRAINING for flag in ("--objective", "--scan", "--remat", "--residual_dtype",
                                    "--mesh", "--sharding")},
}

# Flags a --suite run hands on to each entry; every other flag belongs to the entries.
SUITE_FLAGS = ("--suite", "--out", "--tiny", "--profile", "--attention", "--gelu", "--adaln",
               "--inference_forms", "--inference_gelu")


def out_folder_missing(out: str) -> bool:
  """Whether ``--out`` names a file in a folder that does not exist."""
  return bool(out) and not os.path.isdir(os.path.dirname(os.path.abspath(out)))


def emit(line: dict[str, Any], out: str) -> None:
  """Prints one JSON line and, given ``out``, appends it there."""
  text = json.dumps(line, sort_keys=True)
  print(text, flush=True)
  if out:
    with open(out, "a") as f:
      f.write(text + "\n")


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  from softvq_jax import parallel  # pylint: disable=g-import-not-at-top
  from softvq_jax.models.layers import ATTENTION_IMPLEMENTATIONS  # pylint: disable=g-import-not-at-top
  from softvq_jax.models.sit import REMAT_POLICIES  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="python -m softvq_jax.bench", description=__doc__.split("\n")[0])
  p.add_argument("--what", choices=WHATS)
  p.add_argument("--suite", choices=sorted(SUITES), help="run a declared list of measurements")
  p.add_argument("--model", default=None,
                 help="tokenizer (softvq_b64, softvq-l-32-512, tiny, ...), generator preset "
                      "(SiT-XL, DiT-XL, ...) or sdvae_f8 for the 256-token pipeline baseline")
  p.add_argument("--batch", default="8", help="comma-separated batch sizes")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--size", type=int, default=0, help="image size override (tokenizer, pipeline; train/memory of a tokenizer)")
  p.add_argument("--tokens", type=int, default=64, help="generator tokens (sit; train/memory of a generator)")
  p.add_argument("--channels", type=int, default=32, help="generator token width (sit; train/memory of a generator)")
  p.add_argument("--generator", default="SiT-XL", help="generator of the pipeline (--what sit/train/memory take theirs in --model)")
  p.add_argument("--steps", type=int, default=50, help="sampler steps (pipeline)")
  p.add_argument("--cfg", type=float, default=1.0, help="CFG scale (pipeline); > 1 doubles the batch")
  p.add_argument("--no-decode", dest="decode", action="store_false",
                 help="pipeline without the tokenizer decoder")
  p.add_argument("--attention", default=None, choices=ATTENTION_IMPLEMENTATIONS,
                 help="auto | cudnn | xla | einsum | pallas (bf16 only; auto on GPUs: the "
                      "packed short-sequence kernels up to 128 tokens, cuDNN beyond; pallas: "
                      "those kernels on any backend, elsewhere auto)")
  p.add_argument("--gelu", default=None, choices=("auto", "epilogue", "float32"),
                 help="how the bf16 tanh GELU of SiT/DiT runs (epilogue: fused into the matmul "
                      "by cuBLASLt on GPUs)")
  p.add_argument("--adaln", default=None, choices=("auto", "pallas", "xla"),
                 help="how the adaLN norm of SiT/DiT blocks and the ViT blocks' LayerNorms "
                      "run (auto: the fused kernels on GPUs for bf16 compute, the ViTs' in "
                      "inference only; pallas: the kernels everywhere, ViT training included; "
                      "xla: XLA's fusions)")
  p.add_argument("--inference_forms", default=None, choices=("auto", "always", "never"),
                 help="where the inference-only matmul forms apply (separate q/k/v matmuls, "
                      "LayerScale folded into the matmul; auto: bf16 on GPUs)")
  p.add_argument("--inference_gelu", default=None, choices=("exact", "tanh"),
                 help="the tokenizers' GELU in bf16 inference (tanh: the tanh approximation, "
                      "fused into the matmul on GPUs; changes the function; default exact)")
  p.add_argument("--mesh", default="data=-1", help="train/memory: e.g. data=-1 or data=2,fsdp=-1")
  p.add_argument("--sharding", default="", choices=("",) + tuple(parallel.PRESETS),
                 help="train/memory: dp | fsdp (default: fsdp if the mesh has an fsdp axis)")
  p.add_argument("--objective", default="simple", choices=("simple", "full"),
                 help="tokenizer train/memory: 'simple' (MSE + entropy) or 'full' (the stage-1 "
                      "trainer's step: LPIPS, DINO discriminator, REPA)")
  p.add_argument("--scan", action="store_true", help="SiT train/memory: scan over layers")
  p.add_argument("--remat", default="none", choices=sorted(REMAT_POLICIES),
                 help="SiT train/memory: remat policy")
  p.add_argument("--residual_dtype", default="float32", choices=("float32", "bfloat16"),
                 help="SiT train/memory: dtype of the residual stream between blocks")
  p.add_argument("--devices", type=int, default=0,
                 help="memory: compile for this many fake CPU devices (ahead of time, nothing runs)")
  p.add_argument("--topology", default="",
                 help="memory: compile for this TPU topology instead (libtpu's names, e.g. "
                      "v5e:16x16 or v4:4x4x4; needs the libtpu package, not a TPU)")
  p.add_argument("--program", default=None, choices=KERNEL_PROGRAMS,
                 help="kernels: which program to compile (the one --what tokenizer (encode, "
                      "decode), sit, pipeline or train times; default encode)")
  p.add_argument("--gpu_target", default=None,
                 help="kernels: a bundled GPU description (" + ", ".join(_bundled_targets())
                      + "; default h200) or the path of a GpuTargetConfig text file")
  p.add_argument("--assume_bandwidth", type=float, default=0.0,
                 help="kernels: bytes/s for the estimate (default: "
                      f"{ASSUMED_BANDWIDTH_FRACTION} of the target's memory bandwidth)")
  p.add_argument("--assume_gemm_rate", type=float, default=0.0,
                 help="kernels: GEMM FLOP/s for the estimate (default: "
                      f"{ASSUMED_GEMM_FRACTION} of the target's published peak for --dtype)")
  p.add_argument("--hbm_gib", type=float, default=None, help="memory: the chip's HBM to compare "
                 "with (default: the topology's chip, else 16)")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--matmul_size", type=int, default=0, help="0: 2048 on CPU, 8192 on accelerators")
  p.add_argument("--out", default="", help="also append the JSON lines to this file")
  p.add_argument("--profile", default="", help="trace each timed program into this folder and "
                 "add a per-kernel table (device time by category, top kernels) to its line")
  p.add_argument("--tiny", action="store_true", help="tiny models (tests of the benchmark itself)")
  args = p.parse_args(argv)
  if (args.what is None) == (args.suite is None):
    p.error("give exactly one of --what and --suite")
  given = {a.split("=")[0] for a in argv if a.startswith("--")}  # the flags typed
  if args.suite:
    # The entries set their own models, batches and repeats: a flag here would be ignored.
    ignored = sorted(given - set(SUITE_FLAGS))
    if ignored:
      p.error(f"{', '.join(ignored)}: not with --suite (each entry sets its own); --suite "
              f"takes {', '.join(SUITE_FLAGS[1:])}")
  if args.matmul_size < 0:
    p.error(f"--matmul_size must be >= 0 (0: the platform's default), got {args.matmul_size}")
  if out_folder_missing(args.out):
    # Checked now, not after the minutes of measuring that would be written there.
    p.error(f"--out {args.out}: its folder does not exist")
  kernel_flags = [f"--{name}" for name in ("program", "gpu_target", "assume_bandwidth",
                                            "assume_gemm_rate") if getattr(args, name)]
  if args.what != "kernels" and kernel_flags:
    p.error(f"{', '.join(kernel_flags)}: only for --what kernels")
  if args.what == "kernels":
    args.program = args.program or "encode"
    args.gpu_target = args.gpu_target or "h200"
  if args.what:
    # A flag the measurement does not read would be taken for part of it.
    what = {"encode": "tokenizer", "decode": "tokenizer"}.get(args.program, args.program) \
        if args.what == "kernels" else args.what
    unused = sorted(flag for flag, whats in FLAG_SCOPE.items()
                    if flag in given and what not in whats)
    if unused:
      p.error(f"{', '.join(unused)}: not read by --what {args.what}"
              + (f" --program {args.program}" if args.what == "kernels" else ""))
  if args.model is None:
    sit = args.what == "sit" or (args.what == "kernels" and args.program == "sit")
    args.model = "SiT-XL" if sit else "softvq_b64"
  if args.what in _TRAINING:
    # train and memory read the flags of the model kind they are given.
    generator = args.model.startswith(("SiT", "DiT"))
    unread = sorted(f for f in (("--size",) if generator else ("--tokens", "--channels"))
                    if f in given)
    if unread:
      p.error(f"{', '.join(unread)}: not read for --model {args.model} (a "
              f"{'generator' if generator else 'tokenizer'}) by --what {args.what}")
  try:
    args.batches = [int(b) for b in args.batch.split(",")]
  except ValueError:
    p.error(f"--batch must be comma-separated integers, got {args.batch!r}")
  if any(b <= 0 for b in args.batches):
    p.error("--batch sizes must be positive")
  for flag, value in (("--steps", args.steps), ("--repeats", args.repeats)):
    if value <= 0:
      p.error(f"{flag} must be positive, got {value}")
  if args.warmup < 0:
    p.error(f"--warmup must be >= 0, got {args.warmup}")
  if args.cfg < 0:
    p.error(f"--cfg must be >= 0 (a CFG scale; 1 or less runs without guidance), got {args.cfg}")
  if args.what == "memory" and args.devices <= 0 and not args.topology:
    p.error("--what memory needs --devices N (the fake device count to compile for) or "
            "--topology NAME")
  if args.what != "memory" and (args.devices or args.topology):
    p.error("--devices and --topology are only for --what memory")
  if args.topology and args.devices:
    p.error("give one of --devices (fake CPU devices) and --topology (a TPU topology)")
  return args


# ----------------------------------------------------------------------------- timing
@dataclasses.dataclass
class Timing:
  compile_s: float
  times: list[float]
  xla_flops: float | None
  memory: dict[str, int]
  outputs: Any = None
  profile: dict[str, Any] | None = None
  # ``repeats`` calls dispatched back to back with one sync at the end, per call:
  # what a batch job sees, with no host round trip between calls.
  pipelined_s: float | None = None
  # Median host time until a call returned (before the sync): argument handling and launch,
  # during which the device has not started that call.
  dispatch_s: float | None = None
  # Seconds of (reference matmul, this program) timed back to back, ``repeats`` pairs: the
  # ratio of each pair is taken at one moment, so a host whose speed drifts during the run
  # moves both terms alike.
  pairs: list[tuple[float, float]] | None = None

  @property
  def median_s(self) -> float:
    return statistics.median(self.times)

  def summary(self) -> dict[str, Any]:
    ts = sorted(self.times)
    # Interpolated quartiles: indexing the sorted times gave the maximum for 2-4 repeats.
    q1, _, q3 = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else ts * 3
    out = dict(compile_s=round(self.compile_s, 3), median_s=self.median_s, min_s=ts[0],
               max_s=ts[-1], iqr_s=q3 - q1, repeats=len(ts),
               program_memory_bytes=self.memory.get("per_device_total_bytes"),
               pipelined_s_per_call=self.pipelined_s, dispatch_s=self.dispatch_s)
    if self.pairs:
      out["paired_median_s"] = statistics.median(t for _, t in self.pairs)
    if self.profile is not None:
      out["profile"] = self.profile
    return out


def _cost_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def _memory(compiled) -> dict[str, int]:
  from softvq_jax.train.state import compiled_memory  # pylint: disable=g-import-not-at-top
  return compiled_memory(compiled)


def _compile(lowerable, args: tuple):
  """``(executable, seconds, XLA's FLOPs)``: ahead-of-time compilation of a jitted function
  for ``args``. The FLOPs are counted on the whole program before the backend's passes: a
  compiled GPU program's count leaves out the cuBLAS and cuDNN calls, and a partitioned
  program's counts one device's share."""
  t0 = time.perf_counter()
  lowered = lowerable.lower(*args)
  flops = _cost_flops(lowered)
  compiled = lowered.compile()
  return compiled, time.perf_counter() - t0, flops


# ``--profile DIR``: every measure() also traces a few calls into its own folder under DIR.
_profile_root: str | None = None
_profile_count = 0
# Set by matmul_rate: one synchronised call of the reference matmul, returning its seconds.
# measure() times it against every program (``Timing.pairs``).
_reference_call: Callable[[], float] | None = None


def measure(fn: Callable, args: tuple, *, repeats: int, warmup: int, carry: bool = False,
            jit: bool = True, compiler_options: dict[str, str] | None = None) -> Timing:
  """Compiles ``fn`` for ``args`` once, then times ``repeats`` calls.

  ``jit=True``: the program takes ``args`` as one list of arrays, as the ``Tokenizer``
  and ``Generator`` programs take their weights (no pytree of NNX variables to flatten
  per call). ``jit=False``: ``fn`` is already jitted (its own shardings and donation) and
  is called with ``args`` as given; ``carry``: it returns ``(new_args[0], ...)`` to feed
  the next call (a train step with a donated state). ``Timing.outputs`` holds the last
  call's outputs. With ``--profile``, three more calls run under the profiler after the
  timed ones.
  """
  import jax  # pylint: disable=g-import-not-at-top
  global _profile_count
  if jit:
    leaves, treedef = jax.tree.flatten(args)
    on_leaves = lambda leaves: fn(*jax.tree.unflatten(treedef, leaves))
    lowerable, args = jax.jit(on_leaves, compiler_options=compiler_options), (leaves,)
  else:
    lowerable = fn
  compiled, compile_s, xla_flops = _compile(lowerable, args)
  times, dispatch_times, out = [], [], None

  def dispatch():
    nonlocal args, out
    out = compiled(*args)
    if carry:
      args = (out[0],) + tuple(args[1:])
    return out

  def run_once():
    return jax.block_until_ready(dispatch())

  for i in range(warmup + repeats):
    t0 = time.perf_counter()
    result = dispatch()
    t1 = time.perf_counter()
    jax.block_until_ready(result)
    if i >= warmup:
      times.append(time.perf_counter() - t0)
      dispatch_times.append(t1 - t0)
  t0 = time.perf_counter()
  for _ in range(repeats):
    dispatch()
  jax.block_until_ready(out)
  pipelined_s = (time.perf_counter() - t0) / repeats
  pairs = None
  if _reference_call is not None:
    pairs = []
    for _ in range(repeats):
      reference_s = _reference_call()
      t0 = time.perf_counter()
      run_once()
      pairs.append((reference_s, time.perf_counter() - t0))
  timing = Timing(compile_s, times, xla_flops, _memory(compiled), out,
                  pipelined_s=pipelined_s, dispatch_s=statistics.median(dispatch_times),
                  pairs=pairs)
  if _profile_root is not None:
    from softvq_jax import kernel_profile  # pylint: disable=g-import-not-at-top
    _profile_count += 1
    logdir = os.path.join(_profile_root, f"{_profile_count:03d}")
    timing.profile = kernel_profile.trace_calls(run_once, logdir, calls=3,
                                                hlo_text=compiled.as_text())
    timing.outputs = out
  return timing


def _jnp_dtype(name: str):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def matmul_rate(dtype: str, size: int, repeats: int, *, paired: bool = False) -> dict[str, Any]:
  """Dense square matmul FLOP/s in ``dtype`` (float32 at HIGHEST precision: no TF32).

  ``paired``: keeps the matmul for ``measure()`` to time against every program (its
  operands stay allocated, which on an accelerator would raise the peak memory lines report).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  dt = _jnp_dtype(dtype)
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (size, size), dt)
  b = jax.random.normal(kb, (size, size), dt)
  precision = jax.lax.Precision.HIGHEST if dtype == "float32" else None
  global _reference_call
  _reference_call = None  # the matmul is not paired with itself
  product = lambda x, y: jnp.dot(x, y, precision=precision)
  timing = measure(product, (a, b), repeats=max(repeats, 5), warmup=2)
  flops = 2.0 * size**3
  if paired:
    matmul = jax.jit(product).lower(a, b).compile()
    jax.block_until_ready(matmul(a, b))

    def reference_call() -> float:
      # The median of three calls: one call of a CPU's 2048² matmul lasts tens of ms.
      seconds = []
      for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        seconds.append(time.perf_counter() - t0)
      return statistics.median(seconds)

    _reference_call = reference_call
  return dict(matmul_size=size, matmul_flops_per_s=flops / timing.median_s,
              matmul_best_flops_per_s=flops / min(timing.times))


# ------------------------------------------------------------------- analytic FLOPs
def transformer_flops(width: int, depth: int, tokens: int, mlp_ratio: float = 4.0) -> float:
  """Forward FLOPs of ``depth`` pre-norm blocks on ``tokens`` tokens (qkv, proj, MLP, attention)."""
  per_token = 2 * (4 + 2 * mlp_ratio) * width**2
  attention = 4 * tokens**2 * width
  return depth * (tokens * per_token + attention)


def tokenizer_flops(cfg) -> dict[str, float]:
  """Encode/decode forward FLOPs per image of a ``TokenizerConfig`` (matmuls + attention)."""
  enc, dec = cfg.encoder, cfg.decoder
  n_enc = (cfg.image_size // enc.patch_size) ** 2
  n_dec = (cfg.image_size // dec.patch_size) ** 2
  latents, dim = cfg.num_latent_tokens, cfg.codebook_embed_dim
  enc_tokens = n_enc + latents + 1
  dec_tokens = n_dec + latents + (1 if cfg.decoder_cls_token else 0)
  encode = (2 * n_enc * 3 * enc.patch_size**2 * enc.embed_dim
            + transformer_flops(enc.embed_dim, enc.depth, enc_tokens, enc.mlp_ratio)
            + 2 * latents * enc.embed_dim * dim)
  if cfg.bottleneck == "softvq":
    # logits against every code, then the soft mixture of the codes
    encode += 4 * latents * cfg.codebook_size * dim
  decode = (2 * latents * dim * dec.embed_dim
            + transformer_flops(dec.embed_dim, dec.depth, dec_tokens, dec.mlp_ratio)
            + to_pixel_flops(cfg))
  return dict(encode=float(encode), decode=float(decode))


def to_pixel_flops(cfg) -> float:
  """Forward FLOPs per image of the decoder's pixel head (``cfg.to_pixel``)."""
  dec = cfg.decoder
  grid = cfg.image_size // dec.patch_size
  tokens = grid**2
  if cfg.to_pixel == "conv":
    from softvq_jax.models.vit import _CONV_HEAD_CHANNELS  # pylint: disable=g-import-not-at-top
    widths = (dec.embed_dim,) + _CONV_HEAD_CHANNELS + (3,)
    flops = 2.0 * tokens * widths[0] * widths[1]  # the 1x1 conv on the patch grid
    for i, (cin, cout) in enumerate(zip(widths[1:-1], widths[2:]), start=1):
      flops += 2.0 * (grid * 2**i) ** 2 * 9 * cin * cout  # 3x3 conv after the i-th x2
    return flops
  if cfg.to_pixel == "siren":
    return 2.0 * tokens * (dec.embed_dim * 2 * dec.embed_dim + 2 * dec.embed_dim * cfg.image_size * 3)
  return 2.0 * tokens * dec.embed_dim * 3 * dec.patch_size**2


def generator_flops(cfg) -> float:
  """One SiT/DiT forward per item: embeddings, blocks, adaLN, final layer."""
  d, t = cfg.hidden_size, cfg.input_size
  blocks = transformer_flops(d, cfg.depth, t, cfg.mlp_ratio)
  adaln = cfg.depth * 2 * d * 6 * d + 2 * d * 2 * d
  embed = 2 * t * cfg.in_channels * d + 2 * (256 * d + d * d)
  final = 2 * t * d * cfg.out_channels
  return float(blocks + adaln + embed + final)


# ------------------------------------------------------------------------- models
def _tokenizer_config(name: str, size: int = 0, tiny: bool = False):
  """The tokenizer ``name`` at ``size`` (0: its own); ``tiny``: a tiny stand-in, once the
  name is known to be valid (a typo must not pass because ``--tiny`` ignores it)."""
  from softvq_jax.models.config import TokenizerConfig  # pylint: disable=g-import-not-at-top
  from softvq_jax.models.released import (  # pylint: disable=g-import-not-at-top
      RELEASED_MAETOK, RELEASED_TOKENIZERS)
  table = {**RELEASED_TOKENIZERS, **RELEASED_MAETOK}
  key = TOKENIZER_ALIASES.get(name, name)
  if name != "tiny" and key not in table:
    raise SystemExit(f"unknown tokenizer {name!r}; known: {sorted(TOKENIZER_ALIASES)} "
                     f"or {sorted(table)} or 'tiny'. {_MODEL_HINT}")
  entry = dict(table["softvq-b-64" if name == "tiny" else key])
  if tiny or name == "tiny":
    # The named architecture (bottleneck, RoPE, decoder kind) at toy widths and size.
    from softvq_jax.config_lib import TINY_VIT  # pylint: disable=g-import-not-at-top
    entry.update(image_size=32, num_latent_tokens=8, codebook_embed_dim=8,
                 encoder_kwargs=dict(TINY_VIT), decoder_kwargs=dict(TINY_VIT))
    if "codebook_size" in entry:
      entry["codebook_size"] = 64
  if size:
    entry["image_size"] = size
  from softvq_jax.models.config import ConfigError  # pylint: disable=g-import-not-at-top
  try:
    return TokenizerConfig.from_json_dict(entry)
  except ConfigError as e:
    raise SystemExit(f"tokenizer {name!r}" + (f" at --size {size}" if size else "") + f": {e}") from e


_MODEL_HINT = ("Generators (SiT-XL, DiT-XL, SiT-S, ...) go in --model for --what sit, train "
               "and memory, and in --generator for --what pipeline, whose --model is the "
               "tokenizer or sdvae_f8 (the 256-token baseline).")


def _generator_config(name: str, tokens: int, channels: int, tiny: bool):
  from softvq_jax.models.sit import GeneratorConfig  # pylint: disable=g-import-not-at-top
  from softvq_jax.models.config import ConfigError  # pylint: disable=g-import-not-at-top
  if name.split("-")[0] not in ("SiT", "DiT"):
    raise SystemExit(f"{name!r} is not a generator. {_MODEL_HINT}")
  preset = name if "/" in name else name + "/1"
  overrides = dict(input_size=tokens, in_channels=channels)
  if tiny:
    overrides.update(hidden_size=32, depth=2, num_heads=2)
  try:
    return GeneratorConfig.preset(preset, **overrides)
  except ConfigError as e:
    raise SystemExit(f"--model/--generator {name!r}: {e}") from e


def _split(module, dtype):
  """``(graphdef, state)`` of ``module`` as the ``Tokenizer``/``Generator`` inference
  classes run it: in the inference forms where they apply, with the weights cast to the
  compute ``dtype`` once (``dtype`` None: float32)."""
  from softvq_jax.models import layers  # pylint: disable=g-import-not-at-top
  return layers.split_for_inference(module, dtype)


def _device_info() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  return dict(device_kind=dev.device_kind, platform=dev.platform, device_count=jax.device_count(),
              process_count=jax.process_count(), jax_version=jax.__version__,
              xla_flags=os.environ.get("XLA_FLAGS", ""))


def _peak_memory() -> int | None:
  import jax  # pylint: disable=g-import-not-at-top
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _rates(line: dict[str, Any], flops_per_item: float, items: int, timing: Timing,
           matmul: dict[str, Any], dtype: str, prefix: str = "") -> None:
  # The same names for every kind (prefixed per program where a line has two): what an
  # item is says line["item"]; the kind's own names (img_per_s, ...) stay beside them.
  line[prefix + "items_per_s"] = items / timing.median_s
  line[prefix + "flops_per_item"] = flops_per_item
  achieved = flops_per_item * items / timing.median_s
  line[prefix + "achieved_flops_per_s"] = achieved
  line[prefix + "fraction_of_matmul_rate"] = achieved / matmul["matmul_flops_per_s"]
  # Fastest call over fastest matmul: on a shared machine both medians drift with the
  # neighbours' load, the best times much less.
  best = flops_per_item * items / min(timing.times)
  line[prefix + "fraction_of_matmul_rate_best"] = best / matmul["matmul_best_flops_per_s"]
  if timing.pairs:
    # Per pair, this program's rate over the matmul's just before it; the median of those.
    matmul_flops = 2.0 * matmul["matmul_size"]**3
    line[prefix + "fraction_of_matmul_rate_paired"] = statistics.median(
        flops_per_item * items / program_s / (matmul_flops / reference_s)
        for reference_s, program_s in timing.pairs)
  peak = _nominal_peak(line["device_kind"], dtype)
  if peak:
    line[prefix + "mfu_nominal"] = achieved / (peak * line["device_count"])
  if timing.pipelined_s:
    pipelined = flops_per_item * items / timing.pipelined_s
    line[prefix + "items_per_s_pipelined"] = items / timing.pipelined_s
    line[prefix + "fraction_of_matmul_rate_pipelined"] = pipelined / matmul["matmul_flops_per_s"]
    if peak:
      line[prefix + "mfu_nominal_pipelined"] = pipelined / (peak * line["device_count"])


# -------------------------------------------------------------------- benchmarks
def bench_tokenizer(args, matmul) -> list[dict[str, Any]]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from softvq_jax.models.layers import inference_compiler_options  # pylint: disable=g-import-not-at-top
  from softvq_jax.models.tokenizer import TokenizerModel  # pylint: disable=g-import-not-at-top
  cfg = _tokenizer_config(args.model, args.size, args.tiny)
  dtype = _jnp_dtype(args.dtype)
  graphdef, state = _split(TokenizerModel(cfg, rngs=nnx.Rngs(0),
                                          dtype=None if args.dtype == "float32" else dtype), dtype)
  flops = tokenizer_flops(cfg)
  options = inference_compiler_options()  # as the Tokenizer class compiles them
  lines = []
  for batch in args.batches:
    images = jax.random.uniform(jax.random.PRNGKey(1), (batch, cfg.image_size, cfg.image_size, 3),
                                jnp.float32, -1, 1)
    enc = measure(_encode_fn(graphdef), (state, images), repeats=args.repeats,
                  warmup=args.warmup, compiler_options=options)
    latents = enc.outputs
    dec = measure(_decode_fn(graphdef), (state, latents), repeats=args.repeats,
                  warmup=args.warmup, compiler_options=options)
    line = dict(what="tokenizer", model=args.model,
                dtype=args.dtype, batch=batch, image_size=cfg.image_size,
                latent_shape=[cfg.num_latent_tokens, cfg.codebook_embed_dim], **_device_info(),
                **matmul)
    line["compiler_options"] = options
    line["item"] = "image"
    line["encode_img_per_s"] = batch / enc.median_s
    line["decode_img_per_s"] = batch / dec.median_s
    line["encode_flops_per_img"] = flops["encode"]
    line["decode_flops_per_img"] = flops["decode"]
    for program, timing in (("encode", enc), ("decode", dec)):
      per_item = timing.xla_flops / batch if timing.xla_flops else None
      # Both names: the common one of every kind, and the tokenizer's earlier one.
      line[f"{program}_xla_flops_per_item"] = line[f"{program}_xla_flops_per_img"] = per_item
    line["encode"] = enc.summary()
    line["decode"] = dec.summary()
    _rates(line, flops["encode"], batch, enc, matmul, args.dtype, "encode_")
    _rates(line, flops["decode"], batch, dec, matmul, args.dtype, "decode_")
    line["program_memory_bytes"] = max((t.memory.get("per_device_total_bytes") or 0)
                                       for t in (enc, dec)) or None
    line["process_peak_memory_bytes"] = _peak_memory()
    lines.append(line)
  return lines


def bench_sit(args, matmul) -> list[dict[str, Any]]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from softvq_jax.models.layers import inference_compiler_options  # pylint: disable=g-import-not-at-top
  from softvq_jax.models.sit import SiT  # pylint: disable=g-import-not-at-top
  cfg = _generator_config(args.model, args.tokens, args.channels, args.tiny)
  dtype = None if args.dtype == "float32" else _jnp_dtype(args.dtype)
  graphdef, state = _split(SiT(cfg, rngs=nnx.Rngs(0), dtype=dtype), dtype)
  flops = generator_flops(cfg)
  options = inference_compiler_options()
  lines = []
  for batch in args.batches:
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, cfg.input_size, cfg.in_channels))
    t = jnp.full((batch,), 0.5, jnp.float32)
    y = jnp.zeros((batch,), jnp.int32)
    timing = measure(_forward_fn(graphdef), (state, x, t, y), repeats=args.repeats,
                     warmup=args.warmup, compiler_options=options)
    line = dict(what="sit", model=args.model, dtype=args.dtype, batch=batch,
                latent_shape=list(cfg.latent_shape), **_device_info(), **matmul)
    line["compiler_options"] = options
    line["item"] = "latent (one forward pass)"
    line["forward_items_per_s"] = batch / timing.median_s
    line["xla_flops_per_item"] = timing.xla_flops / batch if timing.xla_flops else None
    line.update(timing.summary())
    _rates(line, flops, batch, timing, matmul, args.dtype)
    line["process_peak_memory_bytes"] = _peak_memory()
    lines.append(line)
  return lines


def _pipeline_parts(args):
  """``(gen_cfg, decoder_fn(state, latents) -> images, decoder_state, decode_flops, name)``."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  dtype = None if args.dtype == "float32" else _jnp_dtype(args.dtype)
  if args.model == "sdvae_f8":
    from softvq_jax.models.sdvae_decoder import SDVAEDecoder  # pylint: disable=g-import-not-at-top
    size = args.size or 256
    grid = size // 8
    # SiT-XL/2 on (grid, grid, 4): 2x2 patches -> grid^2/4 tokens of width 16.
    tokens, width = (grid // 2) ** 2, 16
    gen_cfg = _generator_config(args.generator, tokens, width, args.tiny)
    decoder = (SDVAEDecoder(rngs=nnx.Rngs(1), dtype=dtype, ch=32, ch_mult=(1, 1, 1, 1))
               if args.tiny else SDVAEDecoder(rngs=nnx.Rngs(1), dtype=dtype))
    dgraph, dstate = _split(decoder, dtype)

    def decode(s, z):
      b = z.shape[0]
      half = grid // 2
      z = z.reshape(b, half, half, 2, 2, 4).transpose(0, 1, 3, 2, 4, 5).reshape(b, grid, grid, 4)
      return nnx.merge(dgraph, s)(z)
    return gen_cfg, decode, dstate, None, dict(image_size=size, latent_shape=[grid, grid, 4])
  from softvq_jax.models.tokenizer import TokenizerModel  # pylint: disable=g-import-not-at-top
  tok_cfg = _tokenizer_config(args.model, args.size, args.tiny)
  gen_cfg = _generator_config(args.generator, tok_cfg.num_latent_tokens,
                              tok_cfg.codebook_embed_dim, args.tiny)
  tgraph, tstate = _split(TokenizerModel(tok_cfg, rngs=nnx.Rngs(1), dtype=dtype), dtype)
  decode = lambda s, z: nnx.merge(tgraph, s).decode(z.astype(jnp.float32))
  return gen_cfg, decode, tstate, tokenizer_flops(tok_cfg)["decode"], dict(
      image_size=tok_cfg.image_size, latent_shape=[tok_cfg.num_latent_tokens,
                                                   tok_cfg.codebook_embed_dim])


def bench_pipeline(args, matmul) -> list[dict[str, Any]]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from softvq_jax.models.layers import inference_compiler_options  # pylint: disable=g-import-not-at-top
  from softvq_jax.models.sit import SiT  # pylint: disable=g-import-not-at-top
  gen_cfg, decode, dec_state, decode_flops, shapes = _pipeline_parts(args)
  dtype = None if args.dtype == "float32" else _jnp_dtype(args.dtype)
  ggraph, gstate = _split(SiT(gen_cfg, rngs=nnx.Rngs(0), dtype=dtype), dtype)
  guided = args.cfg > 1.0
  generate = _generate_fn(args, ggraph, gen_cfg, decode)

  if decode_flops is None and args.decode:
    decode_flops = _decoder_flops(decode, dec_state, gen_cfg)
  per_step = generator_flops(gen_cfg) * (2 if guided else 1)
  flops = args.steps * per_step + ((decode_flops or 0.0) if args.decode else 0.0)
  options = inference_compiler_options()
  lines = []
  for batch in args.batches:
    noise = jax.random.normal(jax.random.PRNGKey(1), (batch,) + gen_cfg.latent_shape)
    labels = jnp.arange(batch, dtype=jnp.int32) % gen_cfg.num_classes
    timing = measure(generate, (gstate, dec_state, noise, labels), repeats=args.repeats,
                     warmup=args.warmup, compiler_options=options)
    line = dict(what="pipeline", model=args.model, generator=args.generator, dtype=args.dtype,
                batch=batch, steps=args.steps, cfg=args.cfg, decode=args.decode,
                tokens=gen_cfg.input_size, **shapes, **_device_info(), **matmul)
    line["sampler"] = "ddim" if gen_cfg.kind == "dit" else "euler"
    line["compiler_options"] = options
    line["item"] = "image"
    line["img_per_s"] = batch / timing.median_s
    line["flops_per_img"] = flops
    line["decode_flops_per_img"] = decode_flops if args.decode else 0.0
    line["xla_flops_per_img"] = None  # XLA counts a loop body once: no count of N steps
    line["xla_flops_per_item"] = None
    line.update(timing.summary())
    _rates(line, flops, batch, timing, matmul, args.dtype)
    line["process_peak_memory_bytes"] = _peak_memory()
    lines.append(line)
  return lines


def _decoder_flops(decode, dec_state, gen_cfg) -> float:
  """FLOPs per image of the convolutional SD-VAE-shaped decoder: XLA's count of the program
  before backend passes. A compiled GPU program's count leaves out the convolutions, which
  become cuDNN calls (it gave 4.2 GFLOP for this decoder instead of 616)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  z = jax.ShapeDtypeStruct((1, gen_cfg.input_size, gen_cfg.in_channels), jnp.float32)
  return _cost_flops(jax.jit(decode).lower(dec_state, z)) or 0.0


def _encode_fn(graphdef):
  """``(state, images) -> latents``: the program ``Tokenizer.encode`` compiles."""
  from softvq_jax import tokenizer  # pylint: disable=g-import-not-at-top
  return functools.partial(tokenizer._encode_fn, graphdef)  # pylint: disable=protected-access


def _decode_fn(graphdef):
  """``(state, latents) -> images``: the program ``Tokenizer.decode`` compiles."""
  from softvq_jax import tokenizer  # pylint: disable=g-import-not-at-top
  return functools.partial(tokenizer._decode_fn, graphdef)  # pylint: disable=protected-access


def _forward_fn(graphdef):
  """``(state, x, t, y) -> output``: the program ``Generator``'s forward compiles."""
  from softvq_jax import generator  # pylint: disable=g-import-not-at-top
  return functools.partial(generator._forward_fn, graphdef)  # pylint: disable=protected-access


def _generate_fn(args, ggraph, gen_cfg, decode):
  """``generate(generator_state, decoder_state, noise, labels)``: the timed pipeline program."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from softvq_jax.transport import samplers  # pylint: disable=g-import-not-at-top

  def generate(gs, ds, noise, labels):
    model = nnx.merge(ggraph, gs)
    if gen_cfg.kind == "dit":
      latents = _dit_ddim(model, gen_cfg, noise, labels, args.steps, args.cfg)
    else:
      latents = samplers.euler_sampler(lambda x, t, y: model(x, t, y), noise, labels,
                                       num_steps=args.steps, cfg_scale=args.cfg,
                                       guided=args.cfg > 1.0, null_label=gen_cfg.null_label)
    return decode(ds, latents) if args.decode else latents
  return generate


def _dit_ddim(model, cfg, noise, labels, steps: int, cfg_scale: float):
  """DiT's deterministic DDIM on ``steps`` respaced steps of the recipe's cosine process, with
  the reference's forward_with_cfg guidance."""
  from softvq_jax.generator import dit_model_fn  # pylint: disable=g-import-not-at-top
  from softvq_jax.transport import diffusion as diffusion_lib  # pylint: disable=g-import-not-at-top
  diff = diffusion_lib.create_diffusion(f"ddim{steps}", "cosine", learn_sigma=cfg.learn_sigma)
  return diff.ddim_sample_loop(dit_model_fn(model, labels, cfg_scale, cfg_scale > 1.0), noise)


def _train_setup(args, batch: int, mesh):
  """``(step_fn, state, batch_arrays, flops_per_item)`` for the train/memory benchmarks.

  The step is the trainers' own: ``make_train_step`` with the SiT flow-matching
  loss, or, for a tokenizer, the stage-1 generator objective (MSE + entropy;
  LPIPS and the GAN terms need their frozen networks and are left out here).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from softvq_jax import parallel  # pylint: disable=g-import-not-at-top
  from softvq_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  dtype = None if args.dtype == "float32" else _jnp_dtype(args.dtype)
  strategy = args.sharding or ("fsdp" if "fsdp" in mesh.axis_names else "dp")
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, b1=0.9, b2=0.95))
  abstract = args.what in ("memory", "kernels")
  shards = int(np.prod([mesh.shape[a] for a in parallel.batch_axes(mesh)]))
  if batch % shards:
    raise SystemExit(f"--batch {batch} does not split over the {shards} batch shards of mesh "
                     f"{dict(mesh.shape)}")
  if args.objective == "full":
    if args.model.startswith(("SiT", "DiT")):
      raise SystemExit("--objective full is the tokenizer's stage-1 objective")
    return _stage1_setup(args, batch, mesh, strategy, abstract)
  if args.model.startswith(("SiT", "DiT")):
    from softvq_jax.models.sit import SiT  # pylint: disable=g-import-not-at-top
    from softvq_jax.transport.loss import sit_loss  # pylint: disable=g-import-not-at-top
    cfg = _generator_config(args.model, args.tokens, args.channels, args.tiny)
    model_fn = lambda rngs: SiT(cfg, rngs=rngs, dtype=dtype, scan_layers=args.scan,
                                remat_policy=args.remat, residual_dtype=args.residual_dtype)

    if cfg.kind == "dit":
      from softvq_jax.train import dit_trainer  # pylint: disable=g-import-not-at-top
      from softvq_jax.transport import diffusion as diffusion_lib  # pylint: disable=g-import-not-at-top
      loss_fn = dit_trainer.make_loss_fn(
          diffusion_lib.create_diffusion("", "cosine", learn_sigma=cfg.learn_sigma))
    else:
      def loss_fn(model, b, key, step):
        del step
        out = sit_loss(lambda x, t, y, k: model(x, t, y, drop_key=k), b["latent"], b["label"],
                       key)
        return jnp.mean(out["loss"]), {}
    data = {"latent": jax.ShapeDtypeStruct((batch,) + cfg.latent_shape, jnp.float32),
            "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
    flops = 3 * generator_flops(cfg)
  else:
    from softvq_jax.models.quantizers import entropy_loss  # pylint: disable=g-import-not-at-top
    from softvq_jax.models.tokenizer import TokenizerModel  # pylint: disable=g-import-not-at-top
    cfg = _tokenizer_config(args.model, args.size, args.tiny)
    model_fn = lambda rngs: TokenizerModel(cfg, rngs=rngs, dtype=dtype)

    def loss_fn(model, b, key, step):
      del key, step
      recon, enc = model(b["image"])
      loss = jnp.mean(jnp.square(recon - b["image"]))
      if enc.softvq is not None:
        loss = loss + 0.01 * entropy_loss(enc.softvq.logits, 0.01)
      return loss, {}
    size = cfg.image_size
    data = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)}
    f = tokenizer_flops(cfg)
    flops = 3 * (f["encode"] + f["decode"])
  batch_sharding = parallel.batch_sharding(mesh)
  if abstract:
    state, shardings = state_lib.abstract_train_state(model_fn, tx, mesh, seed=0,
                                                      strategy=strategy)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_fn(nnx.Rngs(0))))
    arrays = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=batch_sharding),
                          data)
  else:
    graphdef, state, shardings = state_lib.create_train_state(model_fn, tx, mesh, seed=0,
                                                              strategy=strategy)
    keys = jax.random.split(jax.random.PRNGKey(2), len(data))
    arrays = {}
    for k, (name, s) in zip(keys, sorted(data.items())):
      value = (jax.random.randint(k, s.shape, 0, 1000, s.dtype) if s.dtype == jnp.int32
               else jax.random.uniform(k, s.shape, s.dtype, -1, 1))
      arrays[name] = jax.device_put(value, batch_sharding)
  step = state_lib.make_train_step(graphdef, tx, loss_fn, ema_decay=0.9999,
                                   state_shardings=shardings, batch_sharding=batch_sharding)
  # Keep activations batch-sharded at block boundaries, as the trainers do.
  step = _ActivationSharded(step, mesh, strategy)
  return step, state, arrays, flops, strategy, ()


def _stage1_config(args, batch: int, strategy: str):
  """The stage-1 recipe of ``--model``: MAETok's settings (its batch and discriminator; the
  trainer has no mask modeling) for MAETok, the SoftVQ one otherwise."""
  from softvq_jax.config_lib import maetok_recipe, tokenizer_recipe  # pylint: disable=g-import-not-at-top
  from softvq_jax.models.released import RELEASED_MAETOK, RELEASED_TOKENIZERS  # pylint: disable=g-import-not-at-top
  name = TOKENIZER_ALIASES.get(args.model, args.model)
  if name not in RELEASED_MAETOK and name not in RELEASED_TOKENIZERS:
    raise SystemExit(f"--objective full needs a released tokenizer, not {args.model!r}; choose "
                     f"from {sorted(TOKENIZER_ALIASES)}")
  recipe = maetok_recipe if name in RELEASED_MAETOK else tokenizer_recipe
  config = recipe(name, "runlocal" if args.tiny else None)
  config.dtype, config.global_batch_size, config.sharding = args.dtype, batch, strategy
  if args.tiny:
    config.model.image_size = 32
    config.loss.disc_backbone.img_size = 32
    config.loss.repa_patch_size = 8
  return config


def _stage1_setup(args, batch: int, mesh, strategy: str, abstract: bool):
  """The tokenizer trainer's own stage-1 step (LPIPS, DINO discriminator, REPA where the
  recipe has it; random frozen networks of the recipe's sizes) for ``--objective full``,
  fed uint8 images as the trainer feeds it."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from softvq_jax import parallel  # pylint: disable=g-import-not-at-top
  from softvq_jax.train import stage1, tokenizer_trainer  # pylint: disable=g-import-not-at-top
  config = _stage1_config(args, batch, strategy)
  setup = tokenizer_trainer.build_stage1(config, total_steps=1000)
  rules = parallel.rules_from_config(config)
  shardings = setup.shardings(mesh, rules)
  replicated = jax.sharding.NamedSharding(parallel.auto_mesh(mesh), jax.sharding.PartitionSpec())
  frozen_shardings = jax.tree.map(lambda _: replicated, setup.frozen_states)
  step = stage1.make_stage1_step(
      setup.graphdef, setup.disc_graphdef, setup.frozen_graphs, setup.objective, tx=setup.tx,
      disc_tx=setup.disc_tx, ema_decay=0.9999, num_codebooks=setup.tok_config.num_codebooks,
      state_shardings=shardings, batch_sharding=parallel.batch_sharding(parallel.auto_mesh(mesh)),
      frozen_shardings=frozen_shardings)
  size = setup.tok_config.image_size
  batch_sharding = parallel.batch_sharding(parallel.auto_mesh(mesh))
  if abstract:
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         jax.eval_shape(setup.init), shardings)
    frozen = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          setup.frozen_states, frozen_shardings)
    arrays = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8,
                                            sharding=batch_sharding)}
  else:
    state = jax.jit(setup.init, out_shardings=shardings)()
    frozen = jax.device_put(setup.frozen_states, replicated)
    arrays = {"image": jax.device_put(jax.random.randint(
        jax.random.PRNGKey(2), (batch, size, size, 3), 0, 256, jnp.int32).astype(jnp.uint8),
                                      batch_sharding)}
  f = tokenizer_flops(setup.tok_config)
  flops = 3 * (f["encode"] + f["decode"])  # the tokenizer's own FLOPs; frozen nets not counted
  return _ActivationSharded(step, mesh, rules), state, arrays, flops, strategy, (frozen,)


class _ActivationSharded:
  """A jitted step traced under ``parallel.activation_sharding`` (``lower`` included)."""

  def __init__(self, step, mesh, strategy):
    self.step, self.mesh, self.strategy = step, mesh, strategy

  def lower(self, *args):
    from softvq_jax import parallel  # pylint: disable=g-import-not-at-top
    with parallel.activation_sharding(self.mesh, self.strategy):
      return self.step.lower(*args)


def _mesh(spec: str, devices=None):
  from softvq_jax import parallel  # pylint: disable=g-import-not-at-top
  axes = []
  for part in spec.split(","):
    name, _, size = part.partition("=")
    if name not in ("data", "fsdp") or not size.lstrip("-").isdigit():
      raise SystemExit(f"--mesh entries look like data=-1 or fsdp=4, got {part!r}")
    axes.append((name, int(size)))
  try:
    return parallel.create_mesh(axes, devices)
  except ValueError as e:
    raise SystemExit(f"--mesh {spec}: {e}") from e


# HBM per chip, GiB, by the device_kind JAX reports for each TPU generation.
TPU_HBM_GIB = {"TPU v4": 32.0, "TPU v5 lite": 16.0, "TPU v5": 95.0, "TPU v5p": 95.0,
               "TPU v6 lite": 32.0}


def _tpu_topology_devices(name: str) -> list:
  """Compile-only devices of a TPU topology, from libtpu on any machine (no TPU attached)."""
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise SystemExit("--topology needs the libtpu package (the version jax[tpu] pins; no TPU is "
                     "needed to compile for one)") from e
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return list(topologies.get_topology_desc(name, "tpu").devices)
  except Exception as e:  # pylint: disable=broad-except
    raise SystemExit(f"--topology {name!r}: {e}") from e


def bench_train(args, matmul) -> list[dict[str, Any]]:
  import jax  # pylint: disable=g-import-not-at-top
  mesh = _mesh(args.mesh)
  lines = []
  for batch in args.batches:
    step, state, arrays, flops, strategy, extra = _train_setup(args, batch, mesh)
    # As the training loop calls it: the state as its list of arrays (a LeafState).
    leaves = step.step.leaves_of(state)
    on_leaves = _ActivationSharded(step.step.jitted, step.mesh, step.strategy)
    timing = measure(on_leaves, (leaves, arrays, *extra), repeats=args.repeats,
                     warmup=args.warmup, carry=True, jit=False)
    metrics = timing.outputs[1]
    line = dict(what="train", model=args.model,
                objective=args.objective,
                dtype=args.dtype, batch=batch, mesh=dict(mesh.shape), sharding=strategy,
                scan=args.scan, remat=args.remat, residual_dtype=args.residual_dtype,
                **_device_info(), **matmul)
    line["item_shapes"] = _item_shapes(arrays)
    if args.objective == "full":
      # What MFU conventionally counts: the trained model. XLA's count has the rest too.
      line["model_flops_cover"] = ("the tokenizer only: not the frozen LPIPS, discriminator "
                                   "backbone and REPA teacher that xla_flops_per_item includes")
    line["item"] = "training example (its forward and backward pass)"
    line["steps_per_s"] = 1.0 / timing.median_s
    line["model_flops_per_item"] = flops
    line["xla_flops_per_item"] = timing.xla_flops / batch if timing.xla_flops else None
    line.update(timing.summary())
    _rates(line, flops, batch, timing, matmul, args.dtype)
    line["loss"] = float(metrics["loss"])
    line["process_peak_memory_bytes"] = _peak_memory()
    lines.append(line)
  return lines


def _item_shapes(arrays) -> dict[str, list[int]]:
  """The shape of one item of each input of a train step (the batch dimension dropped)."""
  return {name: list(a.shape[1:]) for name, a in sorted(arrays.items())}


def bench_memory(args) -> list[dict[str, Any]]:
  """Ahead-of-time compile of the train step for ``--devices`` fake CPU devices, or for the
  chips of a TPU ``--topology`` (libtpu's own compiler and memory accounting): memory per
  device."""
  devices = _tpu_topology_devices(args.topology) if args.topology else None
  mesh = _mesh(args.mesh, devices)
  kind = devices[0].device_kind if devices else "cpu (fake devices)"
  hbm_gib = args.hbm_gib or TPU_HBM_GIB.get(kind) or 16.0
  lines = []
  for batch in args.batches:
    step, state, arrays, _, strategy, extra = _train_setup(args, batch, mesh)
    compiled, compile_s, _ = _compile(step, (state, arrays, *extra))
    mem = _memory(compiled)
    line = dict(what="memory", model=args.model,
                objective=args.objective,
                dtype=args.dtype, batch=batch, mesh=dict(mesh.shape), sharding=strategy,
                scan=args.scan, remat=args.remat, residual_dtype=args.residual_dtype,
                devices=len(devices) if devices else args.devices,
                topology=args.topology or None, device_kind=kind, compile_s=compile_s,
                hbm_gib=hbm_gib, item_shapes=_item_shapes(arrays), **mem)
    total = mem.get("per_device_total_bytes")
    line["per_device_gib"] = total / 2**30 if total is not None else None
    line["fits"] = bool(total is not None and total < hbm_gib * 2**30)
    lines.append(line)
  return lines


def _gpu_target(spec: str) -> tuple[Any, str, dict[str, float]]:
  """``(device, target text, facts)`` for ``--gpu_target``: a compile-only GPU device from
  jax's CUDA plugin, which needs no GPU or driver."""
  import jax  # pylint: disable=g-import-not-at-top
  path = spec if os.path.isfile(spec) else os.path.join(GPU_TARGETS_DIR, f"{spec}.txtpb")
  if not os.path.isfile(path):
    raise SystemExit(f"--gpu_target {spec!r}: neither a file nor a bundled target "
                     f"({', '.join(_bundled_targets())})")
  with open(path) as f:
    text = f.read()
  try:
    import jax_plugins.xla_cuda12  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise SystemExit(
        f"--what kernels needs the jax-cuda12-plugin and jax-cuda12-pjrt wheels of jax "
        f"{jax.__version__} (no GPU needed): bash launch/setup.sh --dev installs them into "
        ".deps/cuda; run with PYTHONPATH=.deps/cuda") from e
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    device = topologies.get_topology_desc("gpu_target", "cuda", topology="1x1x1",
                                          target_config=text).devices[0]
  except Exception as e:  # pylint: disable=broad-except
    raise SystemExit(f"--gpu_target {spec!r}: {e}") from e
  bandwidth = re.search(r"memory_bandwidth:\s*(\d+)", text)
  name = re.search(r'device_description_str:\s*"([^"]*)"', text)
  return device, path, dict(memory_bandwidth=float(bandwidth.group(1)) if bandwidth else 0.0,
                            device_kind=name.group(1) if name else "")


def _nominal_peak(device_kind: str, dtype: str) -> float | None:
  """The published peak of the longest NOMINAL_PEAK name that ``device_kind`` starts with."""
  names = [k for k in NOMINAL_PEAK if k[1] == dtype and device_kind.startswith(k[0])]
  return NOMINAL_PEAK[max(names, key=lambda k: len(k[0]))] if names else None


def bench_kernels(args) -> list[dict[str, Any]]:
  """``--what kernels``: compile a benchmark program for ``--gpu_target`` and read its kernels."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from softvq_jax import hlo_kernels  # pylint: disable=g-import-not-at-top
  from softvq_jax.models import layers  # pylint: disable=g-import-not-at-top
  device, target_path, facts = _gpu_target(args.gpu_target)
  peak = _nominal_peak(facts["device_kind"], args.dtype)
  bandwidth = args.assume_bandwidth or ASSUMED_BANDWIDTH_FRACTION * facts["memory_bandwidth"]
  gemm_rate = args.assume_gemm_rate or (ASSUMED_GEMM_FRACTION * peak if peak else 0.0)
  if bandwidth <= 0 or gemm_rate <= 0:
    raise SystemExit(f"--gpu_target {args.gpu_target!r}: no memory_bandwidth or known peak for "
                     f"{facts['device_kind']!r} in {args.dtype}; give --assume_bandwidth and "
                     "--assume_gemm_rate")
  sharding = jax.sharding.SingleDeviceSharding(device)

  def on_target(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)

  dtype = None if args.dtype == "float32" else _jnp_dtype(args.dtype)
  lines = []
  with layers.compiling_for("gpu"):
    options = layers.inference_compiler_options()
    for batch in args.batches:
      shapes: dict[str, Any] = {}
      if args.program in ("encode", "decode"):
        from softvq_jax.models.tokenizer import TokenizerModel  # pylint: disable=g-import-not-at-top
        cfg = _tokenizer_config(args.model, args.size, args.tiny)
        graphdef, state = _split(TokenizerModel(cfg, rngs=nnx.Rngs(0), dtype=dtype), dtype)
        images = jax.ShapeDtypeStruct((batch, cfg.image_size, cfg.image_size, 3), jnp.float32)
        flops = tokenizer_flops(cfg)[args.program]
        shapes = dict(image_size=cfg.image_size,
                      latent_shape=[cfg.num_latent_tokens, cfg.codebook_embed_dim])
        if args.program == "encode":
          fn, fn_args = _encode_fn(graphdef), (state, images)
        else:
          latents = jax.eval_shape(_encode_fn(graphdef), state, images)
          fn, fn_args = _decode_fn(graphdef), (state, latents)
      elif args.program == "sit":
        from softvq_jax.models.sit import SiT  # pylint: disable=g-import-not-at-top
        cfg = _generator_config(args.model, args.tokens, args.channels, args.tiny)
        graphdef, state = _split(SiT(cfg, rngs=nnx.Rngs(0), dtype=dtype), dtype)
        fn = _forward_fn(graphdef)
        fn_args = (state, jax.ShapeDtypeStruct((batch,) + cfg.latent_shape, jnp.float32),
                   jax.ShapeDtypeStruct((batch,), jnp.float32),
                   jax.ShapeDtypeStruct((batch,), jnp.int32))
        flops, shapes = generator_flops(cfg), dict(latent_shape=list(cfg.latent_shape))
      elif args.program == "pipeline":
        from softvq_jax.models.sit import SiT  # pylint: disable=g-import-not-at-top
        gen_cfg, decode, dec_state, decode_flops, shapes = _pipeline_parts(args)
        if decode_flops is None and args.decode:
          decode_flops = _decoder_flops(decode, dec_state, gen_cfg)
        ggraph, gstate = _split(SiT(gen_cfg, rngs=nnx.Rngs(0), dtype=dtype), dtype)
        fn = _generate_fn(args, ggraph, gen_cfg, decode)
        fn_args = (gstate, dec_state, jax.ShapeDtypeStruct((batch,) + gen_cfg.latent_shape,
                                                           jnp.float32),
                   jax.ShapeDtypeStruct((batch,), jnp.int32))
        per_step = generator_flops(gen_cfg) * (2 if args.cfg > 1.0 else 1)
        flops = args.steps * per_step + ((decode_flops or 0.0) if args.decode else 0.0)
        shapes.update(steps=args.steps, cfg=args.cfg, decode=args.decode)
      else:
        mesh = _mesh(args.mesh, [device])
        step, state, arrays, flops, strategy, extra = _train_setup(args, batch, mesh)
        lowered = step.lower(state, arrays, *extra)
        shapes = dict(mesh=dict(mesh.shape), sharding=strategy, objective=args.objective,
                      scan=args.scan, remat=args.remat, residual_dtype=args.residual_dtype)
      if args.program != "train":
        lowered = jax.jit(fn, compiler_options=options).lower(*on_target(fn_args))
      t0 = time.perf_counter()
      hlo = lowered.compile().as_text()
      compile_s = time.perf_counter() - t0
      summary = hlo_kernels.estimate(hlo_kernels.kernels(hlo), bandwidth=bandwidth,
                                     gemm_flops_per_s=gemm_rate)
      line = dict(what="kernels", program=args.program,
                  model=args.model,
                  generator=args.generator if args.program == "pipeline" else None,
                  dtype=args.dtype, batch=batch, **shapes, timed=False,
                  gpu_target=args.gpu_target, device_kind=facts["device_kind"],
                  jax_version=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""),
                  compiler_options=options if args.program != "train" else None,
                  compile_s=compile_s, flops_per_item=flops, **summary)
      line["attention"] = "xla (cuDNN attention needs a device)"
      line["estimated_items_per_s"] = batch / summary["estimated_s"]
      if peak:
        line["estimated_mfu_nominal"] = flops * batch / summary["estimated_s"] / peak
      lines.append(line)
  return lines


def _kernel_choices() -> dict[str, tuple[Callable, Callable]]:
  """``(set, get)`` of the process-wide kernel choices the bench sets from its flags and
  records in every line, by flag name (``--attention`` ...)."""
  from softvq_jax.models import adaln, layers  # pylint: disable=g-import-not-at-top
  return {
      "attention": (layers.set_attention_implementation, layers.attention_implementation),
      "gelu": (layers.set_gelu_implementation, layers.gelu_implementation),
      "adaln": (adaln.set_adaln_implementation, adaln.adaln_implementation),
      "inference_forms": (layers.set_inference_forms, layers.inference_forms),
      "inference_gelu": (layers.set_inference_gelu, layers.inference_gelu),
  }


def run_suite(args) -> list[dict[str, Any]]:
  """Each entry of the suite in this process; a failing entry prints an error line and the rest go on."""
  lines = []
  extra = ((["--out", args.out] if args.out else []) + (["--tiny"] if args.tiny else [])
           + (["--profile", args.profile] if args.profile else []))
  for entry in SUITES[args.suite]:
    kernels = [a for name in _kernel_choices()
               if getattr(args, name)
               and f"--{name}" not in entry for a in (f"--{name}", getattr(args, name))]
    try:
      lines += main(entry.split() + extra + kernels)
    except Exception as e:  # pylint: disable=broad-except
      emit(dict(what="error", entry=entry, error=f"{type(e).__name__}: {e}"[:2000]), args.out)
  return lines


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  if args.suite:
    return run_suite(args)
  # XLA flags must be set before the first backend starts.
  if args.what == "memory" and args.devices:
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={args.devices}")
  if args.what == "kernels":
    # The GPU compiler runs here without a device: Triton GEMMs would need autotuning on one
    # (flags given by the user come later and win).
    os.environ["XLA_FLAGS"] = ("--xla_gpu_enable_triton_gemm=false "
                               + os.environ.get("XLA_FLAGS", "")).strip()
  import jax  # pylint: disable=g-import-not-at-top
  if args.what in ("memory", "kernels"):
    # Compile-only: the programs run nowhere, and the CPU backend is the host. A TPU topology
    # compiles through libtpu and a GPU target through jax's CUDA plugin without their
    # backends starting (the plugin then skips its driver check). The package has imported
    # jax already, so the JAX_PLATFORMS variable would come too late: set the config.
    jax.config.update("jax_platforms", "cpu")
  if args.what == "memory" and args.devices and jax.device_count() != args.devices:
    raise SystemExit(f"--devices {args.devices} needs a fresh process (JAX already has "
                     f"{jax.device_count()} devices)")
  from softvq_jax.models import layers  # pylint: disable=g-import-not-at-top
  # A flag left out means the environment's choice (SOFTVQ_ATTENTION...), also when a suite
  # runs several measurements in one process.
  choices = _kernel_choices()
  for name, (set_choice, _) in choices.items():
    set_choice(getattr(args, name))
  global _profile_root
  _profile_root = args.profile or None
  if args.what == "memory":
    lines = bench_memory(args)
  elif args.what == "kernels":
    lines = bench_kernels(args)
  else:
    platform = jax.devices()[0].platform
    if layers.attention_implementation() == "cudnn" and platform != "gpu":
      raise SystemExit(f"--attention cudnn needs an NVIDIA GPU; this process runs on {platform} "
                       "(auto and xla run everywhere)")
    on_cpu = platform == "cpu"
    size = args.matmul_size or (2048 if on_cpu else 8192)
    global _reference_call
    # Paired timings on CPUs, the shared hosts whose speed drifts within a run (and which
    # report no peak memory for the matmul's operands to distort).
    matmul = matmul_rate(args.dtype, size, args.repeats, paired=on_cpu)
    try:
      if args.what == "matmul":
        lines = [dict(what="matmul", dtype=args.dtype, **_device_info(), **matmul)]
      else:
        lines = {"tokenizer": bench_tokenizer, "sit": bench_sit, "pipeline": bench_pipeline,
                 "train": bench_train}[args.what](args, matmul)
    finally:
      _reference_call = None  # other users of measure() (the kernel sweep) time no pairs
  for line in lines:
    if args.tiny:
      # Every kind says so alike: a tiny line must never pass for the named model's.
      line["tiny"] = True
      for field in ("model", "generator"):
        if isinstance(line.get(field), str) and not line[field].startswith("tiny"):
          line[field] = f"tiny-{line[field]}"
    for name, (_, get_choice) in choices.items():
      line.setdefault(name, get_choice())
    refused = layers.refused_cudnn_attention_shapes()
    if refused:
      line["cudnn_attention_refused"] = [list(shape) for shape in refused]
    emit(line, args.out)
  return lines


if __name__ == "__main__":
  main()
