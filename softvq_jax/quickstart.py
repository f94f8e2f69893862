"""The default job: the whole SoftVQ pipeline, small, offline, on real images.

1. trains a small SoftVQ tokenizer on Fashion-MNIST (the scikit-image photos
   where Fashion-MNIST is not installed),
2. reconstructs held-out images (PSNR, SSIM, PNG grid),
3. caches the latents of the training images (ArrayRecord shards, with flips),
4. trains a small class-conditional SiT on the cached latents,
5. samples every class, decodes the samples and writes PNGs and an ADM npz.

Each stage writes into its own folder of the workdir; ``summary.json`` holds
the metrics of every stage and their wall times. Rerunning resumes: finished
stages are skipped, interrupted training continues from its checkpoint.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from softvq_jax.tokenizer import Tokenizer
from softvq_jax.utils import fs
from softvq_jax.utils.errors import JobError
from softvq_jax.utils.images import make_grid, samples_to_uint8, save_png, to_uint8


class _Subset:
  """The first ``n`` examples of a source (the quickstart caches a slice of the data)."""

  def __init__(self, source, n: int):
    self.source, self.n = source, min(n, len(source))
    self.name = f"{getattr(source, 'name', type(source).__name__)} (first {self.n})"

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int):
    if not 0 <= index < self.n:
      raise IndexError(index)
    return self.source[index]


def _stage(summary: dict, name: str, workdir: str, fn, produces: str | None = None):
  """Runs stage ``name`` unless its ``DONE.json`` exists; ``None`` when it stopped unfinished.

  A trainer stopped by SIGTERM checkpoints and returns without exporting its model
  (``produces``): the stage is then not done, and a rerun resumes it.
  """
  done = os.path.join(workdir, name, "DONE.json")
  if os.path.exists(done):
    with open(done) as f:
      summary[name] = json.load(f)
    logging.info("Stage %s already done: %s", name, summary[name])
    return summary[name]
  logging.info("=== Stage %s ===", name)
  # The wall time of the attempts that stopped unfinished (SIGTERM, an error), so that a
  # resumed stage reports all of its time, not its last part.
  earlier_path = os.path.join(workdir, name, "EARLIER_ATTEMPTS.json")
  earlier = 0.0
  if os.path.exists(earlier_path):
    with open(earlier_path) as f:
      earlier = float(json.load(f)["seconds"])
  start = time.time()
  finished = False
  try:
    result = dict(fn(os.path.join(workdir, name)) or {})
    if produces is not None and not os.path.exists(produces):
      logging.warning("Stage %s stopped before it finished (%s was not written); rerun the "
                      "same command to resume it.", name, produces)
      return None
    finished = True
  finally:
    if not finished:
      os.makedirs(os.path.dirname(earlier_path), exist_ok=True)
      fs.write_json_atomic(earlier_path, {"seconds": round(earlier + time.time() - start, 1)})
  result["seconds"] = round(earlier + time.time() - start, 1)
  os.makedirs(os.path.dirname(done), exist_ok=True)
  fs.write_json_atomic(done, result)
  summary[name] = result
  return result


def reconstruct_heldout(tok: Tokenizer, source, workdir: str, num: int, batch: int) -> dict:
  from softvq_jax.data.pipeline import image_pipeline  # pylint: disable=g-import-not-at-top
  from softvq_jax.eval.image_metrics import reconstruction_metrics  # pylint: disable=g-import-not-at-top
  originals, recons = [], []
  pipeline = image_pipeline(_Subset(source, num), batch_size=batch, image_size=tok.image_size,
                            train=False)
  for b in tqdm(pipeline, desc="reconstruct", unit="batch"):
    originals.append(to_uint8(b["image"]))
    recons.append(to_uint8(tok.decode(tok.encode(b["image"]))))
  originals, recons = np.concatenate(originals), np.concatenate(recons)
  metrics = reconstruction_metrics(originals, recons)
  save_png(os.path.join(workdir, "reconstructions.png"),
           make_grid([originals[:16], recons[:16]]))
  return dict(num_images=int(len(originals)), **metrics)


def sample_classes(sit_workdir: str, tok: Tokenizer, out_dir: str, *, per_class: int,
                   num_steps: int, cfg_scale: float, seed: int) -> dict:
  """Class-balanced samples of the EMA generator of a SiT run."""
  from softvq_jax.checkpoint import TrainCheckpointer  # pylint: disable=g-import-not-at-top
  from softvq_jax.generator import Generator, build_model  # pylint: disable=g-import-not-at-top
  from softvq_jax.models.sit import GeneratorConfig  # pylint: disable=g-import-not-at-top

  sit_workdir = os.path.abspath(sit_workdir)
  ckpt = TrainCheckpointer(os.path.join(sit_workdir, "checkpoints"))
  step = ckpt.latest_step()
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(sit_workdir, "checkpoints", str(step), "state"))
  with open(os.path.join(sit_workdir, "checkpoints", str(step), "meta", "metadata")) as f:
    meta = json.load(f)
  ckpt.close()
  gen_config = GeneratorConfig.from_json_dict(dict(meta["generator"], vae_1d=True))
  flat = {}

  def collect(prefix, node):
    for key, value in node.items():
      key = int(key) if isinstance(key, str) and key.isdigit() else key
      if isinstance(value, dict) and set(value) == {"value"} and not isinstance(value["value"], dict):
        flat[prefix + (key,)] = value["value"]  # an nnx Variable as Orbax stores it
      elif isinstance(value, dict):
        collect(prefix + (key,), value)
      else:
        flat[prefix + (key,)] = value

  collect((), restored["ema"])
  collect((), restored["rest"])
  from softvq_jax.models.sit import unstack_layers  # pylint: disable=g-import-not-at-top
  gen = Generator(build_model(gen_config, unstack_layers(flat)))
  classes = gen_config.num_classes
  labels = np.repeat(np.arange(classes), per_class).astype(np.int32)
  noise = jax.random.normal(jax.random.key(seed), (len(labels),) + gen_config.latent_shape)
  z = gen.sample(noise, labels, method="euler", num_steps=num_steps, cfg_scale=cfg_scale)
  images = samples_to_uint8(tok.decode(tok.denormalize(np.asarray(z))))
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  for i, (img, y) in enumerate(zip(images, labels)):
    save_png(os.path.join(out_dir, "images", f"{i:05d}_class{y}.png"), img)
  rows = [images[labels == c] for c in range(classes)]
  save_png(os.path.join(out_dir, "samples.png"), make_grid(rows))
  with fs.staged_file(os.path.join(out_dir, "samples.npz"), ".npz") as tmp:
    np.savez(tmp, arr_0=images, arr_1=labels)
  settings = dict(method="euler", num_steps=num_steps, cfg_scale=cfg_scale, seed=seed,
                  precision="float32", generator_step=int(step), num_samples=int(len(labels)))
  fs.write_json_atomic(os.path.join(out_dir, "sampling.json"), settings)
  return settings


def _check_same_settings(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A workdir holds one quickstart: a rerun with other settings would skip the finished
  stages and mix their results with the new ones, so it is refused."""
  path = os.path.join(workdir, "quickstart_config.json")
  current = json.loads(config.to_json_best_effort(sort_keys=True))
  if not os.path.exists(path):
    fs.write_json_atomic(path, current)
    return
  with open(path) as f:
    stored = json.load(f)
  if stored != current:
    changed = sorted(_differences(stored, current))
    raise JobError(f"{workdir} holds a quickstart run with other settings ("
                   f"{', '.join(changed[:8])}{', ...' if len(changed) > 8 else ''}); "
                   "rerun with the same arguments to resume it, or choose another --workdir")


def _differences(a, b, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    return [name for key in sorted(set(a) | set(b))
            for name in _differences(a.get(key), b.get(key), f"{prefix}{key}.")]
  return [] if a == b else [prefix.rstrip(".")]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  from softvq_jax.train import sit_trainer, tokenizer_trainer  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  summary: dict = {}
  start = time.time()

  _check_same_settings(config, workdir)
  tok_dir = os.path.join(workdir, "1_tokenizer", "tokenizer")
  if _stage(summary, "1_tokenizer", workdir, lambda d: tokenizer_trainer.run(config.tokenizer, d),
            produces=os.path.join(tok_dir, "config.json")) is None:
    return summary
  tok = Tokenizer.load(tok_dir)

  eval_source = tokenizer_trainer.resolve_source(config.tokenizer.data, "eval")
  _stage(summary, "2_reconstruct", workdir,
         lambda d: reconstruct_heldout(tok, eval_source, d, config.heldout_images, 64))

  def cache(d):
    from softvq_jax.data.cache_latents import write_latent_cache  # pylint: disable=g-import-not-at-top
    train_source = tokenizer_trainer.resolve_source(config.tokenizer.data, "train")
    info = write_latent_cache(tok, _Subset(train_source, config.cache_examples), d,
                              batch_size=256, examples_per_shard=2048)
    return {k: info[k] for k in ("num_examples", "num_shards", "latent_shape") if k in info}
  _stage(summary, "3_latents", workdir, cache)

  sit_config = config.sit
  with sit_config.unlocked():
    sit_config.tokenizer_dir = tok_dir
    sit_config.data.cache_dir = os.path.join(workdir, "3_latents")
  if _stage(summary, "4_sit", workdir, lambda d: sit_trainer.run(sit_config, d),
            produces=os.path.join(workdir, "4_sit", "generator", "config.json")) is None:
    return summary
  _stage(summary, "5_samples", workdir, lambda d: sample_classes(
      os.path.join(workdir, "4_sit"), tok, d, per_class=config.sample.per_class,
      num_steps=config.sample.num_steps, cfg_scale=config.sample.cfg_scale, seed=config.seed))

  # The stages' own times add up across reruns; this run's alone can be a second.
  summary["total_seconds"] = round(sum(stage.get("seconds", 0.0) for stage in summary.values()
                                       if isinstance(stage, dict)), 1)
  summary["this_run_seconds"] = round(time.time() - start, 1)
  fs.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  logging.info("Quickstart done in %.0f s: %s", summary["total_seconds"],
               json.dumps(summary, indent=1))
  return summary
