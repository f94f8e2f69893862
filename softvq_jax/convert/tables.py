"""Name tables: PyTorch state-dict names -> NNX parameter paths, per model family."""

from __future__ import annotations

from softvq_jax.convert.core import Rule, Transform

ID, LIN, CONV = Transform.IDENTITY, Transform.LINEAR, Transform.CONV_OIHW

_VIT = r"(encoder|decoder)\.model"
_BLOCK = _VIT + r"\.blocks\.(\d+)"

TOKENIZER_RULES: list[Rule] = [
    (_BLOCK + r"\.(norm[12])\.weight", r"\1.model.blocks.\2.\3.scale", ID),
    (_BLOCK + r"\.(norm[12])\.bias", r"\1.model.blocks.\2.\3.bias", ID),
    (_BLOCK + r"\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.weight", r"\1.model.blocks.\2.\3.kernel", LIN),
    (_BLOCK + r"\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.bias", r"\1.model.blocks.\2.\3.bias", ID),
    (_BLOCK + r"\.(ls[12])\.gamma", r"\1.model.blocks.\2.\3.gamma", ID),
    (_VIT + r"\.norm\.weight", r"\1.model.norm.scale", ID),
    (_VIT + r"\.norm\.bias", r"\1.model.norm.bias", ID),
    (_VIT + r"\.(cls_token|pos_embed)", r"\1.model.\2", ID),
    (r"encoder\.model\.patch_embed\.proj\.weight", "encoder.model.patch_embed.proj.kernel", CONV),
    (r"encoder\.model\.patch_embed\.proj\.bias", "encoder.model.patch_embed.proj.bias", ID),
    (r"encoder\.(latent_tokens|latent_pos_embed)", r"encoder.\1", ID),
    (r"decoder\.(mask_token|latent_pos_embed)", r"decoder.\1", ID),
    (r"(quant_conv|post_quant_conv|decoder\.to_pixel\.model)\.weight", r"\1.kernel", LIN),
    (r"(quant_conv|post_quant_conv|decoder\.to_pixel\.model)\.bias", r"\1.bias", ID),
    (r"quantize\.embedding", "quantize.embedding", ID),
]

# Present in reference checkpoints but without influence on inference: the
# usage ring buffer, the REPA teacher and projector (training only) and the
# decoder's patch embedding, which the reference builds and never calls.
TOKENIZER_IGNORED: list[str] = [
    r"quantize\.codebook_used",
    r"repa_model\..*",
    r"projection\.\d+\.(weight|bias)",
    r"decoder\.model\.patch_embed\.proj\.(weight|bias)",
]
