"""``layers.broadcast_over_batch``: the learned token and position tables of the ViTs, repeated
over the batch, with their gradient summed over the batch in two stages."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from softvq_jax.models import layers
from softvq_jax.models.layers import broadcast_over_batch


@pytest.mark.parametrize("target", ["cpu", "gpu"])  # gpu: the pairwise sum
@pytest.mark.parametrize("batch", [1, 3, 4, 6])
def test_values_and_gradient_are_those_of_a_broadcast(batch, target):
  rng = np.random.default_rng(batch)
  table = rng.normal(size=(1, 5, 3)).astype(np.float32)
  cotangent = rng.normal(size=(batch, 5, 3)).astype(np.float32)
  expected = cotangent.astype(np.float64).sum(axis=0, keepdims=True)
  with layers.compiling_for(target):
    out, vjp = jax.vjp(lambda t: broadcast_over_batch(t, batch), jnp.asarray(table))
    (grad,) = vjp(jnp.asarray(cotangent))
    jitted = jax.jit(jax.grad(lambda t, c: jnp.sum(broadcast_over_batch(t, batch) * c)))
    jitted_grad = jitted(table, cotangent)
  np.testing.assert_array_equal(np.asarray(out), np.broadcast_to(table, (batch, 5, 3)))
  assert grad.shape == table.shape and grad.dtype == jnp.float32
  assert rel_err(grad, expected) < 1e-6
  assert rel_err(jitted_grad, expected) < 1e-6


def _collectives(devices: int, batch: int, target: str) -> list[str]:
  """Collectives of the table's gradient with the batch sharded over ``devices``."""
  mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
  grad = jax.jit(jax.grad(lambda t, w: jnp.sum(broadcast_over_batch(t, batch) * w)),
                 in_shardings=(NamedSharding(mesh, PartitionSpec()),
                               NamedSharding(mesh, PartitionSpec("data"))))
  with layers.compiling_for(target):
    hlo = grad.lower(jnp.ones((1, 16, 8)), jnp.ones((batch, 16, 8))).compile().as_text()
    values = grad(jnp.ones((1, 16, 8)), jnp.arange(batch * 128.0).reshape(batch, 16, 8))
  expected = np.arange(batch * 128.0).reshape(batch, 16, 8).sum(axis=0, keepdims=True)
  assert rel_err(values, expected) < 1e-6
  return re.findall(r"(all-reduce|all-gather|collective-permute|all-to-all|reduce-scatter)"
                    r"(?:-start)?\(", hlo)


def test_a_sharded_batch_needs_one_all_reduce():
  """Pairs of examples stay on a device when each holds an even number of them; other
  targets keep the plain sum, which is local for any number (a pod's one example each)."""
  assert jax.device_count() >= 8  # the test session's fake CPU devices
  assert _collectives(2, 4, "gpu") == ["all-reduce"]
  assert _collectives(4, 8, "gpu") == ["all-reduce"]
  assert _collectives(8, 8, "cpu") == ["all-reduce"]
  assert _collectives(2, 6, "cpu") == ["all-reduce"]


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
