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
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from flax import nnx

from softvq_jax.eval import adm
from softvq_jax.eval.eval_recon import ReconstructionMetrics
from softvq_jax.utils.images import to_uint8


def ema_reconstruct_fn(graphdef) -> Callable[[Any, np.ndarray], jax.Array]:
  """``(state, images) -> reconstructions`` with the EMA parameters of a ``TrainState``."""

  @jax.jit
  def reconstruct(ema, rest, x):
    return nnx.merge(graphdef, ema, rest)(x)[0]

  return lambda state, x: reconstruct(state.ema, state.rest, x)


class HeldoutRFID:
  """Every ``every`` steps: rFID/PSNR/SSIM of ``images`` reconstructed by the model in ``state``.

  ``images``: float ``(N, H, W, 3)`` in [-1, 1], N >= 2 (the same on every process).
  ``reconstruct``: ``(state, images) -> images`` (default: the EMA model of ``graphdef``).
  ``features``: an :class:`~softvq_jax.eval.adm.InceptionFeatures` (default: loaded at the
  first evaluation). ``self.last`` holds the latest metrics, ``self.history`` all of them.
  """

  def __init__(self, graphdef, images: np.ndarray, *, every: int, total_steps: int,
               writer=None, features: adm.InceptionFeatures | None = None,
               reconstruct: Callable[[Any, np.ndarray], jax.Array] | None = None,
               batch_size: int = 64, lpips: bool = False, prefix: str = "heldout_"):
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
      recons.append(to_uint8(np.asarray(self._reconstruct(state, chunk))))
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
    if step % self.every and step != self.total:
      return
    out = self.evaluate(state)
    self.last = out
    self.history.append((step, out))
    logging.info("step %d held-out (%d images): rFID %.3f, PSNR %.2f dB, SSIM %.4f", step,
                 out["num_images"], out["rfid"], out["psnr"], out["ssim"])
    if self.writer is not None:
      self.writer.write_scalars(step, {f"{self.prefix}{k}": float(v) for k, v in out.items()})


def _local_result(metrics: ReconstructionMetrics) -> dict[str, float]:
  """This process's means (every process evaluates the same images, so no collective)."""
  out = {"num_images": metrics.count}
  out.update({k: v / metrics.count for k, v in metrics.sums.items()})
  return out
