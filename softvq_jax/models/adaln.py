"""The adaLN norms of SiT/DiT blocks, ``LN(x) * (1 + scale[b]) + shift[b]``, as GPU kernels.

XLA compiles each such norm of the training step into a Triton fusion for the forward
pass and about five kernels for the backward pass (row sums, the two row-wise
corrections, the per-example sums of the modulation's gradient, the cast), with the gated
residual add before the norm and the gate's gradient in kernels of their own; each reads
or writes a whole ``(B, T, D)`` activation. Here:

* ``gated_residual_adaln`` is one forward kernel for ``x + gate * h`` and the next norm,
  writing the new residual and the compute-dtype input of the next matmul, and one
  backward kernel that reads the residual, ``h`` and both cotangents once and writes
  ``dx``, ``dh`` and per-example partial sums of the gate, scale and shift gradients;
* ``adaln_modulate`` is the same without the residual add (a SiT's first norm).

A ViT block's affine LayerNorm is the same computation with one modulation for every
example (``shift = bias``, and the weight as the multiplier: ``scale_offset=0``) and its
LayerScale as the gate, so the tokenizers' blocks can chain through the same kernels
(opt-in, see below). Such shared modulations are passed as ``(D,)`` vectors: every program
reads the same row, and nothing is broadcast to ``(B, D)`` or offset first (a separate small
kernel per operand on a GPU).

The row statistics are recomputed in the backward kernel from the residual it reads
anyway, so nothing beyond the kernels' inputs is kept for the backward pass. The kernels
define a reverse-mode rule only: forward-mode differentiation (``jax.jvp``) of a bfloat16
SiT/DiT on a GPU needs the XLA form (``set_adaln_implementation("xla")`` or
``SOFTVQ_ADALN=xla``).

``"auto"`` takes the kernels on GPUs when the output dtype is a 16-bit float; float32
programs, CPUs and TPUs keep the XLA form, whose rounding the reference-parity tests pin.
On CPUs ``"pallas"`` runs the same kernels in Pallas' interpreter, which is how the tests
check them against NumPy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from softvq_jax import parallel
from softvq_jax.models import layers, pallas_gpu

Array = jax.Array

# "auto": the Pallas kernels on GPUs for 16-bit outputs: SiT/DiT's adaLN norms, and the ViT
#         blocks' affine LayerNorms (``layers.Block.chained``) in inference programs (H100,
#         SoftVQ-B-64 at batch 64: encode +7%, decode +10%); the XLA form elsewhere, ViT
#         training included (not yet timed on a device);
# "pallas": the kernels wherever the shapes allow (interpreted on CPUs, for tests), ViT
#           training included;
# "xla": always the XLA form.
ADALN_IMPLEMENTATIONS = ("auto", "pallas", "xla")
_ADALN = layers.NamedChoice("adaLN implementation", ADALN_IMPLEMENTATIONS, "SOFTVQ_ADALN")

# Rows per program of the forward kernel and per loop step of the backward kernel: with
# the width padded to a power of two (2048 for SiT-XL's 1152) a few rows keep each
# thread's share of the tile in registers. The tuning below is the fastest of a sweep on an
# H100 (rows 2/4/8, warps 4/8, stages 1/3, 512/2048 backward programs) of the residual
# norm's forward and backward at SiT-XL's (256, 64, 1152): 0.266 ms against 0.279 for
# 4 rows, 8 warps, 1 stage and 0.53-2.1 ms for 8 rows, 4 warps (register spills).
_ROWS_PER_STEP = 2
# The backward kernel's own rows per loop step and warps (None: from the tile size), so that
# a sweep can set them apart from the forward's. Compiled for sm_90a at SiT-XL's shape the
# residual backward holds its loop-invariant modulation rows and four running sums in
# registers: 254 per thread with 2 rows and 4 warps (2 programs, 8 warps per SM); 1 row and
# 8 warps: 128 (2 programs, 16 warps); 1 row and 16 warps: 64 (2 programs, 32 warps). Those
# are not yet timed on a device; the forward has 72 registers (7 programs per SM).
_BACKWARD_ROWS_PER_STEP = 2
_BACKWARD_WARPS: int | None = None
# The backward kernel's grid is (examples, splits of the token axis); each split writes
# its own partial sums of d scale / d shift. Enough programs to fill a GPU several times
# over, few enough that the partial sums stay small next to the activations.
_MIN_BACKWARD_PROGRAMS = 512
# A tile row holds the whole padded width in registers; wider rows take the XLA form.
_MAX_KERNEL_WIDTH = 8192
# Triton's warps per program of the forward kernel (None: from the tile size) and
# software-pipelining stages.
_WARPS: int | None = None
_STAGES = 3


def set_adaln_implementation(name: str | None) -> None:
  """Selects how the adaLN norm runs (see ``ADALN_IMPLEMENTATIONS``; ``None``:
  ``$SOFTVQ_ADALN`` or "auto"); read when tracing."""
  _ADALN.set(name)


def adaln_implementation() -> str:
  return _ADALN.get()


def layer_norm_modulate_xla(x: Array, shift: Array, scale: Array, eps: float,
                            scale_offset: float = 1.0) -> Array:
  """The blocks' original form: a float32 LayerNorm cast back to ``x.dtype``, then the
  modulation in the promoted dtype of ``x``, ``shift`` and ``scale``."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  centred = x32 - mean
  var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
  normed = (centred * jax.lax.rsqrt(var + eps)).astype(x.dtype)
  multiplier = _over_tokens(scale) if scale_offset == 0 else scale_offset + _over_tokens(scale)
  return normed * multiplier + _over_tokens(shift)


def _over_tokens(modulation: Array) -> Array:
  """A ``(B, D)`` modulation as ``(B, 1, D)``; a shared ``(D,)`` one broadcasts as it is."""
  return modulation[:, None] if modulation.ndim == 2 else modulation


def adaln_modulate(x: Array, shift: Array, scale: Array, *, eps: float,
                   out_dtype=None, implementation: str | None = None,
                   scale_offset: float = 1.0) -> Array:
  """``LN(x) * (scale_offset + scale[:, None]) + shift[:, None]`` for ``x`` ``(B, T, D)``,
  ``shift`` and ``scale`` ``(B, D)``, or both ``(D,)`` for one modulation of every example;
  the LayerNorm has no affine parameters. ``scale_offset`` is 1 for adaLN; an affine
  LayerNorm is ``shift = bias``, ``scale = weight``, ``scale_offset = 0``.

  ``out_dtype`` is the dtype the consumer computes in (the next matmul's); ``None`` keeps
  the XLA form's promoted dtype. The kernel path computes in float32 and rounds once to
  ``out_dtype``.
  """
  _check_shapes(x, shift=shift, scale=scale)
  if _use_kernel(x, out_dtype, implementation):
    out = parallel.per_device_rows(
        functools.partial(_adaln_kernel, eps=eps, out_dtype=jnp.dtype(out_dtype),
                          scale_offset=float(scale_offset)), x,
        **_modulations(shift, scale))
    if out is not None:
      return out
  out = layer_norm_modulate_xla(x, shift, scale, eps, scale_offset)
  return out if out_dtype is None else out.astype(out_dtype)


def gated_residual_adaln(x: Array, h: Array, gate: Array, shift: Array, scale: Array, *,
                         eps: float, bias: Array | None = None, out_dtype=None,
                         implementation: str | None = None,
                         scale_offset: float = 1.0) -> tuple[Array, Array]:
  """``(x + gate * (h + bias), adaln_modulate(that, shift, scale))``: a block's gated residual
  add and the next adaLN norm in one pass.

  The new residual keeps ``x.dtype``; ``h`` is the branch output ``(B, T, D)`` before the
  bias of its last matmul, ``bias`` that bias ``(D,)`` (None: none), ``gate`` ``(B, D)``.
  Taking the bias here saves the matmul's separate bias add and, in training, its
  separate gradient reduction. In the XLA form the bias is added and the gated branch
  rounded to the promoted dtype of ``gate`` and ``h`` before the residual add, as the
  blocks always did; the kernel adds in float32. ``gate``, ``shift`` and ``scale`` may
  instead all be ``(D,)``, shared by every example (a ViT block's LayerScale and LayerNorm);
  ``scale_offset`` as in ``adaln_modulate``.
  """
  _check_shapes(x, shift=shift, scale=scale, gate=gate)
  if h.shape != x.shape:
    raise ValueError(f"gated_residual_adaln: h must have x's shape {x.shape}, got {h.shape}")
  if bias is not None and bias.shape != x.shape[-1:]:
    raise ValueError(f"gated_residual_adaln: bias must have shape {x.shape[-1:]}, got "
                     f"{bias.shape}")
  if _use_kernel(x, out_dtype, implementation):
    kernel_bias = bias if bias is not None else jnp.zeros(x.shape[-1:], h.dtype)
    modulations = _modulations(gate, shift, scale)
    out = parallel.per_device_rows(
        functools.partial(_residual_adaln_kernel, eps=eps, out_dtype=jnp.dtype(out_dtype),
                          scale_offset=float(scale_offset)),
        x, rows=(h,), columns=(kernel_bias,) + modulations.get("columns", ()),
        per_example=modulations.get("per_example", ()))
    if out is not None:
      return out
  if bias is not None:
    h = h + jnp.reshape(bias, (1,) * (h.ndim - 1) + (-1,))
  x = x + (_over_tokens(gate) * h).astype(x.dtype)
  out = layer_norm_modulate_xla(x, shift, scale, eps, scale_offset)
  return x, (out if out_dtype is None else out.astype(out_dtype))


def pending_add_and_norm(x: Array, pending: layers.PendingBranch | None, shift: Array,
                         scale: Array, *, eps: float, out_dtype=None,
                         implementation: str | None = None,
                         scale_offset: float = 1.0) -> tuple[Array, Array]:
  """``gated_residual_adaln`` of a chained block's pending branch (see ``AdaLNBlock.chained``
  and ``layers.Block.chained``): the previous block's last residual add and this norm.
  Without a pending branch (the first block), ``x`` as it is and ``adaln_modulate``."""
  if pending is None:
    return x, adaln_modulate(x, shift, scale, eps=eps, out_dtype=out_dtype,
                             implementation=implementation, scale_offset=scale_offset)
  return gated_residual_adaln(x, pending.h, pending.gate, shift, scale, bias=pending.bias,
                              eps=eps, out_dtype=out_dtype, implementation=implementation,
                              scale_offset=scale_offset)


def vit_kernels_apply(x: Array, out_dtype, *, inference: bool) -> bool:
  """Whether the ViT blocks' affine LayerNorms run as the kernels, for a 16-bit
  ``out_dtype``: under "pallas", and under "auto" in GPU programs of blocks prepared for
  inference (``layers.prepare_for_inference``; timed there). Training keeps XLA's norms
  under "auto": not yet timed on a device."""
  implementation = adaln_implementation()
  if out_dtype is None or jnp.dtype(out_dtype).itemsize != 2:
    return False
  if implementation == "auto" and not inference:
    return False
  return _use_kernel(x, out_dtype, implementation)


def _check_shapes(x: Array, **modulations: Array) -> None:
  shapes = {v.shape for v in modulations.values()}
  if x.ndim != 3 or len(shapes) != 1 or shapes.pop() not in ((x.shape[0], x.shape[2]),
                                                              (x.shape[2],)):
    shapes = ", ".join(f"{k} {v.shape}" for k, v in modulations.items())
    raise ValueError(f"the adaLN norm needs x (B, T, D) and modulations all (B, D) or all (D,); "
                     f"got x {x.shape}, {shapes}")


def _modulations(*modulations: Array) -> dict[str, tuple[Array, ...]]:
  """``per_device_rows``' keyword for the modulations: split with the batch when per
  example, replicated when shared."""
  return {"columns" if modulations[0].ndim == 1 else "per_example": modulations}


def _use_kernel(x: Array, out_dtype, implementation: str | None) -> bool:
  implementation = _ADALN.resolve(implementation)
  if implementation == "xla" or out_dtype is None:
    return False
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.shape[-1] > _MAX_KERNEL_WIDTH:
    return False
  if implementation == "pallas":
    return layers.compile_target() in ("gpu", "cpu")
  return layers.compile_target() == "gpu" and jnp.dtype(out_dtype).itemsize == 2


def _compiler_params(padded_width: int, tile_rows: int, warps: int | None):
  warps = warps or min(8, max(4, tile_rows * padded_width // 1024))
  return pl_triton.CompilerParams(num_warps=warps, num_stages=_STAGES)


def _tile(batch_index, first_token, tile_rows: int, tokens: int, width: int,
          padded_width: int):
  """Row indices into the flattened ``(B * T, D)`` arrays, column indices and the mask of a
  ``(tile_rows, padded_width)`` tile that starts at ``first_token`` of example
  ``batch_index``."""
  token = first_token + jnp.arange(tile_rows)
  column = jnp.arange(padded_width)
  mask = (token < tokens)[:, None] & (column < width)[None, :]
  rows = batch_index * tokens + token
  return rows[:, None], column[None, :], mask


def _load(ref, index, mask):
  return pl_triton.load(ref.at[index], mask=mask, other=0.0).astype(jnp.float32)


def _row_statistics(x: Array, mask: Array, width: int, eps: float):
  """``(x - mean) * rstd`` (zero where masked) and ``rstd``, in float32, two-pass variance."""
  mean = jnp.sum(x, axis=1, keepdims=True) / width
  centred = jnp.where(mask, x - mean, 0.0)
  var = jnp.sum(centred * centred, axis=1, keepdims=True) / width
  rstd = jax.lax.rsqrt(var + eps)
  return centred * rstd, rstd


def _modulation_index(b, columns, shared: bool):
  """Where a program reads its example's modulation: row ``b``, or the one shared row."""
  return (columns,) if shared else (b, columns)


def _forward_kernel(*refs, residual: bool, shared: bool, tokens: int, width: int,
                    padded_width: int, eps: float, scale_offset: float):
  if residual:
    x_ref, h_ref, bias_ref, gate_ref, shift_ref, scale_ref, x_out_ref, out_ref = refs
  else:
    x_ref, shift_ref, scale_ref, out_ref = refs
  b = pl.program_id(0)
  rows, columns, mask = _tile(b, pl.program_id(1) * _ROWS_PER_STEP, _ROWS_PER_STEP, tokens,
                              width, padded_width)
  column_mask = columns < width
  modulation = _modulation_index(b, columns, shared)
  x = _load(x_ref, (rows, columns), mask)
  if residual:
    branch = _load(h_ref, (rows, columns), mask) + _load(bias_ref, (columns,), column_mask)
    x = x + _load(gate_ref, modulation, column_mask) * branch
    x_out = x.astype(x_out_ref.dtype)
    pl_triton.store(x_out_ref.at[rows, columns], x_out, mask=mask)
    # The statistics are those of the stored residual, which the backward pass reads.
    x = x_out.astype(jnp.float32)
  normed, _ = _row_statistics(x, mask, width, eps)
  out = (normed * (scale_offset + _load(scale_ref, modulation, column_mask))
         + _load(shift_ref, modulation, column_mask))
  pl_triton.store(out_ref.at[rows, columns], out.astype(out_ref.dtype), mask=mask)


def _backward_kernel(*refs, residual: bool, shared: bool, tokens: int, width: int,
                     padded_width: int, eps: float, scale_offset: float, steps: int):
  """One (example, token split) of the backward pass. ``x`` is the normed input (the new
  residual when ``residual``); with ``residual`` the output's cotangent adds the residual
  stream's own, which also flows to ``h``, its bias and ``gate``."""
  if residual:
    (x_ref, h_ref, bias_ref, gate_ref, scale_ref, grad_ref, x_grad_ref,
     dx_ref, dh_ref, dscale_ref, dshift_ref, dgate_ref, dbias_ref) = refs
  else:
    x_ref, scale_ref, grad_ref, dx_ref, dscale_ref, dshift_ref = refs
  b, split = pl.program_id(0), pl.program_id(1)
  columns = jnp.arange(padded_width)[None, :]
  column_mask = columns < width
  modulation = _modulation_index(b, columns, shared)
  multiplier = scale_offset + _load(scale_ref, modulation, column_mask)
  if residual:
    gate = _load(gate_ref, modulation, column_mask)
    bias = _load(bias_ref, (columns,), column_mask)

  def step(i, sums):
    rows, cols, mask = _tile(b, (split * steps + i) * _BACKWARD_ROWS_PER_STEP,
                             _BACKWARD_ROWS_PER_STEP, tokens, width, padded_width)
    x = _load(x_ref, (rows, cols), mask)
    grad = _load(grad_ref, (rows, cols), mask)
    normed, rstd = _row_statistics(x, mask, width, eps)
    g = grad * multiplier
    mean_g = jnp.sum(g, axis=1, keepdims=True) / width
    mean_gn = jnp.sum(g * normed, axis=1, keepdims=True) / width
    dx = (g - mean_g - normed * mean_gn) * rstd
    new = [jnp.sum(grad * normed, axis=0, keepdims=True), jnp.sum(grad, axis=0, keepdims=True)]
    if residual:
      dx = dx + _load(x_grad_ref, (rows, cols), mask)
      dh = gate * dx
      pl_triton.store(dh_ref.at[rows, cols], dh.astype(dh_ref.dtype), mask=mask)
      branch = jnp.where(mask, _load(h_ref, (rows, cols), mask) + bias, 0.0)
      new += [jnp.sum(dx * branch, axis=0, keepdims=True), jnp.sum(dh, axis=0, keepdims=True)]
    pl_triton.store(dx_ref.at[rows, cols], dx.astype(dx_ref.dtype), mask=mask)
    return tuple(total + part for total, part in zip(sums, new))

  zeros = jnp.zeros((1, padded_width), jnp.float32)
  sums = jax.lax.fori_loop(0, steps, step, (zeros,) * (4 if residual else 2))
  out_refs = (dscale_ref, dshift_ref) + ((dgate_ref, dbias_ref) if residual else ())
  out_columns = jnp.arange(padded_width)
  for ref, total in zip(out_refs, sums):
    pl_triton.store(ref.at[b, split, out_columns], total[0], mask=out_columns < width)


def _flat(x: Array) -> Array:
  return x.reshape(x.shape[0] * x.shape[1], x.shape[2])


def _forward(x: Array, rows: tuple[Array, ...], columns: tuple[Array, ...],
             modulations: tuple[Array, ...], *, eps: float, scale_offset: float, out_dtype):
  """``y`` (and the new residual first, when ``rows`` holds ``h`` and ``columns`` its bias)
  of the forward kernel."""
  batch, tokens, width = x.shape
  padded = pallas_gpu.block_extent(width)
  residual = bool(rows)
  kernel = functools.partial(_forward_kernel, residual=residual,
                             shared=modulations[0].ndim == 1, tokens=tokens, width=width,
                             padded_width=padded, eps=eps, scale_offset=scale_offset)
  out_shape = jax.ShapeDtypeStruct((batch * tokens, width), out_dtype)
  if residual:
    out_shape = (jax.ShapeDtypeStruct((batch * tokens, width), x.dtype), out_shape)
  out = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(batch, pl.cdiv(tokens, _ROWS_PER_STEP)),
      compiler_params=_compiler_params(padded, _ROWS_PER_STEP, _WARPS),
      interpret=pallas_gpu.interpret(), name="residual_adaln_fwd" if residual else "adaln_fwd",
  )(_flat(x), *map(_flat, rows), *columns, *modulations)
  return jax.tree.map(lambda a: a.reshape(x.shape), out)


def _backward_splits(batch: int, tokens: int) -> tuple[int, int]:
  """``(splits of the token axis, loop steps per split)`` of the backward grid."""
  row_steps = pl.cdiv(tokens, _BACKWARD_ROWS_PER_STEP)
  splits = min(row_steps, max(1, pl.cdiv(_MIN_BACKWARD_PROGRAMS, batch)))
  steps = pl.cdiv(row_steps, splits)
  return pl.cdiv(row_steps, steps), steps


def _backward(x: Array, rows: tuple[Array, ...], columns: tuple[Array, ...],
              modulations: tuple[Array, ...], grads: tuple[Array, ...], *, eps: float,
              scale_offset: float):
  """``(dx, [dh,] d scale, d shift[, d gate, d bias])``; the modulations' in their own
  shape (per example or shared), the bias's ``(D,)``, all in float32."""
  batch, tokens, width = x.shape
  padded = pallas_gpu.block_extent(width)
  splits, steps = _backward_splits(batch, tokens)
  residual = bool(rows)
  shared = modulations[0].ndim == 1
  kernel = functools.partial(_backward_kernel, residual=residual, shared=shared, tokens=tokens,
                             width=width, padded_width=padded, eps=eps,
                             scale_offset=scale_offset, steps=steps)
  partial_sums = jax.ShapeDtypeStruct((batch, splits, width), jnp.float32)
  out_shape = [jax.ShapeDtypeStruct((batch * tokens, width), x.dtype)]
  if residual:
    out_shape.append(jax.ShapeDtypeStruct((batch * tokens, width), rows[0].dtype))
  out_shape += [partial_sums] * (4 if residual else 2)
  out = pl.pallas_call(
      kernel, out_shape=tuple(out_shape), grid=(batch, splits),
      compiler_params=_compiler_params(padded, _BACKWARD_ROWS_PER_STEP, _BACKWARD_WARPS),
      interpret=pallas_gpu.interpret(), name="residual_adaln_bwd" if residual else "adaln_bwd",
  )(_flat(x), *map(_flat, rows), *columns, *modulations, *map(_flat, grads))
  n_rows = 2 if residual else 1
  # Partial sums are per (example, token split); the bias is always shared.
  sums = [jnp.sum(a, axis=(0, 1) if shared else 1) for a in out[n_rows:]]
  if residual:
    sums[-1] = jnp.sum(out[-1], axis=(0, 1))
  return tuple(a.reshape(x.shape) for a in out[:n_rows]) + tuple(sums)


# The modulations' dtypes are kept as zero-size slices (they cost nothing) so that the
# backward passes can return cotangents of the right dtype.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _adaln_kernel(x: Array, shift: Array, scale: Array, eps: float, out_dtype,
                  scale_offset: float) -> Array:
  return _forward(x, (), (), (shift, scale), eps=eps, scale_offset=scale_offset,
                  out_dtype=out_dtype)


def _adaln_kernel_fwd(x, shift, scale, eps, out_dtype, scale_offset):
  return _adaln_kernel(x, shift, scale, eps, out_dtype, scale_offset), (x, scale, shift[:0])


def _adaln_kernel_bwd(eps, out_dtype, scale_offset, residuals, grad):
  del out_dtype
  x, scale, shift_like = residuals
  dx, dscale, dshift = _backward(x, (), (), (scale,), (grad,), eps=eps,
                                 scale_offset=scale_offset)
  return dx, dshift.astype(shift_like.dtype), dscale.astype(scale.dtype)


_adaln_kernel.defvjp(_adaln_kernel_fwd, _adaln_kernel_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _residual_adaln_kernel(x: Array, h: Array, bias: Array, gate: Array, shift: Array,
                           scale: Array, eps: float, out_dtype,
                           scale_offset: float) -> tuple[Array, Array]:
  return _forward(x, (h,), (bias,), (gate, shift, scale), eps=eps, scale_offset=scale_offset,
                  out_dtype=out_dtype)


def _residual_adaln_kernel_fwd(x, h, bias, gate, shift, scale, eps, out_dtype, scale_offset):
  x_new, out = _residual_adaln_kernel(x, h, bias, gate, shift, scale, eps, out_dtype,
                                      scale_offset)
  return (x_new, out), (x_new, h, bias, gate, scale, shift[:0])


def _residual_adaln_kernel_bwd(eps, out_dtype, scale_offset, residuals, grads):
  del out_dtype
  x_new, h, bias, gate, scale, shift_like = residuals
  x_grad, grad = grads
  dx, dh, dscale, dshift, dgate, dbias = _backward(x_new, (h,), (bias,), (gate, scale),
                                                   (grad, x_grad), eps=eps,
                                                   scale_offset=scale_offset)
  return (dx, dh, dbias.astype(bias.dtype), dgate.astype(gate.dtype),
          dshift.astype(shift_like.dtype), dscale.astype(scale.dtype))


_residual_adaln_kernel.defvjp(_residual_adaln_kernel_fwd, _residual_adaln_kernel_bwd)
