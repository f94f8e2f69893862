"""DiffAugment (Zhao et al. 2020) for NHWC images in [-1, 1], with explicit PRNG keys.

Semantics of the reference (``utils/diff_aug.py`` of the PyTorch code):

* a policy is a comma-separated list of ``color``, ``translation`` and
  ``cutout_R``; they run in the order given;
* each policy is applied to the **whole batch** or not at all, with one coin
  per policy per call (probability ``prob``); the random magnitudes inside a
  policy are drawn **per sample**;
* ``color`` = brightness (+U[-0.5, 0.5)), then saturation (deviation from the
  per-pixel channel mean times U[0, 2)), then contrast (deviation from the
  per-image mean times U[0.5, 1.5));
* ``translation`` shifts by an integer in [-s, s] per axis, s = int(0.125 * size
  + 0.5), filling with zeros;
* ``cutout_R`` zeroes a box of int(R * size + 0.5) pixels per axis whose
  centre is drawn per sample; the box is clipped at the image border.

The reference augments real and fake images with separate calls (independent
draws), so there is no paired variant here: call ``diff_augment`` twice with
different keys. Under ``jit`` the coins are drawn once for the global batch;
each DDP rank of the reference tosses its own for its local batch.

Everything is computed in float32 and cast back to the input dtype, so
bfloat16 images keep their dtype without bfloat16 means.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_POLICY = "color,translation,cutout_0.2"
# The consistency regulariser's strong augmentation, always applied (prob 1.0).
STRONG_POLICY = "color,translation,cutout_0.5"
TRANSLATION_RATIO = 0.125


@functools.lru_cache(maxsize=None)
def parse_policy(policy: str) -> tuple[tuple[str, float], ...]:
  """``"color,translation,cutout_0.2"`` -> ``(("color", 0.), ("translation", .125), ("cutout", .2))``."""
  ops = []
  for name in (p.strip() for p in policy.split(",")):
    if not name:
      continue
    if name == "color":
      ops.append(("color", 0.0))
    elif name == "translation":
      ops.append(("translation", TRANSLATION_RATIO))
    elif name.startswith("cutout_"):
      try:
        ratio = float(name[len("cutout_"):])
      except ValueError:
        raise ValueError(f"bad cutout ratio in DiffAugment policy {policy!r}") from None
      ops.append(("cutout", ratio))
    else:
      raise ValueError(f"unknown DiffAugment policy {name!r} in {policy!r}; "
                       "expected color, translation or cutout_<ratio>")
  return tuple(ops)


def _per_sample(r: jax.Array) -> jax.Array:
  return r.reshape(-1, 1, 1, 1)


def brightness(x: jax.Array, r: jax.Array) -> jax.Array:
  """``x + (r - 0.5)``; ``r`` of shape (B,) in [0, 1)."""
  return x + (_per_sample(r) - 0.5)


def saturation(x: jax.Array, r: jax.Array) -> jax.Array:
  """Scales each pixel's deviation from its channel mean by ``2 r``."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  return (x - mean) * (_per_sample(r) * 2.0) + mean


def contrast(x: jax.Array, r: jax.Array) -> jax.Array:
  """Scales each image's deviation from its mean (over H, W, C) by ``r + 0.5``."""
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return (x - mean) * (_per_sample(r) + 0.5) + mean


def translation_shift(size: int, ratio: float = TRANSLATION_RATIO) -> int:
  return int(size * ratio + 0.5)


def translate(x: jax.Array, dx: jax.Array, dy: jax.Array, ratio: float = TRANSLATION_RATIO) -> jax.Array:
  """``out[b, i, j] = x[b, i + dx[b], j + dy[b]]``, zero outside; |dx|, |dy| <= the ratio's shift."""
  _, h, w, _ = x.shape
  sh, sw = translation_shift(h, ratio), translation_shift(w, ratio)
  padded = jnp.pad(x, ((0, 0), (sh, sh), (sw, sw), (0, 0)))

  # A per-sample window of the zero-padded image: a slice, not a gather, which
  # is what TPUs like and is exact.
  def window(img, ox, oy):
    return jax.lax.dynamic_slice(img, (sh + ox, sw + oy, 0), (h, w, img.shape[-1]))

  return jax.vmap(window)(padded, dx.astype(jnp.int32), dy.astype(jnp.int32))


def cutout_size(size: int, ratio: float) -> int:
  return int(size * ratio + 0.5)


def cutout(x: jax.Array, ox: jax.Array, oy: jax.Array, ratio: float) -> jax.Array:
  """Zeroes rows ``[ox - c//2, ox - c//2 + c)`` x the same for columns, per sample, clipped.

  The reference clamps the box's indices into the image and scatters zeros;
  the clamped indices always land inside the clipped box, so a box mask is the
  same set of pixels.
  """
  _, h, w, _ = x.shape
  ch, cw = cutout_size(h, ratio), cutout_size(w, ratio)
  rows = jnp.arange(h)[None, :] - (ox.reshape(-1, 1) - ch // 2)
  cols = jnp.arange(w)[None, :] - (oy.reshape(-1, 1) - cw // 2)
  in_rows = (rows >= 0) & (rows < ch)
  in_cols = (cols >= 0) & (cols < cw)
  box = in_rows[:, :, None] & in_cols[:, None, :]
  return x * jnp.where(box, 0.0, 1.0).astype(x.dtype)[..., None]


def _apply(name: str, ratio: float, x: jax.Array, key: jax.Array) -> jax.Array:
  b, h, w, _ = x.shape
  if name == "color":
    kb, ks, kc = jax.random.split(key, 3)
    x = brightness(x, jax.random.uniform(kb, (b,), jnp.float32))
    x = saturation(x, jax.random.uniform(ks, (b,), jnp.float32))
    return contrast(x, jax.random.uniform(kc, (b,), jnp.float32))
  if name == "translation":
    kx, ky = jax.random.split(key)
    sh, sw = translation_shift(h, ratio), translation_shift(w, ratio)
    dx = jax.random.randint(kx, (b,), -sh, sh + 1)
    dy = jax.random.randint(ky, (b,), -sw, sw + 1)
    return translate(x, dx, dy, ratio)
  if name == "cutout":
    kx, ky = jax.random.split(key)
    ch, cw = cutout_size(h, ratio), cutout_size(w, ratio)
    # Upper bounds as the reference's randint(0, size + (1 - c % 2)).
    ox = jax.random.randint(kx, (b,), 0, h + 1 - ch % 2)
    oy = jax.random.randint(ky, (b,), 0, w + 1 - cw % 2)
    return cutout(x, ox, oy, ratio)
  raise ValueError(f"unknown DiffAugment op {name!r}")


def diff_augment(x: jax.Array, key: jax.Array, policy: str = DEFAULT_POLICY,
                 prob: float | jax.Array = 0.5) -> jax.Array:
  """Augments a batch ``(B, H, W, C)``; each policy is applied to all of it with probability ``prob``.

  The reference skips a policy when ``rand() > prob``; here it is applied when
  ``u < prob`` with u in [0, 1), which differs only on a set of measure zero
  and makes ``prob=0`` an exact identity. ``policy`` must be static.
  Gradients flow to ``x`` through the applied ops, as in the reference.
  """
  ops = parse_policy(policy)
  if not ops:
    return x
  out = x.astype(jnp.float32)
  static_prob = isinstance(prob, (int, float))
  if static_prob and prob <= 0:
    return x
  for (name, ratio), k in zip(ops, jax.random.split(key, len(ops))):
    k_coin, k_op = jax.random.split(k)
    augmented = _apply(name, ratio, out, k_op)
    if static_prob and prob >= 1:
      out = augmented
    else:
      applied = jax.random.uniform(k_coin, (), jnp.float32) < prob
      out = jnp.where(applied, augmented, out)
  return out.astype(x.dtype)
