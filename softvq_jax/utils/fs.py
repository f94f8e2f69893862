"""Files of a workdir that is a local folder or a bucket URL such as ``gs://bucket/run``.

Local paths go through ``os`` and ``open`` exactly as before. URLs go through
``etils.epath`` (Cloud Storage through TensorFlow's file system or gcsfs). Object
stores have no rename and no append, so:

- ``write_bytes_atomic`` writes an object in one upload, which becomes visible
  whole or not at all (local files: temporary file, then rename);
- ``append_text`` on a URL rewrites the whole object with the new text added
  (metrics files are small and written every few hundred steps);
- ``upload_tree`` copies a finished local folder, ``config.json`` last, so a
  reader that requires it never sees a partial copy; ``copy_tree`` does the same
  within the bucket.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import shutil
import socket
import tempfile
from typing import IO, Any, Iterator


# Copies move data in pieces of this size, never a whole file at once.
_CHUNK_BYTES = 16 << 20


def is_remote(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


def _remote(path: str):
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path)


def abspath(path: str) -> str:
  """``os.path.abspath`` for local paths; URLs unchanged (abspath would turn one into a folder)."""
  return path if is_remote(path) else os.path.abspath(path)


def makedirs(path: str) -> None:
  if is_remote(path):
    _remote(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
  return _remote(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _remote(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  if is_remote(path):
    p = _remote(path)
    return p.exists() and not p.is_dir()
  return os.path.isfile(path)


def listdir(path: str) -> list[str]:
  """Names of the entries of a directory (local or bucket), sorted."""
  if is_remote(path):
    return sorted(p.name for p in _remote(path).iterdir())
  return sorted(os.listdir(path))


def rmtree(path: str) -> None:
  if is_remote(path):
    _remote(path).rmtree()
  else:
    shutil.rmtree(path)


def remove(path: str) -> None:
  """Deletes one file (local or bucket object)."""
  if is_remote(path):
    _remote(path).unlink()
  else:
    os.remove(path)


def open(path: str, mode: str = "r") -> IO[Any]:  # pylint: disable=redefined-builtin
  return _remote(path).open(mode) if is_remote(path) else builtins.open(path, mode)


def write_bytes_atomic(path: str, data: bytes) -> str:
  """Writes ``data`` to ``path`` so that readers see the old content or the new, never a part."""
  if is_remote(path):
    p = _remote(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return path
  with staged_file(path) as tmp, builtins.open(tmp, "wb") as f:
    f.write(data)
  return path


def write_json_atomic(path: str, payload: Any) -> str:
  text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
  return write_bytes_atomic(path, text.encode())


def temp_sibling(path: str) -> str:
  """A hidden name beside local ``path`` for this process to write before renaming it into
  place: hidden, so that no ``*.npz`` pattern takes a torn file for a result, and with host
  and pid, so that :func:`remove_dead_writers_temps` knows whose it is (several hosts may
  write beside each other on a shared file system)."""
  head, base = os.path.split(os.path.abspath(path))
  return os.path.join(head, f".{base}.tmp-{socket.gethostname()}-{os.getpid()}")


def remove_dead_writers_temps(path: str) -> None:
  """Deletes the :func:`temp_sibling` files and folders of ``path`` that killed processes of
  this host left behind (those of live processes and of other hosts stay)."""
  head, base = os.path.split(os.path.abspath(path))
  prefix = f".{base}.tmp-{socket.gethostname()}-"
  try:
    names = os.listdir(head)
  except FileNotFoundError:
    return
  for name in names:
    pid = name[len(prefix):].split(".")[0].split("-")[0] if name.startswith(prefix) else ""
    if pid.isdigit() and not _process_alive(int(pid)):
      stale = os.path.join(head, name)
      if os.path.isdir(stale):
        shutil.rmtree(stale, ignore_errors=True)
      else:
        with contextlib.suppress(FileNotFoundError):
          os.remove(stale)


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  return True


@contextlib.contextmanager
def staged_file(path: str, suffix: str = "") -> Iterator[str]:
  """Yields a local file name to write; when the block succeeds it becomes ``path``.

  Local: a temporary sibling renamed into place. URL: a local temporary file
  uploaded in one go (for large outputs such as an ADM sample batch, without
  holding them in memory). ``suffix`` keeps writers that add an extension
  (``np.savez`` adds ``.npz``) writing to the yielded name.
  """
  if not is_remote(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    remove_dead_writers_temps(path)
    tmp = temp_sibling(path) + suffix
    try:
      yield tmp
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    return
  with tempfile.TemporaryDirectory() as local:
    tmp = os.path.join(local, "staged" + suffix)
    yield tmp
    _stream_up(tmp, _remote(path))


def append_text(path: str, text: str) -> None:
  if not is_remote(path):
    with builtins.open(path, "a") as f:
      f.write(text)
    return
  p = _remote(path)
  old = p.read_text() if p.exists() else ""
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_text(old + text)


def download(path: str, local_path: str) -> str:
  """Copies the file at ``path`` (URL or local) to ``local_path`` atomically; returns it."""
  os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
  with staged_file(local_path) as tmp, open(path, "rb") as src, builtins.open(tmp, "wb") as dst:
    shutil.copyfileobj(src, dst, length=_CHUNK_BYTES)
  return local_path


def upload_tree(local_dir: str, remote_dir: str, *, last: str = "config.json") -> None:
  """Copies the files under ``local_dir`` to ``remote_dir``, the file named ``last`` last."""
  target = _remote(remote_dir)
  for rel in tree_files(local_dir, last=last):
    _stream_up(os.path.join(local_dir, rel), target / rel)


def tree_files(local_dir: str, *, last: str = "config.json") -> list[str]:
  """The files under a local folder, relative to it, in upload order: those in sub-folders,
  then the top-level files, ``last`` last. An upload cut short thus leaves a partial
  sub-folder (which an overwrite recognises as its own) before any lone top-level file."""
  files = []
  for root, _, names in os.walk(local_dir):
    for name in names:
      files.append(os.path.relpath(os.path.join(root, name), local_dir))
  return sorted(files, key=lambda rel: (rel == last, os.sep not in rel, rel))


def copy_tree(src_dir: str, dst_dir: str, files: list[str]) -> None:
  """Copies ``files`` (relative paths, in order) within a bucket by the store's own copy.

  The listing is the caller's (``tree_files`` of the local folder that was uploaded): a
  recursive listing of a bucket costs a request per folder.
  """
  src, target = _remote(src_dir), _remote(dst_dir)
  for rel in files:
    (target / rel).parent.mkdir(parents=True, exist_ok=True)
    (src / rel).copy(target / rel, overwrite=True)


def _stream_up(local_file: str, target) -> None:
  # Chunked, so a multi-GiB parameter file never sits in host memory whole.
  target.parent.mkdir(parents=True, exist_ok=True)
  with builtins.open(local_file, "rb") as src, target.open("wb") as dst:
    shutil.copyfileobj(src, dst, length=_CHUNK_BYTES)
