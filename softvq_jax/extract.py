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


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  from softvq_jax.data.cache_latents import write_latent_cache  # pylint: disable=g-import-not-at-top
  from softvq_jax.train.tokenizer_trainer import resolve_source  # pylint: disable=g-import-not-at-top
  if not config.get("tokenizer_dir"):
    raise ValueError("config.tokenizer_dir is required: a converted or trained tokenizer directory")
  tok = Tokenizer.load(config.tokenizer_dir, dtype=config.get("dtype", "float32"))
  # ``split`` names the dataset's own split ("train", "test", "train[:1%]"...), read as is.
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.train_split = str(config.get("split", "train"))
  source = resolve_source(data, "train")
  info = write_latent_cache(tok, source, workdir, batch_size=config.batch_size,
                            examples_per_shard=config.examples_per_shard,
                            max_skipped=config.get("max_skipped", 100))
  logging.info("Latent cache in %s: %s", workdir, info)
  return info
