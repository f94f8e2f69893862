"""PSNR and SSIM in JAX, per image, with scikit-image's definitions.

SSIM follows ``skimage.metrics.structural_similarity`` with its defaults: 7x7 uniform
window (``gaussian_weights=False``), K1 = 0.01, K2 = 0.03, sample covariances (49/48),
the SSIM map cropped by 3 pixels on each side before averaging, channels averaged.
Because of that crop only windows lying wholly inside the image count, so a "valid"
box filter gives the same numbers as skimage's reflect-padded one.

The SoftVQ reference (``inference/reconstruct_vq.py``) scores uint8 images converted to
[0, 1] floats with PSNR at data range 1 and SSIM at ``data_range=2.0``; the latter inflates
SSIM (the stabilising constants grow 4x). :func:`reconstruction_metrics` reports the
correct SSIM as ``ssim`` and the reference's number as ``ssim_reference_dr2``, never mixing
the two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _as_float(x: jax.Array, data_range: float) -> jax.Array:
  # Work in units of the data range so every quantity is O(1) in float32.
  return jnp.asarray(x, jnp.float32) / jnp.float32(data_range)


@jax.jit
def _psnr_unit(a: jax.Array, b: jax.Array) -> jax.Array:
  mse = jnp.mean(jnp.square(a - b), axis=tuple(range(1, a.ndim)))
  return 10.0 * jnp.log10(1.0 / mse)


def psnr(a: jax.Array, b: jax.Array, data_range: float) -> jax.Array:
  """Per-image PSNR in dB of batches ``(N, ...)``; ``inf`` for identical images."""
  if a.shape != b.shape:
    raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
  return _psnr_unit(_as_float(a, data_range), _as_float(b, data_range))


def _box_mean(x: jax.Array, win: int) -> jax.Array:
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, win, win, 1), (1, 1, 1, 1), "VALID")
  return total / (win * win)


def _ssim_unit(x: jax.Array, y: jax.Array, win: int, k1: float, k2: float) -> jax.Array:
  c1, c2 = k1 ** 2, k2 ** 2  # data range is 1 after _as_float
  n = win * win
  cov_norm = n / (n - 1)
  ux, uy = _box_mean(x, win), _box_mean(y, win)
  uxx, uyy, uxy = _box_mean(x * x, win), _box_mean(y * y, win), _box_mean(x * y, win)
  vx = cov_norm * (uxx - ux * ux)
  vy = cov_norm * (uyy - uy * uy)
  vxy = cov_norm * (uxy - ux * uy)
  s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
  return jnp.mean(s, axis=(1, 2, 3))


_ssim_jit = jax.jit(_ssim_unit, static_argnames=("win", "k1", "k2"))


def ssim(a: jax.Array, b: jax.Array, data_range: float, *, win_size: int = 7, k1: float = 0.01,
         k2: float = 0.03) -> jax.Array:
  """Per-image SSIM of NHWC batches (skimage ``structural_similarity(..., channel_axis=-1)``)."""
  if a.shape != b.shape or a.ndim != 4:
    raise ValueError(f"expected two NHWC batches of one shape, got {a.shape} and {b.shape}")
  if win_size % 2 != 1 or win_size > min(a.shape[1:3]):
    raise ValueError(f"win_size must be odd and fit the image, got {win_size} for {a.shape}")
  return _ssim_jit(_as_float(a, data_range), _as_float(b, data_range), win_size, k1, k2)


def reconstruction_metrics(originals_u8: np.ndarray, recons_u8: np.ndarray) -> dict[str, float]:
  """Mean per-image PSNR/SSIM of uint8 NHWC batches, plus the reference's SSIM quirk.

  ``psnr`` equals skimage's on the [0, 1] floats the reference uses (data range 1);
  ``ssim`` uses the true data range; ``ssim_reference_dr2`` is the SoftVQ repository's
  ``structural_similarity(x / 255, y / 255, data_range=2.0)``, only for comparing with its
  published SSIM (e.g. 0.74 for softvq-l-64).
  """
  a = jnp.asarray(originals_u8, jnp.float32) / 255.0
  b = jnp.asarray(recons_u8, jnp.float32) / 255.0
  return {
      "psnr": float(jnp.mean(psnr(a, b, 1.0))),
      "ssim": float(jnp.mean(ssim(a, b, 1.0))),
      "ssim_reference_dr2": float(jnp.mean(ssim(a, b, 2.0))),
  }
