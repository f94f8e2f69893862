"""The ``reconstruct`` job: encode and decode a set of images with a tokenizer.

Writes to the workdir: ``reconstructions.png`` (originals above their
reconstructions), ``latents.npz`` (latents, normalised latents, image names)
and ``metrics.json`` (PSNR on uint8 round-tripped images, code usage). A workdir holding
any of them is refused unless ``overwrite=True``, which replaces the whole set (the earlier
files go before the first new one is written; ``metrics.json`` comes last).
"""

from __future__ import annotations

import os
import time

import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from softvq_jax import config_lib
from softvq_jax.eval import job_utils
from softvq_jax.tokenizer import Tokenizer
from softvq_jax.utils import fs
from softvq_jax.utils.errors import JobError
from softvq_jax.utils.images import make_grid, save_png, to_uint8


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Per-image PSNR (dB) of uint8 images (data range 255)."""
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
  return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12))


_ARCHITECTURE = ("image_size", "encoder", "decoder", "num_latent_tokens", "codebook_embed_dim",
                 "codebook_size", "num_codebooks", "bottleneck", "to_pixel")


def _check_is_the_named_model(config: ml_collections.ConfigDict, tok: Tokenizer) -> None:
  """``released=`` and ``image_size=`` beside a tokenizer_dir say what it must hold."""
  if config.get("image_size") and config.image_size != tok.image_size:
    raise JobError(f"image_size={config.image_size}, but {config.tokenizer_dir} holds a "
                   f"{tok.image_size}x{tok.image_size} tokenizer")
  if config.get("released"):
    from softvq_jax.models.config import TokenizerConfig  # pylint: disable=g-import-not-at-top
    named = TokenizerConfig.from_json_dict(config.model.to_dict())
    differ = [f for f in _ARCHITECTURE if getattr(named, f) != getattr(tok.config, f)]
    if differ:
      raise JobError(f"{config.tokenizer_dir} is not {config.released}: its {', '.join(differ)} "
                     "differ from the release's")


def load_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
  if config.get("tokenizer_dir"):
    logging.info("Loading tokenizer from %s", config.tokenizer_dir)
    tok = Tokenizer.load(config.tokenizer_dir, dtype=config.get("dtype", "float32"))
    _check_is_the_named_model(config, tok)
    return tok
  logging.warning("No tokenizer_dir given: using a RANDOMLY INITIALISED tokenizer (seed %d). "
                  "Its reconstructions are noise; convert a released checkpoint with "
                  "`python -m softvq_jax.convert` and pass --config.tokenizer_dir=DIR.",
                  config.seed)
  return Tokenizer.random(config.model.to_dict(), seed=config.seed,
                          dtype=config.get("dtype", "float32"))


def load_images(config: ml_collections.ConfigDict, image_size: int) -> tuple[np.ndarray, list[str]]:
  source = config.data.source
  if source == "skimage":
    from softvq_jax.data.photos import skimage_photos  # pylint: disable=g-import-not-at-top
    return skimage_photos(image_size)
  raise JobError(f"unknown data.source {source!r} for the reconstruct job; supported: 'skimage'")


OUTPUTS = ("reconstructions.png", "latents.npz", "metrics.json")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  config_lib.require_integers(config, "batch_size")
  job_utils.refuse_earlier_outputs(config, workdir, *OUTPUTS)
  tok = load_tokenizer(config)
  fs.makedirs(workdir)
  images, names = load_images(config, tok.image_size)
  logging.info("Reconstructing %d images of %dx%d; latents %s", len(images), tok.image_size,
               tok.image_size, tok.latent_shape)
  batch = config.batch_size
  latents, recons = [], []
  # Per codebook, the soft assignments summed over every token of every image: the
  # perplexity of their mean covers the whole set whatever the batch size.
  prob_sums = None
  start = time.time()
  for i in tqdm(range(0, len(images), batch), desc="reconstruct", unit="batch"):
    z, info = tok.encode(images[i:i + batch], return_info=True)
    latents.append(np.asarray(z))
    recons.append(np.asarray(tok.decode(z)))
    if "probs" in info:
      probs = np.asarray(info["probs"], np.float64)
      groups = tok.config.num_codebooks
      summed = probs.reshape(len(probs), groups, -1, probs.shape[-1]).sum(axis=(0, 2))
      prob_sums = summed if prob_sums is None else prob_sums + summed
  seconds = time.time() - start
  latents, recons = np.concatenate(latents), np.concatenate(recons)
  originals_u8, recons_u8 = to_uint8(images), to_uint8(recons)
  psnr = psnr_uint8(originals_u8, recons_u8)
  metrics = {
      "num_images": int(len(images)),
      "psnr_db": float(psnr.mean()),
      "psnr_db_per_image": {n: float(p) for n, p in zip(names, psnr)},
      "latent_mean": float(latents.mean()),
      "latent_std": float(latents.std()),
      "seconds": seconds,
      "random_weights": not config.get("tokenizer_dir"),
  }
  if prob_sums is not None:
    mean = prob_sums / prob_sums.sum(axis=-1, keepdims=True)
    perplexity = np.exp(-np.sum(mean * np.log(mean + 1e-10), axis=-1))
    metrics["codebook_perplexity"] = [float(v) for v in perplexity]
  job_utils.clear_earlier_outputs(workdir, *OUTPUTS)  # metrics.json, written last, marks a whole set
  save_png(os.path.join(workdir, "reconstructions.png"), make_grid([originals_u8, recons_u8]))
  with fs.staged_file(os.path.join(workdir, "latents.npz"), ".npz") as tmp:
    np.savez(tmp, latents=latents, normalized=np.asarray(tok.normalize(latents)),
             names=np.array(names))
  fs.write_json_atomic(os.path.join(workdir, "metrics.json"), metrics)
  logging.info("PSNR %.2f dB over %d images; wrote %s", metrics["psnr_db"], len(images), workdir)
  return metrics
