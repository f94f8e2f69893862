"""Reads PyTorch ``.pt``/``.bin``/``.pth`` checkpoints without torch and without running pickled code.

``torch.save`` writes a zip holding ``<root>/data.pkl`` (the object graph) and
``<root>/data/<n>`` (raw tensor storages); before torch 1.6 it wrote the legacy stream
(pickles, then the storages' bytes), which is read too. The unpickler below resolves only an
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


def _int_tuple(value, what: str) -> tuple[int, ...]:
  try:
    items = tuple(value)
  except TypeError:
    items = None
  if items is None or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
    raise TorchCheckpointError(f"tensor {what} {value!r} is not a sequence of integers")
  return items


def _rebuild_tensor(storage: np.ndarray, storage_offset: int, size, stride, *unused) -> np.ndarray:
  """The tensor ``size``/``stride`` view of ``storage`` from ``storage_offset``, copied.

  The file names the view: every element it reaches must lie inside the storage, so
  negative offsets and strides are refused (torch.save never writes them) rather than
  letting the view read memory outside the file's bytes.
  """
  if not isinstance(storage, np.ndarray):
    raise TorchCheckpointError(f"tensor storage is {type(storage).__name__}, not a storage")
  size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
  if (not isinstance(storage_offset, int) or isinstance(storage_offset, bool)
      or storage_offset < 0):
    raise TorchCheckpointError(f"tensor storage offset {storage_offset!r} is not an integer >= 0")
  if len(size) != len(stride):
    raise TorchCheckpointError(f"tensor size {size} and stride {stride} differ in length")
  if any(s < 0 for s in size) or any(st < 0 for st in stride):
    raise TorchCheckpointError(f"tensor size {size} or stride {stride} is negative")
  if any(s == 0 for s in size):
    return np.zeros(size, storage.dtype)
  needed = storage_offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1
  if needed > storage.size:
    raise TorchCheckpointError(f"tensor of size {size} runs past its storage ({storage.size} elements)")
  count = int(np.prod(size, dtype=np.int64)) if size else 1
  if count > storage.size:
    # Views whose elements overlap (expand(), stride 0) are legal in torch, but each would be
    # copied out in full here: a tiny file could ask for any amount of memory.
    raise TorchCheckpointError(f"tensor of size {size} and stride {stride} has more elements "
                               f"than its storage ({storage.size}): an overlapping view, not a "
                               "weight")
  if not size:
    return storage[storage_offset:storage_offset + 1].reshape(()).copy()
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
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
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
      if len(raw) % dtype.itemsize:
        raise TorchCheckpointError(f"storage {name} holds {len(raw)} bytes, not a whole number "
                                   f"of {dtype.name} elements: truncated or corrupt")
      self._storages[key] = np.frombuffer(raw, dtype=dtype)
    return self._storages[key]


# The legacy (before torch 1.6, or ``_use_new_zipfile_serialization=False``) format: five
# pickles in a row (magic number, protocol, system info, the object graph, the sorted storage
# keys), then each storage as an int64 element count and its raw bytes.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _PendingStorage:
  """A legacy storage named by the object graph, whose bytes come after it."""

  def __init__(self, key: str, dtype: np.dtype, view: tuple | None):
    self.key, self.dtype, self.view = key, dtype, view


class _PendingTensor:
  def __init__(self, storage: _PendingStorage, args: tuple):
    self.storage, self.args = storage, args


def _rebuild_tensor_or_pending(storage, *args):
  if isinstance(storage, _PendingStorage):
    return _PendingTensor(storage, args)
  return _rebuild_tensor(storage, *args)


class _PlainUnpickler(pickle.Unpickler):
  """The legacy header's pickles hold numbers, strings and dicts only."""

  def find_class(self, module: str, name: str):
    raise TorchCheckpointError(f"unexpected global {module}.{name} in a checkpoint header")


class _LegacyUnpickler(_RestrictedUnpickler):

  def __init__(self, file):
    super().__init__(file, None, "")
    self.storage_dtypes: dict[str, np.dtype] = {}  # by key, as the graph names them

  def find_class(self, module: str, name: str):
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
      return _rebuild_tensor_or_pending
    return super().find_class(module, name)

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
      raise TorchCheckpointError(f"unsupported persistent id in legacy checkpoint: {pid!r}")
    _, storage_type, key, _location, _numel, view = pid
    if isinstance(storage_type, _StorageType):
      dtype = storage_type.dtype
    elif isinstance(storage_type, _TorchDtype):
      dtype = np.dtype(_TORCH_DTYPES[storage_type.name])
    else:
      raise TorchCheckpointError(f"unsupported storage type {storage_type!r}")
    self.storage_dtypes.setdefault(str(key), dtype)
    return _PendingStorage(str(key), dtype, view)


def _resolve(obj: Any, storages: dict[str, np.ndarray]) -> Any:
  """``obj`` with every pending tensor built from ``storages``."""
  if isinstance(obj, _PendingTensor):
    pending = obj.storage
    if pending.key not in storages:
      raise TorchCheckpointError(f"legacy checkpoint is missing storage {pending.key}")
    data = storages[pending.key].view(pending.dtype)
    if pending.view is not None:  # (view key, element offset, element count)
      _, offset, count = pending.view
      data = data[offset:offset + count]
    return _rebuild_tensor(data, *obj.args)
  if isinstance(obj, dict):
    resolved = {k: _resolve(v, storages) for k, v in obj.items()}
    return type(obj)(resolved) if isinstance(obj, collections.OrderedDict) else resolved
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v, storages) for v in obj)
  if isinstance(obj, Opaque):
    obj.args = tuple(_resolve(v, storages) for v in obj.args)
    if hasattr(obj, "state"):
      obj.state = _resolve(obj.state, storages)
  return obj


def _load_legacy(path: str, f) -> Any:
  try:
    magic = _PlainUnpickler(f).load()
  except Exception as e:  # pylint: disable=broad-except  (arbitrary bytes fail in many ways)
    raise TorchCheckpointError(f"{path} is not a PyTorch checkpoint (neither a torch.save zip "
                               "nor the legacy format)") from e
  if magic != _LEGACY_MAGIC:
    raise TorchCheckpointError(f"{path} is not a PyTorch checkpoint (neither a torch.save zip "
                               "nor the legacy format)")
  try:
    protocol = _PlainUnpickler(f).load()
    if protocol != _LEGACY_PROTOCOL:
      raise TorchCheckpointError(f"{path}: legacy protocol {protocol} is not supported")
    info = _PlainUnpickler(f).load()
    if not info.get("little_endian", True):
      raise TorchCheckpointError(f"{path} was written big-endian; not supported")
    unpickler = _LegacyUnpickler(f)
    graph = unpickler.load()
    keys = _PlainUnpickler(f).load()
  except TorchCheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise TorchCheckpointError(f"{path}: truncated or corrupt legacy checkpoint ({e!r})") from e
  needed = unpickler.storage_dtypes
  storages: dict[str, np.ndarray] = {}
  for key in keys:
    header = f.read(8)
    if len(header) != 8:
      raise TorchCheckpointError(f"{path}: truncated at storage {key}")
    count = int(np.frombuffer(header, "<i8")[0])
    dtype = needed.get(str(key), np.dtype(np.uint8))
    raw = f.read(count * dtype.itemsize)
    if len(raw) != count * dtype.itemsize:
      raise TorchCheckpointError(f"{path}: truncated at storage {key}")
    storages[str(key)] = np.frombuffer(raw, dtype)
  return _resolve(graph, storages)


def load_torch_zip(path: str) -> Any:
  """Loads the object graph of a ``torch.save`` file (zip, or the legacy format of torch
  before 1.6); tensors become numpy arrays."""
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile:
    with open(path, "rb") as f:
      return _load_legacy(path, f)
  with archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pickles:
      raise TorchCheckpointError(f"{path} has no data.pkl: not a torch.save checkpoint")
    name = pickles[0]
    root = name[: -len("/data.pkl")] if "/" in name else ""
    with archive.open(name) as f:
      try:
        return _RestrictedUnpickler(f, archive, root).load()
      except TorchCheckpointError as e:
        raise TorchCheckpointError(f"{path}: {e}") from None
      except Exception as e:  # pylint: disable=broad-except  (arbitrary bytes fail in many ways)
        raise TorchCheckpointError(f"{path}: truncated or corrupt checkpoint ({e!r})") from e
