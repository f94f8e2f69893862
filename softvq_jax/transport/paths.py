"""Interpolants of the SiT transport: t = 0 is data, t = 1 is noise.

``x_t = alpha_t x0 + sigma_t eps`` and the model learns the velocity
``dx_t/dt = alpha'_t x0 + sigma'_t eps``:

* linear: ``alpha = 1 - t``, ``sigma = t`` (velocity ``eps - x0``);
* cosine: ``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)``.

Every function works on JAX arrays and on NumPy float64 arrays (the samplers
precompute their per-step coefficients in float64, as the reference does).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PATHS = ("linear", "cosine")
WEIGHTINGS = ("uniform", "lognormal")


class Coefficients(NamedTuple):
  alpha: jax.Array
  sigma: jax.Array
  d_alpha: jax.Array
  d_sigma: jax.Array


def _check_path(path: str) -> None:
  if path not in PATHS:
    raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def coefficients(path: str, t) -> Coefficients:
  """``(alpha_t, sigma_t, alpha'_t, sigma'_t)`` with the broadcast shape of ``t``."""
  _check_path(path)
  xp = np if isinstance(t, (np.ndarray, float, int)) else jnp
  if path == "linear":
    return Coefficients(1 - t, t, -xp.ones_like(t), xp.ones_like(t))
  half_pi = np.pi / 2
  return Coefficients(xp.cos(t * half_pi), xp.sin(t * half_pi),
                      -half_pi * xp.sin(t * half_pi), half_pi * xp.cos(t * half_pi))


def _expand(t, x):
  t = jnp.asarray(t, dtype=x.dtype)
  return jnp.reshape(t, t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(path: str, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """``x_t = alpha_t x0 + sigma_t noise``; ``t`` has shape ``(B,)`` (or broadcasts)."""
  c = coefficients(path, _expand(t, x0))
  return c.alpha * x0 + c.sigma * noise


def velocity_target(path: str, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """``alpha'_t x0 + sigma'_t noise``: the regression target of a velocity model."""
  c = coefficients(path, _expand(t, x0))
  return c.d_alpha * x0 + c.d_sigma * noise


def score_coefficients(path: str, t):
  """``(a, b)`` with ``score = a * v + b * x`` for a velocity ``v`` at ``(x, t)``.

  From the reference's conversion ``score = (r v - x) / (sigma^2 - r sigma' sigma)``
  with ``r = alpha / alpha'`` (undefined at t = 0 for the linear path).
  """
  c = coefficients(path, t)
  ratio = c.alpha / c.d_alpha
  var = c.sigma**2 - ratio * c.d_sigma * c.sigma
  return ratio / var, -1 / var


def score_from_velocity(path: str, v: jax.Array, x: jax.Array, t: jax.Array) -> jax.Array:
  a, b = score_coefficients(path, _expand(t, x))
  return a * v + b * x


def sample_time(key: jax.Array, shape: tuple[int, ...], *, weighting: str = "uniform",
                path: str = "linear", dtype=jnp.float32) -> jax.Array:
  """Training times: ``uniform`` on [0, 1), or ``lognormal`` (EDM: sigma = exp(n), n ~ N(0, 1)).

  A lognormal sigma maps to the t with ``sigma_t / alpha_t = sigma``:
  ``sigma / (1 + sigma)`` on the linear path, ``(2 / pi) atan(sigma)`` on the cosine one.
  """
  _check_path(path)
  if weighting == "uniform":
    return jax.random.uniform(key, shape, dtype)
  if weighting == "lognormal":
    sigma = jnp.exp(jax.random.normal(key, shape, dtype))
    if path == "linear":
      return sigma / (1 + sigma)
    return (2 / np.pi) * jnp.arctan(sigma)
  raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
