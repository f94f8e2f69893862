"""Flax NNX models of SoftVQ-VAE (tokenizers) and, later, its generators."""

from softvq_jax.models.config import ConfigError, TokenizerConfig, ViTConfig
from softvq_jax.models.tokenizer import EncodeOutput, TokenizerModel

__all__ = ["ConfigError", "EncodeOutput", "TokenizerConfig", "TokenizerModel", "ViTConfig"]
