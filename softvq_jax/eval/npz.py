"""Readers and writers for the ADM (guided-diffusion) evaluator's ``.npz`` batches.

* Sample batch: ``arr_0`` uint8 ``(N, H, W, 3)`` images, optional ``arr_1`` int labels
  (what ``sample.py`` scripts of ADM, DiT, SiT and SoftVQ write).
* Reference batch (e.g. ``VIRTUAL_imagenet256_labeled.npz``): ``arr_0`` images plus the
  statistics ``mu``/``sigma`` (pool_3, 2048) and ``mu_s``/``sigma_s`` (spatial, 2023).

:func:`iter_images` streams ``arr_0`` in batches straight out of the zip, like ADM's
``open_npz_array``, so a 50k x 256 x 256 x 3 batch (9.8 GB) never has to sit in memory.
"""

from __future__ import annotations

import zipfile
from typing import Iterator

import numpy as np

from softvq_jax.eval.fid import FeatureStats
from softvq_jax.utils import fs
from softvq_jax.utils.errors import JobError


def _check_images(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected uint8 NHWC RGB images, got {images.dtype} {images.shape}")
  return images


def write_sample_batch(path: str, images: np.ndarray, labels: np.ndarray | None = None) -> None:
  """``arr_0`` = uint8 NHWC images, ``arr_1`` = labels (if given); uncompressed like ADM's."""
  images = _check_images(images)
  arrays = {"arr_0": images}
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
      raise ValueError(f"labels must be ({len(images)},), got {labels.shape}")
    arrays["arr_1"] = labels.astype(np.int64)
  np.savez(path, **arrays)


def read_sample_batch(path: str) -> tuple[np.ndarray, np.ndarray | None]:
  with fs.open(path, "rb") as raw, np.load(raw) as data:
    images = _check_images(data["arr_0"])
    labels = np.asarray(data["arr_1"]) if "arr_1" in data.files else None
  return images, labels


def write_reference_batch(path: str, *, images: np.ndarray | None = None,
                          pool: FeatureStats | None = None,
                          spatial: FeatureStats | None = None) -> None:
  """A reference batch with whichever of ``arr_0``, ``mu``/``sigma``, ``mu_s``/``sigma_s`` is given."""
  arrays = {}
  if images is not None:
    arrays["arr_0"] = _check_images(images)
  if pool is not None:
    arrays["mu"], arrays["sigma"] = pool.mean, pool.covariance
  if spatial is not None:
    arrays["mu_s"], arrays["sigma_s"] = spatial.mean, spatial.covariance
  if not arrays:
    raise ValueError("nothing to write")
  np.savez(path, **arrays)


def read_reference_stats(path: str) -> dict[str, np.ndarray]:
  """The statistics stored in a reference batch (``mu``, ``sigma``, ``mu_s``, ``sigma_s``) that exist."""
  with fs.open(path, "rb") as raw, np.load(raw) as data:
    return {k: np.asarray(data[k], np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s")
            if k in data.files}


def _npy_member(archive: zipfile.ZipFile, key: str) -> str:
  name = f"{key}.npy"
  if name not in archive.namelist():
    raise KeyError(f"{key} not in the npz (has {archive.namelist()})")
  return name


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  if version == (2, 0):
    return np.lib.format.read_array_header_2_0(f)
  return np.lib.format._read_array_header(f, version)  # pylint: disable=protected-access


def array_shape(path: str, key: str = "arr_0") -> tuple[int, ...]:
  """Shape of one array of an npz, read from its header only."""
  with fs.open(path, "rb") as raw, zipfile.ZipFile(raw) as archive, \
      archive.open(_npy_member(archive, key)) as f:
    shape, _, _ = _read_header(f)
  return tuple(shape)


def check_batch(path: str, role: str, *, images_required: bool = True) -> tuple[int, ...] | None:
  """The shape of a batch's ``arr_0`` (None if it has none and may lack it), read from its header.

  Everything an evaluation would otherwise find out late, or in a library's words, is said
  here with the file and its ``role`` named: a folder, a file that is not an npz archive,
  images that are not uint8 NHWC RGB, fewer than two images (no covariance).
  """
  if fs.isdir(path):
    raise IsADirectoryError(f"{role} {path} is a folder, not an .npz batch")
  if not fs.exists(path):
    raise FileNotFoundError(f"{role} {path} does not exist")
  try:
    with fs.open(path, "rb") as raw, zipfile.ZipFile(raw) as archive:
      if "arr_0.npy" not in archive.namelist():
        if images_required:
          raise JobError(f"{role} {path} holds no images (arr_0); it has "
                         f"{sorted(n.removesuffix('.npy') for n in archive.namelist())}")
        return None
      with archive.open("arr_0.npy") as f:
        shape, _, dtype = _read_header(f)
  except zipfile.BadZipFile as e:
    raise JobError(f"{role} {path} is not an .npz archive ({e}): write it with numpy.savez "
                   "(arr_0 = uint8 NHWC images)") from e
  shape = tuple(shape)
  if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
    raise JobError(f"{role} {path}: arr_0 must be uint8 NHWC RGB images, got {dtype} {shape}")
  if shape[0] < 2:
    raise JobError(f"{role} {path}: arr_0 holds {shape[0]} image(s); the statistics need at "
                   "least 2")
  return shape


def iter_images(path: str, batch_size: int, key: str = "arr_0") -> Iterator[np.ndarray]:
  """Yields ``arr_0`` in consecutive batches of at most ``batch_size`` rows, streamed."""
  with fs.open(path, "rb") as raw, zipfile.ZipFile(raw) as archive, \
      archive.open(_npy_member(archive, key)) as f:
    shape, fortran, dtype = _read_header(f)
    if fortran:
      # Its rows are not contiguous: read it whole, as ADM's evaluator does.
      f.seek(0)
      whole = np.lib.format.read_array(f, allow_pickle=False)
      for start in range(0, shape[0], batch_size):
        yield np.ascontiguousarray(whole[start:start + batch_size])
      return
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    for start in range(0, shape[0], batch_size):
      count = min(batch_size, shape[0] - start)
      raw = f.read(count * row)
      if len(raw) != count * row:
        raise JobError(f"{path}:{key} is truncated at row {start}")
      yield np.frombuffer(raw, dtype).reshape((count,) + tuple(shape[1:]))
