"""Frozen timm ViT weights for NNX ViTs: the DINOv2 REPA teacher and the DINO discriminator backbone.

Reads a user's local checkpoint (``.safetensors``, or a PyTorch ``.pth``/``.pt``/
``.bin`` zip through the allow-list unpickler; nothing from the file is ever
executed) into any NNX module whose attribute names mirror timm's
``VisionTransformer``: ``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.N.{norm1, attn.qkv, attn.proj, ls1, norm2, mlp.fc1, mlp.fc2, ls2}``,
``norm``. Every missing, unexpected or mis-shaped tensor is reported in one error.

The reference builds its teacher with ``timm.create_model(name, pretrained=True,
img_size=256, patch_size=16)``, so timm 1.0.12's ``checkpoint_filter_fn`` adapts
the 518-px, 14-pixel-patch DINOv2 weights: it drops ``mask_token``, resamples the
patch kernel by the pseudo-inverse of the resize ("PI-resize", FlexiViT) and the
position table by an image resize of its grid, both bicubic with antialiasing.
Both resizes are PyTorch's ``F.interpolate``; here they are exact float64
matrices with the same weights, so no torch is needed.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from softvq_jax.convert.core import (ConversionError, Rule, Transform, format_path,
                                     map_state_dict)
from softvq_jax.convert.readers import read_checkpoint
from softvq_jax.models.config import ConfigError, ViTConfig, vit_config_from_name
from softvq_jax.models.layers import Dtype
from softvq_jax.models.vit import VisionTransformer

ID, LIN, CONV = Transform.IDENTITY, Transform.LINEAR, Transform.CONV_OIHW

DINOV2_NAMES: dict[str, str] = {
    "small": "vit_small_patch14_dinov2.lvd142m",
    "base": "vit_base_patch14_dinov2.lvd142m",
    "large": "vit_large_patch14_dinov2.lvd142m",
}

# Relative names: a caller loading from a larger checkpoint passes ``prefix``
# (``repa_model.`` in the reference's training checkpoints).
TIMM_VIT_RULES: list[Rule] = [
    (r"blocks\.(\d+)\.(norm[12])\.weight", r"blocks.\1.\2.scale", ID),
    (r"blocks\.(\d+)\.(norm[12])\.bias", r"blocks.\1.\2.bias", ID),
    (r"blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.weight", r"blocks.\1.\2.kernel", LIN),
    (r"blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.bias", r"blocks.\1.\2.bias", ID),
    (r"blocks\.(\d+)\.(ls[12])\.gamma", r"blocks.\1.\2.gamma", ID),
    (r"norm\.weight", "norm.scale", ID),
    (r"norm\.bias", "norm.bias", ID),
    (r"(cls_token|reg_token|pos_embed)", r"\1", ID),
    (r"patch_embed\.proj\.weight", "patch_embed.proj.kernel", CONV),
    (r"patch_embed\.proj\.bias", "patch_embed.proj.bias", ID),
]

# timm's DINOv2 filter pops the masked-image-modelling token; nothing uses it.
TIMM_VIT_IGNORED: list[str] = [r"mask_token"]


# --------------------------------------------------------------------------- resampling


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter ``a``."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def resize_matrix(in_size: int, out_size: int, interpolation: str = "bicubic",
                  antialias: bool = True) -> np.ndarray:
  """``(out_size, in_size)`` float64 matrix of PyTorch's 1-D ``F.interpolate`` (align_corners=False).

  ``F.interpolate`` on a 2-D grid is separable: ``out = R_h @ x @ R_w.T``.
  With ``antialias`` PyTorch uses its PIL-like filters (cubic a=-0.5 or the
  triangle, stretched by the scale when downsampling, taps renormalised at the
  borders); without it the classic kernels (cubic a=-0.75 with clamped border
  taps; bilinear with the source index clamped at 0).
  """
  if interpolation not in ("bicubic", "bilinear"):
    raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
  if in_size < 1 or out_size < 1:
    raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
  mat = np.zeros((out_size, in_size))
  scale = in_size / out_size
  if antialias:
    taps = 4 if interpolation == "bicubic" else 2
    support = taps / 2 * scale if scale >= 1 else taps / 2
    inv_scale = 1 / scale if scale >= 1 else 1.0
    for i in range(out_size):
      centre = scale * (i + 0.5)
      # int() truncates toward zero like the C++ static_cast; negatives clamp to 0 anyway.
      lo = max(int(centre - support + 0.5), 0)
      hi = min(int(centre + support + 0.5), in_size)
      x = (np.arange(lo, hi) - centre + 0.5) * inv_scale
      w = _cubic(x, -0.5) if interpolation == "bicubic" else np.maximum(0.0, 1 - np.abs(x))
      total = w.sum()
      mat[i, lo:hi] = w / total if total != 0 else w
    return mat
  for i in range(out_size):
    src = scale * (i + 0.5) - 0.5
    if interpolation == "bilinear":
      src = max(src, 0.0)
      i0 = int(src)
      i1 = min(i0 + 1, in_size - 1)
      frac = src - i0
      mat[i, i0] += 1 - frac
      mat[i, i1] += frac
    else:
      i0 = math.floor(src)
      t = src - i0
      weights = _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)
      for k, w in enumerate(weights):
        mat[i, min(max(i0 - 1 + k, 0), in_size - 1)] += w
  return mat


def resample_abs_pos_embed(posemb: np.ndarray, new_grid: Sequence[int], *,
                           num_prefix_tokens: int = 1, interpolation: str = "bicubic",
                           antialias: bool = True) -> np.ndarray:
  """timm's ``resample_abs_pos_embed``: resize the square grid rows, keep the prefix rows.

  ``posemb`` is ``(1, prefix + g*g, D)``; returns ``(1, prefix + H*W, D)`` in the input dtype.
  """
  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f"pos_embed must be (1, tokens, dim), got {posemb.shape}")
  new_h, new_w = new_grid
  num_old = posemb.shape[1] - num_prefix_tokens
  # As timm: equal length and a square target means nothing to do.
  if num_old == new_h * new_w and new_h == new_w:
    return posemb
  old = math.isqrt(max(num_old, 0))
  if old * old != num_old or old == 0:
    raise ValueError(f"pos_embed has {num_old} grid rows after {num_prefix_tokens} prefix "
                     "row(s); a square grid is needed to resample it")
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
  grid = grid.astype(np.float64).reshape(old, old, -1)
  rows = resize_matrix(old, new_h, interpolation, antialias)
  cols = resize_matrix(old, new_w, interpolation, antialias)
  grid = np.einsum("yh,hwd,xw->yxd", rows, grid, cols).reshape(1, new_h * new_w, -1)
  return np.concatenate([prefix, grid.astype(posemb.dtype)], axis=1)


def resample_patch_embed(weight: np.ndarray, new_size: Sequence[int], *,
                         interpolation: str = "bicubic", antialias: bool = True) -> np.ndarray:
  """timm's ``resample_patch_embed`` (FlexiViT PI-resize) of an OIHW conv kernel.

  With ``R`` the resize of a patch (``resize(x) = R x`` on flattened patches),
  the new kernel is ``pinv(R.T) k``, so that ``<new_k, R x> = <k, x>`` for every
  patch ``x`` when upsampling (the least-squares best otherwise).
  """
  weight = np.asarray(weight)
  if weight.ndim != 4:
    raise ValueError(f"patch_embed.proj.weight must be OIHW, got shape {weight.shape}")
  old_h, old_w = weight.shape[-2:]
  new_h, new_w = new_size
  if (old_h, old_w) == (new_h, new_w):
    return weight
  resize = np.kron(resize_matrix(old_h, new_h, interpolation, antialias),
                   resize_matrix(old_w, new_w, interpolation, antialias))
  pinv = np.linalg.pinv(resize.T)  # (new_h*new_w, old_h*old_w)
  flat = weight.astype(np.float64).reshape(*weight.shape[:2], old_h * old_w)
  out = np.einsum("no,abo->abn", pinv, flat).reshape(*weight.shape[:2], new_h, new_w)
  return out.astype(weight.dtype)


# --------------------------------------------------------------------------- loading


def _param_shapes(module: nnx.Module) -> dict[tuple, Any]:
  state = nnx.state(module, nnx.Param)
  return {tuple(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def fill_module(module: nnx.Module, flat: Mapping[tuple, np.ndarray]) -> None:
  """Sets the ``nnx.Param`` values of ``module`` (concrete or from ``nnx.eval_shape``) in place.

  Each value is cast to the dtype the module declares for that parameter.
  """
  targets = _param_shapes(module)
  pure: dict = {}
  for path, value in flat.items():
    node = pure
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jnp.asarray(value, dtype=targets[path].dtype)
  state = nnx.state(module, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(module, state)


def _num_prefix_tokens(module: nnx.Module) -> int:
  """Rows of the module's position table that belong to prefix tokens (none when they get none)."""
  if getattr(module, "no_embed_class", False):
    return 0
  if hasattr(module, "num_prefix_tokens"):
    return int(module.num_prefix_tokens)
  return 1 if getattr(module, "cls_token", None) is not None else 0


def _meta_registers_to_timm(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Meta's register-token DINOv2 layout -> timm's (as timm's DINOv2 filter converts it).

  Meta's table has a class row and no register rows; timm's reg4 models add a
  patches-only table, so the class row is folded into the class token.
  """
  state = dict(state)
  state["reg_token"] = state.pop("register_tokens")
  pos = np.asarray(state.pop("pos_embed"))
  state["cls_token"] = np.asarray(state["cls_token"]) + pos[:, :1]
  state["pos_embed"] = pos[:, 1:]
  return state


def adapt_timm_state(state: Mapping[str, np.ndarray], targets: Mapping[tuple, Any], *,
                     num_prefix_tokens: int = 1, zero_k_bias: bool = False,
                     interpolation: str = "bicubic",
                     antialias: bool = True) -> dict[str, np.ndarray]:
  """timm's ``checkpoint_filter_fn`` for these ViTs, against the model's parameter shapes.

  Resamples ``patch_embed.proj.weight`` when its kernel size differs from the
  model's and ``pos_embed`` when its length differs; ``zero_k_bias`` zeroes the
  key third of every ``attn.qkv.bias`` as the reference's DINO discriminator
  does (softmax over keys is invariant to it, so this changes only rounding).
  """
  has_registers = "register_tokens" in state or "reg_token" in state
  if has_registers != (("reg_token",) in targets):
    raise ConversionError(
        "checkpoint has register tokens (a DINOv2 '_reg4' model) but the model has none"
        if has_registers else
        "the model has register tokens (a DINOv2 '_reg4' model) but the checkpoint has none")
  out = _meta_registers_to_timm(state) if "register_tokens" in state else dict(state)
  kernel = targets.get(("patch_embed", "proj", "kernel"))
  weight = out.get("patch_embed.proj.weight")
  if kernel is not None and weight is not None and np.ndim(weight) == 4:
    p_h, p_w = tuple(kernel.shape[:2])  # HWIO
    if tuple(weight.shape[-2:]) != (p_h, p_w):
      logging.info("Resampling patch_embed.proj.weight %s to %dx%d patches (%s, antialias=%s)",
                   weight.shape, p_h, p_w, interpolation, antialias)
      out["patch_embed.proj.weight"] = resample_patch_embed(
          weight, (p_h, p_w), interpolation=interpolation, antialias=antialias)
  table = targets.get(("pos_embed",))
  posemb = out.get("pos_embed")
  if table is not None and posemb is not None and np.ndim(posemb) == 3:
    if posemb.shape[1] != table.shape[1]:
      grid = math.isqrt(table.shape[1] - num_prefix_tokens)
      if grid * grid != table.shape[1] - num_prefix_tokens:
        raise ConversionError(f"the model's pos_embed {tuple(table.shape)} is not a square grid "
                              f"after {num_prefix_tokens} prefix row(s)")
      logging.info("Resampling pos_embed %s to a %dx%d grid (%s, antialias=%s)", posemb.shape,
                   grid, grid, interpolation, antialias)
      try:
        out["pos_embed"] = resample_abs_pos_embed(posemb, (grid, grid),
                                                  num_prefix_tokens=num_prefix_tokens,
                                                  interpolation=interpolation, antialias=antialias)
      except ValueError as e:
        raise ConversionError(f"cannot resample pos_embed: {e}") from e
  if zero_k_bias:
    for name in out:
      if name.endswith("attn.qkv.bias"):
        bias = np.array(out[name], copy=True)
        dim = bias.shape[0] // 3
        bias[dim:2 * dim] = 0
        out[name] = bias
  return out


def load_timm_vit(module: nnx.Module, checkpoint: str | os.PathLike | Mapping[str, np.ndarray], *,
                  prefix: str = "", zero_k_bias: bool = False, ignore: Iterable[str] = (),
                  interpolation: str = "bicubic", antialias: bool = True,
                  weights: str = "auto") -> list[str]:
  """Fills ``module`` in place from a timm ViT state dict; returns the names it ignored.

  Args:
    module: an NNX module with timm's attribute names (e.g. ``VisionTransformer``,
      or the DINO discriminator's backbone), concrete or abstract.
    checkpoint: a local file (``.safetensors``, ``.pth``/``.pt``/``.bin`` zip) or
      an already-read ``{name: array}`` state dict in PyTorch layout.
    prefix: only names starting with it are used, with it removed
      (``"repa_model."`` for the teacher inside a reference training checkpoint).
    zero_k_bias: zero the key part of ``attn.qkv.bias`` (the reference's DINO
      discriminator does this to its DINO v1 weights).
    ignore: extra regexes (full match, after removing ``prefix``) of tensors to
      skip, e.g. ``[r"norm\\..*"]`` for a backbone without the final norm.
    interpolation, antialias: resampling of the patch kernel and position table
      when their sizes differ from the module's (timm: bicubic, antialias).
    weights: which state dict of a multi-entry training checkpoint to read.

  Raises:
    ConversionError: listing every missing, unexpected and mis-shaped tensor.
  """
  if isinstance(checkpoint, Mapping):
    state = {k: np.asarray(v) for k, v in checkpoint.items()}
  else:
    state = read_checkpoint(os.fspath(checkpoint), weights=weights)
  if prefix:
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not state:
      raise ConversionError(f"checkpoint has no tensor whose name starts with {prefix!r}")
  targets = _param_shapes(module)
  state = adapt_timm_state(state, targets, num_prefix_tokens=_num_prefix_tokens(module),
                           zero_k_bias=zero_k_bias, interpolation=interpolation,
                           antialias=antialias)
  flat, ignored = map_state_dict(state, {p: tuple(v.shape) for p, v in targets.items()},
                                 TIMM_VIT_RULES, [*TIMM_VIT_IGNORED, *ignore])
  fill_module(module, flat)
  return [prefix + name for name in ignored]


# --------------------------------------------------------------------------- teacher


def warn_random_weights(role: str, model_name: str) -> None:
  """Logs, loudly, that a frozen feature network has no pretrained weights."""
  bar = "!" * 78
  logging.warning(
      "\n%s\n!!! %s %s has NO pretrained weights: it is RANDOMLY INITIALISED.\n"
      "!!! Its features are meaningless, and so is every loss built on them (REPA alignment,\n"
      "!!! DINO discriminator). Pass a local checkpoint file to train as the reference does.\n%s",
      bar, role, model_name, bar)


def dinov2_config(model_name: str = DINOV2_NAMES["large"], *, patch_size: int = 16,
                  overrides: Mapping[str, Any] | None = None) -> ViTConfig:
  """The ``ViTConfig`` of a timm DINOv2 entry point (or ``"small"|"base"|"large"``), re-patched."""
  name = DINOV2_NAMES.get(model_name, model_name)
  if isinstance(name, str) and re.match(r"^vit_giant_patch14(_reg4)?_dinov2", name):
    raise NotImplementedError(f"{name}: DINOv2-giant has a SwiGLU MLP, which this ViT does not "
                              "implement; use small, base or large")
  return vit_config_from_name(name, patch_size, overrides, field="repa_model")


def repa_teacher(model_name: str = DINOV2_NAMES["large"],
                 checkpoint: str | os.PathLike | Mapping[str, np.ndarray] | None = None, *,
                 image_size: int = 256, patch_size: int = 16,
                 overrides: Mapping[str, Any] | None = None, prefix: str = "",
                 dtype: Dtype | None = None, seed: int = 0) -> VisionTransformer:
  """The frozen DINOv2 teacher as ``timm.create_model(name, pretrained=True, img_size, patch_size)``.

  With ``checkpoint`` (timm's ``model.safetensors`` or Meta's ``dinov2_vit*14_pretrain.pth``)
  the weights are loaded and resampled to ``patch_size`` and the
  ``image_size / patch_size`` grid. Without it the teacher is randomly
  initialised and a loud warning is logged: only smoke tests should do that.
  ``overrides`` (``embed_dim``, ``depth``, ``num_heads``, ``init_values``)
  shrink the entry point for tests.
  """
  name = DINOV2_NAMES.get(model_name, model_name)
  cfg = dinov2_config(name, patch_size=patch_size, overrides=overrides)
  if image_size % patch_size:
    raise ConfigError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")

  def build():
    return VisionTransformer(cfg, image_size, dtype=dtype, rngs=nnx.Rngs(seed))

  if checkpoint is None:
    warn_random_weights("REPA teacher", name)
    # One compiled init instead of one eager dispatch per parameter.
    return nnx.jit(build)()
  teacher = nnx.eval_shape(build)
  load_timm_vit(teacher, checkpoint, prefix=prefix)
  leftover = [format_path(p) for p, v in _param_shapes(teacher).items()
              if isinstance(v, jax.ShapeDtypeStruct)]
  if leftover:  # map_state_dict already demands every parameter; this guards fill_module
    raise ConversionError(f"parameters left unloaded: {leftover}")
  return teacher
