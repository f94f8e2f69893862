"""The ``sample`` job: class-balanced samples of a generator, decoded by its tokenizer.

Writes to the workdir: ``samples.npz`` in the ADM evaluator's layout (``arr_0``
uint8 NHWC, ``arr_1`` labels), ``samples.png`` (a grid of the first 64),
``images/*.png`` (one file per sample, when ``save_pngs``) and ``sampling.json``
(sampler, steps, CFG scale, guidance interval, seed, precision, models).
Batches are written as they finish (``parts/``), so a rerun resumes.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from softvq_jax import config_lib
from softvq_jax.generator import Generator
from softvq_jax.models.sit import GeneratorConfig
from softvq_jax.tokenizer import Tokenizer
from softvq_jax.transport import diffusion as diffusion_lib
from softvq_jax.utils import fs
from softvq_jax.utils.errors import JobError
from softvq_jax.utils.images import make_grid, samples_to_uint8, save_png


# What the job writes besides sampling.json.
OUTPUTS = ("samples.npz", "samples.png", "images", "parts")


def _load_models(config: ml_collections.ConfigDict, mesh) -> tuple[Generator, Tokenizer]:
  dtype = config.get("dtype", "float32")
  if config.get("tokenizer_dir"):
    tok = Tokenizer.load(config.tokenizer_dir, dtype=dtype, mesh=mesh)
  else:
    logging.warning("No tokenizer_dir: decoding with a RANDOMLY INITIALISED tokenizer")
    tok = Tokenizer.random(config.tokenizer.to_dict(), seed=config.seed, dtype=dtype, mesh=mesh)
  if config.get("generator_dir"):
    gen = Generator.load(config.generator_dir, dtype=dtype, mesh=mesh)
  else:
    logging.warning("No generator_dir: sampling a RANDOMLY INITIALISED generator")
    fields = dict(config.generator.to_dict(), input_size=tok.latent_shape[0],
                  in_channels=tok.latent_shape[1], vae_1d=True)
    gen = Generator.random(GeneratorConfig.from_json_dict(fields), seed=config.seed, dtype=dtype,
                           mesh=mesh)
  if gen.latent_shape != tok.latent_shape:
    raise JobError(f"the generator makes latents {gen.latent_shape}, the tokenizer takes "
                   f"{tok.latent_shape}: they do not belong together")
  return gen, tok


def balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
  """Every class equally often (to within one), in class order."""
  return (np.arange(num_samples) * num_classes // num_samples).astype(np.int32)


def sampler_options(sampler: ml_collections.ConfigDict, gen: Generator) -> dict:
  """The ``Generator.sample`` options of ``config.sampler`` for this generator's family.

  A field of the other family set to other than its default is refused by
  ``Generator.check_sample_options`` (e.g. a guidance interval for a DiT, which guides
  every step), rather than left out silently.
  """
  options = dict(method=sampler.method, num_steps=sampler.num_steps, cfg_scale=sampler.cfg_scale)
  if tuple(sampler.get("guidance_interval", (0.0, 1.0))) != (0.0, 1.0) or gen.kind == "sit":
    options["guidance_interval"] = tuple(sampler.get("guidance_interval", (0.0, 1.0)))
  if sampler.get("path", "linear") != "linear" or gen.kind == "sit":
    options["path"] = sampler.get("path", "linear")
  if sampler.get("rtol", 1e-3) != 1e-3 or sampler.method == "dopri5":
    options["rtol"] = sampler.get("rtol", 1e-3)  # dopri5's tolerance
  if gen.kind == "dit" or sampler.get("eta", 0.0):
    options["eta"] = sampler.get("eta", 0.0)
  # Empty: the schedule the DiT was trained with (its config.json).
  if sampler.get("noise_schedule") or gen.kind == "dit":
    options["noise_schedule"] = sampler.get("noise_schedule") or gen.config.noise_schedule
  if sampler.get("timestep_respacing"):
    options["timestep_respacing"] = sampler.timestep_respacing
  try:
    gen.check_sample_options(**options)
  except ValueError as e:
    raise JobError(f"config.sampler: {e}") from e
  if gen.kind == "dit" and options.get("timestep_respacing"):
    # The respacing replaces num_steps: record the steps that run, not the unused field.
    steps = len(diffusion_lib.space_timesteps(gen.config.diffusion_steps,
                                              options["timestep_respacing"]))
    if steps != options["num_steps"]:
      logging.info("sampler.timestep_respacing=%r replaces sampler.num_steps=%s: %d steps",
                   options["timestep_respacing"], options["num_steps"], steps)
    options["num_steps"] = steps
  return options


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  config_lib.require_integers(config, "num_samples", "batch_size")
  settings_path = os.path.join(workdir, "sampling.json")
  if not fs.exists(settings_path):
    # A run records its settings before its first sample: outputs without them are not a
    # run of this job to resume, and may be the user's.
    found = [name for name in OUTPUTS if fs.exists(os.path.join(workdir, name))]
    if found:
      raise FileExistsError(f"{workdir} holds {', '.join(found)} but no sampling.json, so no "
                            "sample run to resume; use another workdir")
  mesh = None
  if jax.device_count() > 1:
    from softvq_jax import parallel  # pylint: disable=g-import-not-at-top
    mesh = parallel.create_mesh([("data", -1)])
  gen, tok = _load_models(config, mesh)
  num_classes = gen.config.num_classes
  labels = balanced_labels(config.num_samples, num_classes)
  options = sampler_options(config.sampler, gen)
  settings = {
      **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
      "kind": gen.kind,
      "seed": config.seed, "precision": config.get("dtype", "float32"),
      "num_samples": config.num_samples, "batch_size": config.batch_size,
      "generator_dir": config.get("generator_dir", ""),
      "tokenizer_dir": config.get("tokenizer_dir", ""),
      "vq_mean": tok.config.vq_mean, "vq_std": tok.config.vq_std,
  }
  if gen.kind == "dit":
    settings["diffusion_steps"] = gen.config.diffusion_steps
  fs.makedirs(os.path.join(workdir, "parts"))
  if fs.exists(settings_path):
    with fs.open(settings_path) as f:
      try:
        previous = json.load(f)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JobError(f"{settings_path} is not valid JSON ({e}): it cannot say which "
                       "settings made the samples there; use a new workdir") from e
    if not isinstance(previous, dict):
      raise JobError(f"{settings_path} holds no settings object; use a new workdir")
    if "kind" not in previous:
      # Written by an earlier version, which recorded every sampler field for both families
      # and not the ones added since: the settings both record must agree.
      shared = set(previous) & set(settings)
      previous = {k: v for k, v in previous.items() if k in shared}
      compared = {k: v for k, v in settings.items() if k in shared}
    else:
      compared = settings
      if "rtol" not in previous and compared.get("rtol") == 1e-3:
        previous = {**previous, "rtol": 1e-3}  # recorded since; dopri5 ran at 1e-3 before
      if previous.get("timestep_respacing") and \
          previous.get("timestep_respacing") == compared.get("timestep_respacing"):
        # Earlier versions recorded the unused num_steps field beside a respacing.
        previous = {**previous, "num_steps": compared["num_steps"]}
    if previous != compared:
      diffs = "; ".join(f"{k}: {previous.get(k)!r} there, {compared.get(k)!r} now"
                        for k in sorted(set(previous) | set(compared))
                        if previous.get(k) != compared.get(k))
      raise JobError(f"{workdir} holds samples made with other settings ({settings_path}: "
                     f"{diffs}); use a new workdir")
  fs.write_json_atomic(settings_path, settings)

  batches = range(0, config.num_samples, config.batch_size)

  def write(start: int, y: np.ndarray, part: str, decoded: jax.Array) -> None:
    images = samples_to_uint8(decoded)
    if config.get("save_pngs", True):
      for i, (img, label) in enumerate(zip(images, y)):
        save_png(os.path.join(workdir, "images", f"{start + i:06d}_class{label}.png"), img)
    # Last: a rerun skips the batches whose part exists, so it must mean "PNGs written too".
    with fs.staged_file(part, ".npz") as tmp:
      np.savez(tmp, images=images, labels=y)

  # One batch in flight: batch b is dispatched before batch b-1 is fetched and written,
  # so the device samples while the host encodes PNGs.
  pending = None
  for b, start in enumerate(tqdm(batches, desc="sample", unit="batch")):
    part = os.path.join(workdir, "parts", f"part_{b:06d}.npz")
    if fs.exists(part):
      continue
    y = labels[start:start + config.batch_size]
    key = jax.random.fold_in(jax.random.key(config.seed), b)
    noise_key, sample_key = jax.random.split(key)
    noise = jax.random.normal(noise_key, (len(y),) + gen.latent_shape)
    decoded = tok.decode(tok.denormalize(gen.sample(noise, y, key=sample_key, **options)))
    if pending is not None:
      write(*pending)
    pending = (start, y, part, decoded)
  if pending is not None:
    write(*pending)

  images, out_labels = [], []
  for b, _ in enumerate(batches):
    with fs.open(os.path.join(workdir, "parts", f"part_{b:06d}.npz"), "rb") as f, \
        np.load(f) as part:
      images.append(part["images"])
      out_labels.append(part["labels"])
  images, out_labels = np.concatenate(images), np.concatenate(out_labels)
  with fs.staged_file(os.path.join(workdir, "samples.npz"), ".npz") as tmp:
    np.savez(tmp, arr_0=images, arr_1=out_labels)
  first = images[:64]
  per_row = 8
  rows = [first[i:i + per_row] for i in range(0, len(first) - len(first) % per_row or 1, per_row)]
  save_png(os.path.join(workdir, "samples.png"), make_grid([r for r in rows if len(r)]))
  logging.info("Wrote %d samples of %d classes to %s", len(images), num_classes, workdir)
  return {"num_samples": int(len(images)), **settings}
