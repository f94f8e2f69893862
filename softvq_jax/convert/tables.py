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
    (_VIT + r"\.(cls_token|reg_token|pos_embed)", r"\1.model.\2", ID),
    (r"encoder\.model\.patch_embed\.proj\.weight", "encoder.model.patch_embed.proj.kernel", CONV),
    (r"encoder\.model\.patch_embed\.proj\.bias", "encoder.model.patch_embed.proj.bias", ID),
    (r"encoder\.(latent_tokens|latent_pos_embed)", r"encoder.\1", ID),
    (r"decoder\.(mask_token|latent_pos_embed)", r"decoder.\1", ID),
    (r"(quant_conv|post_quant_conv|decoder\.to_pixel\.model)\.weight", r"\1.kernel", LIN),
    (r"(quant_conv|post_quant_conv|decoder\.to_pixel\.model)\.bias", r"\1.bias", ID),
    # The conv head's nn.Sequential convolutions and the SIREN head's sine layers.
    (r"decoder\.to_pixel\.model\.(\d+)\.weight", r"decoder.to_pixel.model.\1.kernel", CONV),
    (r"decoder\.to_pixel\.model\.(\d+)\.bias", r"decoder.to_pixel.model.\1.bias", ID),
    (r"decoder\.to_pixel\.model\.(\d+)\.linear\.weight",
     r"decoder.to_pixel.model.\1.linear.kernel", LIN),
    (r"decoder\.to_pixel\.model\.(\d+)\.linear\.bias", r"decoder.to_pixel.model.\1.linear.bias", ID),
    (r"quantize\.embedding", "quantize.embedding", ID),
    # MAETok: learned RoPE frequencies and the MoVQ decoder's modulation layers
    # (PyTorch Sequential(SiLU, Linear): index 1 is the Linear).
    (r"(encoder|decoder)\.freqs", r"\1.freqs", ID),
    (r"decoder\.model\.(blocks\.\d+|norm)\.adaLN_modulation\.1\.weight",
     r"decoder.model.\1.adaLN_modulation.kernel", LIN),
    (r"decoder\.model\.(blocks\.\d+|norm)\.adaLN_modulation\.1\.bias",
     r"decoder.model.\1.adaLN_modulation.bias", ID),
]

# Present in reference checkpoints but without influence on inference: the
# usage ring buffer, the REPA teacher and projector (training only) and the
# decoder's patch embedding, which the reference builds and never calls.
TOKENIZER_IGNORED: list[str] = [
    r"quantize\.codebook_used",
    r"repa_model\..*",
    r"projection\.\d+\.(weight|bias)",
    r"decoder\.model\.patch_embed\.proj\.(weight|bias)",
    # MAETok: the encoder's MAE mask token (training only) and the RoPE position
    # buffers, which we derive from the input size instead.
    r"encoder\.mask_token",
    r"(encoder|decoder)\.freqs_t_[xy]",
    # MAETok training checkpoints: auxiliary HOG/DINOv2/SigLIP decoders and teachers.
    r"(decoder|post_quant_conv|to_pixel)_(hog|dino|clip)(\..*)?",
    r"clip_model\..*",
    r"hog_generator\..*",   # the HOG target's fixed filters (persistent buffers)
]

# Tensors a checkpoint may hold although this model does not use them: the
# decoder's position table when the decoder runs without absolute positions.
TOKENIZER_UNUSED_IF_ABSENT: list[str] = [
    r"decoder\.model\.pos_embed",
]
