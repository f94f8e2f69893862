"""The SiT training objective: regress the velocity of the chosen interpolant."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from softvq_jax.transport import paths

# velocity_fn(x_t, t, y, drop_key) -> v, e.g. ``lambda x, t, y, k: model(x, t, y, drop_key=k)``.
VelocityFn = Callable[[jax.Array, jax.Array, jax.Array, "jax.Array | None"], jax.Array]


def mean_flat(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def sit_loss(velocity_fn: VelocityFn, x0: jax.Array, y: jax.Array, key: jax.Array | None = None,
             *, path: str = "linear", weighting: str = "uniform", t: jax.Array | None = None,
             noise: jax.Array | None = None, label_dropout: bool = True) -> dict[str, jax.Array]:
  """Per-sample denoising loss ``mean_flat((v_hat - v)^2)`` (the reference's ``SILoss``).

  Args:
    velocity_fn: the model as ``(x_t, t, y, drop_key) -> v``.
    x0: normalised latents ``(B, T, C)``.
    y: labels ``(B,)``.
    key: draws t (unless given), the noise (unless given) and the label dropout.
    path / weighting: interpolant and time distribution (``uniform`` | ``lognormal``).
    t, noise: fixed values instead of drawing them (tests, evaluation).
    label_dropout: pass a dropout key to the model (training); False for evaluation.

  Returns:
    ``{"loss": (B,), "t": (B,)}``; average ``loss`` over the batch for the step.
  """
  k_time, k_noise, k_drop = jax.random.split(key, 3) if key is not None else (None,) * 3
  b = x0.shape[0]
  if t is None:
    if key is None:
      raise ValueError("sit_loss needs a key to draw t (or an explicit t)")
    t = paths.sample_time(k_time, (b,), weighting=weighting, path=path, dtype=x0.dtype)
  t = jnp.asarray(t, x0.dtype)
  if noise is None:
    if key is None:
      raise ValueError("sit_loss needs a key to draw the noise (or an explicit noise)")
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
  x_t = paths.interpolate(path, x0, noise, t)
  target = paths.velocity_target(path, x0, noise, t)
  v = velocity_fn(x_t, t, y, k_drop if label_dropout else None)
  loss = mean_flat(jnp.square(v.astype(jnp.float32) - target.astype(jnp.float32)))
  return {"loss": loss, "t": t}
