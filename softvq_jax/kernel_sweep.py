"""Times the tuning variants of the Pallas GPU kernels at SiT-XL's training shape.

  python -m softvq_jax.kernel_sweep --out sweep.jsonl                 # on a GPU
  python -m softvq_jax.kernel_sweep --tiny --repeats 1 --warmup 0     # anywhere (interpreter)

One JSON line per (kernel, variant), forward and backward of one call timed together as a
train step runs them:

* ``short_attention``: ``_SPLIT_HEAD_DIM`` (a head of 72 as 64 + 16 instead of one tile of
  128) x ``_LATE_LOADS`` (the backward loads v and the output gradient after the
  probabilities) x ``_BACKWARD_WARPS`` (4, 8), at 256 x 64 tokens, 16 heads of 72, bfloat16;
* ``residual_adaln``: the residual adaLN backward's ``_BACKWARD_ROWS_PER_STEP`` and
  ``_BACKWARD_WARPS`` x ``_MIN_BACKWARD_PROGRAMS`` (512, 1024), at (256, 64, 1152), float32
  residual stream, bfloat16 branch and output.

Every line carries ``max_rel_diff_vs_default``: the largest difference of its outputs and
gradients from the default variant's, relative to the largest magnitude of each, so that a
faster variant that computes something else shows. The constants are module globals read
when a program is traced; each variant is set, traced, timed, and the defaults restored.
What ``benchmarks/README.md`` ("Open on a GPU") expects of the sweep is stated there.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
from typing import Any, Callable, Iterator, Sequence

ATTENTION_VARIANTS = tuple(
    dict(_SPLIT_HEAD_DIM=split, _LATE_LOADS=late, _BACKWARD_WARPS=warps)
    for split, late, warps in itertools.product((False, True), (False, True), (4, 8)))
ADALN_VARIANTS = tuple(
    dict(_BACKWARD_ROWS_PER_STEP=rows, _BACKWARD_WARPS=warps, _MIN_BACKWARD_PROGRAMS=programs)
    for (rows, warps), programs in itertools.product(
        ((2, None), (2, 8), (2, 16), (1, 4), (1, 8), (1, 16)), (512, 1024)))
KERNELS = ("short_attention", "residual_adaln")

# (batch, tokens, heads, head_dim) and (batch, tokens, width): SiT-XL at batch 256 on 64
# tokens; tiny: shapes the interpreter runs in seconds, with a head that splits (24 = 16 + 8).
SHAPES = {"short_attention": (256, 64, 16, 72), "residual_adaln": (256, 64, 1152)}
TINY_SHAPES = {"short_attention": (2, 8, 2, 24), "residual_adaln": (2, 8, 48)}


@contextlib.contextmanager
def module_constants(module, values: dict[str, Any]) -> Iterator[None]:
  """Sets ``module``'s tuning constants for the block, restoring them afterwards."""
  unknown = sorted(name for name in values if not hasattr(module, name))
  if unknown:
    raise AttributeError(f"{module.__name__} has no {', '.join(unknown)}")
  saved = {name: getattr(module, name) for name in values}
  try:
    for name, value in values.items():
      setattr(module, name, value)
    yield
  finally:
    for name, value in saved.items():
      setattr(module, name, value)


def _attention_case(shape) -> tuple[Callable, tuple]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from softvq_jax.models import short_attention  # pylint: disable=g-import-not-at-top
  batch, tokens, heads, head_dim = shape
  width = heads * head_dim
  keys = jax.random.split(jax.random.key(0), 3)
  qkv = jax.random.normal(keys[0], (batch, tokens, 3 * width), jnp.bfloat16)
  bias = (0.1 * jax.random.normal(keys[1], (3 * width,))).astype(jnp.bfloat16)
  grad = jax.random.normal(keys[2], (batch, tokens, width), jnp.float32)

  def step(qkv, bias, grad):
    def loss(qkv, bias):
      out = short_attention.packed_attention(qkv, bias, heads)
      return jnp.sum(out.astype(jnp.float32) * grad), out
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(qkv, bias)
    return (out,) + grads
  return step, (qkv, bias, grad)


def _adaln_case(shape) -> tuple[Callable, tuple]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from softvq_jax.models import adaln  # pylint: disable=g-import-not-at-top
  batch, tokens, width = shape
  keys = jax.random.split(jax.random.key(1), 8)
  x = jax.random.normal(keys[0], shape, jnp.float32)
  h = jax.random.normal(keys[1], shape, jnp.bfloat16)
  bias, gate, shift, scale = (
      (0.1 * jax.random.normal(k, s)).astype(jnp.bfloat16)
      for k, s in zip(keys[2:6], ((width,), (batch, width), (batch, width), (batch, width))))
  grad_x = jax.random.normal(keys[6], shape, jnp.float32)
  grad_out = jax.random.normal(keys[7], shape, jnp.float32)

  def step(x, h, bias, gate, shift, scale, grad_x, grad_out):
    def loss(*inputs):
      new_x, out = adaln.gated_residual_adaln(
          inputs[0], inputs[1], inputs[3], inputs[4], inputs[5], eps=1e-6, bias=inputs[2],
          out_dtype=jnp.bfloat16, implementation="pallas")
      value = jnp.sum(new_x * grad_x) + jnp.sum(out.astype(jnp.float32) * grad_out)
      return value, (new_x, out)
    (_, outs), grads = jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True)(
        x, h, bias, gate, shift, scale)
    return outs + grads
  return step, (x, h, bias, gate, shift, scale, grad_x, grad_out)


def _relative_difference(outputs, reference) -> float:
  import numpy as np  # pylint: disable=g-import-not-at-top
  worst = 0.0
  for got, want in zip(outputs, reference):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    worst = max(worst, float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)))
  return worst


def sweep(kernel: str, *, tiny: bool, repeats: int, warmup: int) -> list[dict[str, Any]]:
  """One line per variant of ``kernel``, the default variant's first."""
  from softvq_jax import bench  # pylint: disable=g-import-not-at-top
  from softvq_jax.models import adaln, short_attention  # pylint: disable=g-import-not-at-top
  module, variants, case = {
      "short_attention": (short_attention, ATTENTION_VARIANTS, _attention_case),
      "residual_adaln": (adaln, ADALN_VARIANTS, _adaln_case)}[kernel]
  shape = (TINY_SHAPES if tiny else SHAPES)[kernel]
  default = {name: getattr(module, name) for name in variants[0]}
  ordered = [default] + [v for v in variants if v != default]
  step, args = case(shape)
  reference, lines = None, []
  for variant in ordered:
    with module_constants(module, variant):
      timing = bench.measure(step, args, repeats=repeats, warmup=warmup)
    outputs = timing.outputs
    if reference is None:
      reference = outputs
    summary = timing.summary()
    lines.append(dict(
        what="kernel_sweep", kernel=kernel, shape=list(shape), tiny=tiny,
        variant={k.lstrip("_").lower(): v for k, v in variant.items()},
        default=variant == default, median_s=summary["median_s"], min_s=summary["min_s"],
        iqr_s=summary["iqr_s"], compile_s=summary["compile_s"], repeats=repeats,
        max_rel_diff_vs_default=_relative_difference(outputs, reference),
        **bench._device_info()))  # pylint: disable=protected-access
  return lines


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  p = argparse.ArgumentParser(prog="python -m softvq_jax.kernel_sweep",
                              description=__doc__.split("\n")[0])
  p.add_argument("--kernel", choices=KERNELS + ("all",), default="all")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--tiny", action="store_true", help="toy shapes (tests of the sweep itself)")
  p.add_argument("--out", default="", help="also append the JSON lines to this file")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  if args.repeats < 1 or args.warmup < 0:
    p.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
  from softvq_jax import bench  # pylint: disable=g-import-not-at-top
  if bench.out_folder_missing(args.out):
    p.error(f"--out {args.out}: its folder does not exist")
  import jax  # pylint: disable=g-import-not-at-top
  platform = jax.devices()[0].platform
  if platform != "gpu" and not args.tiny:
    # Elsewhere the kernels run in Pallas' interpreter: times of no use, at hours per shape.
    p.error(f"the kernels are timed on NVIDIA GPUs; this process runs on {platform} "
            "(--tiny runs the sweep's own check there)")
  lines = []
  for kernel in (KERNELS if args.kernel == "all" else (args.kernel,)):
    for line in sweep(kernel, tiny=args.tiny, repeats=args.repeats, warmup=args.warmup):
      bench.emit(line, args.out)
      lines.append(line)
  return lines


if __name__ == "__main__":
  main()
