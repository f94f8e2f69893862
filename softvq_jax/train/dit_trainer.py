"""Stage 2, DiT: ADM Gaussian diffusion (eps + learned-range variance) on the tokenizer's latents.

The reference's ``train/train_dit.py``: 1000-step cosine schedule, uniform
integer ``t``, loss = MSE(eps) + VB (the variance term, with the mean frozen),
AdamW lr 1e-4 without weight decay or gradient clipping, EMA 0.9999, label
dropout 0.1. Data, tokenizer and latent handling are the SiT trainer's.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from softvq_jax.generator import dit_model_fn
from softvq_jax.models.layers import inference_compiler_options
from softvq_jax.models.sit import GeneratorConfig, SiT
from softvq_jax.tokenizer import Tokenizer
from softvq_jax.train import sit_trainer
from softvq_jax.transport import diffusion as diffusion_lib
from softvq_jax.utils.errors import JobError


def generator_config(config: ml_collections.ConfigDict, tok: Tokenizer) -> GeneratorConfig:
  return sit_trainer.generator_config(config, tok, kind="dit")


def dit_loss_terms(model: SiT, diff: diffusion_lib.GaussianDiffusion, batch, key):
  """Per-sample ADM terms for one batch, with ``t``, noise and label dropout drawn from ``key``."""
  x0 = batch["latent"]
  t_key, noise_key, drop_key = jax.random.split(key, 3)
  t = diff.sample_timesteps(t_key, x0.shape[0])
  noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
  return diff.training_losses(lambda x, tm: model(x, tm, batch["label"], drop_key=drop_key),
                              x0, t, noise)


def make_loss_fn(diff: diffusion_lib.GaussianDiffusion):
  def loss_fn(model: SiT, batch, key, step):
    del step
    terms = dit_loss_terms(model, diff, batch, key)
    metrics = {"mse": jnp.mean(terms["mse"])}
    if "vb" in terms:
      metrics["vb"] = jnp.mean(terms["vb"])
    return jnp.mean(terms["loss"]), metrics
  return loss_fn


def ema_sampler(graphdef, gen_config: GeneratorConfig, *, num_steps: int, cfg_scale: float,
                key: jax.Array):
  """``(state, noise, labels, batch=0) -> latents``: DDPM samples (``num_steps`` respaced
  steps) of the EMA model, compiled once per batch shape. Each batch index draws its own
  step noise (``key`` folded with it), the same at every call: the FID hook's batches are
  independent, and its successive evaluations differ only by the weights."""
  diff = diffusion_lib.model_diffusion(gen_config, str(num_steps))
  if cfg_scale > 1.0 and not gen_config.has_null_label:
    raise JobError(f"sample.cfg_scale={cfg_scale}: classifier-free guidance needs the null-"
                   "class row, which a model trained with class_dropout_prob=0 does not have")
  guided = cfg_scale > 1.0  # the reference's condition for guided sampling

  def sample(ema, rest, noise, labels, batch):
    model = nnx.merge(graphdef, ema, rest)
    return diff.p_sample_loop(dit_model_fn(model, labels, cfg_scale, guided), noise,
                              key=jax.random.fold_in(key, batch))

  jitted = jax.jit(sample, compiler_options=inference_compiler_options())
  return lambda state, noise, labels, batch=0: jitted(state.ema, state.rest, noise, labels,
                                                      np.int32(batch))


class SampleGrid(sit_trainer.SampleGrid):
  """Every ``every`` steps: DDPM samples (few respaced steps) of the EMA model, decoded, as PNGs."""

  def __init__(self, graphdef, tok: Tokenizer, gen_config: GeneratorConfig, *, workdir: str,
               every: int, total_steps: int, num: int, num_steps: int, cfg_scale: float,
               seed: int, writer=None):
    # The parent's decode/grid/write path is reused; only the sampler differs, so the
    # parent's (ODE-building) constructor is not called.
    self.tok, self.every, self.total, self.writer = tok, every, total_steps, writer
    self.dir = os.path.join(workdir, "samples")
    noise_key, self.key = jax.random.split(jax.random.key(seed))
    self.noise = jax.random.normal(noise_key, (num,) + gen_config.latent_shape)
    self.labels = jnp.arange(num) % gen_config.num_classes  # class-balanced
    self._sample = ema_sampler(graphdef, gen_config, num_steps=num_steps, cfg_scale=cfg_scale,
                               key=self.key)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  # The process as the generator config records it (from config.diffusion; exported with it).
  make_loss = lambda g: make_loss_fn(diffusion_lib.model_diffusion(g))
  r = sit_trainer.prepare_training(config, workdir, make_loss, kind="dit")
  return sit_trainer.train_generator(
      config, workdir, r, grid_class=SampleGrid,
      fid_sampler=lambda graphdef, gen_config: ema_sampler(
          graphdef, gen_config, num_steps=config.sample.num_steps,
          cfg_scale=config.sample.cfg_scale, key=jax.random.key(config.seed + 2)),
      extra_meta={"diffusion": config.diffusion.to_dict()})
