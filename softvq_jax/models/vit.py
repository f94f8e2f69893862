"""The DINOv2-style ViT of the reference and the 1-D tokenizer encoder/decoder built on it.

Attribute names follow the PyTorch state_dict (``encoder.model.blocks.3.attn.qkv``,
``decoder.to_pixel.model``...), so checkpoint conversion is a name table.
Images are NHWC; token sequences are ``(B, N, D)``.

Two decoder flavours exist: the SoftVQ one (class token, absolute positions,
standard blocks) and MAETok's MoVQ one (no class token, no absolute positions,
mixed RoPE, blocks whose latent rows are modulated by the raw latent).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from softvq_jax.models import adaln
from softvq_jax.models import rope as rope_lib
from softvq_jax.models.config import ViTConfig
from softvq_jax.models.layers import (Attention, Block, Dtype, LayerNorm, Mlp, PatchEmbed,
                                      RopeTables, broadcast_over_batch, linear, matmul_precision,
                                      norm_affine, torch_default_bias_init,
                                      torch_default_kernel_init, trunc_normal_02)
from softvq_jax.parallel import constrain


def modulate_last_rows(h: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """``h * scale + shift`` on the last L rows only (MoVQ: no ``1 +``, unlike SiT/DiT)."""
  num_latent = shift.shape[1]
  head, tail = h[:, :-num_latent], h[:, -num_latent:]
  tail = tail * scale.astype(tail.dtype) + shift.astype(tail.dtype)
  return jnp.concatenate([head, tail], axis=1)


_ACTIVATIONS = ("batch", "length", "act_embed")  # the logical names sit.py uses


class MoVQBlock(nnx.Module):
  """MoVQBlockv2: non-affine pre-norms whose latent rows are modulated by the latent."""

  def __init__(self, dim: int, num_heads: int, latent_dim: int, *, mlp_ratio: float = 4.0,
               rngs: nnx.Rngs, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32):
    self.norm1 = LayerNorm(dim, use_affine=False)
    self.attn = Attention(dim, num_heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm2 = LayerNorm(dim, use_affine=False)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # PyTorch: Sequential(SiLU, Linear) -> "adaLN_modulation.1"; the reference zero-inits it.
    self.adaLN_modulation = linear(latent_dim, 4 * dim, dtype=dtype, param_dtype=param_dtype,
                                   kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

  def modulation(self, latent: jax.Array) -> jax.Array:
    return self.adaLN_modulation(jax.nn.silu(latent))

  def __call__(self, x: jax.Array, latent: jax.Array, rope: RopeTables | None = None) -> jax.Array:
    shift_msa, scale_msa, shift_mlp, scale_mlp = jnp.split(self.modulation(latent), 4, axis=-1)
    h = modulate_last_rows(self.norm1(x), shift_msa, scale_msa)
    x = x + self.attn(h, rope).astype(x.dtype)
    h = modulate_last_rows(self.norm2(x), shift_mlp, scale_mlp)
    return x + self.mlp(h).astype(x.dtype)


class MoVQNorm(nnx.Module):
  """Final non-affine norm with the latent rows modulated as in ``MoVQBlock``."""

  def __init__(self, dim: int, latent_dim: int, *, rngs: nnx.Rngs, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32):
    self.norm = LayerNorm(dim, use_affine=False)
    self.adaLN_modulation = linear(latent_dim, 2 * dim, dtype=dtype, param_dtype=param_dtype,
                                   kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

  def modulation(self, latent: jax.Array) -> jax.Array:
    return self.adaLN_modulation(jax.nn.silu(latent))

  def __call__(self, x: jax.Array, latent: jax.Array) -> jax.Array:
    shift, scale = jnp.split(self.modulation(latent), 2, axis=-1)
    return modulate_last_rows(self.norm(x), shift, scale)


class VisionTransformer(nnx.Module):
  """Class token, learned position table (with the class row), pre-norm blocks, final norm."""

  def __init__(self, cfg: ViTConfig, image_size: int, *, with_patch_embed: bool = True,
               with_cls_token: bool = True, with_pos_embed: bool = True,
               latent_dim: int | None = None, in_chans: int = 3, rngs: nnx.Rngs,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32):
    self.embed_dim = cfg.embed_dim
    self.num_heads = cfg.num_heads
    self.grid_size = image_size // cfg.patch_size
    self.movq = cfg.movq
    num_patches = self.grid_size**2
    self.no_embed_class = cfg.no_embed_class
    self.num_prefix_tokens = (1 if with_cls_token else 0) + cfg.reg_tokens
    self.patch_embed = (PatchEmbed(cfg.patch_size, in_chans, cfg.embed_dim, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs)
                        if with_patch_embed else None)
    self.cls_token = (nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, cfg.embed_dim),
                                                         param_dtype))
                      if with_cls_token else None)
    # timm leaves register tokens at zero.
    self.reg_token = (nnx.Param(jnp.zeros((1, cfg.reg_tokens, cfg.embed_dim), param_dtype))
                      if cfg.reg_tokens else None)
    table_rows = num_patches if cfg.no_embed_class else self.num_prefix_tokens + num_patches
    self.pos_embed = (nnx.Param(trunc_normal_02(rngs.params(), (1, table_rows, cfg.embed_dim),
                                                param_dtype))
                      if with_pos_embed else None)
    if cfg.movq:
      if latent_dim is None:
        raise ValueError("MoVQ blocks need the latent dimension")
      self.blocks = nnx.List([
          MoVQBlock(cfg.embed_dim, cfg.num_heads, latent_dim, mlp_ratio=cfg.mlp_ratio, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.depth)])
      self.norm = MoVQNorm(cfg.embed_dim, latent_dim, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
    else:
      self.blocks = nnx.List([
          Block(cfg.embed_dim, cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                layerscale_init=cfg.layerscale_init, dtype=dtype, param_dtype=param_dtype,
                rngs=rngs) for _ in range(cfg.depth)])
      self.norm = LayerNorm(cfg.embed_dim, param_dtype=param_dtype)

  def add_cls_and_positions(self, tokens: jax.Array) -> jax.Array:
    """Prepends the class (and register) tokens and adds the position table (timm ``_pos_embed``).

    A table with a class row is added after prepending; a patches-only table
    (``no_embed_class``) before, so the prefix tokens get no position.
    """
    b = tokens.shape[0]
    # As PyTorch's cat and add promote: with 16-bit patch embeddings and float32 tokens and
    # positions (autocast), the residual stream that starts here is float32.
    params = [p for p in (self.cls_token, self.reg_token, self.pos_embed) if p is not None]
    tokens = tokens.astype(jnp.result_type(tokens.dtype, *(p.dtype for p in params)))
    prefix = [jnp.broadcast_to(p[...], (b,) + p.shape[1:]).astype(tokens.dtype)
              for p in (self.cls_token, self.reg_token) if p is not None]
    pos = (broadcast_over_batch(self.pos_embed[...], b).astype(tokens.dtype)
           if self.pos_embed is not None else None)
    if self.no_embed_class and pos is not None:
      tokens = tokens + pos
    if prefix:
      tokens = jnp.concatenate(prefix + [tokens], axis=1)
    if not self.no_embed_class and pos is not None:
      tokens = tokens + pos
    return tokens

  def run_blocks(self, x: jax.Array, *, freqs: jax.Array | None = None,
                 latent: jax.Array | None = None) -> jax.Array:
    """Blocks and final norm; ``freqs`` turns on RoPE, ``latent`` feeds MoVQ modulation."""
    # Batch-sharded activations at block boundaries: with FSDP-sharded weights, XLA would
    # otherwise be free to replicate them (no-op outside a mesh; see parallel.constrain).
    x = constrain(x, _ACTIVATIONS)
    if (not self.movq and len(self.blocks)
        and adaln.vit_kernels_apply(x, self.blocks[0].dtype,
                                    inference=self.blocks[0].prepared_for_inference)):
      return self._run_chained_blocks(x, freqs)
    for i, block in enumerate(self.blocks):
      x = block(x, latent, self._rope(freqs, i)) if self.movq else block(x, self._rope(freqs, i))
      x = constrain(x, _ACTIVATIONS)
    return self.norm(x, latent) if self.movq else self.norm(x)

  def _rope(self, freqs: jax.Array | None, layer: int):
    if freqs is None:
      return None
    return rope_lib.layer_tables(freqs, layer, (self.grid_size, self.grid_size), self.num_heads,
                                 self.num_prefix_tokens)

  def _run_chained_blocks(self, x: jax.Array, freqs: jax.Array | None) -> jax.Array:
    """``run_blocks`` with every residual add fused into the next LayerNorm (``Block.chained``),
    the last one into the final norm, whose output keeps the residual stream's dtype."""
    pending = None
    for i, block in enumerate(self.blocks):
      x, pending = block.chained(x, pending, self._rope(freqs, i))
      x = constrain(x, _ACTIVATIONS)
      pending = pending._replace(h=constrain(pending.h, _ACTIVATIONS))
    shift, weight = norm_affine(self.norm)
    _, out = adaln.pending_add_and_norm(x, pending, shift, weight, eps=self.norm.eps,
                                        out_dtype=x.dtype, implementation="pallas",
                                        scale_offset=0.0)
    return out


def _rope_freqs(cfg: ViTConfig, theta: float, rngs: nnx.Rngs, param_dtype: Dtype) -> nnx.Param:
  head_dim = cfg.embed_dim // cfg.num_heads
  return nnx.Param(rope_lib.init_mixed_freqs(rngs.params(), cfg.depth, cfg.num_heads, head_dim,
                                             theta).astype(param_dtype))


class ViTEncoder(nnx.Module):
  """Image tokens, then learned latent tokens appended at the end; returns the last L tokens."""

  def __init__(self, cfg: ViTConfig, image_size: int, num_latent_tokens: int, *,
               use_rope: bool = False, rope_theta: float = 10.0, rngs: nnx.Rngs,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32):
    self.num_latent_tokens = num_latent_tokens
    self.patch_size = cfg.patch_size
    self.image_size = image_size
    self.model = VisionTransformer(cfg, image_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.latent_tokens = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (1, num_latent_tokens, cfg.embed_dim), param_dtype))
    self.latent_pos_embed = nnx.Param(
        trunc_normal_02(rngs.params(), (1, num_latent_tokens, cfg.embed_dim), param_dtype))
    self.freqs = _rope_freqs(cfg, rope_theta, rngs, param_dtype) if use_rope else None

  def embed(self, images: jax.Array) -> jax.Array:
    """Input of the first block: ``[cls, patches (+pos), latents (+latent pos)]``."""
    x = self.model.add_cls_and_positions(self.model.patch_embed(images))
    latents = broadcast_over_batch(self.latent_tokens[...] + self.latent_pos_embed[...],
                                   x.shape[0])
    dtype = jnp.result_type(x.dtype, latents.dtype)  # promoted, as torch.cat does
    return jnp.concatenate([x.astype(dtype), latents.astype(dtype)], axis=1)

  def __call__(self, images: jax.Array) -> jax.Array:
    freqs = self.freqs[...] if self.freqs is not None else None
    x = self.model.run_blocks(self.embed(images), freqs=freqs)
    return x[:, -self.num_latent_tokens:]


class _HeadStep(nnx.Module):
  """A parameter-free step of the reference's ``nn.Sequential`` conv head, kept so that the
  convolutions keep its indices: ``grid`` (tokens to the patch grid, which the head does
  itself), ``relu`` or a nearest x2 ``upsample``."""

  def __init__(self, kind: str):
    self.kind = kind

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kind == "relu":
      return jax.nn.relu(x)
    if self.kind == "upsample":
      return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x


class _SineLayer(nnx.Module):
  """SIREN layer ``sin(omega * linear(x))`` with the reference's initialisation."""

  OMEGA = 30.0

  def __init__(self, in_features: int, out_features: int, *, first: bool, rngs: nnx.Rngs,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32):
    bound = 1.0 / in_features if first else (6.0 / in_features) ** 0.5 / self.OMEGA
    self.linear = linear(
        in_features, out_features, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        kernel_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(
            key, shape, dtype, -bound, bound),
        bias_init=torch_default_bias_init(in_features))

  def __call__(self, x: jax.Array) -> jax.Array:
    # The phase is taken in float32: at omega 30 a bfloat16 phase would be off by radians.
    return jnp.sin(self.OMEGA * self.linear(x).astype(jnp.float32))


_CONV_HEAD_CHANNELS = (128, 64, 32, 16)


class ToPixel(nnx.Module):
  """Decoder tokens ``(B, g*g, D)`` -> NHWC image; kept under ``to_pixel.model`` like the reference.

  ``linear`` (every released model): ``D -> p*p*3`` per patch, unpatchified. ``conv``: the
  patch grid through a 1x1 conv to 128 channels, then four nearest x2 upsamplings, each
  followed by a 3x3 conv (64, 32, 16, 3 channels), ReLUs between; indices as the
  reference's ``nn.Sequential`` (convs at 1, 4, 7, 10, 13). ``siren``: two sine layers
  whose outputs are read as the image, in the reference's memory order.
  """

  def __init__(self, dim: int, patch_size: int, grid_size: int, head: str = "linear",
               out_chans: int = 3, *, rngs: nnx.Rngs, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32):
    self.head, self.patch_size, self.grid_size, self.out_chans = head, patch_size, grid_size, out_chans
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if head == "linear":
      self.model = linear(dim, patch_size * patch_size * out_chans, **kw)
    elif head == "conv":
      steps = [_HeadStep("grid")]
      widths = (dim,) + _CONV_HEAD_CHANNELS + (out_chans,)
      for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
        if i:
          steps.append(_HeadStep("upsample"))
        size = 1 if i == 0 else 3
        steps.append(nnx.Conv(cin, cout, (size, size), padding="SAME",
                              precision=matmul_precision(dtype),
                              kernel_init=torch_default_kernel_init,
                              bias_init=torch_default_bias_init(cin * size * size), **kw))
        if i < len(widths) - 2:
          steps.append(_HeadStep("relu"))
      self.model = nnx.List(steps)
    elif head == "siren":
      image_size = grid_size * patch_size
      self.model = nnx.List([
          _SineLayer(dim, 2 * dim, first=True, **kw),
          _SineLayer(2 * dim, image_size * out_chans, first=False, **kw)])
    else:
      raise ValueError(f"unknown to_pixel head {head!r}")

  def __call__(self, x: jax.Array) -> jax.Array:
    b, g, p, c = x.shape[0], self.grid_size, self.patch_size, self.out_chans
    if self.head == "linear":
      return unpatchify(self.model(x), p, g, g, c)
    if self.head == "conv":
      x = x.reshape(b, g, g, x.shape[-1])  # tokens in row-major grid order
      for step in self.model:
        x = step(x)
      return x
    for layer in self.model:
      x = layer(x)
    # The reference views its (B, L, image_size*3) output as an NCHW image.
    return x.reshape(b, c, g * p, g * p).transpose(0, 2, 3, 1)


def unpatchify(tokens: jax.Array, patch_size: int, grid_h: int, grid_w: int,
               channels: int = 3) -> jax.Array:
  """``(B, gh*gw, p*p*C)`` with inner order (p_row, p_col, C) -> NHWC image."""
  b = tokens.shape[0]
  p = patch_size
  x = tokens.reshape(b, grid_h, grid_w, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid_h * p, grid_w * p, channels)


class ViTDecoder(nnx.Module):
  """Mask tokens (+ class token and positions), then the projected latents appended at the end."""

  def __init__(self, cfg: ViTConfig, image_size: int, num_latent_tokens: int, *,
               latent_dim: int, use_rope: bool = False, rope_theta: float = 10.0,
               use_ape: bool = True, cls_token: bool = True, to_pixel: str = "linear",
               rngs: nnx.Rngs, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32):
    self.num_latent_tokens = num_latent_tokens
    self.patch_size = cfg.patch_size
    self.grid_size = image_size // cfg.patch_size
    # The reference builds a decoder patch_embed (and, without APE, a position
    # table) but never uses them; we do not create them.
    self.model = VisionTransformer(cfg, image_size, with_patch_embed=False, with_cls_token=cls_token,
                                   with_pos_embed=use_ape, latent_dim=latent_dim, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs)
    self.mask_token = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (1, 1, cfg.embed_dim), param_dtype))
    self.latent_pos_embed = nnx.Param(
        trunc_normal_02(rngs.params(), (1, num_latent_tokens, cfg.embed_dim), param_dtype))
    self.freqs = _rope_freqs(cfg, rope_theta, rngs, param_dtype) if use_rope else None
    self.to_pixel = ToPixel(cfg.embed_dim, cfg.patch_size, self.grid_size, to_pixel,
                            dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def embed(self, latents: jax.Array) -> jax.Array:
    """Input of the first block from projected latents ``(B, L, D)``."""
    b = latents.shape[0]
    num_patches = self.grid_size**2
    masks = jnp.broadcast_to(self.mask_token[...], (b, num_patches, self.mask_token.shape[-1]))
    # Promoted as PyTorch promotes: 16-bit projected latents plus float32 positions are float32,
    # so under autocast the residual stream is float32.
    x = self.model.add_cls_and_positions(masks)
    latents = latents + broadcast_over_batch(self.latent_pos_embed[...], b)
    dtype = jnp.result_type(x.dtype, latents.dtype)
    return jnp.concatenate([x.astype(dtype), latents.astype(dtype)], axis=1)

  def normed_tokens(self, latents: jax.Array, raw_latents: jax.Array | None = None) -> jax.Array:
    """Final-norm output of every row; ``raw_latents`` (before post_quant_conv) drive MoVQ."""
    freqs = self.freqs[...] if self.freqs is not None else None
    return self.model.run_blocks(self.embed(latents), freqs=freqs, latent=raw_latents)

  def image_tokens(self, latents: jax.Array, raw_latents: jax.Array | None = None) -> jax.Array:
    """The image rows of the final norm, the input of ``to_pixel``."""
    start = self.model.num_prefix_tokens
    return self.normed_tokens(latents, raw_latents)[:, start:start + self.grid_size**2]

  def __call__(self, latents: jax.Array, raw_latents: jax.Array | None = None) -> jax.Array:
    return self.to_pixel(self.image_tokens(latents, raw_latents))
