"""Conversion of released SoftVQ-VAE (and KL/AE) tokenizer checkpoints."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from softvq_jax.convert.core import map_state_dict
from softvq_jax.convert.readers import read_checkpoint
from softvq_jax.convert.tables import (TOKENIZER_IGNORED, TOKENIZER_RULES,
                                       TOKENIZER_UNUSED_IF_ABSENT)
from softvq_jax.models.config import ConfigError, TokenizerConfig


def load_config_json(config: str | Mapping[str, Any]) -> dict[str, Any]:
  if isinstance(config, Mapping):
    return dict(config)
  if os.path.isdir(config):
    raise FileNotFoundError(f"config {config} is a folder; name the config.json in it")
  if not os.path.isfile(config):
    raise FileNotFoundError(f"config {config} does not exist")
  with open(config) as f:
    try:
      return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ConfigError(f"{config} is not valid JSON: {e}") from e


def infer_bottleneck(state: Mapping[str, np.ndarray], cfg: Mapping[str, Any]) -> str:
  """Released configs do not name their bottleneck; the weights do."""
  if "bottleneck" in cfg:
    return cfg["bottleneck"]
  if "quantize.embedding.weight" in state:
    # VQModel's nn.Embedding codebook: hard nearest-code quantisation.
    raise ConfigError("this checkpoint is a hard-VQ tokenizer (quantize.embedding.weight), which "
                      "this version does not support; supported: SoftVQ, KL and plain AE")
  if "quantize.embedding" in state:
    return "softvq"
  quant = state.get("quant_conv.weight")
  dim = cfg.get("codebook_embed_dim")
  if quant is not None and dim is not None and quant.shape[0] == 2 * dim:
    return "kl"
  return "ae"


def convert(checkpoint_path: str, config: str | Mapping[str, Any], *, weights: str = "auto"):
  """Returns (TokenizerConfig, params by NNX path, names of ignored tensors)."""
  from softvq_jax.tokenizer import param_shapes  # pylint: disable=g-import-not-at-top

  cfg = load_config_json(config)
  state = read_checkpoint(checkpoint_path, weights=weights)
  tok_config = TokenizerConfig.from_json_dict(cfg, bottleneck=infer_bottleneck(state, cfg))
  target = {p: tuple(s.shape) for p, s in param_shapes(tok_config).items()}
  flat, ignored = map_state_dict(state, target, TOKENIZER_RULES, TOKENIZER_IGNORED,
                                 unused_if_absent=TOKENIZER_UNUSED_IF_ABSENT)
  return tok_config, flat, ignored
