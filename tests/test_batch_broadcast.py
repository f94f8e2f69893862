"""``layers.broadcast_over_batch``: the learned token and position tables of the ViTs, repeated
over the batch, with their gradient summed over the batch in two stages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from softvq_jax.models.layers import broadcast_over_batch


@pytest.mark.parametrize("batch", [1, 3, 4, 6])
def test_values_and_gradient_are_those_of_a_broadcast(batch):
  rng = np.random.default_rng(batch)
  table = rng.normal(size=(1, 5, 3)).astype(np.float32)
  cotangent = rng.normal(size=(batch, 5, 3)).astype(np.float32)
  out, vjp = jax.vjp(lambda t: broadcast_over_batch(t, batch), jnp.asarray(table))
  np.testing.assert_array_equal(np.asarray(out), np.broadcast_to(table, (batch, 5, 3)))
  (grad,) = vjp(jnp.asarray(cotangent))
  assert grad.shape == table.shape and grad.dtype == jnp.float32
  expected = cotangent.astype(np.float64).sum(axis=0, keepdims=True)
  assert rel_err(grad, expected) < 1e-6
  jitted = jax.jit(jax.grad(lambda t, c: jnp.sum(broadcast_over_batch(t, batch) * c)))
  assert rel_err(jitted(table, cotangent), expected) < 1e-6


def test_a_bfloat16_cast_after_it_keeps_a_float32_gradient():
  """The models cast the repeated table to the compute dtype; the table's gradient is summed in
  the table's float32."""
  table = jnp.ones((1, 4, 2), jnp.float32)
  weights = np.random.default_rng(0).normal(size=(8, 4, 2)).astype(np.float32)

  def loss(t):
    cast = broadcast_over_batch(t, 8).astype(jnp.bfloat16)
    return jnp.sum(cast.astype(jnp.float32) * weights)

  grad = jax.grad(loss)(table)
  assert grad.dtype == jnp.float32
  # The cotangent reaching the table went through the bfloat16 cast: each term is rounded to
  # bfloat16, the sum over the batch is not.
  rounded = np.asarray(jnp.asarray(weights).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  assert rel_err(grad, rounded.sum(axis=0, keepdims=True)) < 1e-6
