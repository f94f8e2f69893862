"""The DINOv2-style ViT of the reference and the 1-D tokenizer encoder/decoder built on it.

Attribute names follow the PyTorch state_dict (``encoder.model.blocks.3.attn.qkv``,
``decoder.to_pixel.model``...), so checkpoint conversion is a name table.
Images are NHWC; token sequences are ``(B, N, D)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from softvq_jax.models.config import ViTConfig
from softvq_jax.models.layers import (Block, Dtype, LayerNorm, PatchEmbed, linear,
                                      trunc_normal_02)


class VisionTransformer(nnx.Module):
  """Class token, learned position table (with the class row), pre-norm blocks, final norm."""

  def __init__(self, cfg: ViTConfig, image_size: int, *, with_patch_embed: bool = True,
               in_chans: int = 3, rngs: nnx.Rngs, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32):
    self.embed_dim = cfg.embed_dim
    self.grid_size = image_size // cfg.patch_size
    num_patches = self.grid_size**2
    self.patch_embed = (PatchEmbed(cfg.patch_size, in_chans, cfg.embed_dim, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs)
                        if with_patch_embed else None)
    self.cls_token = nnx.Param(
        1e-6 * jax.random.normal(rngs.params(), (1, 1, cfg.embed_dim), param_dtype))
    self.pos_embed = nnx.Param(
        trunc_normal_02(rngs.params(), (1, 1 + num_patches, cfg.embed_dim), param_dtype))
    self.blocks = nnx.List([
        Block(cfg.embed_dim, cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
              layerscale_init=cfg.layerscale_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(cfg.depth)
    ])
    self.norm = LayerNorm(cfg.embed_dim, param_dtype=param_dtype)

  def add_cls_and_positions(self, tokens: jax.Array) -> jax.Array:
    """Prepends the class token and adds the position table (timm ``_pos_embed``)."""
    b = tokens.shape[0]
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, self.embed_dim)).astype(tokens.dtype)
    return jnp.concatenate([cls, tokens], axis=1) + self.pos_embed[...].astype(tokens.dtype)

  def run_blocks(self, x: jax.Array) -> jax.Array:
    for block in self.blocks:
      x = block(x)
    return self.norm(x)


class ViTEncoder(nnx.Module):
  """Image tokens, then learned latent tokens appended at the end; returns the last L tokens."""

  def __init__(self, cfg: ViTConfig, image_size: int, num_latent_tokens: int, *,
               rngs: nnx.Rngs, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32):
    self.num_latent_tokens = num_latent_tokens
    self.patch_size = cfg.patch_size
    self.image_size = image_size
    self.model = VisionTransformer(cfg, image_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.latent_tokens = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (1, num_latent_tokens, cfg.embed_dim), param_dtype))
    self.latent_pos_embed = nnx.Param(
        trunc_normal_02(rngs.params(), (1, num_latent_tokens, cfg.embed_dim), param_dtype))

  def embed(self, images: jax.Array) -> jax.Array:
    """Input of the first block: ``[cls, patches (+pos), latents (+latent pos)]``."""
    x = self.model.add_cls_and_positions(self.model.patch_embed(images))
    latents = (self.latent_tokens[...] + self.latent_pos_embed[...]).astype(x.dtype)
    latents = jnp.broadcast_to(latents, (x.shape[0],) + latents.shape[1:])
    return jnp.concatenate([x, latents], axis=1)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = self.model.run_blocks(self.embed(images))
    return x[:, -self.num_latent_tokens:]


class ToPixel(nnx.Module):
  """Linear head ``D -> p*p*3``; kept under ``to_pixel.model`` like the reference."""

  def __init__(self, dim: int, patch_size: int, out_chans: int = 3, *, rngs: nnx.Rngs,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32):
    self.model = linear(dim, patch_size * patch_size * out_chans, dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.model(x)


def unpatchify(tokens: jax.Array, patch_size: int, grid_h: int, grid_w: int,
               channels: int = 3) -> jax.Array:
  """``(B, gh*gw, p*p*C)`` with inner order (p_row, p_col, C) -> NHWC image."""
  b = tokens.shape[0]
  p = patch_size
  x = tokens.reshape(b, grid_h, grid_w, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid_h * p, grid_w * p, channels)


class ViTDecoder(nnx.Module):
  """Mask tokens + class token + positions, then the projected latents appended at the end."""

  def __init__(self, cfg: ViTConfig, image_size: int, num_latent_tokens: int, *,
               rngs: nnx.Rngs, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32):
    self.num_latent_tokens = num_latent_tokens
    self.patch_size = cfg.patch_size
    self.grid_size = image_size // cfg.patch_size
    # The reference builds a decoder patch_embed but never uses it; released
    # checkpoints omit it, so we do not create it.
    self.model = VisionTransformer(cfg, image_size, with_patch_embed=False, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs)
    self.mask_token = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (1, 1, cfg.embed_dim), param_dtype))
    self.latent_pos_embed = nnx.Param(
        trunc_normal_02(rngs.params(), (1, num_latent_tokens, cfg.embed_dim), param_dtype))
    self.to_pixel = ToPixel(cfg.embed_dim, cfg.patch_size, dtype=dtype, param_dtype=param_dtype,
                            rngs=rngs)

  def embed(self, latents: jax.Array) -> jax.Array:
    """Input of the first block from projected latents ``(B, L, D)``."""
    b = latents.shape[0]
    num_patches = self.grid_size**2
    masks = jnp.broadcast_to(self.mask_token[...], (b, num_patches, self.mask_token.shape[-1]))
    x = self.model.add_cls_and_positions(masks.astype(latents.dtype))
    latents = latents + self.latent_pos_embed[...].astype(latents.dtype)
    return jnp.concatenate([x, latents], axis=1)

  def image_tokens(self, latents: jax.Array) -> jax.Array:
    """Final-norm output of the image rows (``1 .. N``), the input of ``to_pixel``."""
    x = self.model.run_blocks(self.embed(latents))
    return x[:, 1:1 + self.grid_size**2]

  def __call__(self, latents: jax.Array) -> jax.Array:
    pixels = self.to_pixel(self.image_tokens(latents))
    return unpatchify(pixels, self.patch_size, self.grid_size, self.grid_size)
