"""ArrayRecord files of msgpack-encoded dicts (numpy arrays, bytes, ints, strings).

ArrayRecord gives random access (what Grain's global shuffle needs) and reads
well from GCS; msgpack via ``flax.serialization`` keeps numpy dtypes and shapes
without TensorFlow. Files are written atomically: a temporary name, then a
rename, so a file under its final name is always complete.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flax import serialization

from softvq_jax.utils import fs

ARRAY_RECORD_OPTIONS = "group_size:1"  # one record per chunk: cheapest random access


def encode_record(record: Mapping[str, Any]) -> bytes:
  return serialization.msgpack_serialize(dict(record))


def decode_record(data: bytes) -> dict[str, Any]:
  return serialization.msgpack_restore(data)


def write_records(path: str, records: Iterable[Mapping[str, Any]]) -> int:
  """Writes ``records`` to ``path`` atomically; returns how many were written.

  A ``gs://`` path is written locally, then uploaded in one go: the object
  appears whole when the upload ends.
  """
  if fs.is_remote(path):
    with fs.staged_file(path) as local:
      return write_records(local, records)
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # Hidden, with host and pid: fs.remove_dead_writers_temps clears it after a kill.
  tmp = fs.temp_sibling(path)
  writer = array_record_module.ArrayRecordWriter(tmp, ARRAY_RECORD_OPTIONS)
  count = 0
  try:
    for record in records:
      writer.write(encode_record(record))
      count += 1
  except BaseException:
    writer.close()
    os.remove(tmp)
    raise
  writer.close()
  os.replace(tmp, path)
  return count


def num_records(path: str) -> int:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return reader.num_records()
  finally:
    reader.close()


def expand_paths(paths: str | Sequence[str]) -> list[str]:
  """A glob, a directory (all ``*.array_record`` in it) or a list of files -> sorted files."""
  if isinstance(paths, (str, os.PathLike)):
    paths = os.fspath(paths)
    if os.path.isdir(paths):
      found = sorted(glob.glob(os.path.join(glob.escape(paths), "*.array_record")))
      if not found:
        raise FileNotFoundError(f"no *.array_record files in directory {paths}")
      return found
    found = sorted(glob.glob(paths))
    if not found:
      raise FileNotFoundError(f"no ArrayRecord files match {paths}")
    return found
  out = [os.fspath(p) for p in paths]
  if not out:
    raise FileNotFoundError("empty list of ArrayRecord files")
  missing = [p for p in out if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f"ArrayRecord files not found: {', '.join(missing[:5])}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
  return out
