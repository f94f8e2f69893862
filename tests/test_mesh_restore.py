"""A train checkpoint written on one mesh restores onto another with the same values."""

from __future__ import annotations

import jax
import numpy as np
import optax

from softvq_jax import parallel
from softvq_jax.checkpoint import TrainCheckpointer
from softvq_jax.models.sit import GeneratorConfig, SiT
from softvq_jax.train import state as state_lib

GEN = GeneratorConfig(kind="sit", input_size=8, in_channels=4, hidden_size=32, depth=2,
                      num_heads=2, num_classes=4)
P = jax.sharding.PartitionSpec


def model_fn(rngs):
  return SiT(GEN, rngs=rngs)


def test_restore_data8_dp_onto_data2_fsdp4(tmp_path):
  tx = optax.adamw(1e-3)
  src_mesh = parallel.create_mesh([("data", 8)])
  _, state, _ = state_lib.create_train_state(model_fn, tx, src_mesh, seed=7, strategy="dp")
  # Make every part of the state differ from a fresh init: moments, EMA, step.
  state = state.replace(
      step=state.step + 5,
      ema=jax.tree.map(lambda e: e + 0.5, state.ema),
      opt_state=jax.tree.map(lambda a: a + 0.25 if a.dtype == np.float32 else a, state.opt_state))
  expected = jax.tree.map(np.asarray, state)
  ckpt = TrainCheckpointer(str(tmp_path / "checkpoints"), keep=2)
  ckpt.save(5, state, data_state={"epoch": 1, "position": 3}, meta={"note": "dp8"}, force=True)
  ckpt.close()

  dst_mesh = parallel.create_mesh([("data", 2), ("fsdp", 4)])
  abstract, shardings = state_lib.abstract_train_state(model_fn, tx, dst_mesh, seed=0,
                                                       strategy="fsdp")
  ckpt = TrainCheckpointer(str(tmp_path / "checkpoints"), keep=2)
  restored, data_state, meta = ckpt.restore(abstract)
  ckpt.close()
  assert data_state == {"epoch": 1, "position": 3} and meta == {"note": "dp8"}

  got, want = jax.tree.leaves(restored), jax.tree.leaves(expected)
  assert len(got) == len(want)
  assert jax.tree.structure(restored) == jax.tree.structure(jax.tree.map(lambda x: x, abstract))
  for a, b, s in zip(got, want, jax.tree.leaves(shardings)):
    np.testing.assert_array_equal(np.asarray(a), b)
    assert a.sharding.is_equivalent_to(s, a.ndim), (a.sharding, s)
  # The (32, 96) qkv kernel, its Adam moments and its EMA copy are now split 4 ways.
  qkv = restored.params["blocks"][0]["attn"]["qkv"]["kernel"]
  assert qkv.sharding.spec == P(None, "fsdp")
  assert {tuple(s.data.shape) for s in qkv.addressable_shards} == {(32, 24)}
  assert restored.ema["blocks"][0]["attn"]["qkv"]["kernel"].sharding.spec == P(None, "fsdp")
  mu = restored.opt_state[0].mu["blocks"][0]["attn"]["qkv"]["kernel"]
  assert mu.sharding.spec == P(None, "fsdp")
  assert dict(qkv.sharding.mesh.shape) == {"data": 2, "fsdp": 4}
  # The source was fully replicated.
  assert state.params["blocks"][0]["attn"]["qkv"]["kernel"].sharding.is_fully_replicated


def test_saving_a_replicated_state_compiles_nothing(tmp_path):
  """One process writes every byte of a replicated array anyway; splitting the write among
  its 8 devices (Orbax's replica parallelism) costs an eager slice, and a compilation per
  array shape, on the first save of every run."""
  from conftest import count_compiles  # pylint: disable=g-import-not-at-top
  mesh = parallel.create_mesh([("data", 8)])
  _, state, _ = state_lib.create_train_state(model_fn, optax.adamw(1e-3), mesh, seed=3,
                                             strategy="dp")
  assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state))
  jax.block_until_ready(state)
  ckpt = TrainCheckpointer(str(tmp_path / "checkpoints"))
  with count_compiles() as compiles:
    ckpt.save(1, state, force=True)
    ckpt.wait()
  assert compiles[0] == 0
  abstract, _ = state_lib.abstract_train_state(model_fn, optax.adamw(1e-3), mesh, seed=0,
                                               strategy="dp")
  restored, _, _ = ckpt.restore(abstract)
  ckpt.close()
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
