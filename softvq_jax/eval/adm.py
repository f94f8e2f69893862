"""The ADM evaluator's numbers (IS, FID, sFID, precision, recall) with our JAX Inception.

Mirrors guided-diffusion's ``evaluations/evaluator.py``: activations of the reference
batch's images and of the sample batch's images; reference statistics read from the
reference npz (``mu``/``sigma``, ``mu_s``/``sigma_s``) when present, else computed from its
images; IS from the samples only (needs the 2048x1008 logits weight, see
:mod:`softvq_jax.eval.inception`); precision/recall with k = 3 on pool_3 features.

Command line (same argument order as ADM's script)::

  python -m softvq_jax.eval.adm VIRTUAL_imagenet256_labeled.npz samples.npz \
      [--batch_size=100] [--logits_weight=softmax_w.npz]

For several hosts, give each host its own images, build :class:`FeatureStats` per host
with :meth:`Activations.stats` and combine them with
:func:`softvq_jax.eval.fid.merge_across_processes` before :func:`fid_from_stats`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Iterable

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from softvq_jax.eval import fid as fid_lib
from softvq_jax.eval import inception as inception_lib
from softvq_jax.eval import npz
from softvq_jax.eval import precision_recall as pr_lib
from softvq_jax.utils.errors import JobError


@dataclasses.dataclass
class Activations:
  pool: np.ndarray  # (N, 2048)
  spatial: np.ndarray  # (N, 2023)
  logits: np.ndarray | None = None  # (N, 1008) when the model has the classifier weight

  def stats(self) -> tuple[fid_lib.FeatureStats, fid_lib.FeatureStats]:
    return (fid_lib.FeatureStats.from_features(self.pool),
            fid_lib.FeatureStats.from_features(self.spatial))


class InceptionFeatures:
  """Runs the FID Inception over uint8 NHWC batches, data-parallel over the local devices.

  Every call is padded to ``batch_size`` rows so the network compiles once per image size.
  """

  def __init__(self, model: inception_lib.FIDInceptionV3 | None = None, batch_size: int = 100):
    model = model if model is not None else inception_lib.load_fid_inception()
    devices = jax.local_devices()
    self.batch_size = -(-batch_size // len(devices)) * len(devices)
    mesh = Mesh(np.array(devices), ("data",))
    self._data_sharding = NamedSharding(mesh, PartitionSpec("data"))
    graphdef, state = nnx.split(model)
    self._state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    self.has_logits = model.logits_weight is not None
    self._forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    images = np.asarray(images)
    if images.dtype != np.uint8:
      raise ValueError(f"expected uint8 images (the evaluator's input), got {images.dtype}")
    out = {}
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      n = len(chunk)
      if n < self.batch_size:
        chunk = np.concatenate([chunk, np.zeros((self.batch_size - n,) + chunk.shape[1:],
                                                chunk.dtype)])
      feats = self._forward(self._state, jax.device_put(chunk, self._data_sharding))
      for key, value in feats.items():
        out.setdefault(key, []).append(np.asarray(value)[:n])
    return {key: np.concatenate(value) for key, value in out.items()}

  def activations(self, batches: Iterable[np.ndarray]) -> Activations:
    parts: dict[str, list[np.ndarray]] = {}
    count, start = 0, time.time()
    for batch in batches:
      for key, value in self(batch).items():
        parts.setdefault(key, []).append(value)
      count += len(batch)
      logging.log_every_n_seconds(logging.INFO, "Inception activations: %d images, %.1f/s", 30,
                                  count, count / max(time.time() - start, 1e-9))
    if not parts:
      raise ValueError("no images")
    joined = {key: np.concatenate(value) for key, value in parts.items()}
    return Activations(joined["pool"], joined["spatial"], joined.get("logits"))

  def npz_activations(self, path: str) -> Activations:
    return self.activations(npz.iter_images(path, self.batch_size))


class StatsAccumulator:
  """Streams uint8 image batches through the Inception into float64 pool/spatial statistics.

  For rFID/gFID jobs that must not keep every feature: ``add`` batches as they come, then
  ``merged()`` (a collective across JAX processes) and :meth:`fid_against` a reference.
  ``keep_pool=True`` also keeps the pool features (for precision/recall) on this host.
  """

  def __init__(self, features: InceptionFeatures, *, keep_pool: bool = False):
    self.features = features
    self.pool = fid_lib.FeatureStats.empty(2048)
    self.spatial = fid_lib.FeatureStats.empty(inception_lib.SPATIAL_CHANNELS * 17 * 17)
    self.kept: list[np.ndarray] | None = [] if keep_pool else None

  def add(self, images: np.ndarray) -> None:
    out = self.features(images)
    self.pool.update(out["pool"])
    self.spatial.update(out["spatial"])
    if self.kept is not None:
      self.kept.append(out["pool"])

  def merged(self, what: str = "the images") -> tuple[fid_lib.FeatureStats, fid_lib.FeatureStats]:
    pool = fid_lib.merge_across_processes(self.pool)
    if pool.count < 2:
      # The pipelines skip undecodable images, so a folder of them ends here.
      raise JobError(f"{what}: {int(pool.count)} image(s) could be read, the statistics need "
                     "at least 2 (undecodable images are skipped, each with a warning)")
    return pool, fid_lib.merge_across_processes(self.spatial)

  def fid_against(self, ref: dict[str, np.ndarray]) -> dict[str, float]:
    """FID (and sFID when ``ref`` has mu_s/sigma_s) against stored reference statistics."""
    pool, spatial = self.merged()
    out = {"fid": fid_lib.frechet_distance(pool.mean, pool.covariance, ref["mu"], ref["sigma"])}
    if "mu_s" in ref:
      out["sfid"] = fid_lib.frechet_distance(spatial.mean, spatial.covariance, ref["mu_s"],
                                             ref["sigma_s"])
    return out


def _mu_sigma(acts: Activations, stored: dict[str, np.ndarray] | None):
  """(mu, sigma, mu_s, sigma_s): stored in the npz if it has them (as ADM), else computed."""
  if stored and "mu" in stored:
    missing = {"sigma", "mu_s", "sigma_s"} - set(stored)
    if missing:
      raise ValueError(f"batch has mu but lacks {sorted(missing)}")
    return stored["mu"], stored["sigma"], stored["mu_s"], stored["sigma_s"]
  pool, spatial = acts.stats()
  return pool.mean, pool.covariance, spatial.mean, spatial.covariance


def evaluate_activations(ref: Activations | None, sample: Activations, *,
                         ref_stats: dict[str, np.ndarray] | None = None,
                         sample_stats: dict[str, np.ndarray] | None = None,
                         split_size: int = 5000,
                         distance_dtype: str = "float16") -> dict[str, float]:
  """ADM's metrics from activations; stored statistics (mu, sigma, mu_s, sigma_s) win, as in ADM.

  ``ref=None``: a reference of statistics only (``ref_stats`` has all four); precision and
  recall, which need the reference's features, are left out.
  """
  mu, sigma, mu_s, sigma_s = _mu_sigma(ref, ref_stats)
  smu, ssigma, smu_s, ssigma_s = _mu_sigma(sample, sample_stats)
  results = {"num_samples": float(len(sample.pool))}
  if ref is not None:
    results["num_ref"] = float(len(ref.pool))
  if sample.logits is not None:
    results["inception_score"] = fid_lib.inception_score(sample.logits, split_size=split_size)
  results["fid"] = fid_lib.frechet_distance(smu, ssigma, mu, sigma)
  results["sfid"] = fid_lib.frechet_distance(smu_s, ssigma_s, mu_s, sigma_s)
  if ref is not None:
    precision, recall = pr_lib.precision_recall(ref.pool, sample.pool,
                                                distance_dtype=distance_dtype)
    results["precision"], results["recall"] = precision, recall
  return results


def evaluate(ref_batch: str, sample_batch: str, features: InceptionFeatures | None = None,
             **kwargs) -> dict[str, float]:
  """ADM's ``evaluator.py REF_BATCH SAMPLE_BATCH`` with our Inception."""
  ref_shape = npz.check_batch(ref_batch, "reference batch", images_required=False)
  sample_shape = npz.check_batch(sample_batch, "sample batch")
  features = features or InceptionFeatures()
  ref_stats = npz.read_reference_stats(ref_batch)
  if ref_shape is not None:
    logging.info("Reference batch %s: %s", ref_batch, ref_shape)
    ref = features.npz_activations(ref_batch)
  elif set(ref_stats) == {"mu", "sigma", "mu_s", "sigma_s"}:
    logging.warning("Reference %s holds statistics only (no arr_0 images): FID and sFID are "
                    "computed, precision and recall are not", ref_batch)
    ref = None
  else:
    raise JobError(f"reference {ref_batch} holds neither images (arr_0) nor the statistics "
                   f"mu, sigma, mu_s, sigma_s (it has {sorted(ref_stats)})")
  logging.info("Sample batch %s: %s", sample_batch, sample_shape)
  sample = features.npz_activations(sample_batch)
  results = evaluate_activations(ref, sample, ref_stats=ref_stats,
                                 sample_stats=npz.read_reference_stats(sample_batch), **kwargs)
  if "inception_score" not in results:
    logging.warning("No logits weight loaded: Inception Score not computed")
  return results


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) != 3:
    raise SystemExit("usage: python -m softvq_jax.eval.adm REF_BATCH.npz SAMPLE_BATCH.npz")
  weight = flags.FLAGS.logits_weight
  model = inception_lib.load_fid_inception(
      logits_weight=inception_lib.read_logits_weight(weight) if weight else None)
  results = evaluate(argv[1], argv[2], InceptionFeatures(model, flags.FLAGS.batch_size))
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,ungrouped-imports
  flags.DEFINE_integer("batch_size", 100, "images per Inception call (all local devices)")
  flags.DEFINE_string("logits_weight", None, "2048x1008 softmax weight (npz or pytorch-fid .pth) "
                      "for the Inception Score")
  app.run(main)
