"""Data sources and pipelines.

    from softvq_jax import data
    src = data.ImageFolderSource("/data/imagenet/train")   # or TfdsSource("imagenet2012"), ...
    it = iter(data.image_pipeline(src, batch_size=32, image_size=256, seed=0))
    batch = next(it)            # {"image": (32, 256, 256, 3) float32 in [-1, 1], "label": (32,)}
    state = it.get_state()      # JSON-able; it.set_state(state) resumes at the same next batch

    data.write_latent_cache(tokenizer, src, "/data/cache")   # stage 2: frozen-tokenizer latents
    it = iter(data.latent_pipeline("/data/cache", batch_size=256, normalize=True))

Sharding defaults to ``jax.process_index()`` of ``jax.process_count()``.
Names are imported lazily so that ``softvq_jax.data.photos`` (used by
inference) does not pull in Grain; nothing here imports TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ImageFolderSource": "sources", "ArrayRecordSource": "sources", "TfdsSource": "sources",
    "FashionMnistSource": "sources", "SkimagePhotosSource": "sources",
    "SyntheticSource": "sources", "make_source": "sources", "write_image_records": "sources",
    "image_pipeline": "pipeline", "build_pipeline": "pipeline", "host_shard": "pipeline",
    "CorruptImageError": "decode",
    "write_latent_cache": "cache_latents", "latent_pipeline": "cache_latents",
    "LatentCacheSource": "cache_latents",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f"module 'softvq_jax.data' has no attribute {name!r}")
  return getattr(importlib.import_module(f"softvq_jax.data.{_EXPORTS[name]}"), name)
