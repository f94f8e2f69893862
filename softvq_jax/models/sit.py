"""SiT and DiT backbones on 1-D latent tokens (adaLN-Zero transformers).

The two reference networks are the same transformer: tokens ``(B, T, C)`` go
through ``x_embedder`` (a Linear, since the latents are 1-D), a fixed
interleaved sin/cos position table, adaLN-Zero blocks conditioned on
``c = t_embedder(t) + y_embedder(y)``, and a modulated final layer. They
differ only in what ``t`` means and what comes out:

* SiT: ``t`` in [0, 1] (t = 1 noise), output the velocity ``(B, T, C)``.
* DiT: ``t`` an integer step in {0..999}, ``learn_sigma`` doubles the output
  to ``[eps | v]`` ``(B, T, 2C)``; ``forward_with_cfg`` guides the eps half.

Either ``t`` is fed to the sinusoid unscaled, so one class serves both.
Attribute names mirror the PyTorch state dict (``blocks.3.adaLN_modulation.1``,
``t_embedder.mlp.2``), which keeps the converter a name table.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from softvq_jax.models.adaln import gated_residual_adaln, pending_add_and_norm
from softvq_jax.models.config import ConfigError
from softvq_jax.parallel import constrain
from softvq_jax.models.layers import (Attention, Dtype, LayerNorm, Mlp, PendingBranch, linear,
                                      linear_without_bias)
from softvq_jax.transport.diffusion import SCHEDULES as DIFFUSION_SCHEDULES

Array = jax.Array
KINDS = ("sit", "dit")

# (hidden_size, depth, num_heads) of the reference's size presets. "SL" exists
# for DiT only in the reference; it is accepted for both here.
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
    "SL": (1024, 16, 16),
}


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
  """Everything that shapes a SiT/DiT on 1-D tokens.

  ``input_size`` is the number of latent tokens T and ``in_channels`` their
  width C (the tokenizer's ``num_latent_tokens`` / ``codebook_embed_dim``).
  ``qk_norm`` (SiT only, as in the reference) adds an affine LayerNorm on each
  head's q and k in every block (``blocks.N.attn.q_norm`` / ``k_norm``).
  ``noise_schedule`` and ``diffusion_steps`` (DiT only) are the diffusion process the
  model was trained on (the reference's: cosine, 1000 steps); samplers respace it.
  """

  kind: str = "sit"
  input_size: int = 64
  in_channels: int = 32
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  class_dropout_prob: float = 0.1
  learn_sigma: bool = False
  qk_norm: bool = False
  noise_schedule: str = "cosine"
  diffusion_steps: int = 1000

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ConfigError(f"kind must be one of {KINDS}, got {self.kind!r}")
    for name in ("input_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if self.hidden_size % self.num_heads:
      raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                        f"{self.num_heads}")
    if self.hidden_size % 2:
      raise ConfigError(f"hidden_size must be even for the sin/cos position table, "
                        f"got {self.hidden_size}")
    if not 0.0 <= self.class_dropout_prob < 1.0:
      raise ConfigError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob!r}")
    if not self.mlp_ratio > 0:
      raise ConfigError(f"mlp_ratio must be positive, got {self.mlp_ratio!r}")
    if self.kind == "sit" and self.learn_sigma:
      raise ConfigError("SiT predicts a velocity; learn_sigma is a DiT option")
    if not isinstance(self.qk_norm, bool):
      raise ConfigError(f"qk_norm must be true or false, got {self.qk_norm!r}")
    if self.kind == "dit" and self.qk_norm:
      # The reference DiT's constructor has no such argument, so no DiT checkpoint has them.
      raise ConfigError("qk_norm is a SiT option; the reference DiT has no q/k norms")
    if self.noise_schedule not in DIFFUSION_SCHEDULES:
      raise ConfigError(f"noise_schedule must be one of {DIFFUSION_SCHEDULES}, "
                        f"got {self.noise_schedule!r}")
    if (not isinstance(self.diffusion_steps, int) or isinstance(self.diffusion_steps, bool)
        or self.diffusion_steps < 2):
      raise ConfigError(f"diffusion_steps must be an integer >= 2, got {self.diffusion_steps!r}")
    if self.kind == "sit" and (self.noise_schedule, self.diffusion_steps) != ("cosine", 1000):
      raise ConfigError("noise_schedule and diffusion_steps are DiT options; a SiT's "
                        "interpolant is chosen when sampling (path=)")

  @classmethod
  def preset(cls, name: str, **overrides) -> "GeneratorConfig":
    """``"SiT-XL/1"``, ``"DiT-B/1"``, ``"DiT-SL/1"``... plus field overrides."""
    try:
      family, rest = name.split("-", 1)
      size, patch = rest.split("/")
    except ValueError:
      raise ConfigError(f"preset names look like 'SiT-XL/1', got {name!r}") from None
    kind = family.lower()
    if kind not in KINDS or size not in SIZES or patch != "1":
      known = [f"{f}-{s}/1" for f in ("SiT", "DiT") for s in SIZES]
      raise ConfigError(f"unknown preset {name!r} (1-D tokens have patch size 1); known: {known}")
    hidden, depth, heads = SIZES[size]
    fields = dict(kind=kind, hidden_size=hidden, depth=depth, num_heads=heads,
                  learn_sigma=kind == "dit")
    fields.update(overrides)
    return cls(**fields)

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @property
  def null_label(self) -> int:
    """The label of the unconditional (dropped) class: row ``num_classes`` of the table."""
    return self.num_classes

  @property
  def has_null_label(self) -> bool:
    return self.class_dropout_prob > 0

  @property
  def latent_shape(self) -> tuple[int, int]:
    return (self.input_size, self.in_channels)

  def to_json_dict(self) -> dict[str, Any]:
    """A config.json in the released field layout, plus ``kind``."""
    out = {
        "kind": self.kind,
        "input_size": self.input_size,
        "in_channels": self.in_channels,
        "hidden_size": self.hidden_size,
        "depth": self.depth,
        "num_heads": self.num_heads,
        "mlp_ratio": self.mlp_ratio,
        "num_classes": self.num_classes,
        "class_dropout_prob": self.class_dropout_prob,
        "patch_size": 1,
        "vae_1d": True,
    }
    if self.kind == "dit":
      out.update(learn_sigma=self.learn_sigma, noise_schedule=self.noise_schedule,
                 diffusion_steps=self.diffusion_steps)
    else:
      out.update(decoder_hidden_size=self.hidden_size, qk_norm=self.qk_norm)
    return out

  @classmethod
  def from_json_dict(cls, cfg: Mapping[str, Any], *, kind: str | None = None) -> "GeneratorConfig":
    """Builds the config from a released SiT/DiT ``config.json`` (or our own).

    Non-architectural fields (``license``, ``repo_url``, ``tags``, ``path_type``,
    ``use_cfg``, attention-kernel switches) are ignored; values that would
    change the network in a way this port does not implement raise.
    """
    if not isinstance(cfg, Mapping):
      raise ConfigError(f"a generator config must be a JSON object, got {type(cfg).__name__}")
    kind = kind or cfg.get("kind") or infer_kind(cfg)
    if kind not in KINDS:
      raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    problems = []
    if cfg.get("vae_1d") is not True:
      problems.append(f"vae_1d={cfg.get('vae_1d')!r}: only generators on 1-D latent tokens "
                      "(vae_1d=true) are supported; 2-D patch inputs are not")
    hidden = cfg.get("hidden_size")
    dec_hidden = cfg.get("decoder_hidden_size", hidden)
    if dec_hidden != hidden:
      # The reference builds its final layer with decoder_hidden_size but feeds it
      # hidden_size features, so such a model cannot run there either.
      problems.append(f"decoder_hidden_size={dec_hidden!r} differs from hidden_size={hidden!r}")
    missing = [k for k in ("input_size", "in_channels", "hidden_size", "depth", "num_heads")
               if k not in cfg]
    if missing:
      problems.append(f"missing required fields {missing}")
    if problems:
      raise ConfigError(f"unsupported {kind} config: " + "; ".join(problems))
    if cfg.get("patch_size", 1) != 1:
      # With vae_1d the reference forces patch size 1 whatever the field says.
      logging.warning("patch_size=%r is ignored for 1-D tokens (the reference uses 1)",
                      cfg["patch_size"])
    if kind == "sit" and cfg.get("learn_sigma", False):
      # The reference SiT has no such argument: it lands in the blocks' unused
      # keyword arguments and the network still outputs in_channels velocities.
      logging.info("learn_sigma=%r is ignored for a SiT (the reference ignores it too)",
                   cfg["learn_sigma"])
    unknown = sorted(set(cfg) - _KNOWN_FIELDS - _IGNORED_FIELDS)
    if unknown:
      logging.warning("ignoring unknown generator config fields %s", unknown)
    learn_sigma = bool(cfg.get("learn_sigma", True)) if kind == "dit" else False
    return cls(
        kind=kind,
        input_size=cfg["input_size"],
        in_channels=cfg["in_channels"],
        hidden_size=hidden,
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
        mlp_ratio=float(cfg.get("mlp_ratio", 4.0)),
        num_classes=cfg.get("num_classes", 1000),
        class_dropout_prob=float(cfg.get("class_dropout_prob", 0.1)),
        learn_sigma=learn_sigma,
        qk_norm=cfg.get("qk_norm", False),
        **({"noise_schedule": cfg.get("noise_schedule", "cosine"),
            "diffusion_steps": cfg.get("diffusion_steps", 1000)} if kind == "dit" else {}),
    )


_KNOWN_FIELDS = {"kind", "input_size", "in_channels", "hidden_size", "decoder_hidden_size", "depth",
                 "num_heads", "mlp_ratio", "num_classes", "class_dropout_prob", "learn_sigma",
                 "patch_size", "vae_1d", "qk_norm", "noise_schedule", "diffusion_steps"}
# Recorded by PyTorchModelHubMixin or used only outside the network (the REPA
# projector sizes are passed to the reference SiT, which never reads them).
_IGNORED_FIELDS = {"license", "repo_url", "tags", "path_type", "use_cfg", "fused_attn",
                   "flash_attn", "z_dims", "encoder_depth"}


def infer_kind(cfg: Mapping[str, Any]) -> str:
  """SiT or DiT from a released config: the Hub mixin's tags name the class."""
  tags = [str(t).lower() for t in cfg.get("tags", []) or []]
  if "dit" in tags and "sit" not in tags:
    return "dit"
  if "sit" in tags and "dit" not in tags:
    return "sit"
  # The reference DiT takes no extra keyword arguments, so SiT-only fields are
  # decisive; learn_sigma is not, since the SiT silently accepts it.
  if {"decoder_hidden_size", "path_type", "use_cfg", "qk_norm"} & set(cfg):
    return "sit"
  if "learn_sigma" in cfg:
    return "dit"
  raise ConfigError("cannot tell whether this config is a SiT or a DiT; pass kind='sit' or 'dit'")


# ----------------------------------------------------------------- embeddings
def sincos_pos_embed_1d(dim: int, length: int) -> np.ndarray:
  """The reference's fixed 1-D table, ``(length, dim)``: even channels sin, odd cos.

  Frequencies are computed in float32 as the reference does, so a rebuilt table
  equals a stored one to float32 rounding.
  """
  if dim % 2:
    raise ValueError(f"sin/cos position table needs an even width, got {dim}")
  div = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim))
  angles = np.arange(length, dtype=np.float32)[:, None] * div[None]
  table = np.zeros((length, dim), np.float32)
  table[:, 0::2] = np.sin(angles)
  table[:, 1::2] = np.cos(angles)
  return table


def timestep_features(t: Array, dim: int = 256, max_period: float = 10000.0) -> Array:
  """``cat(cos(t f), sin(t f))`` with ``f_i = exp(-ln(max_period) i / half)``, in float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t).astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


class FixedEmbed(nnx.Variable):
  """A stored but non-trainable table (the reference's ``requires_grad=False`` pos_embed).

  Not an ``nnx.Param``, so optimizers built with ``wrt=nnx.Param`` leave it alone,
  but it is state: checkpoints carry it and loading a stored table replaces it.
  """


_xavier = nnx.initializers.xavier_uniform()
_zeros = nnx.initializers.zeros_init()
_normal_02 = nnx.initializers.normal(0.02)


class TimestepEmbedder(nnx.Module):
  """Sinusoid of t -> Linear -> SiLU -> Linear (``mlp.0`` / ``mlp.2`` like the nn.Sequential)."""

  def __init__(self, hidden_size: int, frequency_dim: int = 256, *, rngs: nnx.Rngs,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32):
    self.frequency_dim = frequency_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=_normal_02, rngs=rngs)
    self.mlp = nnx.List([linear(frequency_dim, hidden_size, **kw), None,
                         linear(hidden_size, hidden_size, **kw)])

  def __call__(self, t: Array, *, return_features: bool = False):
    freq = timestep_features(t, self.frequency_dim)
    emb = self.mlp[2](jax.nn.silu(self.mlp[0](freq)))
    return (emb, freq) if return_features else emb


class LabelEmbedder(nnx.Module):
  """Class table with an extra null row (index ``num_classes``) when labels can be dropped."""

  def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, *,
               rngs: nnx.Rngs, param_dtype: Dtype = jnp.float32):
    self.num_classes = num_classes
    self.dropout_prob = dropout_prob
    rows = num_classes + (1 if dropout_prob > 0 else 0)
    self.embedding_table = nnx.Embed(rows, hidden_size, param_dtype=param_dtype,
                                     embedding_init=_normal_02, rngs=rngs)

  def drop_labels(self, labels: Array, key: Array | None = None,
                  force_drop_ids: Array | None = None) -> Array:
    """Replaces labels by the null class: ``force_drop_ids == 1``, else with prob ``dropout_prob``."""
    if force_drop_ids is not None:
      drop = jnp.asarray(force_drop_ids) == 1
    else:
      drop = jax.random.uniform(key, labels.shape) < self.dropout_prob
    return jnp.where(drop, self.num_classes, labels)

  def __call__(self, labels: Array, *, drop_key: Array | None = None,
               force_drop_ids: Array | None = None) -> Array:
    labels = jnp.asarray(labels).astype(jnp.int32)
    if force_drop_ids is not None or (drop_key is not None and self.dropout_prob > 0):
      labels = self.drop_labels(labels, drop_key, force_drop_ids)
    table = self.embedding_table.embedding[...]
    # Under an explicitly sharded batch the gather must be told its output
    # sharding: rows follow the labels' batch sharding.
    sharding = jax.typeof(labels).sharding
    spec = getattr(sharding, "spec", None)
    if spec is not None and any(axis is not None for axis in spec):
      out = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec, None))
      return table.at[labels].get(out_sharding=out)
    return table[labels]


# Named rematerialisation policies for training at scale: what each block keeps
# for the backward pass instead of recomputing it.
REMAT_POLICIES = {
    "none": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _maybe_remat(block, policy: str, method: str = "__call__"):
  """``block.<method>`` rematerialised with the named policy, or as it is for "none".

  ``jax.checkpoint`` over the block's split state rather than ``nnx.remat``: a model
  merged outside a JAX transform is called inside one by the samplers (``lax.scan``
  over the steps), and NNX transforms refuse modules from another trace level.
  """
  if policy == "none":
    return getattr(block, method)
  graphdef, state = nnx.split(block)

  @functools.partial(jax.checkpoint, policy=REMAT_POLICIES[policy])
  def run(block_state, *args):
    return getattr(nnx.merge(graphdef, block_state), method)(*args)

  return lambda *args: run(state, *args)


def stack_layers(flat: Mapping[tuple, Any], depth: int) -> dict[tuple, Any]:
  """Unscanned parameter paths ``('blocks', i, ...)`` -> scanned ``('blocks', ...)`` stacked on axis 0."""
  out, groups = {}, {}
  for path, value in flat.items():
    if path[0] == "blocks" and isinstance(path[1], int):
      groups.setdefault(path[2:], {})[path[1]] = value
    else:
      out[path] = value
  for rest, by_layer in groups.items():
    if sorted(by_layer) != list(range(depth)):
      raise ValueError(f"blocks.*.{'.'.join(map(str, rest))}: layers {sorted(by_layer)}, "
                       f"expected 0..{depth - 1}")
    out[("blocks",) + rest] = np.stack([np.asarray(by_layer[i]) for i in range(depth)])
  return out


def unstack_layers(flat: Mapping[tuple, Any]) -> dict[tuple, Any]:
  """Scanned ``('blocks', ...)`` (leading depth axis) -> unscanned ``('blocks', i, ...)``."""
  out = {}
  for path, value in flat.items():
    if path[0] == "blocks" and not isinstance(path[1], int):
      for i, layer in enumerate(np.asarray(value)):
        out[("blocks", i) + path[1:]] = layer
    else:
      out[path] = value
  return out


# Logical axes of the residual stream (B, T, hidden) between blocks.
_ACT = ("batch", "length", "act_embed")


class AdaLNBlock(nnx.Module):
  """adaLN-Zero block: x += gate * attn(mod(LN(x))); x += gate * mlp(mod(LN(x)))."""

  def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *,
               rngs: nnx.Rngs, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
               qk_norm: bool = False):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # The dtype the matmuls after each norm compute in: the fused GPU norm writes it directly.
    self.dtype = dtype
    self.norm1 = LayerNorm(hidden_size, use_affine=False)
    # q_norm / k_norm: nn.LayerNorm(head_dim) of the reference, default eps and affine.
    self.attn = Attention(hidden_size, num_heads, qkv_bias=True, kernel_init=_xavier,
                          qk_norm=qk_norm, qk_norm_eps=1e-5, **kw)
    self.norm2 = LayerNorm(hidden_size, use_affine=False)
    self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), approximate_gelu=True,
                   kernel_init=_xavier, **kw)
    # Index 1 because index 0 is the SiLU of the reference's nn.Sequential.
    self.adaLN_modulation = nnx.List([None, linear(hidden_size, 6 * hidden_size,
                                                   kernel_init=_zeros, **kw)])

  def __call__(self, x: Array, c: Array) -> Array:
    x, (h, bias, gate) = self.chained(x, c)
    return x + (gate[:, None] * (h if bias is None else h + bias)).astype(x.dtype)

  def chained(self, x: Array, c: Array, pending: PendingBranch | None = None
              ) -> tuple[Array, PendingBranch]:
    """The block with its last gated residual add left to the next norm.

    ``pending`` is the previous block's ``(mlp output before fc2's bias, that bias, gate)``:
    it is added to ``x`` in the same pass as this block's first norm. Returns
    ``(x, (h, bias, gate))`` with the block's own MLP branch pending; ``x + gate * (h + bias)``
    is what ``__call__`` returns. Chained this way every norm of a SiT is one fused kernel
    with the residual add (and the bias of the matmul before it) in the same pass (see
    ``models.adaln``); in the XLA form the operations are the unchained ones.
    """
    mod = self.adaLN_modulation[1](jax.nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    x, h = pending_add_and_norm(x, pending, shift_msa, scale_msa, eps=self.norm1.eps,
                                out_dtype=self.dtype)
    attn, bias = linear_without_bias(self.attn.proj, self.attn.attend(h))
    x, h = gated_residual_adaln(x, attn, gate_msa, shift_mlp, scale_mlp, bias=bias,
                                eps=self.norm2.eps, out_dtype=self.dtype)
    return x, PendingBranch(*linear_without_bias(self.mlp.fc2, self.mlp.hidden(h)), gate_mlp)


class FinalLayer(nnx.Module):
  def __init__(self, hidden_size: int, out_channels: int, *, rngs: nnx.Rngs,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32):
    kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=_zeros, rngs=rngs)
    self.dtype = dtype
    self.norm_final = LayerNorm(hidden_size, use_affine=False)
    self.linear = linear(hidden_size, out_channels, **kw)
    self.adaLN_modulation = nnx.List([None, linear(hidden_size, 2 * hidden_size, **kw)])

  def __call__(self, x: Array, c: Array,
               pending: PendingBranch | None = None) -> Array:
    """``pending``: the last block's ``(mlp output, bias, gate)``, added to ``x`` first."""
    shift, scale = jnp.split(self.adaLN_modulation[1](jax.nn.silu(c)), 2, axis=-1)
    _, h = pending_add_and_norm(x, pending, shift, scale, eps=self.norm_final.eps,
                                out_dtype=self.dtype)
    return self.linear(h)


class SiT(nnx.Module):
  """SiT (velocity) or, with ``config.kind == 'dit'``, DiT (eps | variance) on ``(B, T, C)`` tokens.

  Args:
    config: the architecture.
    dtype: compute dtype of the matmuls (None/float32 = exact float32).
      Parameters are ``param_dtype``; norms and softmax stay float32, the
      residual stream is ``residual_dtype``, and the output is float32.
    residual_dtype: dtype of the residual stream between blocks. float32 (the
      default) is what PyTorch autocast keeps (its float32 position table
      promotes the sum); the compute dtype halves the traffic of every
      LayerNorm, modulation and residual add (SiT-XL's bfloat16 train step at
      batch 256 compiled for an H200: 101.5 instead of 106.6 ms estimated),
      at the cost of rounding the stream once per block.
  """

  def __init__(self, config: GeneratorConfig, *, rngs: nnx.Rngs, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32, scan_layers: bool = False,
               remat_policy: str = "none", residual_dtype: Dtype | str = jnp.float32):
    if remat_policy not in REMAT_POLICIES:
      raise ConfigError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {remat_policy!r}")
    try:
      residual = jnp.dtype(residual_dtype)
    except TypeError as e:
      raise ConfigError(f"residual_dtype must be a float dtype, got {residual_dtype!r}") from e
    if residual not in (jnp.float32, jnp.bfloat16, jnp.float16):
      raise ConfigError(f"residual_dtype must be float32, bfloat16 or float16, "
                        f"got {residual_dtype!r}")
    self.config = config
    self.scan_layers = scan_layers
    self.remat_policy = remat_policy
    self.residual_dtype = residual.name
    d = config.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.x_embedder = linear(config.in_channels, d, kernel_init=_xavier, **kw)
    self.pos_embed = FixedEmbed(
        jnp.asarray(sincos_pos_embed_1d(d, config.input_size)[None], param_dtype))
    self.t_embedder = TimestepEmbedder(d, **kw)
    self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout_prob,
                                    rngs=rngs, param_dtype=param_dtype)
    if scan_layers:
      # One block with every parameter stacked along a leading depth axis; the
      # forward pass scans over it, so compile time does not grow with depth.
      @nnx.split_rngs(splits=config.depth)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def stacked(rngs):
        return AdaLNBlock(d, config.num_heads, config.mlp_ratio, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs, qk_norm=config.qk_norm)
      self.blocks = stacked(rngs)
    else:
      self.blocks = nnx.List([AdaLNBlock(d, config.num_heads, config.mlp_ratio,
                                         qk_norm=config.qk_norm, **kw)
                              for _ in range(config.depth)])
    self.final_layer = FinalLayer(d, config.out_channels, **kw)

  @property
  def sequence_length(self) -> int:
    """The tokens every attention layer sees (``layers.prepare_for_inference``)."""
    return self.config.input_size

  def __call__(self, x: Array, t: Array, y: Array, *, drop_key: Array | None = None,
               force_drop_ids: Array | None = None, return_intermediates: bool = False):
    """``x (B, T, C)``, ``t (B,)`` (float in [0, 1] for SiT, integer step for DiT), ``y (B,)``.

    ``drop_key`` turns on training-time label dropout (null class with
    probability ``class_dropout_prob``). Returns ``(B, T, out_channels)`` float32,
    and with ``return_intermediates`` also a dict of the reference's taps.
    """
    x = jnp.asarray(x)
    if x.ndim != 3 or x.shape[1:] != self.config.latent_shape:
      raise ValueError(f"x must have shape (B, {self.config.input_size}, "
                       f"{self.config.in_channels}), got {x.shape}")
    taps: dict[str, Array] = {}
    emb = self.x_embedder(x)
    tokens = (emb.astype(jnp.float32)
              + self.pos_embed[...].astype(jnp.float32)).astype(self.residual_dtype)
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    t_emb, t_freq = self.t_embedder(t, return_features=True)
    y_emb = self.y_embedder(y, drop_key=drop_key, force_drop_ids=force_drop_ids)
    c = t_emb.astype(jnp.float32) + y_emb.astype(jnp.float32)
    if return_intermediates:
      taps.update(x_embedder=emb, tokens_in=tokens, t_freq=t_freq, t_emb=t_emb, y_emb=y_emb, c=c)
    # Block boundaries: the batch over the data-parallel mesh axes (a no-op without an
    # active mesh; see parallel.activation_sharding).
    h = constrain(tokens, _ACT)
    pending = None
    if self.scan_layers:
      if return_intermediates:
        raise ValueError("return_intermediates needs the unscanned model (scan_layers=False)")
      h = self._scan_blocks(h, c)
    elif return_intermediates:
      for i, block in enumerate(self.blocks):
        h = _maybe_remat(block, self.remat_policy)(h, c)
        h = constrain(h, _ACT)
        taps[f"block{i}"] = h
    else:
      # Each block's last residual add runs with the next norm (see AdaLNBlock.chained).
      for block in self.blocks:
        h, pending = _maybe_remat(block, self.remat_policy, "chained")(h, c, pending)
        h, pending = constrain(h, _ACT), pending._replace(h=constrain(pending.h, _ACT))
    out = self.final_layer(h, c, pending).astype(jnp.float32)
    return (out, taps) if return_intermediates else out

  def _scan_blocks(self, h: Array, c: Array) -> Array:
    # lax.scan over the split state, not nnx.scan: see _maybe_remat.
    policy = self.remat_policy
    graphdef, stacked = nnx.split(self.blocks)

    def run(x, layer_state):
      block = nnx.merge(graphdef, layer_state)
      return constrain(_maybe_remat(block, policy)(x, c), _ACT), None

    return jax.lax.scan(run, h, stacked)[0]

  def forward_with_cfg(self, x: Array, t: Array, y: Array, cfg_scale: float | Array) -> Array:
    """The reference DiT's guided call on a ``[half, half]`` batch (labels ``[y, null]``).

    Only ``x[:n]`` is used; the eps channels of both halves become
    ``eps_u + s (eps_c - eps_u)`` (all C of them), the variance channels stay
    each half's own.
    """
    n = x.shape[0] // 2
    half = x[:n]
    out = self(jnp.concatenate([half, half], axis=0), t, y)
    c = self.config.in_channels
    eps, rest = out[..., :c], out[..., c:]
    cond, uncond = eps[:n], eps[n:]
    guided = uncond + cfg_scale * (cond - uncond)
    return jnp.concatenate([jnp.concatenate([guided, guided], axis=0), rest], axis=-1)


DiT = SiT  # One network; ``config.kind`` and ``learn_sigma`` say which it is.


def build_generator(config: GeneratorConfig, *, rngs: nnx.Rngs, dtype: Dtype | None = None,
                    param_dtype: Dtype = jnp.float32) -> SiT:
  return SiT(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
