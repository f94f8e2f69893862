"""The ``extract`` job: encode a dataset with a tokenizer into a sharded ArrayRecord latent cache.

Each record holds the latents of the ADM-centre-cropped image and of its mirror
image, plus the label and name. The workdir is the cache: complete shards are
skipped on a rerun, so an interrupted extraction resumes. A ``gs://`` workdir works
the same way (each shard is one upload). Stage 2 trains from it
with ``--config.data.source=latent_cache --config.data.cache_dir=WORKDIR``.
"""

from __future__ import annotations

import ml_collections
from absl import logging

from softvq_jax.tokenizer import Tokenizer
from softvq_jax.utils.errors import JobError


_TRAIN_AND_HELD_OUT_ONLY = ("offline", "synthetic", "skimage")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  from softvq_jax.data.cache_latents import write_latent_cache  # pylint: disable=g-import-not-at-top
  from softvq_jax.train.tokenizer_trainer import resolve_source  # pylint: disable=g-import-not-at-top
  if not config.get("tokenizer_dir"):
    raise JobError("config.tokenizer_dir is required: a converted or trained tokenizer directory")
  tok = Tokenizer.load(config.tokenizer_dir, dtype=config.get("dtype", "float32"))
  # ``split`` names the dataset's own split ("train", "test", "train[:1%]"...), read as is.
  data = ml_collections.ConfigDict(config.data.to_dict())
  split = str(config.get("split", "train"))
  if data.source in _TRAIN_AND_HELD_OUT_ONLY:
    # These sources have a training part and a held-out part, no named splits.
    if split not in ("train", "test", "validation"):
      raise JobError(f"data.source={data.source} has a training and a held-out part: split "
                     f"must be 'train' or 'test', got {split!r}")
    source = resolve_source(data, "train" if split == "train" else "eval")
  else:
    data.train_split = split
    source = resolve_source(data, "train")
  info = write_latent_cache(tok, source, workdir, batch_size=config.batch_size,
                            examples_per_shard=config.examples_per_shard,
                            max_skipped=config.get("max_skipped", 100))
  cached, skipped = info.get("cached_examples"), info.get("skipped_images")
  logging.info("Latent cache in %s: %s of the %s images of %s cached%s: %s", workdir,
               "(shards of other processes pending)" if cached is None else cached,
               info.get("num_examples"), info.get("source"),
               f" ({skipped} undecodable left out this run)" if skipped else "", info)
  return info
