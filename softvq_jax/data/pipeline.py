"""Grain pipelines: per-host sharding, seeded shuffling and augmentation, resumable iterators.

    source -> [drop remainder] -> shuffle(seed) -> repeat(epochs)
           -> random_map(decode + transform, seed) -> [index::count] per host
           -> to_iter_dataset(threads) -> [mp_prefetch(workers)] -> SkipAndBatch

All hosts shuffle with the same seed and take every ``count``-th element of
the one global stream, so like PyTorch's ``DistributedSampler`` each epoch
is a fresh global permutation split across hosts, and the examples consumed
do not depend on how many hosts share the work. Every random choice is a
function of (seed, position in the global stream), so a pipeline is
reproducible from its seed whatever the host count, and its iterator state
(``get_state``/``set_state``, JSON-able; also what ``grain.checkpoint`` saves)
pins the exact next batch. Images that cannot be decoded travel down the
pipeline as ``Skipped`` markers and are dropped, counted (the count is part of
the iterator state) and checked against ``max_skipped`` in the main process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from softvq_jax.data import decode, transforms
from softvq_jax.utils.errors import JobError, UnreadableDataError


MAX_SKIPPED_IN_A_ROW = 1000


@dataclasses.dataclass(frozen=True)
class Skipped:
  """Stands in for an example whose image could not be decoded."""
  name: str
  reason: str


def host_shard(shard_index: int | None = None, shard_count: int | None = None) -> tuple[int, int]:
  """(index, count) of this host's shard: the JAX process index/count unless overridden."""
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
  return shard_index, shard_count


def shard_stream(ds: grain.MapDataset, shard_index: int, shard_count: int,
                 epoch_length: int) -> tuple[grain.MapDataset, int]:
  """This host's part of the global stream: every ``shard_count``-th element from ``shard_index``.

  Strided, not contiguous, so that unshuffled sources sorted by class (image
  folders in eval) still give every host every class. Returns the dataset
  and how many elements of each epoch this host gets.
  """
  per_epoch = len(range(shard_index, epoch_length, shard_count))
  return ds[shard_index::shard_count], per_epoch


def _augment_seed(seed: int) -> int:
  # Decorrelated from the shuffle, which uses `seed` itself.
  return int(np.random.SeedSequence([seed, 0x50F7]).generate_state(1)[0])


# Longest side over shortest side beyond which an image is skipped, not resized: its short side
# goes to the image size, so a 1 x 60,000 strip would become a 256 x 15,360,000 image (12 GB).
# Panoramas stay well inside; 64:1 at 512 pixels is 50 MB.
MAX_ASPECT_RATIO = 64


class ImagePreprocess(grain.transforms.RandomMap):
  """Decodes one record and applies the train or eval transform -> uint8 image, int32 label."""

  def __init__(self, image_size: int, train: bool, min_resize: int | None = None,
               max_resize: int | None = None, flip: bool = True):
    self.image_size, self.train = image_size, train
    self.min_resize, self.max_resize, self.flip = min_resize, max_resize, flip
    if train:  # fail at build time, not in a worker
      transforms.sample_crop_params(np.random.default_rng(0), (image_size, image_size),
                                    image_size, min_resize, max_resize, flip)

  def random_map(self, element: dict[str, Any],
                 rng: np.random.Generator) -> dict[str, Any] | Skipped:
    name = str(element.get("name", "?"))
    try:
      image = decode.to_pil_rgb(element["image"], name)
    except decode.CorruptImageError as e:
      return Skipped(name, e.reason)
    if max(image.size) > MAX_ASPECT_RATIO * min(image.size):
      return Skipped(name, f"its size {image.size[0]}x{image.size[1]} is more than "
                           f"{MAX_ASPECT_RATIO}:1, too elongated to resize and crop")
    if self.train:
      out = transforms.random_crop_flip(image, self.image_size, rng, self.min_resize,
                                        self.max_resize, self.flip)
    else:
      out = transforms.center_crop_arr(image, self.image_size)
    return {"image": out, "label": np.int32(element.get("label", 0))}


def stack_examples(examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  return {k: np.stack([np.asarray(ex[k]) for ex in examples]) for k in examples[0]}


def images_to_float(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  batch["image"] = transforms.to_float(batch["image"])
  batch["label"] = batch["label"].astype(np.int32)
  return batch


def images_as_uint8(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  batch["label"] = batch["label"].astype(np.int32)
  return batch


class _SkipAndBatchIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, batch_size: int, drop_remainder: bool,
               max_skipped: int | None, source_name: str,
               finalize: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]):
    super().__init__(parent)
    self._batch_size, self._drop_remainder = batch_size, drop_remainder
    self._max_skipped, self._source_name, self._finalize = max_skipped, source_name, finalize
    self.num_skipped = 0  # skips, one per epoch for an image that never decodes
    # The different images skipped, which max_skipped bounds: one unreadable file of a
    # training set is skipped again every epoch, and must not end a long run.
    self.distinct_skipped: set[str] = set()
    self._in_a_row = 0
    self.skipped_names: list[str] = []  # the most recent few, for the error message

  def _note_skip(self, skipped: Skipped) -> None:
    self.num_skipped += 1
    self._in_a_row += 1
    first_time = skipped.name not in self.distinct_skipped
    self.distinct_skipped.add(skipped.name)
    if first_time:
      self.skipped_names = (self.skipped_names + [f"{skipped.name} ({skipped.reason})"])[-5:]
    log = logging.warning if first_time else logging.info
    log("Skipping undecodable image %s in %s: %s (%d different images skipped so far)",
        skipped.name, self._source_name, skipped.reason, len(self.distinct_skipped))
    if self._max_skipped is not None and len(self.distinct_skipped) > self._max_skipped:
      raise UnreadableDataError(
          f"{len(self.distinct_skipped)} different images of {self._source_name} could not be "
          f"decoded, more than max_skipped={self._max_skipped}; the last: "
          f"{'; '.join(self.skipped_names)}. Remove or repair them, or raise max_skipped.")
    if self._in_a_row >= MAX_SKIPPED_IN_A_ROW:
      # Without this, an unreadable dataset repeated forever would spin silently.
      raise UnreadableDataError(
          f"{self._in_a_row} images in a row of {self._source_name} could not be decoded (the "
          f"last: {'; '.join(self.skipped_names)}): is it readable?")

  def __next__(self) -> dict[str, np.ndarray]:
    examples = []
    while len(examples) < self._batch_size:
      try:
        element = next(self._parent)
      except StopIteration:
        if self.num_skipped:
          logging.warning("%s: end of data; %d undecodable images were skipped",
                          self._source_name, len(self.distinct_skipped))
        break
      if isinstance(element, Skipped):
        self._note_skip(element)
      else:
        self._in_a_row = 0
        examples.append(element)
    if not examples or (self._drop_remainder and len(examples) < self._batch_size):
      raise StopIteration
    return self._finalize(stack_examples(examples))

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "num_skipped": self.num_skipped,
            "distinct_skipped": sorted(self.distinct_skipped)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self.num_skipped = int(state.get("num_skipped", 0))
    # States saved before the names were kept count skips only.
    self.distinct_skipped = set(state.get("distinct_skipped", ()))


class SkipAndBatch(grain.IterDataset):
  """Drops ``Skipped`` markers (counting them), batches the rest, applies ``finalize``.

  Runs in the main process (after any ``mp_prefetch``) so the count covers
  all workers and is saved with the iterator state.
  """

  def __init__(self, parent: grain.IterDataset, batch_size: int, *, drop_remainder: bool = True,
               max_skipped: int | None = 100, source_name: str = "the dataset",
               finalize: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] = lambda b: b):
    super().__init__(parent)
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self._args = (batch_size, drop_remainder, max_skipped, source_name, finalize)

  def __iter__(self) -> _SkipAndBatchIterator:
    return _SkipAndBatchIterator(self._parent.__iter__(), *self._args)

  def __str__(self) -> str:
    return f"SkipAndBatch(batch_size={self._args[0]}, max_skipped={self._args[2]})"


def _source_name(source: Any) -> str:
  return str(getattr(source, "name", type(source).__name__))


def build_pipeline(source: Any, element_fn: grain.transforms.RandomMap, *, batch_size: int,
                   seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                   drop_remainder: bool = True, shard_index: int | None = None,
                   shard_count: int | None = None, num_threads: int = 8,
                   prefetch_buffer_size: int = 64, worker_count: int = 0,
                   max_skipped: int | None = 100,
                   finalize: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] = lambda b: b,
                   ) -> grain.IterDataset:
  """The generic pipeline (see the module docstring); ``element_fn`` maps one record.

  ``batch_size`` is per host. ``num_epochs=None`` repeats forever.
  """
  name = _source_name(source)
  n = len(source)
  if n == 0:
    raise JobError(f"{name} is empty")
  index, count = host_shard(shard_index, shard_count)
  ds = grain.MapDataset.source(source)
  if drop_remainder:
    # Equal shares, so all hosts run equally many steps and none waits forever.
    ds = ds[:n - n % count]
  epoch_length = len(ds)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  # Seeded by the position in the global stream (MapDataset is lazy: each host
  # only computes its own slice), so augmentations do not depend on host count.
  ds = ds.random_map(element_fn, seed=_augment_seed(seed))
  ds, per_epoch = shard_stream(ds, index, count, epoch_length)
  if drop_remainder and per_epoch < batch_size:
    raise JobError(
        f"{name} has {n} examples, {per_epoch} per epoch for this host's shard ({index} of "
        f"{count}): fewer than one batch of {batch_size}; use a smaller batch or more data")
  if per_epoch == 0:
    raise JobError(f"{name} has {n} examples, none for shard {index} of {count}")
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=prefetch_buffer_size))
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return SkipAndBatch(ds, batch_size, drop_remainder=drop_remainder, max_skipped=max_skipped,
                      source_name=name, finalize=finalize)


def image_pipeline(source: Any, *, batch_size: int, image_size: int, train: bool = True,
                   seed: int = 0, num_epochs: int | None = None, shuffle: bool | None = None,
                   drop_remainder: bool | None = None, min_resize: int | None = None,
                   max_resize: int | None = None, flip: bool = True,
                   shard_index: int | None = None, shard_count: int | None = None,
                   num_threads: int = 8, prefetch_buffer_size: int = 64, worker_count: int = 0,
                   max_skipped: int | None = 100,
                   image_dtype: str = "float32") -> grain.IterDataset:
  """Batches ``{"image": (B, S, S, 3) float32 in [-1, 1], "label": (B,) int32}`` from ``source``.

  ``image_dtype="uint8"`` keeps the images as uint8 [0, 255] for a program that maps
  them to [-1, 1] on the device (``transforms.to_float_on_device``): a quarter of the
  bytes to copy, and no float conversion on the host (about 0.5 s of one core per 256
  images at 256 px).

  ``train=True``: the reference's augmentation (short side uniform in
  [min_resize, max_resize], default [S, ceil(S/0.8)], BOX halving + bicubic,
  random S crop, horizontal flip), shuffled, repeated forever, remainder dropped.
  ``train=False``: ADM centre crop, one pass in source order, last batch kept.

  ``iter()`` of the result has ``get_state``/``set_state`` and ``num_skipped``.
  """
  finalize = {"float32": images_to_float, "uint8": images_as_uint8}.get(image_dtype)
  if finalize is None:
    raise ValueError(f"image_dtype must be 'float32' or 'uint8', got {image_dtype!r}")
  if num_epochs is None and not train:
    num_epochs = 1
  fn = ImagePreprocess(image_size, train, min_resize, max_resize, flip)
  return build_pipeline(
      source, fn, batch_size=batch_size, seed=seed,
      shuffle=train if shuffle is None else shuffle, num_epochs=num_epochs,
      drop_remainder=train if drop_remainder is None else drop_remainder,
      shard_index=shard_index, shard_count=shard_count, num_threads=num_threads,
      prefetch_buffer_size=prefetch_buffer_size, worker_count=worker_count,
      max_skipped=max_skipped, finalize=finalize)
