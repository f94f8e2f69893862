"""Conversion of released SiT / DiT checkpoints (1-D latent tokens)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from absl import logging

from softvq_jax.convert.core import Rule, Transform, map_state_dict
from softvq_jax.convert.readers import read_checkpoint
from softvq_jax.convert.tokenizer import load_config_json
from softvq_jax.models.sit import GeneratorConfig, sincos_pos_embed_1d

ID, LIN = Transform.IDENTITY, Transform.LINEAR
_LINEARS = (r"x_embedder|t_embedder\.mlp\.[02]|blocks\.\d+\.(?:attn\.qkv|attn\.proj|mlp\.fc1|"
            r"mlp\.fc2|adaLN_modulation\.1)|final_layer\.(?:linear|adaLN_modulation\.1)")

GENERATOR_RULES: list[Rule] = [
    (rf"({_LINEARS})\.weight", r"\1.kernel", LIN),
    (rf"({_LINEARS})\.bias", r"\1.bias", ID),
    (r"y_embedder\.embedding_table\.weight", "y_embedder.embedding_table.embedding", ID),
    # qk_norm SiTs only: the model has these paths only then, so a qk_norm=false config
    # reports such tensors as unexpected and a qk_norm=true one reports them as missing.
    (r"(blocks\.\d+\.attn\.[qk]_norm)\.weight", r"\1.scale", ID),
    (r"(blocks\.\d+\.attn\.[qk]_norm)\.bias", r"\1.bias", ID),
    (r"pos_embed", "pos_embed", ID),
]
GENERATOR_IGNORED: list[str] = []

POS_EMBED = ("pos_embed",)


def convert(checkpoint_path: str, config: str | Mapping[str, Any], *, weights: str = "auto",
            kind: str | None = None):
  """Returns (GeneratorConfig, params by NNX path, names of ignored tensors).

  ``pos_embed`` is taken from the checkpoint when it is there (the reference
  stores it); otherwise the fixed sin/cos table is rebuilt.
  """
  from softvq_jax.generator import variable_shapes  # pylint: disable=g-import-not-at-top

  cfg = load_config_json(config)
  state = read_checkpoint(checkpoint_path, weights=weights)  # prefixes already stripped
  gen_config = GeneratorConfig.from_json_dict(cfg, kind=kind)
  target = {p: tuple(s.shape) for p, s in variable_shapes(gen_config).items()}
  has_pos = "pos_embed" in state
  if not has_pos:
    target.pop(POS_EMBED)
  flat, ignored = map_state_dict(state, target, GENERATOR_RULES, GENERATOR_IGNORED)
  table = sincos_pos_embed_1d(gen_config.hidden_size, gen_config.input_size)[None]
  if not has_pos:
    logging.info("checkpoint has no pos_embed; using the fixed sin/cos table")
    flat[POS_EMBED] = table
  elif not np.allclose(flat[POS_EMBED], table, atol=1e-5):
    logging.warning("the checkpoint's pos_embed differs from the sin/cos table by %.3g; "
                    "using the stored one", float(np.max(np.abs(flat[POS_EMBED] - table))))
  return gen_config, flat, ignored
