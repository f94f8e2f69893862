"""The 1-D tokenizer: ViT encoder -> quant_conv -> bottleneck -> post_quant_conv -> ViT decoder."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from softvq_jax.models.config import TokenizerConfig
from softvq_jax.models.layers import Dtype, linear, torch_default_bias_init, torch_default_kernel_init
from softvq_jax.models.quantizers import DiagonalGaussian, SoftVectorQuantizer, SoftVQOutput
from softvq_jax.models.vit import ViTDecoder, ViTEncoder


class EncodeOutput(NamedTuple):
  """What the bottleneck produced: ``quant`` is the latent every caller wants."""

  quant: jax.Array                       # (B, L, d)
  h: jax.Array                           # quant_conv output (for KL: the 2d moments)
  softvq: SoftVQOutput | None = None
  posterior: DiagonalGaussian | None = None


def _torch_linear(in_features: int, out_features: int, **kwargs) -> nnx.Linear:
  # quant_conv / post_quant_conv keep PyTorch's default Linear init.
  return linear(in_features, out_features, kernel_init=torch_default_kernel_init,
                bias_init=torch_default_bias_init(in_features), **kwargs)


class TokenizerModel(nnx.Module):
  """SoftVQ (default), KL or plain-AE (MAETok) tokenizer with the reference's parameter names."""

  def __init__(self, cfg: TokenizerConfig, *, rngs: nnx.Rngs, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32):
    self.config = cfg
    kw: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.encoder = ViTEncoder(cfg.encoder, cfg.image_size, cfg.num_latent_tokens,
                              use_rope=cfg.use_rope, rope_theta=cfg.rope_theta, **kw)
    moments = 2 if cfg.bottleneck == "kl" else 1
    self.quant_conv = _torch_linear(cfg.encoder.embed_dim, moments * cfg.codebook_embed_dim, **kw)
    self.quantize = (SoftVectorQuantizer(cfg.codebook_size, cfg.codebook_embed_dim,
                                         cfg.num_codebooks, cfg.tau, l2_norm=cfg.codebook_l2_norm,
                                         rngs=rngs, param_dtype=param_dtype)
                     if cfg.bottleneck == "softvq" else None)
    self.post_quant_conv = _torch_linear(cfg.codebook_embed_dim, cfg.decoder.embed_dim, **kw)
    self.decoder = ViTDecoder(cfg.decoder, cfg.image_size, cfg.num_latent_tokens,
                              latent_dim=cfg.codebook_embed_dim, use_rope=cfg.use_rope,
                              rope_theta=cfg.rope_theta, use_ape=cfg.decoder_use_ape,
                              cls_token=cfg.decoder_cls_token, to_pixel=cfg.to_pixel, **kw)

  def encode(self, images: jax.Array, *, sample_key: jax.Array | None = None) -> EncodeOutput:
    """NHWC images in [-1, 1] -> latents. KL uses the posterior mode unless a key is given."""
    h = self.quant_conv(self.encoder(images)).astype(jnp.float32)
    if self.config.bottleneck == "softvq":
      out = self.quantize(h)
      return EncodeOutput(quant=out.quant, h=h, softvq=out)
    if self.config.bottleneck == "kl":
      posterior = DiagonalGaussian.from_moments(h)
      quant = posterior.mode() if sample_key is None else posterior.sample(sample_key)
      return EncodeOutput(quant=quant, h=h, posterior=posterior)
    return EncodeOutput(quant=h, h=h)

  def decode(self, latents: jax.Array) -> jax.Array:
    """``(B, L, d)`` latents -> NHWC image (not clamped)."""
    raw = latents if self.config.decoder.movq else None
    return self.decoder(self.post_quant_conv(latents), raw).astype(jnp.float32)

  def __call__(self, images: jax.Array, *, sample_key: jax.Array | None = None):
    enc = self.encode(images, sample_key=sample_key)
    return self.decode(enc.quant), enc
