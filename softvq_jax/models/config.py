"""Tokenizer architecture, read from a released ``config.json``.

The architecture comes from the config's fields (``encoder_model``,
``decoder_model``, ``num_latent_tokens``, ...), never from a repository name:
the repository called softvq-l-32 is a ViT-B encoder with a ViT-L decoder.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from typing import Any, Mapping

# Sizes of the timm DINOv2 entry points the reference builds its ViTs from.
VIT_SIZES: dict[str, dict[str, int]] = {
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}
_VIT_NAME = re.compile(r"^vit_(small|base|large)_patch14_(reg4_)?dinov2(_movqv2)?(\.lvd142m)?$")
# The reference registers MoVQ variants of these sizes only.
_MOVQ_SIZES = ("small", "base")
_SIZE_OVERRIDES = ("embed_dim", "depth", "num_heads", "mlp_ratio", "init_values")
BOTTLENECKS = ("softvq", "kl", "ae")
# The reference's pixel heads that make an image: a Linear per patch (every released model),
# a convolutional upsampler and a SIREN. Its "identity" head returns tokens, not an image.
TO_PIXEL_HEADS = ("linear", "conv", "siren")


class ConfigError(ValueError):
  """A config.json (or a config dict) that we cannot build a model from."""


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  embed_dim: int
  depth: int
  num_heads: int
  patch_size: int = 16
  mlp_ratio: float = 4.0
  layerscale_init: float | None = 1e-5
  # MoVQ blocks (MAETok decoder): non-affine norms, no LayerScale, latent rows
  # modulated by the raw latent, modulated final norm.
  movq: bool = False
  # DINOv2 "reg4" entry points: register tokens after the class token, and a
  # position table for the patches only (timm's no_embed_class), added before
  # the prefix tokens are prepended.
  reg_tokens: int = 0
  no_embed_class: bool = False

  def __post_init__(self):
    for name in ("embed_dim", "depth", "num_heads", "patch_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"ViT {name} must be a positive integer, got {value!r}")
    if not isinstance(self.reg_tokens, int) or isinstance(self.reg_tokens, bool) or self.reg_tokens < 0:
      raise ConfigError(f"ViT reg_tokens must be a non-negative integer, got {self.reg_tokens!r}")
    if (isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float))
        or not self.mlp_ratio > 0 or int(self.embed_dim * self.mlp_ratio) <= 0):
      raise ConfigError(f"ViT mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
    if self.embed_dim % self.num_heads:
      raise ConfigError(f"ViT embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")


def vit_config_from_name(model_name: str, patch_size: int,
                         overrides: Mapping[str, Any] | None = None, *, field: str) -> ViTConfig:
  """Sizes implied by a timm model name, optionally overridden by ``*_kwargs``."""
  if not isinstance(model_name, str):
    raise ConfigError(f"{field} must be a string, got {model_name!r}")
  if re.match(r"^vit_giant_patch14(_reg4)?_dinov2", model_name):
    raise ConfigError(f"{field}={model_name!r}: DINOv2-giant has a SwiGLU MLP, which this version "
                      "does not implement; use small, base or large")
  match = _VIT_NAME.match(model_name)
  if match is None:
    known = ", ".join([f"vit_{s}_patch14[_reg4]_dinov2.lvd142m" for s in VIT_SIZES]
                      + [f"vit_{s}_patch14_dinov2_movqv2" for s in _MOVQ_SIZES])
    raise ConfigError(f"unknown {field} {model_name!r}; supported: {known}")
  size, reg, movq = match.group(1), match.group(2) is not None, match.group(3) is not None
  if movq and field != "decoder_model":
    raise ConfigError(f"{field}={model_name!r}: MoVQ blocks exist only in decoders")
  if movq and (reg or size not in _MOVQ_SIZES):
    raise ConfigError(f"{field}={model_name!r}: the reference registers no such model; MoVQ "
                      f"decoders are vit_{{{','.join(_MOVQ_SIZES)}}}_patch14_dinov2_movqv2")
  sizes: dict[str, Any] = dict(VIT_SIZES[size])
  overrides = dict(overrides or {})
  unknown = set(overrides) - set(_SIZE_OVERRIDES)
  if unknown:
    raise ConfigError(f"{field.replace('_model', '')}_kwargs has unsupported keys {sorted(unknown)}; "
                      f"allowed: {sorted(_SIZE_OVERRIDES)}")
  # timm's name for the LayerScale init (1e-5 in DINOv2). timm's create_model
  # drops None-valued kwargs, so null keeps the default; 0 builds blocks without
  # LayerScale (and checkpoints without ls*.gamma).
  layerscale_init = overrides.pop("init_values", None)
  if layerscale_init is None:
    layerscale_init = 1e-5
  sizes.update(overrides)
  extra: dict[str, Any] = dict(reg_tokens=4, no_embed_class=True) if reg else {}
  if movq:
    # MoVQ blocks have no LayerScale whatever init_values says.
    return ViTConfig(patch_size=patch_size, layerscale_init=None, movq=True, **sizes)
  if isinstance(layerscale_init, bool) or not isinstance(layerscale_init, (int, float)):
    raise ConfigError(f"init_values must be a number or null, got {layerscale_init!r}")
  return ViTConfig(patch_size=patch_size,
                   layerscale_init=float(layerscale_init) if layerscale_init else None,
                   **extra, **sizes)


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """Everything that shapes a tokenizer, plus the latent statistics."""

  image_size: int
  encoder: ViTConfig
  decoder: ViTConfig
  num_latent_tokens: int
  codebook_embed_dim: int
  bottleneck: str = "softvq"
  codebook_size: int = 8192
  num_codebooks: int = 4
  tau: float = 0.07
  codebook_l2_norm: bool = True
  entropy_loss_ratio: float = 0.01
  entropy_temperature: float = 0.01
  kl_loss_weight: float = 1e-6
  vq_mean: float = 0.0
  vq_std: float = 1.0
  # MAETok options: learnable mixed 2-D RoPE in both ViTs (the encoder keeps its
  # absolute positions whatever ``decoder_use_ape`` says, as in the reference).
  use_rope: bool = False
  rope_theta: float = 10.0
  decoder_use_ape: bool = True
  decoder_cls_token: bool = True
  to_pixel: str = "linear"
  encoder_model: str = ""
  decoder_model: str = ""

  def __post_init__(self):
    if self.bottleneck not in BOTTLENECKS:
      raise ConfigError(f"bottleneck must be one of {BOTTLENECKS}, got {self.bottleneck!r}")
    for name in ("image_size", "num_latent_tokens", "codebook_embed_dim", "codebook_size",
                 "num_codebooks"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    for side, vit in (("encoder", self.encoder), ("decoder", self.decoder)):
      if self.image_size % vit.patch_size:
        raise ConfigError(f"image_size {self.image_size} is not a multiple of the {side} patch size "
                          f"{vit.patch_size}")
    if self.bottleneck == "softvq":
      if self.num_latent_tokens % self.num_codebooks:
        raise ConfigError(f"num_latent_tokens {self.num_latent_tokens} is not divisible by "
                          f"num_codebooks {self.num_codebooks}: SoftVQ splits the tokens into "
                          "contiguous groups, one per codebook")
      if not self.tau > 0:
        raise ConfigError(f"tau must be positive, got {self.tau!r}")
    if not self.vq_std > 0:
      raise ConfigError(f"vq_std must be positive, got {self.vq_std!r}")
    if self.to_pixel not in TO_PIXEL_HEADS:
      raise ConfigError(f"to_pixel must be one of {TO_PIXEL_HEADS}, got {self.to_pixel!r}")
    if self.to_pixel == "conv" and self.decoder.patch_size != 16:
      # Four nearest x2 upsamplings of the patch grid: the reference's head fits 16-px patches.
      raise ConfigError(f"to_pixel='conv' upsamples the patch grid 16 times, so it needs a decoder "
                        f"patch size of 16, got {self.decoder.patch_size}")
    if self.to_pixel == "siren" and self.image_size != self.decoder.patch_size**2:
      # The reference views each token's image_size*3 outputs as the image, which holds
      # exactly when the image has patch_size**2 pixels per side.
      raise ConfigError(f"to_pixel='siren' needs image_size equal to the decoder patch size "
                        f"squared ({self.decoder.patch_size**2}), got {self.image_size}")
    if self.bottleneck == "kl" and self.decoder.movq:
      # The reference's KL model decodes without the raw latent a MoVQ decoder needs.
      raise ConfigError("a KL tokenizer cannot have a MoVQ decoder (the reference's KLModel "
                        "does not pass the latent that modulates MoVQ blocks)")
    if self.use_rope:
      for side, vit in (("encoder", self.encoder), ("decoder", self.decoder)):
        head_dim = vit.embed_dim // vit.num_heads
        if head_dim % 4:
          raise ConfigError(f"mixed RoPE needs the {side} head dim divisible by 4, got {head_dim}")

  @property
  def latent_shape(self) -> tuple[int, int]:
    return (self.num_latent_tokens, self.codebook_embed_dim)

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.encoder.patch_size) ** 2

  def to_json_dict(self) -> dict[str, Any]:
    """A config.json in the released layout (plus ``bottleneck`` and the size overrides)."""
    return {
        "bottleneck": self.bottleneck,
        "image_size": self.image_size,
        "encoder_model": self.encoder_model or _name_for(self.encoder),
        "decoder_model": self.decoder_model or _name_for(self.decoder),
        "encoder_kwargs": _kwargs_for(self.encoder),
        "decoder_kwargs": _kwargs_for(self.decoder),
        "enc_type": "vit",
        "dec_type": "vit",
        "enc_patch_size": self.encoder.patch_size,
        "dec_patch_size": self.decoder.patch_size,
        "num_latent_tokens": self.num_latent_tokens,
        "codebook_embed_dim": self.codebook_embed_dim,
        "codebook_size": self.codebook_size,
        "num_codebooks": self.num_codebooks,
        "tau": self.tau,
        "codebook_l2_norm": self.codebook_l2_norm,
        "entropy_loss_ratio": self.entropy_loss_ratio,
        "kl_loss_weight": self.kl_loss_weight,
        "vq_mean": self.vq_mean,
        "vq_std": self.vq_std,
        "use_rope": self.use_rope,
        "rope_mixed": self.use_rope,
        "rope_theta": self.rope_theta,
        "use_ape": self.decoder_use_ape,
        "dec_cls_token": self.decoder_cls_token,
        "to_pixel": self.to_pixel,
    }

  @classmethod
  def from_json_dict(cls, cfg: Mapping[str, Any], *, bottleneck: str | None = None) -> "TokenizerConfig":
    """Builds the config from a released (or our own) ``config.json`` dict.

    Keys that do not shape the model are ignored. Values that would change the
    architecture in a way we do not implement raise ``ConfigError``.
    """
    if not isinstance(cfg, Mapping):
      raise ConfigError(f"a tokenizer config must be a JSON object, got {type(cfg).__name__}")
    _reject_unsupported(cfg)
    missing = [k for k in ("encoder_model", "decoder_model", "image_size", "num_latent_tokens",
                           "codebook_embed_dim") if k not in cfg]
    if missing:
      raise ConfigError(f"tokenizer config is missing required fields {missing}")
    _warn_of_near_misses(cfg)
    bottleneck = bottleneck or cfg.get("bottleneck", "softvq")
    encoder = vit_config_from_name(cfg["encoder_model"], _int(cfg, "enc_patch_size", 16),
                                   cfg.get("encoder_kwargs"), field="encoder_model")
    decoder = vit_config_from_name(cfg["decoder_model"], _int(cfg, "dec_patch_size", 16),
                                   cfg.get("decoder_kwargs"), field="decoder_model")
    use_rope = _bool(cfg, "use_rope", False)
    # The reference turns absolute positions off whenever RoPE is on.
    decoder_use_ape = _bool(cfg, "use_ape", True) and not use_rope
    decoder_cls_token = _bool(cfg, "dec_cls_token", True)
    if decoder_use_ape and not decoder_cls_token and not decoder.no_embed_class:
      # timm built the table with a class-token row; the reference drops only the
      # token, so adding the table to the mask tokens fails on a length mismatch.
      raise ConfigError("dec_cls_token=False with absolute positions (use_ape=True, use_rope="
                        "False) cannot run in the reference: its decoder position table keeps "
                        "the class-token row")
    return cls(
        bottleneck=bottleneck,
        image_size=cfg["image_size"],
        encoder=encoder,
        decoder=decoder,
        num_latent_tokens=cfg["num_latent_tokens"],
        codebook_embed_dim=cfg["codebook_embed_dim"],
        codebook_size=cfg.get("codebook_size", 16384),  # the reference ModelArgs default
        num_codebooks=cfg.get("num_codebooks", 1),
        tau=_float(cfg, "tau", 0.1),
        codebook_l2_norm=_bool(cfg, "codebook_l2_norm", True),
        entropy_loss_ratio=_float(cfg, "entropy_loss_ratio", 0.0),
        kl_loss_weight=_float(cfg, "kl_loss_weight", 1e-6),
        vq_mean=_float(cfg, "vq_mean", 0.0),
        vq_std=_float(cfg, "vq_std", 1.0),
        use_rope=use_rope,
        rope_theta=_float(cfg, "rope_theta", 10.0),
        decoder_use_ape=decoder_use_ape,
        decoder_cls_token=decoder_cls_token,
        to_pixel=cfg.get("to_pixel", "linear"),
        encoder_model=cfg["encoder_model"],
        decoder_model=cfg["decoder_model"],
    )


def _bool(cfg: Mapping[str, Any], key: str, default: bool) -> bool:
  value = cfg.get(key, default)
  if not isinstance(value, bool):
    # bool("false") is True: a string here would be read as its opposite.
    raise ConfigError(f"{key} must be true or false, got {value!r}")
  return value


def _float(cfg: Mapping[str, Any], key: str, default: float) -> float:
  value = cfg.get(key, default)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ConfigError(f"{key} must be a finite number, got {value!r}")
  return float(value)


# The fields from_json_dict reads (a test records its reads); a key a character or two away
# from one, while that one is absent, is most likely a typo of it (released configs carry
# many other keys).
_READ_FIELDS = ("encoder_model", "decoder_model", "image_size", "num_latent_tokens",
                "codebook_embed_dim", "enc_patch_size", "dec_patch_size", "encoder_kwargs",
                "decoder_kwargs", "use_rope", "use_ape", "dec_cls_token", "codebook_size",
                "num_codebooks", "tau", "codebook_l2_norm", "entropy_loss_ratio",
                "kl_loss_weight", "vq_mean", "vq_std", "rope_theta", "to_pixel", "bottleneck",
                "enc_type", "dec_type", "rope_mixed", "enc_tuning_method", "dec_tuning_method")


def _warn_of_near_misses(cfg: Mapping[str, Any]) -> None:
  from absl import logging  # pylint: disable=g-import-not-at-top
  for key in cfg:
    if key in _READ_FIELDS:
      continue
    close = [f for f in difflib.get_close_matches(key, _READ_FIELDS, n=1, cutoff=0.85)
             if f not in cfg]
    if close:
      logging.warning("tokenizer config field %r is not read (did you mean %r? it is absent, so "
                      "its default is used)", key, close[0])


def _int(cfg: Mapping[str, Any], key: str, default: int) -> int:
  value = cfg.get(key, default)
  if not isinstance(value, int) or isinstance(value, bool):
    raise ConfigError(f"{key} must be an integer, got {value!r}")
  return value


# (field, value that we support, what it would need). A missing field takes the
# reference's default for checkpoints of the SoftVQ era, which is the supported one.
_SUPPORTED_VALUES = (
    ("enc_type", "vit", "a CNN encoder"),
    ("dec_type", "vit", "a CNN decoder"),
    ("enc_tuning_method", "full", "LoRA/frozen encoders"),
    ("dec_tuning_method", "full", "LoRA/frozen decoders"),
)


def _reject_unsupported(cfg: Mapping[str, Any]) -> None:
  problems = []
  if "enc_type" not in cfg:
    # The reference's ModelArgs default is a CNN encoder: a config without the
    # field does not describe a ViT tokenizer.
    problems.append("enc_type is missing (the reference default is 'cnn', which is not supported)")
  for key, supported, what in _SUPPORTED_VALUES:
    if key in cfg and cfg[key] != supported:
      problems.append(f"{key}={cfg[key]!r} would need {what}, which this version does not support "
                      f"(supported: {supported!r})")
  if cfg.get("to_pixel") == "identity":
    problems.append("to_pixel='identity' decodes to tokens, not an image; choose one of "
                    f"{TO_PIXEL_HEADS}")
  if cfg.get("use_rope") and not cfg.get("rope_mixed", False):
    problems.append("use_rope=True with rope_mixed=False would need axial RoPE, which this version "
                    "does not support (supported: the learnable mixed RoPE of MAETok)")
  if not cfg.get("use_ape", True) and not cfg.get("use_rope", False):
    # Without APE or mixed RoPE the reference encoder takes its axial-RoPE path,
    # which fails, and its decoder has no rotary tables: no such model runs.
    problems.append("use_ape=False without use_rope=True leaves the reference's ViTs without "
                    "position information and its forward fails; set use_ape=True, or "
                    "use_rope=True with rope_mixed=True")
  if problems:
    raise ConfigError("unsupported tokenizer config: " + "; ".join(problems))


def _name_for(vit: ViTConfig) -> str:
  if vit.movq:
    return "vit_base_patch14_dinov2_movqv2"
  reg = "reg4_" if vit.reg_tokens else ""
  for size, dims in VIT_SIZES.items():
    if dims == dict(embed_dim=vit.embed_dim, depth=vit.depth, num_heads=vit.num_heads):
      return f"vit_{size}_patch14_{reg}dinov2.lvd142m"
  return f"vit_base_patch14_{reg}dinov2.lvd142m"


def _kwargs_for(vit: ViTConfig) -> dict[str, Any]:
  kwargs: dict[str, Any] = dict(embed_dim=vit.embed_dim, depth=vit.depth, num_heads=vit.num_heads)
  if vit.mlp_ratio != 4.0:
    kwargs["mlp_ratio"] = vit.mlp_ratio
  if not vit.movq and vit.layerscale_init != 1e-5:
    # 0.0, not None, for blocks without LayerScale: timm reads None as "default".
    kwargs["init_values"] = vit.layerscale_init or 0.0
  return kwargs
