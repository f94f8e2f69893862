"""Attention over short sequences (SiT/DiT's 32-256 latent tokens) as one GPU kernel each way.

cuDNN's flash attention is built for long sequences and head widths of 64 or 128. On
SiT-XL's 64 tokens of head width 72 its backward pass ran at about a quarter of the memory
bandwidth (9.5 ms of a 129 ms train step on an H100, 2026-11-27), and around it XLA copied
q, k and v out of the packed ``qkv`` matmul output (2.1 ms) and concatenated their
gradients back (2.5 ms). Here one Triton program per (example, head) reads its q, k and v
straight from the packed output (``(B, T, 3 D)``, rows ``q | k | v`` head-major, as the
``qkv`` Linear writes them) together with the matmul's bias, keeps the whole ``T x T``
score tile in registers, and writes the head's output; the backward program recomputes
the scores (cheap at these lengths), and writes ``d qkv`` in the packed layout plus
per-example partial sums of the bias gradient. Nothing but the packed input is kept for
the backward pass.

Taken by the default attention choice ("auto") in GPU programs, and by "pallas"
(``--attention pallas``) everywhere, for bfloat16/float16 attention of up to
``MAX_TOKENS`` tokens without q/k norms or rotary embeddings; other attention keeps its
path. On an H100 at SiT-XL's training shape (256 x 64 tokens, 16 heads of 72) the forward
took 0.094 ms against cuDNN's 0.200, forward and backward 0.235 against 0.611 ms, and the
SiT-XL train step went from 126.2 to 118.8 ms (2026-11-27). On CPUs "pallas" runs the
kernels in Pallas' interpreter (tests).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from softvq_jax import parallel
from softvq_jax.models import layers, pallas_gpu

Array = jax.Array

# The whole score tile of one head lives in registers: up to 128 x 128 float32.
MAX_TOKENS = 128
# Triton warps per program, from a sweep on an H100 at SiT-XL's training shape: forward
# 0.089-0.094 ms with 4 or 8 (within the noise), backward 0.14 ms with 4 and 0.21 with 8.
# Stages do not matter: a program has no loop.
_FORWARD_WARPS = 4
_BACKWARD_WARPS = 4
_STAGES = 1
# Whether a head's columns are covered by several power-of-two tiles (SiT-XL's 72: 64 + 16)
# instead of one (128), so that fewer registers, less shared memory and less dot work go to
# padding. Whether the backward kernel loads v and the output's gradient only where it first
# uses them, after the probabilities, instead of with q and k, so that fewer tiles are live at
# once, at the cost of two more waits on memory per program. Compiled for sm_90a at SiT-XL's
# shape (registers per thread, shared memory, programs of 4 warps that fit on an SM):
#   forward:  one tile 106, 48 KB, 4;   split 80, 28 KB, 6;
#   backward: one tile 198, 96 KB, 2;   split 170, 58 KB, 2;
#             late loads 168, 72 KB, 3; split and late loads 152, 48 KB, 3.
# Not yet timed on a device.
_SPLIT_HEAD_DIM = False
_LATE_LOADS = False


def supported(tokens: int, head_dim: int, dtype) -> bool:
  """Whether the kernels take attention of this shape and dtype on the compile target."""
  return (layers.compile_target() in ("gpu", "cpu") and tokens <= MAX_TOKENS
          and head_dim <= 256 and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16))


def packed_attention(qkv: Array, bias: Array | None, num_heads: int) -> Array | None:
  """``softmax(q k^T / sqrt(hd)) v`` per head for ``qkv`` ``(B, T, 3 D)`` (before its bias),
  ``bias`` ``(3 D,)`` or None; returns ``(B, T, D)`` in ``qkv.dtype``. The bias is added
  and rounded to ``qkv.dtype`` as the Linear would, the softmax runs in float32 and the
  probabilities are rounded to ``qkv.dtype`` before the product with v, as cuDNN does.
  ``None`` when an active mesh shards the activations beyond their batch axis (the caller
  then takes another path)."""
  batch, tokens, width3 = qkv.shape
  if width3 % (3 * num_heads):
    raise ValueError(f"packed qkv width {width3} is not 3 x num_heads ({num_heads}) x head_dim")
  if bias is None:
    bias = jnp.zeros((width3,), qkv.dtype)
  if bias.shape != (width3,):
    raise ValueError(f"qkv bias must have shape ({width3},), got {bias.shape}")
  fn = functools.partial(_attention, num_heads=num_heads)
  return parallel.per_device_rows(fn, qkv, columns=(bias.astype(qkv.dtype),))


def _head_pieces(head_dim: int, split: bool) -> tuple[tuple[int, int], ...]:
  """Column pieces ``(start, extent)`` that cover one head; Triton tiles are powers of two.
  One tile of the next power of two, or (``split``) the width rounded up to 16 as a sum of
  powers of two, largest first, so that less of each tile is padding: 72 is 64 + 16 instead
  of 128, 96 is 64 + 32."""
  if not split:
    return ((0, pallas_gpu.block_extent(head_dim)),)
  rest, start, pieces = -(-head_dim // 16) * 16, 0, []
  while rest:
    extent = 1 << (rest.bit_length() - 1)
    pieces.append((start, extent))
    start, rest = start + extent, rest - extent
  return tuple(pieces)


class _Piece(NamedTuple):
  """One column piece of a head's q, k, v or gradient tile."""
  tile: Array
  columns: Array        # (extent,) the piece's columns within q, k or v: head * head_dim + d
  column_mask: Array    # (extent,) the real columns
  mask: Array           # (tokens, extent) the real tokens and columns


class _Program(NamedTuple):
  """What a (example, head) program reads: ``load(ref, part, piece, bias_ref=None)`` gives
  columns ``piece`` of part ``part`` (q 0, k 1, v 2 of the packed ``qkv``; 0 for a
  ``(rows, D)`` array) of this head, plus its bias, rounded to the compute dtype, zero in the
  padding."""
  example: Array
  rows: Array
  tokens_mask: Array
  load: Callable[..., _Piece]


def _program(*, tokens, head_dim, padded_tokens, width, dtype) -> _Program:
  b, h = pl.program_id(0), pl.program_id(1)
  t = jnp.arange(padded_tokens)
  tokens_mask = t < tokens
  rows = b * tokens + t

  def load(ref, part: int, piece: tuple[int, int], bias_ref=None) -> _Piece:
    d = piece[0] + jnp.arange(piece[1])
    columns = h * head_dim + d
    column_mask = d < head_dim
    mask = tokens_mask[:, None] & column_mask[None, :]
    x = pl_triton.load(ref.at[rows[:, None], (part * width + columns)[None, :]], mask=mask,
                       other=0.0)
    if bias_ref is not None:
      bias = pl_triton.load(bias_ref.at[part * width + columns], mask=column_mask, other=0.0)
      x = x.astype(jnp.float32) + bias.astype(jnp.float32)[None, :]
    return _Piece(jnp.where(mask, x, 0.0).astype(dtype), columns, column_mask, mask)

  return _Program(b, rows, tokens_mask, load)


def _load_qkv(program: _Program, qkv_ref, bias_ref, pieces, parts=(0, 1, 2)):
  """The head's q, k and v (or those of ``parts``), each as its list of pieces."""
  return [[program.load(qkv_ref, part, piece, bias_ref) for piece in pieces] for part in parts]


def _probabilities(qs, ks, keys_mask, scale):
  scores = sum(jnp.dot(q.tile, k.tile.T, preferred_element_type=jnp.float32)
               for q, k in zip(qs, ks)) * scale
  scores = jnp.where(keys_mask[None, :], scores, -jnp.inf)
  unnormalised = jnp.exp(scores - jnp.max(scores, axis=1, keepdims=True))
  return unnormalised / jnp.sum(unnormalised, axis=1, keepdims=True)


def _forward_kernel(qkv_ref, bias_ref, out_ref, *, pieces, **geometry):
  dtype = out_ref.dtype
  program = _program(dtype=dtype, **geometry)
  qs, ks, vs = _load_qkv(program, qkv_ref, bias_ref, pieces)
  p = _probabilities(qs, ks, program.tokens_mask, geometry["head_dim"] ** -0.5).astype(dtype)
  for v in vs:
    out = jnp.dot(p, v.tile, preferred_element_type=jnp.float32)
    pl_triton.store(out_ref.at[program.rows[:, None], v.columns[None, :]], out.astype(dtype),
                    mask=v.mask)


def _backward_kernel(qkv_ref, bias_ref, grad_ref, dqkv_ref, dbias_ref, *, pieces, **geometry):
  dtype = qkv_ref.dtype
  width = geometry["width"]
  scale = geometry["head_dim"] ** -0.5
  program = _program(dtype=dtype, **geometry)

  def store(part: int, piece: _Piece, value):
    value = jnp.where(piece.mask, value, 0.0)
    columns = part * width + piece.columns
    pl_triton.store(dqkv_ref.at[program.rows[:, None], columns[None, :]],
                    value.astype(dqkv_ref.dtype), mask=piece.mask)
    pl_triton.store(dbias_ref.at[program.example, columns], jnp.sum(value, axis=0),
                    mask=piece.column_mask)

  def values():
    return _load_qkv(program, qkv_ref, bias_ref, pieces, parts=(2,))[0]

  def output_grads():
    return [program.load(grad_ref, 0, piece) for piece in pieces]

  # A load is placed in the kernel where it is traced (see _LATE_LOADS).
  qs, ks = _load_qkv(program, qkv_ref, bias_ref, pieces, parts=(0, 1))
  vs, grads = (None, None) if _LATE_LOADS else (values(), output_grads())
  # Each gradient is stored as soon as it is computed, so that its float32 tile does not stay
  # in registers while the next ones are computed (sm_90a, SiT-XL: 222 to 198 registers).
  p = _probabilities(qs, ks, program.tokens_mask, scale)
  p_rounded = p.astype(dtype)
  grads = grads or output_grads()
  for grad in grads:
    store(2, grad, jnp.dot(p_rounded.T, grad.tile, preferred_element_type=jnp.float32))
  vs = vs or values()
  dp = sum(jnp.dot(grad.tile, v.tile.T, preferred_element_type=jnp.float32)
           for grad, v in zip(grads, vs))
  ds = (p * (dp - jnp.sum(p * dp, axis=1, keepdims=True))).astype(dtype)
  for q, k in zip(qs, ks):
    store(0, q, jnp.dot(ds, k.tile, preferred_element_type=jnp.float32) * scale)
    store(1, k, jnp.dot(ds.T, q.tile, preferred_element_type=jnp.float32) * scale)


def _call(kernel, name, qkv, num_heads, out_shape, *args, num_warps: int):
  batch, tokens, width3 = qkv.shape
  width = width3 // 3
  head_dim = width // num_heads
  kernel = functools.partial(kernel, tokens=tokens, head_dim=head_dim, width=width,
                             padded_tokens=pallas_gpu.block_extent(tokens),
                             pieces=_head_pieces(head_dim, _SPLIT_HEAD_DIM))
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(batch, num_heads),
      compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=_STAGES),
      interpret=pallas_gpu.interpret(), name=name,
  )(qkv.reshape(batch * tokens, width3), *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _attention(qkv: Array, bias: Array, num_heads: int) -> Array:
  batch, tokens, width3 = qkv.shape
  out = _call(_forward_kernel, "short_attention_fwd", qkv, num_heads,
              jax.ShapeDtypeStruct((batch * tokens, width3 // 3), qkv.dtype), bias,
              num_warps=_FORWARD_WARPS)
  return out.reshape(batch, tokens, width3 // 3)


def _attention_fwd(qkv, bias, num_heads):
  return _attention(qkv, bias, num_heads), (qkv, bias)


def _attention_bwd(num_heads, residuals, grad):
  qkv, bias = residuals
  batch, tokens, width3 = qkv.shape
  dqkv, dbias = _call(
      _backward_kernel, "short_attention_bwd", qkv, num_heads,
      (jax.ShapeDtypeStruct((batch * tokens, width3), qkv.dtype),
       jax.ShapeDtypeStruct((batch, width3), jnp.float32)),
      bias, grad.reshape(batch * tokens, width3 // 3), num_warps=_BACKWARD_WARPS)
  return dqkv.reshape(qkv.shape), jnp.sum(dbias, axis=0).astype(bias.dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)
