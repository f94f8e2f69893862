"""Train steps and inference programs take their state as a list of arrays, not a pytree of
NNX variables (whose flattening costs host time on every call)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from softvq_jax import parallel
from softvq_jax.checkpoint import TrainCheckpointer
from softvq_jax.generator import Generator
from softvq_jax.models.sit import GeneratorConfig, SiT
from softvq_jax.tokenizer import Tokenizer
from softvq_jax.train import state as state_lib
from softvq_jax.train.loop import train_loop
from softvq_jax.transport.loss import sit_loss

GEN = GeneratorConfig(kind="sit", input_size=8, in_channels=4, hidden_size=32, depth=2,
                      num_heads=2, num_classes=4)
TX = optax.adamw(1e-3)
TOKENIZER = dict(enc_type="vit", dec_type="vit",
                 encoder_model="vit_small_patch14_dinov2.lvd142m",
                 decoder_model="vit_small_patch14_dinov2.lvd142m",
                 encoder_kwargs=dict(embed_dim=32, depth=1, num_heads=2),
                 decoder_kwargs=dict(embed_dim=32, depth=1, num_heads=2), image_size=32,
                 enc_patch_size=8, dec_patch_size=8, num_latent_tokens=8, codebook_embed_dim=4,
                 codebook_size=16)


def _loss_fn(model, batch, key, step):
  del step
  out = sit_loss(lambda x, t, y, k: model(x, t, y, drop_key=k), batch["latent"], batch["label"],
                 key)
  return jnp.mean(out["loss"]), {}


def _setup(config=GEN):
  mesh = parallel.create_mesh([("data", -1)])
  graphdef, state, shardings = state_lib.create_train_state(lambda rngs: SiT(config, rngs=rngs),
                                                            TX, mesh, seed=0)
  step = state_lib.make_train_step(graphdef, TX, _loss_fn, ema_decay=0.9,
                                   state_shardings=shardings,
                                   batch_sharding=parallel.batch_sharding(mesh))
  return mesh, state, step


def _batches(mesh, n=2):
  rng = np.random.default_rng(0)
  count = jax.device_count()
  return [parallel.global_batch({"latent": rng.normal(size=(count, 8, 4)).astype(np.float32),
                                 "label": rng.integers(0, 4, count).astype(np.int32)}, mesh)
          for _ in range(n)]


@pytest.fixture(scope="module")
def setup():
  return _setup()


def _copy(state):
  return jax.tree.map(jnp.copy, state)


def test_leaf_step_computes_what_the_step_jitted_on_the_pytree_does(setup):
  mesh, state, step = setup
  batches = _batches(mesh)
  reference, leafy, pytree = _copy(state), state_lib.LeafState.of(_copy(state)), _copy(state)
  plain = jax.jit(step.fn)  # the step on the TrainState pytree, as jitted before LeafStep
  for batch in batches:
    reference, ref_metrics = plain(reference, batch)
    leafy, metrics = step(leafy, batch)
    pytree, tree_metrics = step(pytree, batch)
    np.testing.assert_array_equal(np.asarray(metrics["loss"]), np.asarray(ref_metrics["loss"]))
    np.testing.assert_array_equal(np.asarray(tree_metrics["loss"]),
                                  np.asarray(ref_metrics["loss"]))
  assert isinstance(leafy, state_lib.LeafState)
  assert isinstance(pytree, state_lib.TrainState)
  assert jax.tree.structure(leafy.tree()) == jax.tree.structure(reference)
  for got, other, want in zip(leafy.leaves, jax.tree.leaves(pytree), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(other), np.asarray(want))
  assert int(leafy.step) == len(batches)


def test_programs_take_a_list_of_arrays(setup):
  mesh, state, step = setup
  lowered = step.lower(state, _batches(mesh, 1)[0])
  state_arg = lowered.in_tree.children()[0].children()[0]
  assert state_arg.num_leaves == len(jax.tree.leaves(state))
  assert "CustomNode" not in str(state_arg) and "State" not in str(state_arg)
  tok = Tokenizer.random(TOKENIZER)
  gen = Generator.random(GEN)
  programs = [tok._encode.lower(tok._compute_leaves, jnp.zeros((1, 32, 32, 3))),  # pylint: disable=protected-access
              gen._forward.lower(gen._compute_leaves, jnp.zeros((1, 8, 4)), jnp.zeros((1,)),  # pylint: disable=protected-access
                                 jnp.zeros((1,), jnp.int32))]
  for program in programs:
    assert "CustomNode" not in str(program.in_tree), program.in_tree


def test_a_state_of_another_model_is_refused(setup):
  mesh, _, step = setup
  _, other, _ = _setup(GeneratorConfig(**{**GEN.__dict__, "depth": 1}))
  with pytest.raises(ValueError, match=r"structure this step was built for: \d+ arrays given"):
    step(state_lib.LeafState.of(other), _batches(mesh, 1)[0])
  with pytest.raises(ValueError, match="structure this step was built for"):
    step.lower(other, _batches(mesh, 1)[0])


def test_leaf_state_reads_like_the_train_state(setup):
  _, state, _ = setup
  leafy = state_lib.LeafState.of(state)
  assert state_lib.LeafState.of(leafy) is leafy
  assert leafy.tree() is leafy.tree()
  assert int(leafy.step) == int(state.step)
  for a, b in zip(jax.tree.leaves(leafy.ema), jax.tree.leaves(state.ema)):
    assert a is b  # the same arrays, not copies
  with pytest.raises(AttributeError):
    leafy.no_such_field  # pylint: disable=pointless-statement


def test_train_loop_passes_a_leaf_state_and_saves_the_pytree(tmp_path):
  mesh, state, step = _setup()
  batches = _batches(mesh, 3)
  seen = []
  workdir = str(tmp_path)
  ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"))
  final, last = train_loop(
      state=state, train_step=step, data=iter(jax.device_get(b) for b in batches), mesh=mesh,
      workdir=workdir, total_steps=3, checkpointer=ckpt, log_every=1, ckpt_every=2,
      hooks=(lambda i, s: seen.append((i, type(s).__name__, int(s.step))),))
  assert seen == [(1, "LeafState", 1), (2, "LeafState", 2), (3, "LeafState", 3)]
  assert isinstance(final, state_lib.TrainState) and int(final.step) == 3
  assert np.isfinite(last["loss"]) and last["param_norm"] > 0
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          final)
  restored, _, meta = ckpt.restore(abstract)
  ckpt.close()
  assert ckpt.all_steps() == [2, 3] and meta["step"] == 3
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(final)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
