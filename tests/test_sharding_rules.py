"""Regex -> logical axes -> mesh axes: specs on real SiT trees, errors, and sharded = 1 device."""

from __future__ import annotations

import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from softvq_jax import parallel
from softvq_jax.models.sit import GeneratorConfig, SiT
from softvq_jax.train import state as state_lib
from softvq_jax.transport.loss import sit_loss

sys.path.insert(0, os.path.dirname(__file__))

P = jax.sharding.PartitionSpec
GEN = GeneratorConfig(kind="sit", input_size=8, in_channels=4, hidden_size=32, depth=2,
                      num_heads=2, num_classes=4)
TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, b2=0.999))


def model_fn(rngs, scan=False):
  return SiT(GEN, rngs=rngs, scan_layers=scan)


def abstract_state(scan=False):
  return jax.eval_shape(lambda: state_lib._init(lambda r: model_fn(r, scan), TX, 0))  # pylint: disable=protected-access


def flat_specs(tree):
  return {"/".join(parallel.path_parts(kp)): s for kp, s in jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: isinstance(x, P))}


@pytest.fixture(scope="module")
def mesh():
  return parallel.create_mesh([("data", 2), ("fsdp", 4)])


# Block parameters of the tiny SiT (hidden 32, mlp 128, fsdp = 4) under the fsdp preset.
FSDP_BLOCK = {
    "attn/qkv/kernel": P(None, "fsdp"), "attn/qkv/bias": P("fsdp"),
    "attn/proj/kernel": P("fsdp", None), "attn/proj/bias": P(),
    "mlp/fc1/kernel": P(None, "fsdp"), "mlp/fc1/bias": P("fsdp"),
    "mlp/fc2/kernel": P("fsdp", None), "mlp/fc2/bias": P(),
    "adaLN_modulation/1/kernel": P(None, "fsdp"), "adaLN_modulation/1/bias": P("fsdp"),
}


def test_fsdp_preset_specs_on_sit_params_and_followers(mesh):
  specs = flat_specs(parallel.state_specs(abstract_state(), mesh, "fsdp"))
  for i in range(2):
    for suffix, want in FSDP_BLOCK.items():
      for top in ("params", "ema", "opt_state/1/0/mu", "opt_state/1/0/nu"):
        assert specs[f"{top}/blocks/{i}/{suffix}"] == want, (top, i, suffix)
  # No rule: the fsdp shape rule (largest dimension divisible by 4).
  assert specs["params/t_embedder/mlp/0/kernel"] == P("fsdp", None)         # (256, 32)
  assert specs["params/final_layer/linear/kernel"] == P("fsdp", None)       # (32, 4)
  assert specs["params/y_embedder/embedding_table/embedding"] == P(None, "fsdp")  # (5, 32)
  assert specs["rest/pos_embed"] == P(None, None, "fsdp")                   # (1, 8, 32)
  assert specs["step"] == P() and specs["opt_state/1/0/count"] == P()
  # Everything replicated under dp.
  dp = flat_specs(parallel.state_specs(abstract_state(), mesh, "dp"))
  assert set(dp.values()) == {P()}


def test_scanned_layout_and_config_rules(mesh, caplog):
  specs = flat_specs(parallel.state_specs(abstract_state(scan=True), mesh, "fsdp"))
  assert specs["params/blocks/attn/qkv/kernel"] == P(None, None, "fsdp")    # (2, 32, 96)
  assert specs["opt_state/1/0/mu/blocks/mlp/fc2/kernel"] == P(None, "fsdp", None)
  # MaxText-style: the residual width over fsdp, the MLP over data; a config rule for the
  # final layer whose 4 output channels do not split 2 ways (replicated, with a note).
  rules = parallel.make_rules(
      "dp",
      sharding_rules=[(r"final_layer/linear/kernel", ("embed", "latent"))],
      logical_axis_rules=[("embed", "fsdp"), ("mlp", "data"), ("latent", "data")])
  mesh42 = parallel.create_mesh([("data", 8)])
  with caplog.at_level(logging.INFO):
    specs = flat_specs(parallel.state_specs(abstract_state(), mesh, rules))
    odd = flat_specs(parallel.state_specs(abstract_state(), mesh42, parallel.make_rules(
        "dp", logical_axis_rules=[("embed", "data")])))
  assert specs["params/blocks/1/mlp/fc1/kernel"] == P("fsdp", "data")
  assert specs["ema/blocks/1/mlp/fc2/kernel"] == P("data", "fsdp")
  assert specs["params/blocks/0/attn/qkv/kernel"] == P("fsdp", None)
  assert specs["params/final_layer/linear/kernel"] == P("fsdp", "data")     # 4 % 2 == 0
  assert specs["params/t_embedder/mlp/0/kernel"] == P()                     # dp fallback
  # 32 splits 8 ways; a (4,)-wide kernel dim and nothing else: (32, 4) kernel's embed dim.
  assert odd["params/blocks/0/attn/proj/kernel"] == P(None, "data")
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="absl"):
    specs = flat_specs(parallel.state_specs(abstract_state(), mesh42, parallel.make_rules(
        "dp", sharding_rules=[(r"final_layer/linear/kernel", ("embed", "latent"))],
        logical_axis_rules=[("latent", "data")])))
  assert specs["params/final_layer/linear/kernel"] == P()                    # 4 % 8 != 0
  assert "not divisible" in caplog.text and "final_layer/linear/kernel" in caplog.text


def test_invalid_rules_are_clear_errors(mesh):
  with pytest.raises(ValueError, match="unknown logical axis 'emb'"):
    parallel.make_rules("fsdp", sharding_rules=[(r"blocks/\d+/attn/qkv/kernel", ("emb", "qkv"))])
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    parallel.state_specs(abstract_state(), mesh,
                         parallel.make_rules("dp", logical_axis_rules=[("embed", "model")]))
  with pytest.raises(ValueError, match=r"qkv/kernel.*1 logical axes.*rank 2"):
    parallel.state_specs(abstract_state(), mesh, parallel.make_rules(
        "dp", sharding_rules=[(r"blocks/\d+/attn/qkv/kernel", ("embed",))]))
  with pytest.raises(ValueError, match="not a valid regex"):
    parallel.make_rules("dp", sharding_rules=[(r"blocks/(", ("embed",))])
  with pytest.raises(ValueError, match="would split dimensions"):
    parallel.state_specs(abstract_state(), mesh, parallel.make_rules(
        "dp", logical_axis_rules=[("embed", "fsdp"), ("qkv", "fsdp")]))
  with pytest.raises(ValueError, match="strategy"):
    parallel.make_rules("zero3")


def loss_fn(model, batch, key, step):
  del step
  out = sit_loss(lambda x, t, y, k: model(x, t, y, drop_key=k), batch["latent"], batch["label"],
                 key, weighting="lognormal")
  return jnp.mean(out["loss"]), {}


def _run(mesh, rules, batches):
  graphdef, state, shardings = state_lib.create_train_state(model_fn, TX, mesh, seed=3,
                                                            strategy=rules)
  step = state_lib.make_train_step(graphdef, TX, loss_fn, ema_decay=0.9,
                                   state_shardings=shardings,
                                   batch_sharding=parallel.batch_sharding(mesh))
  # What the trainers do (parallel.with_activation_sharding), lowered once and kept.
  with parallel.activation_sharding(mesh, rules):
    lowered = step.lower(state, parallel.global_batch(batches[0], mesh))
  compiled = lowered.compile()
  losses = []
  leaves = step.leaves_of(state)  # the program takes the state as its list of arrays
  for batch in batches:
    leaves, metrics = compiled(leaves, parallel.global_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  return jax.tree.unflatten(step.treedef, leaves), losses, lowered.as_text()


def test_rule_based_fsdp_step_equals_one_device():
  rng = np.random.default_rng(0)
  batches = [{"latent": rng.normal(size=(8, 8, 4)).astype(np.float32),
              "label": rng.integers(0, 4, 8).astype(np.int32)} for _ in range(2)]
  one = parallel.create_mesh([("data", 1)], devices=jax.devices()[:1])
  ref_state, ref_losses, _ = _run(one, "dp", batches)
  mesh = parallel.create_mesh([("data", 2), ("fsdp", 4)])
  rules = parallel.make_rules("fsdp", logical_axis_rules=[("embed", "data")])
  state, losses, text = _run(mesh, rules, batches)
  # Traced under the rules: the blocks constrain their activations (batch over data x fsdp).
  assert text.count("sharding_constraint") >= GEN.depth + 1
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(state.ema), jax.tree.leaves(ref_state.ema)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  fc1 = state.params["blocks"][0]["mlp"]["fc1"]["kernel"]
  assert fc1.sharding.spec == P("data", "fsdp")
  assert fc1.addressable_shards[0].data.shape == (16, 32)
  mu = state.opt_state[1][0].mu["blocks"][0]["mlp"]["fc1"]["kernel"]
  assert mu.sharding.spec == fc1.sharding.spec


def test_constrain_lowers_to_a_sharding_constraint():
  mesh = parallel.create_mesh([("data", 2), ("fsdp", 4)])
  x = jnp.zeros((8, 8, 4))
  assert parallel.constrain(x, ("batch", None, None)) is x          # not traced: no-op
  f = jax.jit(lambda x: parallel.constrain(x * 2, ("batch", None, None)))
  assert "sharding_constraint" not in f.lower(x).as_text()          # no mesh: no-op
  g = jax.jit(lambda x: parallel.constrain(x * 3, ("batch", None, None)))
  with parallel.activation_sharding(mesh, "fsdp"):
    text = g.lower(x).as_text()
  assert "sharding_constraint" in text and '"data", "fsdp"' in text.replace("'", '"')
  from flax import nnx  # pylint: disable=g-import-not-at-top
  model = SiT(GEN, rngs=nnx.Rngs(0))
  graphdef, st = nnx.split(model)
  h = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, jnp.zeros(8), jnp.zeros(8, jnp.int32)))
  with parallel.activation_sharding(mesh, "dp"):
    text = h.lower(st, x).as_text()
  assert text.count("sharding_constraint") >= GEN.depth + 1
  # Under jax.set_mesh (no rules given) the dp preset's rules apply; a batch the data axes
  # do not divide stays replicated.
  with jax.set_mesh(mesh):
    assert jax.jit(lambda x: parallel.constrain(x + 1, ("batch", None, None)))(
        x).sharding.spec == P(("data", "fsdp"))
    assert jax.jit(lambda x: parallel.constrain(x + 1, ("batch",)))(
        jnp.zeros(6)).sharding.spec == P()


def test_rules_from_a_trainer_config(mesh):
  from test_train_engine import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(1, sharding="fsdp", logical_axis_rules=[("embed", "data")],
                       sharding_rules=[(r"x_embedder/kernel", (None, "embed"))])
  rules = parallel.rules_from_config(config)
  specs = flat_specs(parallel.state_specs(abstract_state(), mesh, rules))
  assert specs["params/blocks/0/mlp/fc1/kernel"] == P("data", "fsdp")
  assert specs["params/x_embedder/kernel"] == P(None, "data")
  assert parallel.rules_from_config(tiny_config(1)) is parallel.PRESETS["dp"]
