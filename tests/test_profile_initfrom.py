"""Profiler traces from the training loop, and SiT/DiT training started from a saved generator."""

from __future__ import annotations

import glob
import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from test_train_engine import _final_params, tiny_config  # noqa: E402  pylint: disable=g-import-not-at-top

from softvq_jax import checkpoint  # noqa: E402
from softvq_jax.generator import Generator, variable_shapes  # noqa: E402
from softvq_jax.models.sit import GeneratorConfig, SiT, stack_layers  # noqa: E402
from softvq_jax.train import dit_trainer, sit_trainer  # noqa: E402


def _profiler_or_skip():
  try:
    from jax._src.lib import _profiler  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    print(f"SKIP reason: the JAX profiler plugin is unavailable ({e})")
    pytest.skip(f"the JAX profiler plugin is unavailable ({e})")


@pytest.mark.parametrize("total_steps", [4, 2])
def test_profile_writes_a_trace(tmp_path, total_steps):
  """A tiny train_loop run with profiling on: one trace, closed inside the run (4 steps) or,
  still open when the run ends (2 steps), by the loop itself."""
  _profiler_or_skip()
  import flax.struct  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from softvq_jax import parallel  # pylint: disable=g-import-not-at-top
  from softvq_jax.checkpoint import TrainCheckpointer  # pylint: disable=g-import-not-at-top
  from softvq_jax.train.loop import train_loop  # pylint: disable=g-import-not-at-top

  @flax.struct.dataclass
  class State:
    step: jax.Array
    w: jax.Array

  step_fn = jax.jit(lambda s, b: (s.replace(step=s.step + 1, w=s.w + jnp.sum(b["x"])),
                                  {"loss": s.w}))
  data = iter(lambda: {"x": np.ones((8,), np.float32)}, None)
  workdir = str(tmp_path)
  ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"))
  state, _ = train_loop(state=State(jnp.zeros((), jnp.int32), jnp.zeros(())), train_step=step_fn,
                        data=data, mesh=parallel.create_mesh([("data", 8)]), workdir=workdir,
                        total_steps=total_steps, checkpointer=ckpt, log_every=1, ckpt_every=100,
                        profile_steps=2, profile_first_step=1)
  ckpt.close()
  assert int(state.step) == total_steps
  traces = glob.glob(os.path.join(workdir, "plugins", "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1, os.listdir(workdir)
  assert os.path.getsize(traces[0]) > 0
  # The profiler is free again (a trace still running would make this raise).
  jax.profiler.start_trace(str(tmp_path / "again"))
  jax.profiler.stop_trace()


def test_profile_is_off_by_default():
  import inspect  # pylint: disable=g-import-not-at-top
  from softvq_jax.train.loop import train_loop  # pylint: disable=g-import-not-at-top
  assert inspect.signature(train_loop).parameters["profile_steps"].default == 0
  assert tiny_config(1).profile_steps == 0
  from softvq_jax.train import common  # pylint: disable=g-import-not-at-top
  assert common.profile_options(tiny_config(1, profile_steps=3, profile_first_step=7)) == dict(
      profile_steps=3, profile_first_step=7)
  from test_dit_trainer import tiny_config as dit_tiny_config  # pylint: disable=g-import-not-at-top
  assert dit_tiny_config(1).profile_steps == 0 and dit_tiny_config(1).init_from == ""


def _generator_config(config, kind="sit") -> GeneratorConfig:
  tok = config.tokenizer
  fields = dict(config.model.to_dict(), input_size=tok.num_latent_tokens,
                in_channels=tok.codebook_embed_dim, vae_1d=True)
  for k in ("scan_layers", "remat_policy") + (("learn_sigma",) if kind == "sit" else ()):
    fields.pop(k, None)
  if kind == "dit":
    fields.setdefault("learn_sigma", True)
  return GeneratorConfig.from_json_dict(fields, kind=kind)


def _saved_generator(path, gen_config: GeneratorConfig, seed: int):
  """A generator with every array random (adaLN-Zero's zero kernels included), saved."""
  model = SiT(gen_config, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)
  leaves = [rng.normal(size=l.shape).astype(np.float32) for l in leaves]
  Generator(nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))).save(str(path))
  return {tuple(str(k) for k in p): np.asarray(v) for p, v in
          checkpoint.read_param_dir(str(path), variable_shapes(gen_config)).items()}


def _state_arrays(restored, field):
  out = {}
  for kp, v in jax.tree_util.tree_leaves_with_path(restored[field]):
    parts = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp)
    out[parts[:-1] if parts[-1] == "value" else parts] = np.asarray(v)
  return out


def test_sit_init_from_saved_generator(tmp_path):
  config = tiny_config(1, log_every=1, ckpt_every=1)
  config.optim.lr = 0.0          # the first step leaves the parameters as initialised
  saved = _saved_generator(tmp_path / "gen", _generator_config(config), seed=5)
  config.init_from = str(tmp_path / "gen")
  sit_trainer.run(config, str(tmp_path / "run"))
  step, restored = _final_params(str(tmp_path / "run"))
  assert step == 1
  params, ema = _state_arrays(restored, "params"), _state_arrays(restored, "ema")
  rest = _state_arrays(restored, "rest")
  assert set(params) | set(rest) == set(saved)
  for name, value in params.items():
    np.testing.assert_array_equal(value, saved[name], err_msg=str(name))
    np.testing.assert_allclose(ema[name], saved[name], rtol=1e-6, atol=1e-6, err_msg=str(name))
  np.testing.assert_array_equal(rest[("pos_embed",)], saved[("pos_embed",)])
  # The optimizer started fresh: one update counted.
  counts = [np.asarray(v) for kp, v in jax.tree_util.tree_leaves_with_path(restored["opt_state"])
            if "count" in jax.tree_util.keystr(kp)]
  assert counts and all(int(c) == 1 for c in counts)
  assert not os.path.exists(tmp_path / "run" / "plugins")  # profiling is off by default

  # Resuming wins over init_from: a different directory is ignored once a checkpoint exists.
  _saved_generator(tmp_path / "other", _generator_config(config), seed=9)
  config.init_from = str(tmp_path / "other")
  config.total_steps = 2
  sit_trainer.run(config, str(tmp_path / "run"))
  step, again = _final_params(str(tmp_path / "run"))
  assert step == 2
  for name, value in _state_arrays(again, "params").items():
    np.testing.assert_array_equal(value, saved[name], err_msg=str(name))


@pytest.mark.parametrize("kind, scan", [("sit", True), ("dit", False)])
def test_init_generator_from_fills_a_fresh_state(tmp_path, kind, scan):
  """The state right after init_from equals the saved generator (stacked when scanned)."""
  import optax  # pylint: disable=g-import-not-at-top
  from softvq_jax import parallel  # pylint: disable=g-import-not-at-top
  from softvq_jax.train import common, state as state_lib  # pylint: disable=g-import-not-at-top
  gen = GeneratorConfig(kind=kind, input_size=8, in_channels=4, hidden_size=32, depth=2,
                        num_heads=2, num_classes=4, learn_sigma=kind == "dit")
  saved = _saved_generator(tmp_path / "gen", gen, seed=3)
  want = saved
  if scan:
    want = {tuple(str(k) for k in p): v for p, v in stack_layers(
        {tuple(int(k) if k.isdigit() else k for k in p): v for p, v in saved.items()},
        gen.depth).items()}
  mesh = parallel.create_mesh([("data", 2), ("fsdp", 4)])
  tx = optax.adamw(1e-3)
  _, state, shardings = state_lib.create_train_state(
      lambda rngs: SiT(gen, rngs=rngs, scan_layers=scan), tx, mesh, seed=0, strategy="fsdp")
  state = common.init_generator_from(state, str(tmp_path / "gen"), gen, scan_layers=scan)
  got = {}
  for field in ("params", "rest", "ema"):
    for kp, v in jax.tree_util.tree_leaves_with_path(getattr(state, field)):
      name = parallel.path_parts(kp)
      got.setdefault(field, {})[name] = v
  assert set(got["params"]) | set(got["rest"]) == set(want)
  for field in ("params", "rest", "ema"):
    for name, v in got[field].items():
      np.testing.assert_array_equal(np.asarray(v), want[name], err_msg=f"{field} {name}")
  # Still laid out as the train step expects; the EMA is its own copy; Adam is untouched.
  for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    assert a.sharding.is_equivalent_to(s, a.ndim)
  assert all(not np.any(np.asarray(m)) for m in jax.tree.leaves(state.opt_state[0].mu))
  assert not any(a is b for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema)))


def test_init_from_mismatch_names_the_tensor(tmp_path):
  import dataclasses  # pylint: disable=g-import-not-at-top
  from softvq_jax.train import common  # pylint: disable=g-import-not-at-top
  gen = GeneratorConfig(kind="sit", input_size=8, in_channels=4, hidden_size=32, depth=2,
                        num_heads=2, num_classes=4)
  _saved_generator(tmp_path / "wide", dataclasses.replace(gen, hidden_size=64), seed=1)
  with pytest.raises(checkpoint.CheckpointError, match=r"x_embedder\.kernel has shape \(4, 64\)"):
    common.init_generator_from(None, str(tmp_path / "wide"), gen)
  _saved_generator(tmp_path / "deep", dataclasses.replace(gen, depth=3), seed=1)
  with pytest.raises(checkpoint.CheckpointError, match=r"unexpected parameter blocks\.2\."):
    common.init_generator_from(None, str(tmp_path / "deep"), gen)
  # Twice the heads at the same width: the same shapes, another function.
  _saved_generator(tmp_path / "heads", dataclasses.replace(gen, num_heads=4), seed=1)
  with pytest.raises(ValueError, match="is another sit: num_heads: 4 there, 2 here"):
    common.init_generator_from(None, str(tmp_path / "heads"), gen)
  # A SiT directory is not a DiT.
  with pytest.raises(ValueError, match="holds a sit"):
    common.init_generator_from(None, str(tmp_path / "wide"), dataclasses.replace(
        gen, kind="dit", learn_sigma=True))
