"""Stage 1: train a tokenizer on images.

This version optimises the reconstruction terms of the reference objective:
``w_rec * MSE + w_p(step) * LPIPS + entropy_loss_ratio * (H(q) - H(E q))``
with the reference's Adam, cosine schedule and EMA. The DINO-discriminator GAN
term and REPA alignment are not implemented yet; a config that asks for them
is trained without them and the run says so.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from softvq_jax import checkpoint, parallel
from softvq_jax.models.config import TokenizerConfig
from softvq_jax.models.quantizers import code_usage, entropy_loss
from softvq_jax.models.tokenizer import TokenizerModel
from softvq_jax.tokenizer import Tokenizer, param_shapes
from softvq_jax.train import common
from softvq_jax.train import state as state_lib
from softvq_jax.train.loop import train_loop
from softvq_jax.utils.images import make_grid, save_png, to_uint8



def resolve_source(data: ml_collections.ConfigDict, split: str):
  """A data source for ``split`` ('train' or 'eval') from ``config.data``."""
  from softvq_jax.data import sources  # pylint: disable=g-import-not-at-top
  kind = data.source
  # Empty strings are unset optional arguments (configs are locked, so they are declared).
  kwargs = {k: v for k, v in dict(data.get("kwargs", {}) or {}).items() if v != ""}
  if kind == "offline":
    try:
      return sources.FashionMnistSource("train" if split == "train" else "test")
    except FileNotFoundError as e:
      logging.warning("%s; using the scikit-image photos instead", e)
      return sources.SkimagePhotosSource(num_examples=256 if split == "train" else 16,
                                         seed=0 if split == "train" else 1)
  if kind == "latent_cache":
    raise ValueError("data.source=latent_cache holds latents, not images")
  if kind in ("tfds", "fashion_mnist") and "split" not in kwargs:
    kwargs["split"] = data.get("train_split" if split == "train" else "eval_split",
                               "train" if split == "train" else "test")
  if kind == "synthetic" and split != "train":
    kwargs["seed"] = kwargs.get("seed", 0) + 1
  return sources.make_source(kind, **kwargs)


def make_loss_fn(config: ml_collections.ConfigDict, lpips_graphdef, tok_config: TokenizerConfig):
  loss_cfg = config.loss
  ratio = float(config.model.get("entropy_loss_ratio", 0.0))
  temperature = float(loss_cfg.get("entropy_temperature", 0.01))
  warmup = max(int(loss_cfg.perceptual_warmup), 1)

  def loss_fn(model: TokenizerModel, batch, key, step, lpips_state):
    images = batch["image"]
    recon, enc = model(images, sample_key=key if tok_config.bottleneck == "kl" else None)
    mse = jnp.mean(jnp.square(recon - images))
    # The reference ramps LPIPS in linearly over `perceptual_warmup` steps (step counted from 1).
    p_weight = loss_cfg.perceptual_weight * jnp.minimum(1.0, (step + 1) / warmup)
    metrics = {"mse": mse, "perceptual_weight": p_weight}
    total = loss_cfg.reconstruction_weight * mse
    if loss_cfg.perceptual_weight > 0:
      lp = jnp.mean(nnx.merge(lpips_graphdef, lpips_state)(images, recon))
      total = total + p_weight * lp
      metrics["lpips"] = lp
    if enc.softvq is not None:
      if ratio > 0:
        ent = entropy_loss(enc.softvq.logits, temperature)
        total = total + ratio * ent
        metrics["entropy"] = ent
      stats = code_usage(enc.softvq, tok_config.num_codebooks)
      metrics.update(code_usage=jnp.mean(stats["usage"]),
                     perplexity=jnp.mean(stats["perplexity"]), max_probs=stats["max_probs"])
    if enc.posterior is not None:
      kl = jnp.mean(enc.posterior.kl())
      total = total + tok_config.kl_loss_weight * kl
      metrics["kl"] = kl
    return total, metrics

  return loss_fn


class ReconstructionGrid:
  """Every ``every`` steps: held-out images above their reconstructions by the EMA model."""

  def __init__(self, graphdef, images: np.ndarray, *, workdir: str, every: int,
               total_steps: int, writer=None):
    self.images, self.every, self.total, self.writer = images, every, total_steps, writer
    self.dir = os.path.join(workdir, "reconstructions")
    self.psnr = None

    def reconstruct(ema, rest, x):
      return nnx.merge(graphdef, ema, rest)(x)[0]

    self._reconstruct = jax.jit(reconstruct)

  def __call__(self, step: int, state) -> None:
    if step % self.every and step != self.total:
      return
    recon = np.asarray(self._reconstruct(state.ema, state.rest, self.images))
    originals, recons = to_uint8(self.images), to_uint8(recon)
    mse = np.mean((originals.astype(np.float64) - recons) ** 2, axis=(1, 2, 3))
    self.psnr = float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-12))))
    grid = make_grid([originals, recons])
    if jax.process_index() == 0:
      save_png(os.path.join(self.dir, f"step_{step:08d}.png"), grid)
    if self.writer is not None:
      self.writer.write_images(step, {"reconstructions": grid[None]})
      self.writer.write_scalars(step, {"heldout_psnr": self.psnr})


def _warn_unimplemented(config: ml_collections.ConfigDict) -> None:
  missing = []
  if config.loss.get("disc_weight", 0) > 0:
    missing.append(f"the DINO-discriminator GAN term (disc_weight={config.loss.disc_weight})")
  if config.loss.get("repa", False):
    missing.append("REPA alignment")
  if missing:
    logging.warning("NOT IMPLEMENTED in this version, trained without: %s. The objective is "
                    "MSE + LPIPS + entropy.", "; ".join(missing))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  from softvq_jax.data.pipeline import image_pipeline  # pylint: disable=g-import-not-at-top
  from softvq_jax.eval.lpips import load_lpips  # pylint: disable=g-import-not-at-top

  os.makedirs(workdir, exist_ok=True)
  _warn_unimplemented(config)
  mesh = common.make_mesh(config)
  common.check_batch(config.global_batch_size, mesh)
  tok_config = TokenizerConfig.from_json_dict(config.model.to_dict())
  size = tok_config.image_size
  train_source = resolve_source(config.data, "train")
  local_batch = config.global_batch_size // jax.process_count()
  steps_per_epoch = max(len(train_source) // config.global_batch_size, 1)
  total_steps = int(config.get("total_steps", 0) or config.total_epochs * steps_per_epoch)
  optim = ml_collections.ConfigDict(config.optim.to_dict())
  optim.lr = config.optim.lr * config.global_batch_size / 256  # the reference's scaling rule
  optim.warmup_steps = int(config.optim.get("warmup_epochs", 0) * steps_per_epoch)
  logging.info("Training %s tokenizer on %s (%d images): %d steps", tok_config.bottleneck,
               getattr(train_source, "name", config.data.source), len(train_source), total_steps)
  data = iter(image_pipeline(train_source, batch_size=local_batch, image_size=size, train=True,
                             seed=config.seed, min_resize=config.data.get("min_resize"),
                             max_resize=config.data.get("max_resize"),
                             flip=config.data.get("horizontal_flip", True)))
  dtype = {"float32": None, "bfloat16": jnp.bfloat16}[config.get("dtype", "float32")]
  model_fn = functools.partial(TokenizerModel, tok_config, dtype=dtype)
  model_fn = lambda rngs, _f=model_fn: _f(rngs=rngs)
  tx, lr_fn = common.make_optimizer(optim, total_steps)
  graphdef, state, shardings, ckpt = common.init_or_restore(
      model_fn, tx, mesh, seed=config.seed, strategy=config.get("sharding", "dp"),
      workdir=workdir, keep=config.get("keep_checkpoints", 3), data=data)
  if config.get("init_from") and int(state.step) == 0:
    state = _init_from(state, config.init_from, tok_config)
  common.log_parameter_overview(state)

  replicated = jax.sharding.NamedSharding(parallel.auto_mesh(mesh), jax.sharding.PartitionSpec())
  if config.loss.perceptual_weight > 0:
    lpips_graphdef, lpips_state = nnx.split(load_lpips())
    lpips_state = jax.device_put(lpips_state, replicated)
  else:
    lpips_graphdef, lpips_state = None, {}
  step_fn = state_lib.make_train_step(
      graphdef, tx, make_loss_fn(config, lpips_graphdef, tok_config), ema_decay=config.ema_decay,
      state_shardings=shardings, batch_sharding=parallel.batch_sharding(parallel.auto_mesh(mesh)),
      learning_rate_fn=lr_fn, frozen_shardings=jax.tree.map(lambda _: replicated, lpips_state))

  writer = common.make_writer(workdir)
  eval_source = resolve_source(config.data, "eval")
  heldout = next(iter(image_pipeline(eval_source, batch_size=min(8, len(eval_source)),
                                     image_size=size, train=False)))["image"]
  grid = ReconstructionGrid(graphdef, heldout, workdir=workdir, every=config.vis_every,
                            total_steps=total_steps, writer=writer)
  state, last = train_loop(state=state, train_step=step_fn, data=data, mesh=mesh, workdir=workdir,
                           total_steps=total_steps, checkpointer=ckpt, log_every=config.log_every,
                           ckpt_every=config.ckpt_every, hooks=(grid,), writer=writer,
                           meta={"tokenizer": tok_config.to_json_dict()}, step_args=(lpips_state,))
  ckpt.close()
  if grid.psnr is not None:
    last["heldout_psnr"] = grid.psnr
  export_dir = os.path.join(workdir, "tokenizer")
  if jax.process_index() == 0 and int(state.step) >= total_steps:
    ema_model = nnx.merge(graphdef, jax.device_get(state.ema), jax.device_get(state.rest))
    Tokenizer(ema_model).save(export_dir, overwrite=True)
    logging.info("Exported the EMA tokenizer to %s (load with Tokenizer.load)", export_dir)
  return last


def _init_from(state, directory: str, tok_config: TokenizerConfig):
  """Starts from converted weights (parameters only; optimizer and EMA start fresh)."""
  flat = checkpoint.read_param_dir(directory, param_shapes(tok_config))
  params = state.params
  for path, value in flat.items():
    node = params
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = nnx.Param(jnp.asarray(value).astype(node[path[-1]].dtype))
  params = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), params, state.params)
  logging.info("Initialised the parameters from %s", directory)
  return state.replace(params=params, ema=jax.tree.map(jnp.copy, params))
