"""REPA representation alignment of the tokenizer's latents with a frozen DINOv2 teacher.

The reference (``VQModel.encode`` in training mode) projects the soft-quantised
latents ``quant`` (B, L, d) with an MLP to the teacher's width and pulls them
towards the teacher's patch features (B, N, D) by negative cosine similarity.
``align`` picks how L latents meet N patches:

* ``repeat`` (the released config): latent l stands for patches
  ``l*N/L .. (l+1)*N/L - 1`` in raster order (its projection is repeated N/L times);
* ``global``: both sides mean-pooled over tokens; the projector sees the pooled latent;
* ``avg_1d``: the N teacher tokens adaptive-average-pooled to L (PyTorch
  ``adaptive_avg_pool1d`` windows);
* ``avg_1d_shuffle``: as ``avg_1d`` after one random permutation of the N teacher
  tokens shared by the whole batch (``torch.randperm`` there, ``jax.random.permutation`` here).

The loss weight (``repa_loss_weight``, 0.1) is the caller's to apply.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from softvq_jax.convert.core import Transform, map_state_dict
from softvq_jax.convert.timm_vit import fill_module
from softvq_jax.models.layers import (Dtype, linear, torch_default_bias_init,
                                      torch_default_kernel_init)
from softvq_jax.models.vit import VisionTransformer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ALIGN_MODES = ("repeat", "global", "avg_1d", "avg_1d_shuffle")

# ``nn.Sequential(Linear, SiLU, Linear, SiLU, Linear)``: the Linears sit at 0, 2, 4.
PROJECTOR_RULES = [
    (r"([024])\.weight", r"layers.\1.kernel", Transform.LINEAR),
    (r"([024])\.bias", r"layers.\1.bias", Transform.IDENTITY),
]


class RepaProjector(nnx.Module):
  """Linear d->P, SiLU, Linear P->P, SiLU, Linear P->D (the reference's ``build_mlp``).

  ``layers`` keeps PyTorch's Sequential indices, so ``projection.4.weight`` is
  ``layers[4].kernel`` (transposed). PyTorch-default init, as ``nn.Linear``.
  """

  def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, rngs: nnx.Rngs,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32):

    def lin(i, o):
      return linear(i, o, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                    kernel_init=torch_default_kernel_init, bias_init=torch_default_bias_init(i))

    self.layers = nnx.List([lin(in_dim, hidden_dim), jax.nn.silu, lin(hidden_dim, hidden_dim),
                            jax.nn.silu, lin(hidden_dim, out_dim)])

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers:
      x = layer(x)
    return x


def load_projector(projector: RepaProjector, state: Mapping[str, np.ndarray], *,
                   prefix: str = "projection.") -> None:
  """Fills ``projector`` from the ``projection.{0,2,4}.*`` tensors of a reference state dict."""
  state = {k[len(prefix):]: np.asarray(v) for k, v in state.items() if k.startswith(prefix)}
  targets = {tuple(p): tuple(v.get_value().shape)
             for p, v in nnx.to_flat_state(nnx.state(projector, nnx.Param))}
  flat, _ = map_state_dict(state, targets, PROJECTOR_RULES)
  fill_module(projector, flat)


def teacher_features(teacher: VisionTransformer, images: jax.Array) -> jax.Array:
  """The teacher's patch features ``(B, N, D)`` float32 for NHWC images in [-1, 1].

  As the reference: ``x*0.5+0.5`` then ImageNet mean/std (in float32), timm
  ``forward_features`` (patch embed, class token, positions, blocks, final
  norm), class token dropped. No gradient flows through it.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be NHWC with 3 channels, got shape {images.shape}")
  size = teacher.grid_size * teacher.patch_embed.patch_size
  if images.shape[1:3] != (size, size):
    raise ValueError(f"the teacher was built for {size}x{size} images, got "
                     f"{images.shape[1]}x{images.shape[2]}")
  x = images.astype(jnp.float32) * 0.5 + 0.5
  x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
  tokens = teacher.add_cls_and_positions(teacher.patch_embed(x))
  features = teacher.run_blocks(tokens)[:, teacher.num_prefix_tokens:]
  return jax.lax.stop_gradient(features.astype(jnp.float32))


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """``(out, in)`` averaging matrix of PyTorch's ``adaptive_avg_pool1d``.

  Window i covers ``floor(i*in/out) .. ceil((i+1)*in/out) - 1``.
  """
  mat = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    lo = (i * in_size) // out_size
    hi = -((-(i + 1) * in_size) // out_size)
    mat[i, lo:hi] = 1.0 / (hi - lo)
  return mat


def _normalize(x: jax.Array) -> jax.Array:
  # F.normalize: x / max(||x||, 1e-12).
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, 1e-12)


def repa_loss(projected: jax.Array, target: jax.Array, align: str = "repeat", *,
              rng: jax.Array | None = None) -> jax.Array:
  """Mean over batch and aligned tokens of ``-cos(target, projected)`` (unweighted, float32).

  Args:
    projected: projector outputs ``(B, L, D)``; for ``global`` the projection of
      the token-mean latent, ``(B, D)`` (see ``repa_alignment_loss``).
    target: teacher patch features ``(B, N, D)``.
    align: one of ``ALIGN_MODES``.
    rng: key for the token permutation of ``avg_1d_shuffle``.
  """
  if align not in ALIGN_MODES:
    raise ValueError(f"repa align must be one of {ALIGN_MODES}, got {align!r}")
  if target.ndim != 3:
    raise ValueError(f"target must be teacher features (B, N, D), got shape {target.shape}")
  b, n, d = target.shape
  want = 2 if align == "global" else 3
  if projected.ndim != want:
    hint = (" (project the token-mean latent: repa_alignment_loss does it)"
            if align == "global" else "")
    raise ValueError(f"align={align!r} needs projected of rank {want}, got shape "
                     f"{projected.shape}{hint}")
  if projected.shape[0] != b or projected.shape[-1] != d:
    raise ValueError(f"projected {projected.shape} does not match target {target.shape} in "
                     "batch size or feature width")
  z = target.astype(jnp.float32)
  z_hat = projected.astype(jnp.float32)
  if align == "global":
    z = jnp.mean(z, axis=1)
  elif align == "repeat":
    num_latents = projected.shape[1]
    if n % num_latents:
      raise ValueError(f"align='repeat' needs the {n} teacher tokens to split evenly over the "
                       f"{num_latents} latents")
    z_hat = jnp.repeat(z_hat, n // num_latents, axis=1)
  else:
    if align == "avg_1d_shuffle":
      if rng is None:
        raise ValueError("align='avg_1d_shuffle' needs rng for its token permutation")
      z = z[:, jax.random.permutation(rng, n)]
    pool = jnp.asarray(adaptive_pool_matrix(n, projected.shape[1]))
    z = jnp.einsum("ln,bnd->bld", pool, z, precision=jax.lax.Precision.HIGHEST)
  cos = jnp.sum(_normalize(z) * _normalize(z_hat), axis=-1)
  return -jnp.mean(cos)


def repa_alignment_loss(projector: RepaProjector, quant: jax.Array, target: jax.Array,
                        align: str = "repeat", *, rng: jax.Array | None = None) -> jax.Array:
  """``repa_loss`` of the projected latents ``quant`` (B, L, d), projecting in the reference's order.

  ``global`` projects the token-mean latent (the projector is nonlinear, so
  pooling after projecting would differ); every other mode projects each latent.
  """
  if quant.ndim != 3:
    raise ValueError(f"quant must be (B, L, d), got shape {quant.shape}")
  latents = jnp.mean(quant, axis=1) if align == "global" else quant
  return repa_loss(projector(latents), target, align, rng=rng)
