"""Where the device time of a compiled program goes: a per-kernel table from a profiler trace.

``python -m softvq_jax.bench ... --profile DIR`` traces a few calls of each timed
program and adds the table to its JSON line; each top kernel that is an XLA
fusion says what it computes (``computes``: its main HLO ops, read from the
optimised HLO). The raw trace (``*.xplane.pb``, readable in TensorBoard's
profile plugin or xprof) and the optimised HLO stay in ``DIR``.

Read without TensorFlow or TensorBoard: ``jax.profiler.ProfileData`` parses the trace.
"""

from __future__ import annotations

import collections
import glob
import os
import time
from typing import Any, Callable

from softvq_jax import hlo_kernels

# Kernel-name fragments by category, first match wins (names lower-cased). cuBLAS/cuBLASLt
# GEMMs are "sm90_xmma_gemm...", "nvjet_..." or "cutlass..."; cuDNN's fused attention
# kernels carry "fmha"/"flash"/"cudnn"; XLA's own kernels are named after their fusion.
_CATEGORIES = (
    ("attention", ("fmha", "flash", "cudnn", "attention", "mha")),
    ("matmul", ("gemm", "xmma", "nvjet", "cutlass", "cublas", "dot", "convolution", "matmul",
                "ynn_")),
    ("copy", ("memcpy", "memset", "copy", "transpose", "dynamic-update-slice", "dynamic_update")),
    ("reduction", ("reduce", "reduction")),
    ("collective", ("all-reduce", "all_reduce", "all-gather", "all_gather", "reduce-scatter",
                    "nccl", "collective")),
    ("elementwise", ("fusion", "loop_", "convert", "add", "multiply", "select")),
)
# Host-side bookkeeping events of the CPU client's thread pools, not kernels.
_CPU_NOISE = ("ThreadpoolListener", "ThunkExecutor", "end: ")


def category(name: str) -> str:
  low = name.lower()
  for label, fragments in _CATEGORIES:
    if any(f in low for f in fragments):
      return label
  return "other"


def _kernel_lines(plane) -> list:
  """The lines of a device plane that hold kernels, without derived duplicate lines."""
  lines = list(plane.lines)
  streams = [l for l in lines if l.name.startswith("Stream")]
  if streams:  # GPU: one line per CUDA stream
    return streams
  ops = [l for l in lines if l.name == "XLA Ops"]
  return ops or lines  # TPU: the op timeline


def _events(data) -> tuple[list[tuple[str, str, float]], str]:
  """``[(kernel name, hlo op, seconds)]`` of every kernel in the trace, and the source kind."""
  devices = [p for p in data.planes if p.name.startswith("/device:")]
  out = []
  if devices:
    for plane in devices:
      for line in _kernel_lines(plane):
        for e in line.events:
          stats = dict(e.stats)
          op = stats.get("hlo_op") or stats.get("tf_op") or ""
          out.append((e.name, str(op), e.duration_ns * 1e-9))
    return out, "device"
  # CPU: XLA runs its kernels on the client's thread pools.
  for plane in data.planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      if "XLA" not in line.name:
        continue
      for e in line.events:
        if not e.name.startswith(_CPU_NOISE) and e.duration_ns > 0:
          out.append((e.name, e.name, e.duration_ns * 1e-9))
  return out, "host"


def fusion_contents(hlo_text: str, most: int = 5) -> dict[str, str]:
  """What each fusion of an optimised HLO module computes: ``"kLoop: multiply x6, tanh x1"``.

  Keys are the fusion names as written in the HLO (``fusion.12``) and as GPU kernels
  are named after them (``fusion_12``), so a profiled kernel can be looked up.
  """
  try:
    computations, _ = hlo_kernels.parse_module(hlo_text)
  except ValueError:  # not a whole module: nothing to name
    return {}
  out = {}
  for body in computations.values():
    for inst in body:
      if inst.opcode != "fusion":
        continue
      kind, called = hlo_kernels.fusion_kind_and_computation(inst)
      if kind is None or called is None:
        continue
      text = f"{kind}: " + hlo_kernels.fused_ops(computations.get(called, []), most)
      out[inst.name] = out[inst.name.replace(".", "_")] = text
  return out


def summarize(logdir: str, calls: int, wall_s: float, top: int = 25,
              hlo_text: str | None = None) -> dict[str, Any]:
  """Per-call kernel time by category and the ``top`` kernels of the newest trace in ``logdir``.

  ``wall_s``: the traced calls' total wall time; ``busy_fraction`` is the kernels'
  summed time over it (below 1: launch gaps, host work, or idle streams).
  """
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  paths = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"no *.xplane.pb trace under {logdir}")
  events, source = _events(ProfileData.from_file(paths[-1]))
  by_kernel: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
  by_category: dict[str, float] = collections.defaultdict(float)
  for name, op, seconds in events:
    entry = by_kernel[(name, op)]
    entry[0] += seconds
    entry[1] += 1
    by_category[category(name if source == "device" else op)] += seconds
  total = sum(by_category.values())
  ranked = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:top]
  contents = fusion_contents(hlo_text) if hlo_text else {}
  return dict(
      source=source, trace=os.path.relpath(paths[-1], logdir), calls=calls,
      kernel_s_per_call=total / calls, wall_s_per_call=wall_s / calls,
      busy_fraction=total / wall_s if wall_s > 0 else None,
      kernels_per_call=len(events) / calls,
      by_category={k: dict(s_per_call=v / calls, share=v / total if total else 0.0)
                   for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
      top=[dict(kernel=name[:160], hlo_op=op[:120], category=category(name),
                computes=contents.get(name) or contents.get(op),
                s_per_call=v[0] / calls, launches_per_call=v[1] / calls,
                share=v[0] / total if total else 0.0)
           for (name, op), v in ranked])


def trace_calls(run_once: Callable[[], Any], logdir: str, calls: int = 3,
                hlo_text: str | None = None) -> dict[str, Any]:
  """Runs ``run_once()`` ``calls`` times under the profiler and summarises the kernels.

  ``run_once`` calls an already compiled program (the trace should hold runs, not
  compilation) and returns its outputs. ``hlo_text``, when given, is written next
  to the trace as ``optimized_hlo.txt``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  os.makedirs(logdir, exist_ok=True)
  if hlo_text is not None:
    with open(os.path.join(logdir, "optimized_hlo.txt"), "w") as f:
      f.write(hlo_text)
  with jax.profiler.trace(logdir):
    t0 = time.perf_counter()
    for _ in range(calls):
      jax.block_until_ready(run_once())
    wall = time.perf_counter() - t0
  return summarize(logdir, calls, wall, hlo_text=hlo_text)
