"""A small checkpointable iterator over in-memory arrays (latents, offline images).

Deterministic for a seed: epoch e is a permutation drawn from ``(seed, e)``;
each process takes a disjoint slice of every global batch. The state is two
integers, saved with the train state so a resumed run continues with the
exact next batch.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


class ArrayIterator:

  def __init__(self, arrays: Mapping[str, np.ndarray], global_batch_size: int, *, seed: int,
               process_index: int = 0, process_count: int = 1, transform=None):
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"arrays have different lengths: {sizes}")
    self.arrays = dict(arrays)
    self.num_examples = next(iter(sizes.values()))
    if global_batch_size % process_count:
      raise ValueError(f"global batch {global_batch_size} does not split over {process_count} "
                       "processes")
    if self.num_examples < global_batch_size:
      raise ValueError(f"the dataset has {self.num_examples} examples, fewer than one global "
                       f"batch of {global_batch_size}")
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.seed = seed
    self.transform = transform
    self.epoch = 0
    self.position = 0  # batches consumed in this epoch
    self._order = None

  @property
  def batches_per_epoch(self) -> int:
    return self.num_examples // self.global_batch_size  # the remainder is dropped

  def _permutation(self) -> np.ndarray:
    if self._order is None or self._order[0] != self.epoch:
      rng = np.random.default_rng([self.seed, self.epoch])
      self._order = (self.epoch, rng.permutation(self.num_examples))
    return self._order[1]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.position >= self.batches_per_epoch:
      self.epoch += 1
      self.position = 0
    start = self.position * self.global_batch_size + self.process_index * self.local_batch_size
    idx = np.sort(self._permutation()[start:start + self.local_batch_size])
    batch = {k: v[idx] for k, v in self.arrays.items()}
    if self.transform is not None:
      # Per-batch randomness derived from the position, so resuming reproduces it.
      rng = np.random.default_rng([self.seed, self.epoch, self.position, self.process_index, 1])
      batch = self.transform(batch, rng)
    self.position += 1
    return batch

  def get_state(self) -> dict[str, int]:
    return {"epoch": int(self.epoch), "position": int(self.position)}

  def set_state(self, state: Mapping[str, int]) -> None:
    self.epoch = int(state["epoch"])
    self.position = int(state["position"])
