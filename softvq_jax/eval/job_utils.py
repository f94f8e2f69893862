"""Pieces the evaluation jobs (``eval_recon``, ``eval_gen``, ``fid_stats``) share."""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from softvq_jax.utils import fs
from softvq_jax.utils.errors import JobError


class Subset:
  """The first ``n`` examples of a source, in source order (``max_images``)."""

  def __init__(self, source: Any, n: int):
    self.source, self.n = source, min(int(n), len(source))
    self.name = f"{getattr(source, 'name', type(source).__name__)} (first {self.n})"

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int) -> Any:
    if not 0 <= index < self.n:
      raise IndexError(f"index {index} out of range for {self.name}")
    return self.source[index]


def eval_source(config: ml_collections.ConfigDict, *, frechet: bool = True) -> Any:
  """The images a job reads: ``config.data`` resolved for the eval split, cut to ``max_images``;
  ``frechet``: the job computes Fréchet distances, which need 2 images or more."""
  from softvq_jax.train.tokenizer_trainer import resolve_source  # pylint: disable=g-import-not-at-top
  source = resolve_source(config.data, "eval")
  limit = int(config.get("max_images", 0) or 0)
  if limit < 0:
    raise JobError(f"max_images must be >= 0 (0 = all), got {limit}")
  if limit and limit < len(source):
    source = Subset(source, limit)
  if len(source) < (2 if frechet else 1):
    raise JobError(f"{getattr(source, 'name', source)} has {len(source)} image(s)"
                   + ("; Fréchet distances need at least 2" if frechet else ""))
  return source


def inception_features(config: ml_collections.ConfigDict):
  """The FID Inception (with the IS classifier when ``config.logits_weight`` is set)."""
  from softvq_jax.eval import adm, inception  # pylint: disable=g-import-not-at-top
  weight = config.get("logits_weight", "")
  model = inception.load_fid_inception(
      config.get("inception_weights", "") or None,
      logits_weight=inception.read_logits_weight(weight) if weight else None)
  return adm.InceptionFeatures(model, batch_size=int(config.get("inception_batch_size", 100)))


def sum_across_processes(values: np.ndarray) -> np.ndarray:
  """Element-wise float64 sum over all JAX processes (collective); bit-exact transport."""
  import jax  # pylint: disable=g-import-not-at-top
  values = np.ascontiguousarray(values, np.float64)
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  # Bit-cast so nothing is rounded to float32 when JAX runs without x64.
  gathered = multihost_utils.process_allgather(values.view(np.uint32), tiled=False)
  return np.sum([np.asarray(g).view(np.float64) for g in gathered], axis=0)


def refuse_earlier_outputs(config: ml_collections.ConfigDict, workdir: str, *names: str) -> None:
  """Refuses, before any work, a workdir that holds one of the job's outputs ``names`` (a
  finished or interrupted earlier run's) unless ``config.overwrite``: results are never
  replaced unasked, nor mixed with a new run's."""
  if config.get("overwrite", False):
    return
  found = [name for name in names if fs.exists(os.path.join(workdir, name))]
  if found:
    raise FileExistsError(f"{workdir} holds {', '.join(found)} from an earlier run; use "
                          "another workdir or pass --config.overwrite=True to replace them")


def clear_earlier_outputs(workdir: str, *names: str) -> None:
  """Removes an earlier run's ``names`` (present only under ``overwrite=True``) just before a
  new set is written, so that a run stopped while writing leaves part of its own set, never
  its files beside an older run's. Called after the work, so a failed run keeps the old set."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  for name in names:
    path = os.path.join(workdir, name)
    if fs.exists(path):
      logging.info("overwrite=True: removing the earlier run's %s", path)
      fs.remove(path)


def write_metrics(workdir: str, metrics: dict[str, Any], name: str = "metrics.json") -> str:
  """Writes ``metrics`` as JSON into the workdir (process 0 only), atomically."""
  import jax  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, name)
  if jax.process_index() == 0:
    fs.write_json_atomic(path, metrics)
    logging.info("Wrote %s", path)
  return path
