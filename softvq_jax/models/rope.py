"""Learnable mixed 2-D rotary position embeddings (RoPE-Mixed), as MAETok uses them.

``freqs`` has shape ``(2, depth, H * hd/2)``: row 0 holds the x frequencies,
row 1 the y frequencies, head-major along the last axis. The angle of pair j
of head h at image token t in layer i is
``t_x * freqs[0, i, h*P + j] + t_y * freqs[1, i, h*P + j]`` with
``t_x = t mod grid_w`` and ``t_y = t div grid_w``. Positions follow from the
input size, so a model runs at any grid its position tables allow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from softvq_jax.models.layers import RopeTables


def grid_positions(grid_h: int, grid_w: int) -> tuple[np.ndarray, np.ndarray]:
  """(t_x, t_y) float32 positions of the row-major patch grid."""
  t = np.arange(grid_h * grid_w)
  return (t % grid_w).astype(np.float32), (t // grid_w).astype(np.float32)


def init_mixed_freqs(key: jax.Array, depth: int, num_heads: int, head_dim: int,
                     theta: float) -> jax.Array:
  """Per layer and head a random direction a; magnitudes theta^(-4k/hd), k < hd/4.

  The first hd/4 pairs point along a, the next hd/4 along a + pi/2.
  """
  if head_dim % 4:
    raise ValueError(f"mixed RoPE needs a head dim divisible by 4, got {head_dim}")
  quarter = head_dim // 4
  mags = theta ** (-4.0 * jnp.arange(quarter, dtype=jnp.float32) / head_dim)
  angles = jax.random.uniform(key, (depth, num_heads, 1), jnp.float32, 0.0, 2 * jnp.pi)
  fx = jnp.concatenate([mags * jnp.cos(angles), mags * jnp.cos(angles + jnp.pi / 2)], axis=-1)
  fy = jnp.concatenate([mags * jnp.sin(angles), mags * jnp.sin(angles + jnp.pi / 2)], axis=-1)
  return jnp.stack([fx, fy]).reshape(2, depth, num_heads * 2 * quarter)


def layer_tables(freqs: jax.Array, layer: int, grid: tuple[int, int], num_heads: int,
                 start: int) -> RopeTables:
  """cos/sin ``(N, H, P)`` of one layer for the image rows starting at ``start``."""
  t_x, t_y = grid_positions(*grid)
  f = freqs[:, layer].astype(jnp.float32).reshape(2, num_heads, -1)  # (2, H, P)
  angles = t_x[:, None, None] * f[0][None] + t_y[:, None, None] * f[1][None]
  return RopeTables(jnp.cos(angles), jnp.sin(angles), start)
