"""Data sources and pipelines.

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
