"""The ``fid_stats`` job: an ADM reference batch (``mu``, ``sigma``, ``mu_s``, ``sigma_s``[, ``arr_0``]).

Any dataset source, ADM centre crop to ``image_size``, uint8, then the FID Inception's pool
(2048) and spatial (mixed_6, 2023) features streamed into float64 statistics (unbiased
covariance, as ADM's ``compute_statistics``) and merged over the hosts. ``images=True`` also
stores the cropped images as ``arr_0``, which the ADM evaluator (and ``eval_gen``) needs for
precision and recall; they are gathered in memory (50,000 x 256 x 256 x 3 is 9.8 GB), on a
single process only. Writes ``WORKDIR/<output>`` (default ``fid_stats.npz``) and beside it the
JSON of the same name (source, count, size; ``fid_stats.json`` by default); either existing is
replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import math
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from softvq_jax import config_lib
from softvq_jax.eval import adm, job_utils, npz
from softvq_jax.utils import fs
from softvq_jax.utils.errors import JobError
from softvq_jax.utils.images import to_uint8


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  from softvq_jax.data.pipeline import host_shard, image_pipeline  # pylint: disable=g-import-not-at-top
  keep_images = bool(config.get("images", False))
  if keep_images and jax.process_count() > 1:
    raise JobError("images=True gathers arr_0 in one process's memory; run it on one host "
                   "(the statistics alone work on any number of hosts)")
  config_lib.require_integers(config, "image_size", "batch_size")
  path = os.path.join(workdir, config.get("output", "fid_stats.npz") or "fid_stats.npz")
  # Beside the output and named after it, so that another output= keeps this one's.
  info_path = os.path.splitext(path)[0] + ".json"
  existing = [p for p in (path, info_path) if fs.exists(p)]
  if existing and not config.get("overwrite", False):
    # Checked before the minutes of Inception work, and never replaced unasked.
    raise FileExistsError(f"{' and '.join(existing)} exist{'s' if len(existing) == 1 else ''}; "
                          "choose another output= or pass --config.overwrite=True to replace "
                          "them")
  if fs.isdir(path):
    raise IsADirectoryError(f"output {path} is a folder; name a file such as fid_stats.npz")
  size = int(config.image_size)
  source = job_utils.eval_source(config)
  batch = int(config.batch_size)
  index, count = host_shard()
  local = len(range(index, len(source), count))
  logging.info("Reference statistics of %s: %d images (%d on this host) at %dx%d",
               getattr(source, "name", source), len(source), local, size, size)
  acc = adm.StatsAccumulator(job_utils.inception_features(config))
  kept: list[np.ndarray] = []
  start = time.time()
  pipeline = image_pipeline(source, batch_size=batch, image_size=size, train=False,
                            max_skipped=config.get("max_skipped", 100))
  for b in tqdm(pipeline, desc="fid_stats", unit="batch", total=math.ceil(local / batch),
                disable=jax.process_index() != 0):
    images = to_uint8(b["image"])  # exact: the pipeline's floats are u / 127.5 - 1
    acc.add(images)
    if keep_images:
      kept.append(images)
  source_name = str(getattr(source, "name", config.data.source))
  pool, spatial = acc.merged(source_name)
  info = {"path": path, "num_images": int(pool.count), "image_size": size,
          "source": source_name,
          "with_images": keep_images, "seconds": round(time.time() - start, 1)}
  if jax.process_index() == 0:
    with fs.staged_file(path, ".npz") as tmp:  # np.savez appends .npz to other names
      npz.write_reference_batch(tmp, images=np.concatenate(kept) if keep_images else None,
                                pool=pool, spatial=spatial)
  job_utils.write_metrics(os.path.dirname(info_path), info, name=os.path.basename(info_path))
  logging.info("Wrote the reference batch of %d images to %s", pool.count, path)
  return info
