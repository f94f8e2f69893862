"""The ``eval_gen`` job: the ADM evaluator's numbers of a sample batch against a reference batch.

FID, sFID, precision, recall (k = 3) and, when ``config.logits_weight`` names the Inception
classifier weight (2048x1008; an npz or pytorch-fid's ``pt_inception-2015-12-05`` file), the
Inception Score, all through :func:`softvq_jax.eval.adm.evaluate`: the reference batch's
stored ``mu``/``sigma``/``mu_s``/``sigma_s`` are used when present (as ADM does), its images
(``arr_0``) feed precision/recall. Writes ``metrics.json`` to the workdir
(an earlier one is replaced only with ``overwrite=True``).
"""

from __future__ import annotations

import time

import jax
import ml_collections
from absl import logging

from softvq_jax.eval import adm, job_utils, npz
from softvq_jax.utils.errors import JobError


# The Inception pool features are 2,048-wide: fewer samples leave their covariance singular.
MIN_SAMPLES_FOR_STABLE_FID = 2048


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  for key in ("samples", "ref"):
    if not config.get(key, ""):
      role = "sample" if key == "samples" else "reference"
      raise JobError(f"config.{key} is required: the {role} batch (.npz, arr_0 uint8 NHWC)")
  if config.get("distance_dtype", "float16") not in ("float16", "float32"):
    raise JobError(f"distance_dtype={config.distance_dtype!r} must be 'float16' or 'float32'")
  if jax.process_count() > 1:
    logging.warning("eval_gen runs the whole evaluation on every process; run it on one host")
  job_utils.refuse_earlier_outputs(config, workdir, "metrics.json")
  samples_shape = npz.check_batch(config.samples, "config.samples")
  try:
    ref_shape = npz.check_batch(config.ref, "config.ref")
  except ValueError as e:
    if "holds no images" not in str(e):
      raise
    # ADM's evaluator needs the reference images too: precision/recall compare features.
    raise JobError(f"{e}; for a reference batch made by configs/fid_stats.py pass its "
                   "`images` argument") from e
  warnings = []
  if ref_shape is not None and tuple(samples_shape[1:3]) != tuple(ref_shape[1:3]):
    # The Inception resizes both to 299, so nothing fails: the numbers compare resolutions.
    warnings.append(f"the samples are {samples_shape[1]}x{samples_shape[2]}, the reference "
                    f"images {ref_shape[1]}x{ref_shape[2]}: make the reference at the samples' "
                    "size (fid_stats image_size=...)")
  if samples_shape[0] < MIN_SAMPLES_FOR_STABLE_FID:
    warnings.append(f"{samples_shape[0]} samples: FID is biased upwards on fewer than "
                    f"{MIN_SAMPLES_FOR_STABLE_FID}; the reference protocol uses 50,000")
  for warning in warnings:
    logging.warning("eval_gen: %s", warning)
  ref_stats = npz.read_reference_stats(config.ref)
  if "mu" not in ref_stats:
    logging.info("%s stores no statistics: computing them from its images", config.ref)
  start = time.time()
  features = job_utils.inception_features(config)
  results = adm.evaluate(config.ref, config.samples, features,
                         split_size=int(config.get("split_size", 5000)),
                         distance_dtype=config.get("distance_dtype", "float16"))
  results.update(seconds=round(time.time() - start, 1), samples=config.samples, ref=config.ref,
                 logits_weight=config.get("logits_weight", ""), warnings=warnings)
  job_utils.write_metrics(workdir, results)
  logging.info("FID %.4f, sFID %.4f, IS %s, precision %.4f, recall %.4f (%d samples vs %d)",
               results["fid"], results["sfid"],
               f"{results['inception_score']:.3f}" if "inception_score" in results else "n/a",
               results["precision"], results["recall"], results["num_samples"],
               results["num_ref"])
  return results
