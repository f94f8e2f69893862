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


def _geometry(tokens: int, head_dim: int):
  return pallas_gpu.block_extent(tokens), pallas_gpu.block_extent(head_dim)


def _load_head(qkv_ref, bias_ref, which: int, rows, tokens_mask, h: int, head_dim: int,
               padded_dim: int, width: int, dtype):
  """q, k or v (``which`` 0, 1, 2) of head ``h``: the matmul output plus its bias, rounded to
  ``dtype``, zero in the padding."""
  d = jnp.arange(padded_dim)
  columns = which * width + h * head_dim + d
  mask = tokens_mask[:, None] & (d < head_dim)[None, :]
  x = pl_triton.load(qkv_ref.at[rows[:, None], columns[None, :]], mask=mask, other=0.0)
  b = pl_triton.load(bias_ref.at[columns], mask=d < head_dim, other=0.0)
  x = x.astype(jnp.float32) + b.astype(jnp.float32)[None, :]
  return jnp.where(mask, x, 0.0).astype(dtype), columns, mask


def _probabilities(q, k, keys_mask, scale):
  scores = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(keys_mask[None, :], scores, -jnp.inf)
  unnormalised = jnp.exp(scores - jnp.max(scores, axis=1, keepdims=True))
  return unnormalised / jnp.sum(unnormalised, axis=1, keepdims=True)


def _forward_kernel(qkv_ref, bias_ref, out_ref, *, tokens, head_dim, padded_tokens,
                    padded_dim, width):
  b, h = pl.program_id(0), pl.program_id(1)
  t = jnp.arange(padded_tokens)
  tokens_mask = t < tokens
  rows = b * tokens + t
  dtype = out_ref.dtype
  load = functools.partial(_load_head, qkv_ref, bias_ref, rows=rows, tokens_mask=tokens_mask,
                           h=h, head_dim=head_dim, padded_dim=padded_dim, width=width,
                           dtype=dtype)
  (q, _, mask), (k, _, _), (v, _, _) = load(which=0), load(which=1), load(which=2)
  p = _probabilities(q, k, tokens_mask, head_dim ** -0.5)
  out = jnp.dot(p.astype(dtype), v, preferred_element_type=jnp.float32)
  d = jnp.arange(padded_dim)
  pl_triton.store(out_ref.at[rows[:, None], (h * head_dim + d)[None, :]], out.astype(dtype),
                  mask=mask)


def _backward_kernel(qkv_ref, bias_ref, grad_ref, dqkv_ref, dbias_ref, *, tokens, head_dim,
                     padded_tokens, padded_dim, width):
  b, h = pl.program_id(0), pl.program_id(1)
  t = jnp.arange(padded_tokens)
  tokens_mask = t < tokens
  rows = b * tokens + t
  dtype = qkv_ref.dtype
  scale = head_dim ** -0.5
  load = functools.partial(_load_head, qkv_ref, bias_ref, rows=rows, tokens_mask=tokens_mask,
                           h=h, head_dim=head_dim, padded_dim=padded_dim, width=width,
                           dtype=dtype)
  (q, q_cols, mask), (k, k_cols, _), (v, v_cols, _) = load(which=0), load(which=1), load(which=2)
  d = jnp.arange(padded_dim)
  grad = pl_triton.load(grad_ref.at[rows[:, None], (h * head_dim + d)[None, :]], mask=mask,
                        other=0.0).astype(dtype)
  column_mask = d < head_dim

  def store(columns, value):
    value = jnp.where(mask, value, 0.0)
    pl_triton.store(dqkv_ref.at[rows[:, None], columns[None, :]], value.astype(dqkv_ref.dtype),
                    mask=mask)
    pl_triton.store(dbias_ref.at[b, columns], jnp.sum(value, axis=0), mask=column_mask)

  # Each gradient is stored as soon as it is computed, so that its float32 tile does not stay
  # in registers while the next ones are computed.
  p = _probabilities(q, k, tokens_mask, scale)
  store(v_cols, jnp.dot(p.astype(dtype).T, grad, preferred_element_type=jnp.float32))
  dp = jnp.dot(grad, v.T, preferred_element_type=jnp.float32)
  ds = (p * (dp - jnp.sum(p * dp, axis=1, keepdims=True))).astype(dtype)
  store(q_cols, jnp.dot(ds, k, preferred_element_type=jnp.float32) * scale)
  store(k_cols, jnp.dot(ds.T, q, preferred_element_type=jnp.float32) * scale)


def _call(kernel, name, qkv, num_heads, out_shape, *args, num_warps: int):
  batch, tokens, width3 = qkv.shape
  width = width3 // 3
  head_dim = width // num_heads
  padded_tokens, padded_dim = _geometry(tokens, head_dim)
  kernel = functools.partial(kernel, tokens=tokens, head_dim=head_dim,
                             padded_tokens=padded_tokens, padded_dim=padded_dim, width=width)
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
