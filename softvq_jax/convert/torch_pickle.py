"""Reads PyTorch ``.pt``/``.bin`` zip checkpoints without torch and without running pickled code.

``torch.save`` writes a zip holding ``<root>/data.pkl`` (the object graph) and
``<root>/data/<n>`` (raw tensor storages). The unpickler below resolves only an
allow-list of globals to local, side-effect-free handlers; every other global
becomes an inert placeholder, so no callable named by the file is imported or run.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_TORCH_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "int64": np.int64, "int32": np.int32, "int16": np.int16,
    "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}


class TorchCheckpointError(ValueError):
  pass


class _StorageType:
  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


class _TorchDtype:
  def __init__(self, name: str):
    self.name = name


class Opaque:
  """Stands in for any class the checkpoint names that we do not need (e.g. argparse.Namespace)."""

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs = args, kwargs

  def __setstate__(self, state):
    self.state = state

  def __call__(self, *args, **kwargs):
    return Opaque(*args, **kwargs)


def _opaque_factory(module: str, name: str):
  return type(name, (Opaque,), {"__module__": f"opaque.{module}"})


def _rebuild_tensor(storage: np.ndarray, storage_offset: int, size, stride, *unused) -> np.ndarray:
  size, stride = tuple(size), tuple(stride)
  if not size:
    return storage[storage_offset:storage_offset + 1].reshape(()).copy()
  needed = storage_offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1
  if any(s == 0 for s in size):
    return np.zeros(size, storage.dtype)
  if needed > storage.size:
    raise TorchCheckpointError(f"tensor of size {size} runs past its storage ({storage.size} elements)")
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=size,
                                         strides=tuple(st * itemsize for st in stride))
  return np.array(view)  # contiguous copy


def _rebuild_parameter(data, *unused):
  return data


class _RestrictedUnpickler(pickle.Unpickler):

  def __init__(self, file, archive: zipfile.ZipFile, root: str):
    super().__init__(file)
    self._archive = archive
    self._root = root
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str):
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    if module == "torch" and name in _TORCH_DTYPES:
      return _TorchDtype(name)
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "builtins" and name in ("dict", "list", "tuple", "set", "frozenset"):
      return {"dict": dict, "list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[name]
    return _opaque_factory(module, name)

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise TorchCheckpointError(f"unsupported persistent id in checkpoint: {pid!r}")
    _, storage_type, key, _location, _numel = pid
    if isinstance(storage_type, _TorchDtype):  # newer pickles name the dtype
      dtype = np.dtype(_TORCH_DTYPES[storage_type.name])
    elif isinstance(storage_type, _StorageType):
      dtype = storage_type.dtype
    else:
      raise TorchCheckpointError(f"unsupported storage type {storage_type!r}")
    if key not in self._storages:
      name = f"{self._root}/data/{key}"
      try:
        raw = self._archive.read(name)
      except KeyError as e:
        raise TorchCheckpointError(f"checkpoint is missing storage {name}") from e
      self._storages[key] = np.frombuffer(raw, dtype=dtype)
    return self._storages[key]


def load_torch_zip(path: str) -> Any:
  """Loads the object graph of a ``torch.save`` zip file; tensors become numpy arrays."""
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise TorchCheckpointError(
        f"{path} is not a PyTorch zip checkpoint (legacy non-zip torch.save files are not "
        "supported; re-save with a current torch or convert to safetensors)") from e
  with archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pickles:
      raise TorchCheckpointError(f"{path} has no data.pkl: not a torch.save checkpoint")
    name = pickles[0]
    root = name[: -len("/data.pkl")] if "/" in name else ""
    with archive.open(name) as f:
      return _RestrictedUnpickler(f, archive, root).load()
