"""Evaluation hooks for the training loop: ``hook(step, state)`` after each step.

:class:`HeldoutRFID` scores stage 1 on a fixed held-out set: every ``every`` steps (and at
the last) it reconstructs the images with the EMA tokenizer and reports rFID, PSNR, SSIM
(and LPIPS if asked) with the same protocol and code as the ``eval_recon`` job. The
Inception statistics of the originals are computed once, at the first evaluation.

Wiring, next to ``ReconstructionGrid`` in the tokenizer trainer::

    heldout = next(iter(image_pipeline(eval_source, batch_size=256, image_size=size,
                                       train=False, shard_index=0, shard_count=1)))["image"]
    rfid = HeldoutRFID(graphdef, heldout, every=config.eval_every, total_steps=total_steps,
                       writer=writer)
    train_loop(..., hooks=(grid, rfid))

Every process must hold the same held-out images (``shard_index=0, shard_count=1``): each
computes the same numbers, so nothing needs gathering. A few hundred images give a noisy
but monotone rFID (it is biased upwards at small counts; compare runs at equal counts).

:class:`SampleFID` scores stage 2: every ``every`` steps it samples the EMA generator with the
trainer's sampler, decodes with the frozen tokenizer and reports FID against a reference
batch or real images (SiT/DiT trainers: ``config.eval_every``, ``config.eval_num_samples``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from flax import nnx

from softvq_jax import parallel
from softvq_jax.eval import adm
from softvq_jax.eval import fid as fid_lib
from softvq_jax.eval.eval_recon import ReconstructionMetrics
from softvq_jax.utils.images import samples_to_uint8, to_uint8
from softvq_jax.utils.periodic import PeriodicHook


def ema_reconstruct_fn(graphdef) -> Callable[[Any, np.ndarray], jax.Array]:
  """``(state, images) -> reconstructions`` with the EMA parameters of a ``TrainState``."""

  @jax.jit
  def reconstruct(ema, rest, x):
    return nnx.merge(graphdef, ema, rest)(x)[0]

  return lambda state, x: reconstruct(state.ema, state.rest, x)


class HeldoutRFID(PeriodicHook):
  """Every ``every`` steps: rFID/PSNR/SSIM of ``images`` reconstructed by the model in ``state``.

  ``images``: float ``(N, H, W, 3)`` in [-1, 1], N >= 2 (the same on every process).
  ``reconstruct``: ``(state, images) -> images`` (default: the EMA model of ``graphdef``).
  ``features``: an :class:`~softvq_jax.eval.adm.InceptionFeatures` (default: loaded at the
  first evaluation). ``self.last`` holds the latest metrics, ``self.history`` all of them.
  """

  def __init__(self, graphdef, images: np.ndarray, *, every: int, total_steps: int,
               writer=None, features: adm.InceptionFeatures | None = None,
               reconstruct: Callable[[Any, np.ndarray], jax.Array] | None = None,
               batch_size: int = 64, lpips: bool = False, prefix: str = "heldout_",
               jsonl_path: str | None = None):
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) < 2:
      raise ValueError(f"held-out images must be (N >= 2, H, W, 3), got {images.shape}")
    if every <= 0:
      raise ValueError(f"every must be positive, got {every}")
    if reconstruct is None and graphdef is None:
      raise ValueError("give graphdef (EMA model of a TrainState) or a reconstruct function")
    self.images, self.every, self.total, self.writer = images, every, total_steps, writer
    self.originals_u8 = to_uint8(images)
    self.features, self.batch_size, self.lpips, self.prefix = features, batch_size, lpips, prefix
    self.jsonl_path = jsonl_path
    self._reconstruct = reconstruct or ema_reconstruct_fn(graphdef)
    self._reference: tuple | None = None
    self.last: dict[str, float] | None = None
    self.history: list[tuple[int, dict[str, float]]] = []

  def _reference_stats(self):
    if self._reference is None:
      if self.features is None:
        self.features = adm.InceptionFeatures(batch_size=self.batch_size)
      acc = adm.StatsAccumulator(self.features)
      for start in range(0, len(self.originals_u8), self.batch_size):
        acc.add(self.originals_u8[start:start + self.batch_size])
      # Host-local on purpose: every process holds the same images.
      self._reference = (acc.pool, acc.spatial)
    return self._reference

  def evaluate(self, state) -> dict[str, float]:
    pool, spatial = self._reference_stats()
    recons = []
    for start in range(0, len(self.images), self.batch_size):
      chunk = self.images[start:start + self.batch_size]
      recons.append(to_uint8(parallel.to_host(self._reconstruct(state, chunk))))
    recons_u8 = np.concatenate(recons)
    metrics = ReconstructionMetrics(None, lpips=self.lpips, batch_size=self.batch_size)
    metrics.add(self.originals_u8, recons_u8)
    out = _local_result(metrics)
    acc = adm.StatsAccumulator(self.features)
    for start in range(0, len(recons_u8), self.batch_size):
      acc.add(recons_u8[start:start + self.batch_size])
    from softvq_jax.eval import fid as fid_lib  # pylint: disable=g-import-not-at-top
    out["rfid"] = fid_lib.fid_from_stats(acc.pool, pool)
    out["rsfid"] = fid_lib.fid_from_stats(acc.spatial, spatial)
    return out

  def __call__(self, step: int, state) -> None:
    if not self.due(step):
      return
    out = self.evaluate(state)
    self.last = out
    self.history.append((step, out))
    logging.info("step %d held-out (%d images): rFID %.3f, PSNR %.2f dB, SSIM %.4f", step,
                 out["num_images"], out["rfid"], out["psnr"], out["ssim"])
    _write_scalars(self.writer, self.jsonl_path, step,
                   {f"{self.prefix}{k}": float(v) for k, v in out.items()})


def _write_scalars(writer, jsonl_path: str | None, step: int, scalars: dict[str, float]) -> None:
  """A hook's scores to TensorBoard and to the run's metrics.jsonl, where given."""
  if writer is not None:
    writer.write_scalars(step, scalars)
  if jsonl_path:
    from softvq_jax.train.loop import JsonlWriter  # pylint: disable=g-import-not-at-top
    JsonlWriter(jsonl_path).write(step, scalars)


def _local_result(metrics: ReconstructionMetrics) -> dict[str, float]:
  """This process's means (every process evaluates the same images, so no collective)."""
  out = {"num_images": metrics.count}
  out.update({k: v / metrics.count for k, v in metrics.sums.items()})
  return out


class SampleFID(PeriodicHook):
  """Every ``every`` steps (and at the last): FID of ``num_samples`` generated images.

  Stage 2's counterpart of :class:`HeldoutRFID`. ``sample``: ``(state, noise, labels,
  batch) -> latents`` (the trainers' compiled EMA sampler, the one their sample grids use;
  ``batch``, the batch's index, tells a stochastic sampler to draw that batch's own noise);
  ``decode``: ``latents -> images`` float in [-1, 1] (the frozen tokenizer). The same
  class-balanced labels and noise are drawn at every evaluation, in batches of
  ``batch_size`` (the last one padded), so the sampler compiles once and successive
  numbers differ only by the weights. Features come from the FID Inception
  (:class:`~softvq_jax.eval.adm.InceptionFeatures`, the ``eval_gen`` code).

  The reference (computed once, at the first evaluation): ``reference`` is the path of an
  ADM reference batch (its ``mu``/``sigma``, else its ``arr_0`` images) or a uint8/float
  ``(N, H, W, 3)`` array of real images. ``self.last`` holds the latest FID,
  ``self.history`` all ``(step, fid)``; each is written to ``writer`` (as ``{prefix}fid``)
  and, when given, appended to the JSONL file ``jsonl_path``.

  Every process runs the same samples and the same Inception batches, so nothing needs
  gathering (as :class:`HeldoutRFID`).
  """

  def __init__(self, sample: Callable[[Any, Any, Any], Any],
               decode: Callable[[np.ndarray], Any], *, latent_shape: tuple[int, int],
               num_classes: int, reference, every: int, total_steps: int, num_samples: int,
               batch_size: int = 32, seed: int = 0, writer=None, jsonl_path: str | None = None,
               features: adm.InceptionFeatures | None = None, inception_batch_size: int = 50,
               prefix: str = ""):
    if every <= 0:
      raise ValueError(f"every must be positive, got {every}")
    if num_samples < 2:
      raise ValueError(f"FID needs at least 2 samples, got num_samples={num_samples}")
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(reference, str):
      import os  # pylint: disable=g-import-not-at-top
      if not os.path.isfile(reference):
        raise FileNotFoundError(f"reference batch {reference!r} does not exist")
    else:
      reference = np.asarray(reference)
      if reference.ndim != 4 or reference.shape[-1] != 3 or len(reference) < 2:
        raise ValueError(f"reference images must be (N >= 2, H, W, 3), got {reference.shape}")
      if reference.dtype != np.uint8:
        reference = to_uint8(reference)
    self._sample, self._decode = sample, decode
    self.reference, self.every, self.total = reference, every, total_steps
    self.num_samples, self.batch_size = num_samples, batch_size
    self.writer, self.jsonl_path, self.prefix = writer, jsonl_path, prefix
    self.features, self.inception_batch_size = features, inception_batch_size
    padded = -(-num_samples // batch_size) * batch_size
    key = jax.random.key(seed)
    self.noise = np.asarray(jax.random.normal(key, (padded,) + tuple(latent_shape)), np.float32)
    self.labels = (np.arange(padded) % num_classes).astype(np.int32)  # class-balanced
    self._reference_stats = None
    self.last: float | None = None
    self.history: list[tuple[int, float]] = []

  def _inception(self) -> adm.InceptionFeatures:
    if self.features is None:
      self.features = adm.InceptionFeatures(batch_size=self.inception_batch_size)
    return self.features

  def reference_stats(self):
    """(mean, covariance) of the reference's pool features, computed at the first call."""
    if self._reference_stats is None:
      if isinstance(self.reference, str):
        from softvq_jax.eval import npz  # pylint: disable=g-import-not-at-top
        stored = npz.read_reference_stats(self.reference)
        if "mu" in stored and "sigma" in stored:
          self._reference_stats = (stored["mu"], stored["sigma"])
        else:
          pool = self._inception().npz_activations(self.reference).pool
          stats = fid_lib.FeatureStats.from_features(pool)
          self._reference_stats = (stats.mean, stats.covariance)
      else:
        stats = self.image_stats(self.reference)
        self._reference_stats = (stats.mean, stats.covariance)
    return self._reference_stats

  def image_stats(self, images_u8: np.ndarray) -> fid_lib.FeatureStats:
    acc = adm.StatsAccumulator(self._inception())
    for start in range(0, len(images_u8), self.inception_batch_size):
      acc.add(images_u8[start:start + self.inception_batch_size])
    return acc.pool

  def generate(self, state) -> np.ndarray:
    """The ``num_samples`` decoded samples of ``state``'s EMA model, uint8 NHWC."""
    out = []
    for start in range(0, len(self.noise), self.batch_size):
      end = start + self.batch_size
      z = self._sample(state, self.noise[start:end], self.labels[start:end],
                       start // self.batch_size)
      z = parallel.to_host(z).astype(np.float32)
      out.append(samples_to_uint8(parallel.to_host(self._decode(z))))
    return np.concatenate(out)[:self.num_samples]

  def evaluate(self, state) -> float:
    mu, sigma = self.reference_stats()
    stats = self.image_stats(self.generate(state))
    return fid_lib.frechet_distance(stats.mean, stats.covariance, mu, sigma)

  def __call__(self, step: int, state) -> None:
    if not self.due(step):
      return
    value = self.evaluate(state)
    self.last = value
    self.history.append((step, value))
    logging.info("step %d: FID %.4f (%d samples)", step, value, self.num_samples)
    _write_scalars(self.writer, self.jsonl_path, step, {f"{self.prefix}fid": float(value)})
