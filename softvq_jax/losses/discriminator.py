"""The DINO discriminator of the reference (from VAR): a frozen DINO ViT-S/16 and five trainable heads.

``DinoBackbone`` is the frozen feature extractor. It is a separate module so
that the trainer never hands it to an optimizer; gradients still flow through
it to the images (the generator's adversarial loss needs them). Its attribute
names follow the DINO / timm state dict (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.N.attn.qkv``...), so loading it is a name table.

``DiscriminatorHeads`` holds the trainable part. Names and tensor layouts
follow the reference state dict exactly (``heads.N.0.0.weight_orig`` of shape
(out, in, k), ``heads.N.0.1.running_var``, ``heads.N.1.fn.0.weight_u``...), so
a converted discriminator is a rename with no transposes.

Both heads' layers keep state that is not trained: spectral-norm power
iteration vectors (``SpectralState``) and BatchNorm running statistics
(``nnx.BatchStat``). ``nnx.Optimizer(..., wrt=nnx.Param)`` leaves them alone;
with ``train=True`` a forward pass updates them in place, as a PyTorch forward
in train mode does.

Features are ``(B, tokens, C)`` (channels last) where the reference has
``(B, C, tokens)`` for its Conv1d layers.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from softvq_jax.models.layers import (Attention, Dtype, LayerNorm, Mlp, PatchEmbed,
                                      matmul_precision, trunc_normal_02)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------
# Input preprocessing: [-1, 1] -> ImageNet-normalised, then to the ViT's size.

def _cubic_weights(t: float, a: float = -0.75) -> tuple[float, float, float, float]:
  """PyTorch's bicubic kernel (a = -0.75) at offsets -1, 0, 1, 2 from the floor sample."""

  def near(d):  # |d| <= 1
    return ((a + 2) * d - (a + 3)) * d * d + 1

  def far(d):  # 1 < |d| < 2
    return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

  return far(t + 1), near(t), near(1 - t), far(2 - t)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix of ``F.interpolate(mode='bicubic', align_corners=False)`` along one axis.

  Sample positions are not clamped before the kernel, and out-of-range taps
  read the border pixel, as PyTorch does (``jax.image.resize`` uses a = -0.5
  and renormalises at the border instead).
  """
  m = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for i in range(out_size):
    src = scale * (i + 0.5) - 0.5
    base = math.floor(src)
    for off, wgt in zip((-1, 0, 1, 2), _cubic_weights(src - base)):
      m[i, min(max(base + off, 0), in_size - 1)] += wgt
  return m.astype(np.float32)


def area_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix of ``F.interpolate(mode='area')`` (adaptive average pooling) along one axis."""
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    m[i, start:end] = 1.0 / (end - start)
  return m.astype(np.float32)


def resize_like_reference(x: jax.Array, size: int) -> jax.Array:
  """NHWC float32 to ``size`` x ``size``: area when H > size, else bicubic (the reference's rule).

  Both are separable, so they run as two small matmuls.
  """
  _, h, w, _ = x.shape
  if h == w == size:
    return x  # PyTorch's same-size bicubic is exactly the identity
  make = area_matrix if h > size else bicubic_matrix
  mh, mw = jnp.asarray(make(h, size)), jnp.asarray(make(w, size))
  x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=_HIGHEST)
  return jnp.einsum("pw,bowc->bopc", mw, x, precision=_HIGHEST)


def imagenet_normalize(x: jax.Array) -> jax.Array:
  """[-1, 1] -> ``((x + 1) / 2 - mean) / std``, written as the reference's scale and shift."""
  s = jnp.asarray(IMAGENET_STD, jnp.float32)
  m = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  return x.astype(jnp.float32) * (0.5 / s) + (0.5 - m) / s


def preprocess(x: jax.Array, key: jax.Array | None, img_size: int) -> jax.Array:
  """The reference's DINO input: normalise, then crop or resize to ``img_size``.

  Inputs larger than ``img_size`` on both sides get, with probability 0.5, one
  random ``img_size`` crop shared by the whole batch (torchvision RandomCrop on
  a batch tensor), and otherwise the area resize. ``key=None`` always resizes:
  a deterministic view for evaluation and tests. Under ``jit`` the batch is
  the global one, so one crop serves every device, where each DDP rank of the
  reference draws its own.
  """
  x = imagenet_normalize(x)
  _, h, w, c = x.shape
  resized = resize_like_reference(x, img_size)
  if key is None or not (h > img_size and w > img_size):
    return resized
  k_coin, k_row, k_col = jax.random.split(key, 3)
  top = jax.random.randint(k_row, (), 0, h - img_size + 1)
  left = jax.random.randint(k_col, (), 0, w - img_size + 1)
  cropped = jax.lax.dynamic_slice(x, (0, top, left, 0), (x.shape[0], img_size, img_size, c))
  use_crop = jax.random.uniform(k_coin, (), jnp.float32) < 0.5
  return jnp.where(use_crop, cropped, resized)


# ----------------------------------------------------------------------------
# Frozen DINO ViT.

class DinoBlock(nnx.Module):
  """Pre-norm block without LayerScale or drop-path; tanh GELU like the reference's MLPNoDrop."""

  def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
               rngs: nnx.Rngs, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32):
    self.norm1 = LayerNorm(dim, eps=norm_eps, param_dtype=param_dtype)
    self.attn = Attention(dim, num_heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm2 = LayerNorm(dim, eps=norm_eps, param_dtype=param_dtype)
    self.mlp = Mlp(dim, round(dim * mlp_ratio), approximate_gelu=True, dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x)).astype(x.dtype)
    return x + self.mlp(self.norm2(x)).astype(x.dtype)


class DinoBackbone(nnx.Module):
  """DINO v1 ViT-S/16 returning the discriminator's feature taps.

  Defaults are ``dino_deitsmall16_pretrain``: 224 px, patch 16, width 384,
  6 heads, 12 blocks, LN eps 1e-6. The taps are the tokens after the position
  embedding and after each block in ``key_depths``, each read out as patch
  tokens plus the class token, ``(B, (img_size / patch)^2, C)`` in float32.
  ``norm`` is never applied; it exists so that every tensor of the DINO
  checkpoint has a home.
  """

  def __init__(self, *, img_size: int = 224, patch_size: int = 16, embed_dim: int = 384,
               depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0,
               key_depths: Sequence[int] = (2, 5, 8, 11), norm_eps: float = 1e-6,
               rngs: nnx.Rngs, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32):
    if img_size % patch_size:
      raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    self.img_size = img_size
    self.embed_dim = embed_dim
    self.dtype = dtype
    # As the reference: taps beyond the depth are dropped.
    self.key_depths = tuple(sorted(d for d in key_depths if d < depth))
    num_patches = (img_size // patch_size) ** 2
    self.patch_embed = PatchEmbed(patch_size, 3, embed_dim, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
    self.cls_token = nnx.Param(jnp.zeros((1, 1, embed_dim), param_dtype))
    self.pos_embed = nnx.Param(trunc_normal_02(rngs.params(), (1, num_patches + 1, embed_dim),
                                               param_dtype))
    self.blocks = nnx.List([
        DinoBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
        for _ in range(depth)
    ])
    self.norm = LayerNorm(embed_dim, eps=norm_eps, param_dtype=param_dtype)

  @property
  def num_features(self) -> int:
    return len(self.key_depths) + 1

  def zero_key_bias(self) -> None:
    """Zeroes the key third of every ``qkv`` bias, as the reference does when it loads DINO.

    Outputs do not change (a per-query constant drops out of the softmax); call
    it after loading to hold exactly the reference's tensors.
    """
    for block in self.blocks:
      bias = block.attn.qkv.bias
      c = bias.shape[0] // 3
      bias[...] = bias[...].at[c:2 * c].set(0.0)

  def features(self, x: jax.Array) -> list[jax.Array]:
    """Taps of an already preprocessed ``(B, img_size, img_size, 3)`` batch."""
    tokens = self.patch_embed(x).astype(jnp.float32)
    b = tokens.shape[0]
    cls = jnp.broadcast_to(self.cls_token[...].astype(jnp.float32), (b, 1, self.embed_dim))
    h = jnp.concatenate([cls, tokens], axis=1) + self.pos_embed[...].astype(jnp.float32)
    feats = [h[:, 1:] + h[:, :1]]
    if self.dtype is not None:
      h = h.astype(self.dtype)
    last = self.key_depths[-1] if self.key_depths else -1
    # Blocks after the last tap cannot change any output, so they are skipped.
    for i in range(last + 1):
      h = self.blocks[i](h)
      if i in self.key_depths:
        h32 = h.astype(jnp.float32)
        feats.append(h32[:, 1:] + h32[:, :1])
    return feats

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> list[jax.Array]:
    """Images in [-1, 1], ``(B, H, W, 3)``, to the feature taps; ``key`` drives the random crop."""
    return self.features(preprocess(x, key, self.img_size))


# ----------------------------------------------------------------------------
# Trainable heads.

class SpectralState(nnx.Variable):
  """Power-iteration vectors of spectral normalisation: updated by forward passes, never trained."""


def _normalize(v: jax.Array, eps: float) -> jax.Array:
  return v / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(v))), eps)


class SpectralConv1d(nnx.Module):
  """Conv1d (channels last in, torch weight layout) under ``torch.nn.utils.spectral_norm``.

  The weight used is ``weight_orig / sigma`` with sigma = u . (W v), W the
  weight as an (out, in * k) matrix. In training one power iteration first
  updates v = normalize(W^T u), then u = normalize(W v) (eps 1e-12), without
  gradient; sigma then carries gradient through W only. Evaluation uses the
  stored vectors. ``padding = k // 2``, circular.
  """

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, *,
               eps: float = 1e-12, rngs: nnx.Rngs, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32):
    self.kernel_size = kernel_size
    self.eps = eps
    self.dtype = dtype
    fan_in = in_channels * kernel_size
    bound = 1.0 / math.sqrt(fan_in)
    # PyTorch's default Conv1d init (kaiming_uniform a=sqrt(5) gives the same bound).
    self.weight_orig = nnx.Param(jax.random.uniform(
        rngs.params(), (out_channels, in_channels, kernel_size), param_dtype, -bound, bound))
    self.bias = nnx.Param(jax.random.uniform(rngs.params(), (out_channels,), param_dtype,
                                             -bound, bound))
    self.weight_u = SpectralState(_normalize(
        jax.random.normal(rngs.params(), (out_channels,), jnp.float32), eps))
    self.weight_v = SpectralState(_normalize(
        jax.random.normal(rngs.params(), (fan_in,), jnp.float32), eps))

  def normalized_weight(self, *, train: bool) -> jax.Array:
    """``weight_orig / sigma`` in float32; with ``train`` the power iteration runs first."""
    w = self.weight_orig[...].astype(jnp.float32)
    mat = w.reshape(w.shape[0], -1)
    u, v = self.weight_u[...], self.weight_v[...]
    if train:
      frozen = jax.lax.stop_gradient(mat)
      v = _normalize(jnp.dot(frozen.T, u, precision=_HIGHEST), self.eps)
      u = _normalize(jnp.dot(frozen, v, precision=_HIGHEST), self.eps)
      self.weight_u[...] = u
      self.weight_v[...] = v
    u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
    sigma = jnp.dot(u, jnp.dot(mat, v, precision=_HIGHEST), precision=_HIGHEST)
    return w / sigma

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """``(B, L, in)`` -> ``(B, L, out)``."""
    w = self.normalized_weight(train=train)
    bias = self.bias[...].astype(jnp.float32)
    pad = self.kernel_size // 2
    if pad:
      x = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)), mode="wrap")
    compute = self.dtype or jnp.float32
    y = jax.lax.conv_general_dilated(
        x.astype(compute), w.astype(compute), window_strides=(1,), padding="VALID",
        dimension_numbers=("NWC", "OIW", "NWC"), precision=matmul_precision(self.dtype),
        preferred_element_type=jnp.float32)
    return y + bias


class BatchNorm1d(nnx.Module):
  """BatchNorm over (batch, tokens) per channel, as torch's (Sync)BatchNorm1d, in float32.

  Training normalises with the biased batch variance and moves the running
  statistics by ``momentum`` (torch convention: new = (1 - m) old + m batch),
  the running variance taking the unbiased estimate. The statistics are means
  over the batch axis of the array this module sees. Under ``jit`` with a
  batch-sharded global array (GSPMD), that mean is already the mean over every
  device's rows: the same numbers as torch's SyncBatchNorm over all ranks,
  with no explicit collective. (Inside ``shard_map`` or ``pmap`` it would be
  the local batch only.)
  """

  def __init__(self, num_features: int, *, eps: float = 1e-6, momentum: float = 0.1,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs  # deterministic init
    self.eps = eps
    self.momentum = momentum
    self.weight = nnx.Param(jnp.ones((num_features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
    self.running_mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.running_var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = x.astype(jnp.float32)
    if train:
      mean = jnp.mean(x, axis=(0, 1))
      var = jnp.mean(jnp.square(x - mean), axis=(0, 1))
      n = x.shape[0] * x.shape[1]
      m = self.momentum
      unbiased = var * (n / max(n - 1, 1))
      self.running_mean[...] = (1 - m) * self.running_mean[...] + m * jax.lax.stop_gradient(mean)
      self.running_var[...] = (1 - m) * self.running_var[...] + m * jax.lax.stop_gradient(unbiased)
      self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
    else:
      mean, var = self.running_mean[...], self.running_var[...]
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class Residual(nnx.Module):
  """``(fn(x) + x) / sqrt(2)``; ``fn`` is a conv block (the reference's ``ResidualBlock``)."""

  def __init__(self, fn: nnx.List):
    self.fn = fn

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return (_conv_block(self.fn, x, train=train) + x) * (1.0 / math.sqrt(2.0))


def _make_conv_block(channels: int, kernel_size: int, *, norm_eps: float, momentum: float,
                     rngs: nnx.Rngs, dtype: Dtype | None, param_dtype: Dtype) -> nnx.List:
  # A list so the state paths are ``0`` (conv) and ``1`` (norm) as in the
  # reference's nn.Sequential; the LeakyReLU has no state.
  return nnx.List([
      SpectralConv1d(channels, channels, kernel_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype),
      BatchNorm1d(channels, eps=norm_eps, momentum=momentum, param_dtype=param_dtype),
  ])


def _conv_block(block: nnx.List, x: jax.Array, *, train: bool) -> jax.Array:
  conv, norm = block[0], block[1]
  return jax.nn.leaky_relu(norm(conv(x, train=train), train=train), negative_slope=0.2)


class DiscriminatorHeads(nnx.Module):
  """The trainable heads, one per feature tap; logits ``(B, num_features * tokens)`` in float32.

  Head n is ``heads[n] = [conv block k=1, Residual(conv block k=kernel_size),
  SpectralConv1d(C, 1)]``, a conv block being spectral-norm Conv1d ->
  BatchNorm -> LeakyReLU(0.2).
  """

  def __init__(self, channels: int = 384, num_features: int = 5, *, kernel_size: int = 9,
               norm_eps: float = 1e-6, momentum: float = 0.1, rngs: nnx.Rngs,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32):
    kw = dict(norm_eps=norm_eps, momentum=momentum, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.heads = nnx.List([
        nnx.List([
            _make_conv_block(channels, 1, **kw),
            Residual(_make_conv_block(channels, kernel_size, **kw)),
            SpectralConv1d(channels, 1, 1, rngs=rngs, dtype=dtype, param_dtype=param_dtype),
        ])
        for _ in range(num_features)
    ])

  def __call__(self, features: Sequence[jax.Array], *, train: bool) -> jax.Array:
    if len(features) != len(self.heads):
      raise ValueError(f"{len(features)} feature taps for {len(self.heads)} heads")
    logits = []
    for head, feat in zip(self.heads, features):
      h = _conv_block(head[0], feat, train=train)
      h = head[1](h, train=train)
      logits.append(head[2](h, train=train)[..., 0])
    return jnp.concatenate(logits, axis=1)


def discriminator(heads: DiscriminatorHeads, backbone: DinoBackbone, x: jax.Array,
                  key: jax.Array | None, *, train: bool) -> jax.Array:
  """D(x): images in [-1, 1] ``(B, H, W, 3)`` -> logits ``(B, num_features * tokens)``, float32.

  ``train=True`` is what the reference runs in both the generator and the
  discriminator step (its loss module is in train mode): batch statistics,
  running-stat updates and one power iteration per call. ``key`` picks the
  backbone's random crop of inputs larger than its image size.

  The reference calls D on real and on fake images separately (and again on
  their strong augmentations for consistency regularisation), so each batch
  is normalised with its own statistics and every call moves the running
  statistics and ``u``: do not concatenate real and fake into one call.
  """
  return heads(backbone(x, key), train=train)
