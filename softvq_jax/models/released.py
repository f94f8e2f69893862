"""Architectures of the released SoftVQ-VAE tokenizers, as their config.json files describe them.

Only the fields that shape the model (and the latent statistics) are listed.
A converted checkpoint always uses its own config.json; these entries are for
building models to train from scratch and for checks such as parameter counts.
The repository called softvq-l-32 is a ViT-B encoder with a ViT-L decoder: the
names do not follow the architecture, the configs do.
"""

from __future__ import annotations

from typing import Any

from softvq_jax.models.config import TokenizerConfig

_B = "vit_base_patch14_dinov2.lvd142m"
_L = "vit_large_patch14_dinov2.lvd142m"


def _entry(encoder, decoder, image_size, tokens, dim, vq_mean, vq_std) -> dict[str, Any]:
  return dict(
      enc_type="vit", dec_type="vit", encoder_model=encoder, decoder_model=decoder,
      enc_patch_size=16, dec_patch_size=16, image_size=image_size, num_latent_tokens=tokens,
      codebook_embed_dim=dim, codebook_size=8192, num_codebooks=4, tau=0.07,
      codebook_l2_norm=True, vq_mean=vq_mean, vq_std=vq_std, bottleneck="softvq",
      to_pixel="linear")


RELEASED_TOKENIZERS: dict[str, dict[str, Any]] = {
    "softvq-b-64": _entry(_B, _B, 256, 64, 32, -0.003192751, 0.07235257),
    "softvq-bl-64": _entry(_B, _L, 256, 64, 32, -0.00077168207, 0.07157949),
    "softvq-l-64": _entry(_L, _L, 256, 64, 32, 0.0009714666, 0.07259091),
    "softvq-b-32": _entry(_B, _B, 256, 32, 64, -0.0001770356, 0.029009325),
    "softvq-bl-32": _entry(_B, _L, 256, 32, 64, 0.0010870857, 0.028672216),
    "softvq-l-32": _entry(_B, _L, 256, 32, 64, 0.00060894643, 0.029030401),
    "softvq-bl-64-512": _entry(_B, _L, 512, 64, 32, -0.0021498345, 0.073663734),
    "softvq-l-32-512": _entry(_B, _L, 512, 32, 64, -0.0011922447, 0.028908715),
}


def _maetok(image_size: int) -> dict[str, Any]:
  # The MAETok releases' latent statistics were not published with the code:
  # take vq_mean/vq_std from the checkpoint's own config.json when converting.
  return dict(
      enc_type="vit", dec_type="vit", encoder_model=_B,
      decoder_model="vit_base_patch14_dinov2_movqv2", enc_patch_size=16, dec_patch_size=16,
      image_size=image_size, num_latent_tokens=128, codebook_embed_dim=32, use_rope=True,
      rope_mixed=True, rope_theta=10.0, use_ape=False, dec_cls_token=False, bottleneck="ae",
      vq_mean=0.0, vq_std=1.0, to_pixel="linear")


# MAETok (arXiv 2502.03444): the same authors' plain-AE tokenizer with learned
# mixed RoPE and a MoVQ decoder; rFID 0.48 (256) and 0.62 (512).
RELEASED_MAETOK: dict[str, dict[str, Any]] = {
    "maetok-b-128": _maetok(256),
    "maetok-b-128-512": _maetok(512),
}


def released_config(name: str) -> TokenizerConfig:
  table = {**RELEASED_TOKENIZERS, **RELEASED_MAETOK}
  if name not in table:
    raise KeyError(f"unknown released tokenizer {name!r}; known: {sorted(table)}")
  return TokenizerConfig.from_json_dict(table[name])
