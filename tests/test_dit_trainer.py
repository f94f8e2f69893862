"""DiT trainer: the step's loss is the ADM loss, training lowers it, the job runs end to end."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from softvq_jax import parallel
from softvq_jax.models.sit import GeneratorConfig, SiT
from softvq_jax.train import common, dit_trainer
from softvq_jax.train import state as state_lib
from softvq_jax.train.dit_config import dit_recipe
from softvq_jax.transport import diffusion as diffusion_lib

GEN = GeneratorConfig(kind="dit", input_size=8, in_channels=4, hidden_size=32, depth=2,
                      num_heads=2, num_classes=4, learn_sigma=True)


def model_fn(rngs):
  return SiT(GEN, rngs=rngs)


def _latents(n=16, seed=0):
  # Class-dependent structured latents, so there is something to learn.
  rng = np.random.default_rng(seed)
  labels = (np.arange(n) % GEN.num_classes).astype(np.int32)
  base = rng.normal(size=(GEN.num_classes,) + GEN.latent_shape).astype(np.float32)
  latents = base[labels] + 0.1 * rng.normal(size=(n,) + GEN.latent_shape).astype(np.float32)
  return {"latent": latents, "label": labels}


def _setup(tx, mesh):
  diff = diffusion_lib.model_diffusion(GEN)
  graphdef, state, shardings = state_lib.create_train_state(model_fn, tx, mesh, seed=1)
  step = state_lib.make_train_step(graphdef, tx, dit_trainer.make_loss_fn(diff), ema_decay=0.9999,
                                   state_shardings=shardings,
                                   batch_sharding=parallel.batch_sharding(mesh))
  return diff, graphdef, state, step


def test_recipe_matches_reference():
  c = dit_recipe("softvq-l-64", None)
  assert c.trainer == "dit" and "transport" not in c
  assert (c.diffusion.noise_schedule, c.diffusion.num_steps) == ("cosine", 1000)
  assert (c.optim.name, c.optim.lr, c.optim.weight_decay, c.optim.grad_clip) == ("adamw", 1e-4,
                                                                                  0.0, 0.0)
  assert (c.ema_decay, c.model.class_dropout_prob, c.global_batch_size) == (0.9999, 0.1, 256)
  assert (c.model.hidden_size, c.model.depth, c.model.num_heads) == (1152, 28, 16)
  assert c.tokenizer.num_latent_tokens == 64 and c.model.learn_sigma
  tx, _ = common.make_optimizer(c.optim, c.total_steps)
  # No gradient clipping: the chain holds the AdamW transformation only, so a huge gradient
  # reaches Adam's first moment unscaled.
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  assert len(state) == 1
  _, state = tx.update({"w": jnp.full(3, 1e6)}, state, params)
  np.testing.assert_allclose(np.asarray(state[0][0].mu["w"]), 1e5, rtol=1e-6)
  local = dit_recipe("softvq-l-64", "runlocal")
  assert local.total_steps < 100 and local.global_batch_size == 8


def test_config_file_and_job_registration():
  import importlib
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "dit_xl_softvq_l64.py"
  spec = importlib.util.spec_from_file_location("dit_xl_softvq_l64", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert "configs/dit_xl_softvq_l64.py:runlocal" in module.__doc__
  assert module.get_config().tokenizer.num_latent_tokens == 64
  assert module.get_config("runlocal").trainer == "dit"
  from softvq_jax import main
  assert importlib.import_module(main._JOBS["dit"]) is dit_trainer


def test_step_loss_equals_training_losses_for_fixed_t_and_noise():
  mesh = parallel.create_mesh([("data", 1)], devices=jax.devices()[:1])
  tx = optax.adamw(1e-4, b1=0.9, b2=0.999, weight_decay=0.0)
  diff, graphdef, state, step = _setup(tx, mesh)
  batch = {k: v[:8] for k, v in _latents().items()}
  model = nnx.merge(graphdef, state.params, state.rest)
  # The draws the step makes from its key, recomputed here.
  key = jax.random.fold_in(state.rng, state.step)
  t_key, noise_key, drop_key = jax.random.split(key, 3)
  t = jax.random.randint(t_key, (8,), 0, 1000)
  noise = jax.random.normal(noise_key, batch["latent"].shape)
  drop = jax.random.uniform(drop_key, (8,)) < GEN.class_dropout_prob
  labels = jnp.where(drop, GEN.num_classes, batch["label"])

  def direct(params):
    m = nnx.merge(graphdef, params, state.rest)
    terms = diff.training_losses(lambda x, tm: m(x, tm, labels), jnp.asarray(batch["latent"]),
                                 t, noise)
    return jnp.mean(terms["loss"]), terms

  (loss, terms), grads = jax.jit(jax.value_and_grad(direct, has_aux=True))(state.params)
  del model
  _, metrics = step(state, parallel.global_batch(batch, mesh))
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["mse"]), float(jnp.mean(terms["mse"])), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["vb"]), float(jnp.mean(terms["vb"])), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.global_norm(grads)),
                             rtol=1e-5)
  # The loss is MSE + VB with a real VB part (learned variance).
  assert float(jnp.mean(terms["vb"])) > 0
  np.testing.assert_allclose(float(loss), float(jnp.mean(terms["mse"] + terms["vb"])), rtol=1e-6)


def test_vb_term_trains_only_the_variance_channels():
  diff = diffusion_lib.model_diffusion(GEN)
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.normal(size=(4, 8, 4)), jnp.float32)
  noise = jnp.asarray(rng.normal(size=(4, 8, 4)), jnp.float32)
  out = jnp.asarray(rng.normal(size=(4, 8, 8)), jnp.float32)
  t = jnp.array([0, 10, 500, 999])
  g = jax.grad(lambda o: jnp.sum(diff.training_losses(lambda x, tm: o, x0, t, noise)["vb"]))(out)
  assert np.all(np.asarray(g[..., :4]) == 0) and np.any(np.asarray(g[..., 4:]) != 0)


def test_training_lowers_the_loss():
  mesh = parallel.create_mesh([("data", 8)])
  tx = optax.adamw(2e-3, b1=0.9, b2=0.999, weight_decay=0.0)
  diff, graphdef, state, step = _setup(tx, mesh)
  data = _latents(16)
  # A fixed evaluation: the same 8 draws of (t, noise) on all 16 latents, no label dropout.
  keys = jax.random.split(jax.random.key(123), 8)

  @jax.jit
  def eval_loss(params):
    m = nnx.merge(graphdef, params, state.rest)
    x0, y = jnp.asarray(data["latent"]), jnp.asarray(data["label"])

    def one(k):
      tk, nk = jax.random.split(k)
      t = jax.random.randint(tk, (16,), 0, 1000)
      noise = jax.random.normal(nk, x0.shape)
      terms = diff.training_losses(lambda x, tm: m(x, tm, y), x0, t, noise)
      return jnp.mean(terms["mse"]), jnp.mean(terms["vb"])
    mse, vb = jax.vmap(one)(keys)
    return jnp.mean(mse), jnp.mean(vb)

  before = eval_loss(state.params)
  rng = np.random.default_rng(0)
  for _ in range(150):
    idx = rng.choice(16, 8, replace=False)
    state, _ = step(state, parallel.global_batch({k: v[idx] for k, v in data.items()}, mesh))
    # One step in flight at a time. With all 150 queued, the 8 fake CPU devices' all-reduce
    # rendezvous sometimes never saw its last device (XLA aborts after 40 s): about one run
    # in 30 on 2 cores (jax 0.10.2).
    jax.block_until_ready(state)
  after = eval_loss(state.params)
  # Epsilon MSE starts near 1 (a zero-initialised output) and must fall clearly.
  assert float(after[0]) < 0.8 * float(before[0]), (before, after)
  assert float(sum(after)) < float(sum(before)), (before, after)


def tiny_config(total_steps: int, **overrides) -> ml_collections.ConfigDict:
  c = dit_recipe("softvq-l-64", "runlocal")
  c.data = ml_collections.ConfigDict(dict(source="synthetic", num_classes=4, num_examples=16))
  c.model.update(hidden_size=32, depth=1, num_heads=2, num_classes=4)
  c.tokenizer.update(image_size=32, enc_patch_size=8, dec_patch_size=8, num_latent_tokens=8,
                     codebook_embed_dim=4, codebook_size=16,
                     encoder_kwargs=dict(embed_dim=32, depth=1, num_heads=2),
                     decoder_kwargs=dict(embed_dim=32, depth=1, num_heads=2))
  c.total_steps = total_steps
  c.log_every = 2
  c.ckpt_every = 4
  c.sample_every = 4
  c.sample = ml_collections.ConfigDict(dict(num=4, num_steps=3, cfg_scale=2.0))
  c.update(overrides)
  return c


def test_run_end_to_end(tmp_path):
  workdir = str(tmp_path)
  last = dit_trainer.run(tiny_config(4), workdir)
  assert np.isfinite(last["loss"]) and {"mse", "vb", "grad_norm"} <= set(last)
  assert os.path.exists(os.path.join(workdir, "samples", "step_00000004.png"))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [2, 4]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]
  from softvq_jax.generator import Generator  # pylint: disable=g-import-not-at-top
  assert Generator.load(os.path.join(workdir, "generator")).config.kind == "dit"
  # The loop logs the parameter norm (outside the step): the saved parameters' L2 norm.
  import orbax.checkpoint as ocp
  saved = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "4", "state"))
  squares = sum(float(np.sum(np.square(np.asarray(leaf, np.float64))))
                for leaf in jax.tree.leaves(saved["params"]))
  assert rows[-1]["param_norm"] == pytest.approx(np.sqrt(squares), rel=1e-5)


def test_fid_sampler_draws_each_batch_its_own_noise():
  """DDPM sampling is stochastic: the FID hook's batches (same starting noise here) must not
  share their step noise, yet a batch index redraws the same samples at every evaluation."""
  mesh = jax.make_mesh((1,), ("data",))
  _, graphdef, state, _ = _setup(optax.sgd(0.0), mesh)
  sample = dit_trainer.ema_sampler(graphdef, GEN, num_steps=3, cfg_scale=1.0,
                                   key=jax.random.key(0))
  noise = jax.random.normal(jax.random.key(1), (2,) + GEN.latent_shape)
  labels = jnp.arange(2, dtype=jnp.int32)
  first, again, second = (np.asarray(sample(state, noise, labels, b)) for b in (0, 0, 1))
  np.testing.assert_array_equal(first, again)
  # The untrained model's samples are large; the last steps' noise alone moves them by O(1).
  assert np.abs(first - second).max() > 0.5
