"""Parameter counts of every released tokenizer, from jax.eval_shape (nothing is allocated).

The expected numbers are derived here from the state-dict key table of the reference
checkpoints, independently of the model code, and anchored to the
reference's measured total for SoftVQ-L-64.
"""

import pytest

from softvq_jax.models.released import RELEASED_TOKENIZERS, released_config
from softvq_jax.tokenizer import count_params

WIDTH = {"vit_base_patch14_dinov2.lvd142m": (768, 12), "vit_large_patch14_dinov2.lvd142m": (1024, 24)}
USAGE_BUFFER = 4 * 65536  # quantize.codebook_used


def reference_state_dict_size(cfg) -> tuple[int, int]:
  """(elements of the reference state_dict, elements of its decoder patch conv)."""
  n = (cfg["image_size"] // 16) ** 2
  tokens, d = cfg["num_latent_tokens"], cfg["codebook_embed_dim"]

  def vit(width, depth):
    block = (2 * width                        # norm1
             + 3 * width * width + 3 * width  # attn.qkv
             + width * width + width          # attn.proj
             + width                          # ls1.gamma
             + 2 * width                      # norm2
             + 4 * width * width + 4 * width  # mlp.fc1
             + 4 * width * width + width      # mlp.fc2
             + width)                         # ls2.gamma
    patch = width * 3 * 16 * 16 + width
    return width + (1 + n) * width + patch + depth * block + 2 * width, patch

  de, depth_e = WIDTH[cfg["encoder_model"]]
  dd, depth_d = WIDTH[cfg["decoder_model"]]
  enc, _ = vit(de, depth_e)
  dec, dec_patch = vit(dd, depth_d)
  total = (enc + 2 * tokens * de                  # + latent_tokens, latent_pos_embed
           + d * de + d                           # quant_conv
           + 4 * 8192 * d + USAGE_BUFFER          # quantize.embedding, codebook_used
           + dd * d + dd                          # post_quant_conv
           + dec + dd + tokens * dd               # + mask_token, latent_pos_embed
           + 768 * dd + 768)                      # to_pixel
  return total, dec_patch


def test_formula_reproduces_the_reference_measurement():
  # The reference SoftVQ-L-64 state_dict, buffers included: 609,186,592 elements.
  total, _ = reference_state_dict_size(RELEASED_TOKENIZERS["softvq-l-64"])
  assert total == 609_186_592


@pytest.mark.parametrize("name", sorted(RELEASED_TOKENIZERS))
def test_param_count_equals_reference(name):
  cfg = RELEASED_TOKENIZERS[name]
  total, dec_patch = reference_state_dict_size(cfg)
  # Released files carry neither the usage buffer (a buffer, not a parameter)
  # nor the decoder patch conv the reference never calls.
  assert count_params(released_config(name)) == total - USAGE_BUFFER - dec_patch


@pytest.mark.parametrize("name, millions", [("softvq-b-32", 174.6), ("softvq-l-32", 392.4),
                                            ("softvq-l-64", 608.9)])
def test_parameter_sizes_quoted_by_the_reference(name, millions):
  total, _ = reference_state_dict_size(RELEASED_TOKENIZERS[name])
  assert round((total - USAGE_BUFFER) / 1e6, 1) == millions


@pytest.mark.parametrize("name, gigabytes", [("softvq-b-32", 0.697), ("softvq-l-64", 2.43),
                                             ("softvq-l-32", 1.57), ("softvq-bl-64-512", 1.57)])
def test_released_file_sizes(name, gigabytes):
  # The released float32 files hold the usage buffer but not the decoder patch conv.
  total, dec_patch = reference_state_dict_size(RELEASED_TOKENIZERS[name])
  digits = 3 if gigabytes < 1 else 2
  assert round((total - dec_patch) * 4 / 1e9, digits) == gigabytes
