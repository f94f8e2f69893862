"""The DiT stage recipe for ``configs/dit_*.py`` (config_lib style ``get_config(arg)`` helper)."""

from __future__ import annotations

import ml_collections

from softvq_jax.config_lib import parse_arg, sit_recipe

# ImageNet-1k train images; the reference counts its schedule in epochs.
IMAGENET_TRAIN_EXAMPLES = 1_281_167


def dit_recipe(tokenizer: str, arg: str | None, *, size: str = "XL") -> ml_collections.ConfigDict:
  """The reference's DiT stage (train/train_dit.py with the README's flags).

  ADM diffusion: 1000 steps, cosine schedule, eps prediction with learned-range
  variance, loss MSE + VB, uniform integer t. AdamW lr 1e-4, betas
  (0.9, 0.999), weight decay 0, no gradient clipping (the reference's
  ``--max-grad-norm`` is parsed but never used), batch 256 for 1400 epochs,
  bf16, EMA 0.9999, label dropout 0.1. Everything else (data, tokenizer,
  mesh, ``runlocal``) is the SiT recipe's.
  """
  c = sit_recipe(tokenizer, arg, size=size)
  runlocal = parse_arg(arg, runlocal=False, tokenizer_dir="").runlocal
  c.trainer = "dit"
  del c["transport"]
  c.model.learn_sigma = True
  c.diffusion = ml_collections.ConfigDict(dict(noise_schedule="cosine", num_steps=1000))
  c.optim.grad_clip = 0.0
  c.optim.weight_decay = 0.0
  if not runlocal:
    c.total_steps = 1400 * IMAGENET_TRAIN_EXAMPLES // c.global_batch_size
  # A few respaced DDPM steps keep the preview cheap; 250 is the paper's sampler.
  c.sample = ml_collections.ConfigDict(dict(num=c.sample.num, num_steps=c.sample.num_steps,
                                            cfg_scale=1.0))
  return c
