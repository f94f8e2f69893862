"""The ``eval_recon`` job: a tokenizer's reconstruction metrics (rFID, PSNR, SSIM, LPIPS).

The SoftVQ reference's protocol (``inference/reconstruct_vq.py``): ADM centre crop to the
tokenizer's size, images in [-1, 1], reconstructions mapped to uint8 with ``127.5 x + 128``
then truncation (:func:`softvq_jax.utils.images.to_uint8`), and every metric computed on
those uint8 images:

* ``rfid``: Fréchet distance of the FID Inception's pool features of the originals vs the
  reconstructions, from streamed float64 statistics merged over every host (the reference
  prints rank 0's shard only; ours is the whole set). ``rsfid``: the same on the spatial
  (mixed_6) features, as ADM's sFID.
* ``psnr``: mean per-image PSNR on [0, 1] floats (data range 1, skimage's, as the reference).
* ``ssim``: mean per-image SSIM with the true data range 1; ``ssim_reference_dr2``: the
  reference's ``structural_similarity(..., data_range=2.0)``, which inflates SSIM and is only
  for comparing with its published numbers (0.74 for softvq-l-64).
* ``lpips``: LPIPS-VGG16 (v0.1) of the uint8 round-tripped images (not in the reference).

Writes ``metrics.json`` and ``reconstructions.png`` (the first 16 originals above their
reconstructions) to the workdir; a workdir holding either is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from softvq_jax.eval import adm, image_metrics, job_utils
from softvq_jax.tokenizer import Tokenizer
from softvq_jax.utils import fs
from softvq_jax.utils.errors import JobError
from softvq_jax.utils.images import from_uint8, make_grid, save_png, to_uint8

# Per-image quantities summed over the set (and the hosts); means are taken at the end.
_SUMMED = ("psnr", "ssim", "ssim_reference_dr2", "lpips")


def _pad(x: np.ndarray, size: int) -> np.ndarray:
  """Pads a short last batch to ``size`` rows (repeating the last) so nothing recompiles."""
  if len(x) == size:
    return x
  return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


@functools.lru_cache(maxsize=1)
def _lpips_program():
  """``(jitted, weights)`` of LPIPS, loaded and compiled once per process: the in-training
  hook makes new metrics at every evaluation."""
  from softvq_jax.eval.lpips import load_lpips  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(load_lpips())
  return jax.jit(lambda s, x, y: nnx.merge(graphdef, s)(x, y)), state


class ReconstructionMetrics:
  """Accumulates the per-image metrics and Inception statistics of uint8 image pairs.

  Shared by the job and the in-training hook (:mod:`softvq_jax.eval.hooks`). Each host
  adds its own images; :meth:`result` is collective over JAX processes.
  """

  def __init__(self, features: adm.InceptionFeatures | None, *, lpips: bool = True,
               batch_size: int = 64):
    self.features = features
    self.batch_size = batch_size
    if features is not None:
      self.originals = adm.StatsAccumulator(features)
      self.recons = adm.StatsAccumulator(features)
    self.sums = dict.fromkeys(_SUMMED if lpips else _SUMMED[:-1], 0.0)
    self.count = 0
    self._lpips = None
    if lpips:
      self._lpips, self._lpips_state = _lpips_program()

  def add(self, originals_u8: np.ndarray, recons_u8: np.ndarray) -> None:
    originals_u8, recons_u8 = np.asarray(originals_u8), np.asarray(recons_u8)
    if originals_u8.shape != recons_u8.shape or originals_u8.dtype != np.uint8 or (
        recons_u8.dtype != np.uint8):
      raise ValueError(f"expected two uint8 batches of one shape, got {originals_u8.dtype} "
                       f"{originals_u8.shape} and {recons_u8.dtype} {recons_u8.shape}")
    for start in range(0, len(originals_u8), self.batch_size):
      self._add_chunk(originals_u8[start:start + self.batch_size],
                      recons_u8[start:start + self.batch_size])

  def _add_chunk(self, a_u8: np.ndarray, b_u8: np.ndarray) -> None:
    n = len(a_u8)
    a, b = _pad(a_u8, self.batch_size), _pad(b_u8, self.batch_size)
    # [0, 1] floats, as the reference hands skimage uint8 / 255.
    a01, b01 = jnp.asarray(a, jnp.float32) / 255.0, jnp.asarray(b, jnp.float32) / 255.0
    values = {
        "psnr": image_metrics.psnr(a01, b01, 1.0),
        "ssim": image_metrics.ssim(a01, b01, 1.0),
        "ssim_reference_dr2": image_metrics.ssim(a01, b01, 2.0),
    }
    if self._lpips is not None:
      values["lpips"] = self._lpips(self._lpips_state, from_uint8(a), from_uint8(b))
    for key, value in values.items():
      self.sums[key] += float(np.sum(np.asarray(value, np.float64)[:n]))
    self.count += n
    if self.features is not None:
      self.originals.add(a_u8)
      self.recons.add(b_u8)

  def result(self) -> dict[str, float]:
    """Means over every host's images, plus rFID/rsFID (collective over processes)."""
    keys = list(self.sums)
    totals = job_utils.sum_across_processes(
        np.array([self.count] + [self.sums[k] for k in keys], np.float64))
    count = int(totals[0])
    if count == 0:
      raise JobError("no images were evaluated")
    out = {"num_images": count}
    out.update({k: float(v / count) for k, v in zip(keys, totals[1:])})
    if self.features is not None:
      ref_pool, ref_spatial = self.originals.merged()
      out.update(self.recons.fid_against({"mu": ref_pool.mean, "sigma": ref_pool.covariance,
                                          "mu_s": ref_spatial.mean,
                                          "sigma_s": ref_spatial.covariance}))
      out["rfid"], out["rsfid"] = out.pop("fid"), out.pop("sfid")
    return out


OUTPUTS = ("metrics.json", "reconstructions.png")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  from softvq_jax.data.pipeline import host_shard, image_pipeline  # pylint: disable=g-import-not-at-top
  if not config.get("tokenizer_dir"):
    raise JobError("config.tokenizer_dir is required: a converted or trained tokenizer "
                   "directory (Tokenizer.save / python -m softvq_jax.convert)")
  job_utils.refuse_earlier_outputs(config, workdir, *OUTPUTS)
  fs.makedirs(workdir)
  mesh = None
  if jax.local_device_count() > 1 and jax.process_count() == 1:
    from softvq_jax import parallel  # pylint: disable=g-import-not-at-top
    mesh = parallel.create_mesh([("data", -1)])
  tok = Tokenizer.load(config.tokenizer_dir, dtype=config.get("dtype", "float32"), mesh=mesh)
  source = job_utils.eval_source(config, frechet=bool(config.get("rfid", True)))
  batch = int(config.batch_size)
  index, count = host_shard()
  local = len(range(index, len(source), count))
  logging.info("Reconstruction metrics of %s on %s: %d images (%d on this host) at %dx%d",
               config.tokenizer_dir, getattr(source, "name", source), len(source), local,
               tok.image_size, tok.image_size)
  features = job_utils.inception_features(config) if config.get("rfid", True) else None
  metrics = ReconstructionMetrics(features, lpips=config.get("lpips", True), batch_size=batch)
  pipeline = image_pipeline(source, batch_size=batch, image_size=tok.image_size, train=False,
                            max_skipped=config.get("max_skipped", 100))
  shown: list[tuple[np.ndarray, np.ndarray]] = []
  start = time.time()
  for b in tqdm(pipeline, desc="eval_recon", unit="batch", total=math.ceil(local / batch),
                disable=jax.process_index() != 0):
    images = b["image"]
    n = len(images)
    recon = np.asarray(tok.decode(tok.encode(_pad(images, batch))))[:n]
    originals_u8, recons_u8 = to_uint8(images), to_uint8(recon)
    metrics.add(originals_u8, recons_u8)
    if sum(len(s[0]) for s in shown) < 16:
      shown.append((originals_u8[:16], recons_u8[:16]))
  result = metrics.result()
  result.update(seconds=round(time.time() - start, 1), tokenizer_dir=config.tokenizer_dir,
                source=str(getattr(source, "name", config.data.source)),
                image_size=tok.image_size)
  job_utils.clear_earlier_outputs(workdir, *OUTPUTS)
  if shown and jax.process_index() == 0:
    originals = np.concatenate([s[0] for s in shown])[:16]
    recons = np.concatenate([s[1] for s in shown])[:16]
    save_png(os.path.join(workdir, "reconstructions.png"), make_grid([originals, recons]))
  job_utils.write_metrics(workdir, result)  # last: a metrics.json marks a whole set
  logging.info("rFID %s, PSNR %.3f dB, SSIM %.4f (reference's data_range=2: %.4f), LPIPS %s "
               "over %d images", _fmt(result.get("rfid")), result["psnr"], result["ssim"],
               result["ssim_reference_dr2"], _fmt(result.get("lpips")), result["num_images"])
  return result


def _fmt(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.4f}"
