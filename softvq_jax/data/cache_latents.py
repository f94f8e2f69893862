"""Stage-2 latent cache: encode a dataset once with a frozen tokenizer; SiT/DiT train on it.

Writer: every image (ADM centre crop, as the reference's SiT training uses)
and its horizontal flip are encoded; each record of the sharded ArrayRecord
files holds ``latent`` and ``latent_flip`` (``(L, d)`` float32), ``label``,
the source ``index`` and ``name``. A shard is written under a temporary name
and renamed when complete, so a rerun skips finished shards and redoes only
the interrupted one. With several processes, process ``p`` writes the shards
``s`` with ``s % process_count == p``.

Each process encodes its own shards independently, so on a multi-host
machine give the writer a ``Tokenizer`` whose mesh spans only
``jax.local_devices()`` (or none), not a global mesh. Paths are local or
FUSE-mounted file systems (``os`` and ArrayRecord's local writer).

Reader: ``latent_pipeline`` yields ``{"latent": (B, L, d), "label": (B,)}``,
picking the flipped copy with probability 1/2 per example when training (the
reference's ``CachedFolder``).

    python -m softvq_jax.data.cache_latents --tokenizer_dir=DIR --source=folder \\
        --data_path=/data/imagenet/train --out_dir=/data/cache/softvq_l64
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import logging
from tqdm import tqdm

from softvq_jax.data import pipeline, records, transforms
from softvq_jax.utils import fs
from softvq_jax.utils.errors import JobError, UnreadableDataError

CACHE_INFO = "cache_info.json"
FORMAT = "softvq_jax.latent_cache"
VERSION = 1
# Fields that must agree between a partial cache and the run resuming it.
_MUST_MATCH = ("format", "version", "num_examples", "num_shards", "examples_per_shard",
               "latent_shape", "image_size", "tokenizer")


def shard_name(shard: int, num_shards: int) -> str:
  return f"latents-{shard:05d}-of-{num_shards:05d}.array_record"


@functools.cache
def _abs_sum_fn():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  # One compiled reduction over all weights, not one dispatch (and compile) per shape.
  return jax.jit(lambda leaves: sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in leaves))


def _abs_sum(leaves):
  return _abs_sum_fn()(leaves)


def tokenizer_fingerprint(tokenizer: Any) -> str:
  """Config hash plus a checksum of the weights: a cache is only valid for one tokenizer."""
  import jax  # pylint: disable=g-import-not-at-top
  config = json.dumps(tokenizer.config.to_json_dict(), sort_keys=True, default=str)
  leaves = [x for x in jax.tree.leaves(tokenizer.state) if hasattr(x, "dtype")]
  checksum = float(_abs_sum(leaves))
  digest = hashlib.sha256(config.encode()).hexdigest()[:16]
  return f"{digest}-{len(leaves)}-{checksum:.6e}"


def _dtype_name(dtype) -> str:
  return np.dtype(dtype).name if dtype is not None else "float32"


def same_tokenizer(cached: str, current: str) -> bool:
  """Whether two fingerprints name one tokenizer: the same config and weight count, and
  weight checksums equal up to float32 summation order (another mesh sums otherwise)."""
  try:
    config_a, count_a, sum_a = cached.rsplit("-", 2)
    config_b, count_b, sum_b = current.rsplit("-", 2)
    a, b = float(sum_a), float(sum_b)
  except (AttributeError, ValueError):
    return cached == current
  return (config_a, count_a) == (config_b, count_b) and abs(a - b) <= 1e-5 * max(abs(a), abs(b))


def read_info(cache_dir: str) -> dict[str, Any]:
  if not cache_dir:
    raise FileNotFoundError("no latent cache given: set config.data.cache_dir to the workdir of "
                            "an extract run (configs/extract_latents.py)")
  path = os.path.join(cache_dir, CACHE_INFO)
  if not fs.exists(path):
    if not fs.isdir(cache_dir):
      raise FileNotFoundError(f"latent cache {cache_dir} does not exist")
    raise FileNotFoundError(f"{cache_dir} is not a latent cache: it has no {CACHE_INFO}")
  with fs.open(path) as f:
    return json.load(f)


def _check_resumable(cache_dir: str, info: dict[str, Any]) -> None:
  old = read_info(cache_dir)
  bad = [k for k in _MUST_MATCH if old.get(k) != info.get(k)
         and not (k == "tokenizer" and same_tokenizer(old.get(k), info.get(k)))]
  # Caches written before these were recorded resume under any value.
  for key in ("compute_dtype", "source_kind", "example_names"):
    if key in old and old[key] != info[key]:
      bad.append(key)
  if bad:
    diffs = "; ".join(f"{k}: cache has {old.get(k)!r}, this run {info.get(k)!r}" for k in bad)
    raise JobError(f"latent cache {cache_dir} was written with different settings ({diffs}); "
                   "write to another folder (extract's --workdir) or delete the old cache")
  if old.get("source") != info.get("source"):
    # Same kind of source: the data may have moved (source names hold their paths).
    logging.warning("latent cache %s was started from %s, resuming from %s", cache_dir,
                    old.get("source"), info.get("source"))


def _example_names(source: Any) -> list[str]:
  """Names of the first, middle and last examples (an image folder's relative paths): two
  sources of one kind and size that hold other images differ in them, while a folder that
  moved does not."""
  n = len(source)
  return [str(source[i].get("name", i)) for i in sorted({0, n // 2, n - 1})] if n else []


def _num_classes(source: Any) -> int | None:
  classes = getattr(source, "classes", None)
  if classes is not None:
    return len(classes)
  count = getattr(source, "num_classes", None)
  return int(count) if isinstance(count, int) else None


def write_latent_cache(tokenizer: Any, source: Any, out_dir: str, *, batch_size: int = 32,
                       examples_per_shard: int = 4096, process_index: int | None = None,
                       process_count: int | None = None, num_threads: int = 8,
                       max_skipped: int | None = 100, progress: bool = True) -> dict[str, Any]:
  """Encodes ``source`` with ``tokenizer`` into ``out_dir``; resumes a partial cache.

  Returns the cache info (whose ``num_examples`` counts the source's images) plus this
  run's ``written_shards``, ``existing_shards`` and ``skipped_images`` (undecodable images,
  left out of the cache), and ``cached_examples``: the records of the whole cache once every
  shard is there (None while another process is still writing, or for a bucket).
  """
  n = len(source)
  name = str(getattr(source, "name", type(source).__name__))
  if n == 0:
    raise JobError(f"{name} is empty: nothing to cache")
  if examples_per_shard < 1 or batch_size < 1:
    raise ValueError(f"examples_per_shard ({examples_per_shard}) and batch_size ({batch_size}) "
                     "must be >= 1")
  index, count = pipeline.host_shard(process_index, process_count)
  num_shards = -(-n // examples_per_shard)
  size = tokenizer.image_size
  info = {"format": FORMAT, "version": VERSION, "num_examples": n, "num_shards": num_shards,
          "examples_per_shard": examples_per_shard, "latent_shape": list(tokenizer.latent_shape),
          "image_size": size, "tokenizer": tokenizer_fingerprint(tokenizer),
          "vq_mean": float(tokenizer.config.vq_mean), "vq_std": float(tokenizer.config.vq_std),
          "source": name, "source_kind": type(source).__name__, "transform": "adm_center_crop",
          # For the generator trainers' class-count check; None where the source does not say.
          "num_classes": _num_classes(source),
          "compute_dtype": _dtype_name(getattr(tokenizer, "dtype", None)),
          "example_names": _example_names(source)}
  fs.makedirs(out_dir)
  if fs.exists(os.path.join(out_dir, CACHE_INFO)):
    _check_resumable(out_dir, info)
  else:
    fs.write_json_atomic(os.path.join(out_dir, CACHE_INFO), info)

  mine = [s for s in range(num_shards) if s % count == index]
  todo = [s for s in mine if not fs.exists(os.path.join(out_dir, shard_name(s, num_shards)))]
  logging.info("latent cache %s: %d examples in %d shards; process %d of %d writes %d, %d already "
               "complete", out_dir, n, num_shards, index, count, len(todo), len(mine) - len(todo))
  preprocess = pipeline.ImagePreprocess(size, train=False)

  def load(i: int) -> tuple[str, dict[str, Any] | pipeline.Skipped]:
    record = source[i]
    return str(record.get("name", i)), preprocess.random_map(record, None)

  skipped: list[str] = []
  total = sum(min(n, (s + 1) * examples_per_shard) - s * examples_per_shard for s in todo)
  bar = tqdm(total=total, desc="cache latents", unit="img", disable=not progress)
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:

    def shard_records(shard: int):
      start, stop = shard * examples_per_shard, min(n, (shard + 1) * examples_per_shard)
      batches = [list(range(b0, min(stop, b0 + batch_size)))
                 for b0 in range(start, stop, batch_size)]
      futures = [pool.submit(load, i) for i in batches[0]]
      for k, ids in enumerate(batches):
        loaded = [f.result() for f in futures]
        if k + 1 < len(batches):  # decode the next batch while this one is encoded
          futures = [pool.submit(load, i) for i in batches[k + 1]]
        kept, images = [], []
        for i, (ex_name, ex) in zip(ids, loaded):
          if isinstance(ex, pipeline.Skipped):
            skipped.append(f"{ex.name} ({ex.reason})")
            logging.warning("Skipping undecodable image %s: %s", ex.name, ex.reason)
            if max_skipped is not None and len(skipped) > max_skipped:
              raise UnreadableDataError(
                  f"{len(skipped)} images of {name} could not be decoded, more than "
                  f"max_skipped={max_skipped}; the last: {'; '.join(skipped[-5:])}")
          else:
            kept.append((i, ex_name, ex))
            images.append(ex["image"])
        bar.update(len(ids))
        if not kept:
          continue
        latents, flipped = encode_with_flip(tokenizer, np.stack(images), batch_size)
        for (i, ex_name, ex), z, zf in zip(kept, latents, flipped):
          yield {"latent": z, "latent_flip": zf, "label": np.int32(ex["label"]), "index": i,
                 "name": ex_name}

    written = []
    for shard in todo:
      path = os.path.join(out_dir, shard_name(shard, num_shards))
      fs.remove_dead_writers_temps(path)
      records.write_records(path, shard_records(shard))
      written.append(shard)
  bar.close()
  if skipped:
    logging.warning("latent cache %s: %d undecodable images left out", out_dir, len(skipped))
  return {**info, "written_shards": written, "existing_shards": len(mine) - len(todo),
          "skipped_images": len(skipped), "cached_examples": _cached_examples(out_dir, info)}


def _cached_examples(out_dir: str, info: dict[str, Any]) -> int | None:
  """The records of every shard of a local cache; None until all of them are written."""
  paths = [os.path.join(out_dir, shard_name(s, info["num_shards"]))
           for s in range(info["num_shards"])]
  if fs.is_remote(out_dir) or not all(os.path.exists(p) for p in paths):
    return None
  return sum(records.num_records(p) for p in paths)


def encode_with_flip(tokenizer: Any, images_u8: np.ndarray,
                     batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Latents of uint8 images and of their mirror images, in one fixed-shape call.

  The batch is padded to ``batch_size`` so the tokenizer compiles once, not
  once per ragged shard end.
  """
  b = len(images_u8)
  x = transforms.to_float(images_u8)
  if b < batch_size:
    x = np.concatenate([x, np.repeat(x[-1:], batch_size - b, axis=0)])
  z = np.asarray(tokenizer.encode(np.concatenate([x, x[:, :, ::-1]])), np.float32)
  return z[:b], z[len(x):len(x) + b]


def default_mirror_dir(cache_dir: str, info: dict[str, Any]) -> str:
  """Where a bucket cache is copied: ``$SOFTVQ_JAX_LATENT_MIRROR`` or the temp folder.

  Keyed by the URL and the cache info (which holds the tokenizer's fingerprint),
  so a cache rewritten with another tokenizer never reuses stale copies.
  """
  key = hashlib.sha256((cache_dir + json.dumps(info, sort_keys=True)).encode()).hexdigest()[:16]
  root = os.environ.get("SOFTVQ_JAX_LATENT_MIRROR") or os.path.join(tempfile.gettempdir(),
                                                                      "softvq_jax_latents")
  return os.path.join(root, key)


class LatentCacheSource:
  """Random access to a complete latent cache (all shards present).

  A ``gs://`` cache is first copied shard by shard to ``mirror_dir`` (default
  ``default_mirror_dir``; shards already there are kept), because the
  ArrayRecord reader takes local files.
  """

  def __init__(self, cache_dir: str, *, mirror_dir: str | None = None, progress: bool = True):
    self.cache_dir = os.fspath(cache_dir)
    self.info = read_info(self.cache_dir)
    num_shards = self.info["num_shards"]
    paths = [os.path.join(self.cache_dir, shard_name(s, num_shards)) for s in range(num_shards)]
    missing = [os.path.basename(p) for p in paths if not fs.exists(p)]
    if missing:
      raise FileNotFoundError(
          f"latent cache {self.cache_dir} is incomplete: {len(missing)} of {num_shards} shards "
          f"missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); rerun the "
          "writer to finish it")
    if fs.is_remote(self.cache_dir):
      mirror_dir = mirror_dir or default_mirror_dir(self.cache_dir, self.info)
      local = [os.path.join(mirror_dir, os.path.basename(p)) for p in paths]
      todo = [(p, q) for p, q in zip(paths, local) if not os.path.exists(q)]
      logging.info("latent cache %s: copying %d of %d shards to %s", self.cache_dir, len(todo),
                   num_shards, mirror_dir)
      for remote, copy in tqdm(todo, desc="copy latent cache", unit="shard",
                               disable=not progress or not todo):
        fs.download(remote, copy)
      paths = local
    self.paths = paths
    self.name = f"latent cache {self.cache_dir}"
    self._source = grain.sources.ArrayRecordDataSource(paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return records.decode_record(self._source[index])


class PickLatent(grain.transforms.RandomMap):
  """Training: the flipped latents with probability 1/2; eval: always the unflipped ones."""

  def __init__(self, train: bool, mean: float = 0.0, std: float = 1.0,
               num_classes: int | None = None):
    self.train, self.mean, self.std, self.num_classes = train, mean, std, num_classes

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    label = int(element["label"])
    if self.num_classes is not None and not 0 <= label < self.num_classes:
      # The generator's embedding lookup would not fail: it would read the
      # unconditional row (label == num_classes) or clamp.
      raise JobError(
          f"latent cache record {element.get('index')} ({element.get('name')}) has label "
          f"{label}, outside [0, {self.num_classes}): the generator has num_classes="
          f"{self.num_classes}; set it to the dataset's number of classes")
    flip = self.train and rng.random() < 0.5
    z = np.asarray(element["latent_flip" if flip else "latent"], np.float32)
    if self.mean != 0.0 or self.std != 1.0:
      z = (z - np.float32(self.mean)) / np.float32(self.std)
    return {"latent": z, "label": np.int32(label)}


def latent_pipeline(cache: str | LatentCacheSource, *, batch_size: int, train: bool = True,
                    seed: int = 0, num_epochs: int | None = None, normalize: bool = False,
                    shard_index: int | None = None, shard_count: int | None = None,
                    num_threads: int = 4, prefetch_buffer_size: int = 256,
                    worker_count: int = 0, num_classes: int | None = None) -> grain.IterDataset:
  """Batches ``{"latent": (B, L, d) float32, "label": (B,) int32}`` from a latent cache.

  ``normalize`` applies the tokenizer's ``(z - vq_mean) / vq_std`` stored in
  the cache info. Training shuffles, repeats forever and drops the remainder;
  eval reads once in order. With ``num_classes``, a label outside
  ``[0, num_classes)`` raises ``ValueError`` when its record is read.
  """
  source = cache if isinstance(cache, LatentCacheSource) else LatentCacheSource(cache)
  mean, std = ((source.info["vq_mean"], source.info["vq_std"]) if normalize else (0.0, 1.0))
  if num_epochs is None and not train:
    num_epochs = 1
  return pipeline.build_pipeline(
      source, PickLatent(train, mean, std, num_classes), batch_size=batch_size, seed=seed,
      shuffle=train, num_epochs=num_epochs, drop_remainder=train, shard_index=shard_index,
      shard_count=shard_count, num_threads=num_threads,
      prefetch_buffer_size=prefetch_buffer_size, worker_count=worker_count, max_skipped=None)


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top

  from softvq_jax.data import sources  # pylint: disable=g-import-not-at-top
  from softvq_jax.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  kwargs = {"folder": {"root": f.data_path}, "array_record": {"paths": f.data_path},
            "tfds": {"dataset": f.tfds_name, "split": f.split, "data_dir": f.data_path},
            "fashion_mnist": {"split": f.split}, "skimage": {}, "synthetic": {}}[f.source]
  source = sources.make_source(f.source, **kwargs)
  tokenizer = Tokenizer.load(f.tokenizer_dir, dtype=f.dtype)
  info = write_latent_cache(tokenizer, source, f.out_dir, batch_size=f.batch_size,
                            examples_per_shard=f.examples_per_shard, num_threads=f.num_threads,
                            max_skipped=f.max_skipped)
  logging.info("latent cache done: %s", json.dumps(info))


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("tokenizer_dir", None, "converted tokenizer (Tokenizer.load)", required=True)
  flags.DEFINE_string("out_dir", None, "where the cache goes", required=True)
  flags.DEFINE_enum("source", "folder", ["folder", "array_record", "tfds", "fashion_mnist",
                                         "skimage", "synthetic"], "data source")
  flags.DEFINE_string("data_path", None, "image folder root, ArrayRecord glob or TFDS data_dir")
  flags.DEFINE_string("tfds_name", "imagenet2012", "TFDS dataset name (source=tfds)")
  flags.DEFINE_string("split", "train", "split (tfds, fashion_mnist)")
  flags.DEFINE_string("dtype", "float32", "tokenizer compute dtype")
  flags.DEFINE_integer("batch_size", 32, "images per encode call (each also encoded flipped)")
  flags.DEFINE_integer("examples_per_shard", 4096, "records per ArrayRecord shard")
  flags.DEFINE_integer("num_threads", 8, "decode threads")
  flags.DEFINE_integer("max_skipped", 100, "stop after more undecodable images than this")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
