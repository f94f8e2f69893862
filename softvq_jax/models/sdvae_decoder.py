"""A decoder with the layer shapes of the Stable Diffusion VAE (KL-f8), for speed comparisons.

The paper's throughput claims compare SiT on 32/64 1-D tokens plus the SoftVQ
decoder against SiT-XL/2 on the 32x32x4 SD-VAE latent plus the SD-VAE decoder.
No SD-VAE weights exist offline here and none are needed to time it: this is
the LDM ``Decoder`` architecture (ch 128, ch_mult (1, 2, 4, 4), two residual
blocks per level plus one, a single-head attention block in the middle,
GroupNorm(32) with eps 1e-6, nearest-neighbour upsampling) with random
weights, so it runs the same convolutions, norms and attention as the real one.
It is not a loader for SD-VAE checkpoints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from softvq_jax.models.layers import Dtype, dot_product_attention, matmul_precision


class GroupNorm(nnx.Module):
  """GroupNorm over NHWC in float32 (statistics per sample and group)."""

  def __init__(self, channels: int, groups: int = 32, eps: float = 1e-6):
    self.groups, self.eps = groups, eps
    self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
    mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 2, 4), keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def _conv(cin: int, cout: int, k: int, rngs: nnx.Rngs, dtype: Dtype | None) -> nnx.Conv:
  return nnx.Conv(cin, cout, (k, k), padding="SAME", dtype=dtype,
                  precision=matmul_precision(dtype), rngs=rngs)


class ResnetBlock(nnx.Module):
  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, dtype: Dtype | None = None):
    self.norm1 = GroupNorm(cin)
    self.conv1 = _conv(cin, cout, 3, rngs, dtype)
    self.norm2 = GroupNorm(cout)
    self.conv2 = _conv(cout, cout, 3, rngs, dtype)
    self.nin_shortcut = _conv(cin, cout, 1, rngs, dtype) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    return (self.nin_shortcut(x) if self.nin_shortcut is not None else x) + h


class AttnBlock(nnx.Module):
  """Single-head self-attention over all pixels, 1x1-conv projections."""

  def __init__(self, c: int, *, rngs: nnx.Rngs, dtype: Dtype | None = None):
    self.norm = GroupNorm(c)
    self.q, self.k, self.v, self.proj_out = (_conv(c, c, 1, rngs, dtype) for _ in range(4))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = self.norm(x)
    q, k, v = (f(y).reshape(b, h * w, 1, c) for f in (self.q, self.k, self.v))
    out = dot_product_attention(q, k, v, precision=matmul_precision(x.dtype))
    return x + self.proj_out(out.reshape(b, h, w, c))


class SDVAEDecoder(nnx.Module):
  """``(B, h, w, 4)`` latents -> ``(B, 8h, 8w, 3)`` images."""

  def __init__(self, *, z_channels: int = 4, ch: int = 128, ch_mult=(1, 2, 4, 4),
               num_res_blocks: int = 2, rngs: nnx.Rngs, dtype: Dtype | None = None):
    kw = dict(rngs=rngs, dtype=dtype)
    c = ch * ch_mult[-1]
    self.post_quant_conv = _conv(z_channels, z_channels, 1, rngs, dtype)
    self.conv_in = _conv(z_channels, c, 3, rngs, dtype)
    self.mid = nnx.List([ResnetBlock(c, c, **kw), AttnBlock(c, **kw), ResnetBlock(c, c, **kw)])
    levels = []
    for i in reversed(range(len(ch_mult))):
      out = ch * ch_mult[i]
      blocks = []
      for _ in range(num_res_blocks + 1):
        blocks.append(ResnetBlock(c, out, **kw))
        c = out
      upsample = _conv(c, c, 3, rngs, dtype) if i != 0 else None
      levels.append(nnx.Dict(block=nnx.List(blocks), upsample=upsample))
    self.up = nnx.List(levels)
    self.norm_out = GroupNorm(c)
    self.conv_out = _conv(c, 3, 3, rngs, dtype)
    self.dtype = dtype

  def __call__(self, z: jax.Array) -> jax.Array:
    x = z.astype(self.dtype or jnp.float32)
    x = self.conv_in(self.post_quant_conv(x))
    for layer in self.mid:
      x = layer(x)
    for level in self.up:
      for block in level["block"]:
        x = block(x)
      if level["upsample"] is not None:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        x = level["upsample"](x)
    return self.conv_out(jax.nn.silu(self.norm_out(x))).astype(jnp.float32)
