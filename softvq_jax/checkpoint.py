"""Checkpoint files: converted parameter directories (and, later, training checkpoints).

A parameter directory holds ``config.json``, ``params/`` (an Orbax PyTree
checkpoint, one zarr array per parameter) and any extra JSON files. It is
written into a temporary sibling and renamed into place, so a reader never
sees a half-written directory and an existing directory is replaced only when
asked to, after the new one is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from softvq_jax.utils import fs

Path = tuple

_PARAMS = "params"
_CONFIG = "config.json"


class CheckpointError(ValueError):
  pass


@contextlib.contextmanager
def atomic_directory(out_dir: str, *, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary directory that becomes ``out_dir`` when the block succeeds."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should not be
  try:
    yield tmp
    if os.path.exists(out_dir):
      # Keep the old directory until the new one is in place.
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
      os.rmdir(old)
      os.rename(out_dir, old)
      os.rename(tmp, out_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _nest(flat: Mapping[Path, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(str(key), {})
    node[str(path[-1])] = value
  return tree


def _flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
  flat = {}
  for key, value in tree.items():
    key = int(key) if isinstance(key, str) and key.isdigit() else key
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def _make_reproducible(params_dir: str) -> None:
  """Drops the wall-clock and path details Orbax records, so equal inputs give equal files."""
  meta_path = os.path.join(params_dir, "_CHECKPOINT_METADATA")
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    for key in ("init_timestamp_nsecs", "commit_timestamp_nsecs"):
      if key in meta:
        meta[key] = 0
    with open(meta_path, "w") as f:
      json.dump(meta, f, sort_keys=True)
  success = os.path.join(params_dir, "commit_success.txt")
  if os.path.exists(success):
    with open(success, "w") as f:
      f.write("Checkpoint commit was successful\n")


def write_param_dir(out_dir: str, flat_params: Mapping[Path, np.ndarray], config: Mapping[str, Any],
                    *, extra_json: Mapping[str, Any] | None = None, overwrite: bool = False) -> str:
  """Writes ``config.json`` + Orbax ``params/`` (+ extra JSON files) atomically.

  A bucket URL (``gs://...``) is written to a local temporary folder first and
  then uploaded with ``config.json`` last: readers require it, so they never load
  a partial upload.
  """
  if overwrite and fs.isdir(out_dir):
    # Only an earlier output of this writer is replaced, never a folder holding anything
    # else (e.g. the very checkpoint being converted).
    names = fs.listdir(out_dir)
    earlier_output = {_CONFIG, _PARAMS} <= set(names)
    foreign = [name for name in names
               if not (name in (_CONFIG, _PARAMS) or (earlier_output and name.endswith(".json")))]
    if foreign:
      raise FileExistsError(f"refusing to overwrite {out_dir}: it holds files this writer "
                            f"did not make ({', '.join(foreign[:5])}"
                            f"{', ...' if len(foreign) > 5 else ''}); choose another folder")
  if fs.is_remote(out_dir):
    if fs.exists(out_dir) and not overwrite:
      raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to "
                            "replace it")
    with tempfile.TemporaryDirectory() as local:
      staged = write_param_dir(os.path.join(local, "out"), flat_params, config,
                               extra_json=extra_json)
      if fs.exists(out_dir):
        fs.rmtree(out_dir)
      fs.upload_tree(staged, out_dir, last=_CONFIG)
    return out_dir
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  with atomic_directory(out_dir, overwrite=overwrite) as tmp:
    tree = _nest({p: np.asarray(v) for p, v in flat_params.items()})
    params_dir = os.path.join(tmp, _PARAMS)
    # Host-local arrays written by this process alone: no barrier with the other processes
    # (in a multi-host job one process exports while the others go on or exit).
    import jax  # pylint: disable=g-import-not-at-top
    solo = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                              active_processes={jax.process_index()},
                                              barrier_sync_key_prefix=f"solo{jax.process_index()}")
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, multiprocessing_options=solo)
    with ocp.Checkpointer(handler, multiprocessing_options=solo) as ckptr:
      ckptr.save(params_dir, args=ocp.args.PyTreeSave(tree))
    _make_reproducible(params_dir)
    _write_json(os.path.join(tmp, _CONFIG), config)
    for name, payload in (extra_json or {}).items():
      _write_json(os.path.join(tmp, name), payload)
  return os.path.abspath(out_dir)


def _write_json(path: str, payload: Any) -> None:
  with open(path, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
    f.write("\n")


def read_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, _CONFIG)
  if not fs.isfile(path):
    raise CheckpointError(f"{directory} has no {_CONFIG}: not a converted checkpoint directory")
  with fs.open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def read_param_dir(directory: str, target: Mapping[Path, jax.ShapeDtypeStruct],
                   shardings: Mapping[Path, jax.sharding.Sharding] | None = None
                   ) -> dict[Path, jax.Array]:
  """Restores ``params/`` onto ``target``'s shapes (and shardings), checking names and shapes."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  params_dir = os.path.join(fs.abspath(directory), _PARAMS)
  if not fs.isdir(params_dir):
    raise CheckpointError(f"{directory} has no {_PARAMS}/ directory")
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    meta = ckptr.metadata(params_dir)
    tree_meta = getattr(meta, "item_metadata", meta)
    tree_meta = getattr(tree_meta, "tree", tree_meta)
    if not isinstance(tree_meta, Mapping):
      raise CheckpointError(f"{params_dir} holds no Orbax checkpoint metadata: an incomplete "
                            "or foreign params/ directory")
    stored = _flatten(tree_meta)
    problems = []
    for path in sorted(set(target) - set(stored), key=str):
      problems.append(f"missing parameter {'.'.join(map(str, path))}")
    for path in sorted(set(stored) - set(target), key=str):
      problems.append(f"unexpected parameter {'.'.join(map(str, path))}")
    for path in sorted(set(stored) & set(target), key=str):
      shape = tuple(getattr(stored[path], "shape", ()))
      if shape != tuple(target[path].shape):
        problems.append(f"parameter {'.'.join(map(str, path))} has shape {shape}, "
                        f"the model needs {tuple(target[path].shape)}")
    if problems:
      raise CheckpointError(f"{params_dir} does not match the model:\n  " + "\n  ".join(problems))
    restore_args = {}
    for path, spec in target.items():
      sharding = (shardings or {}).get(path)
      if sharding is None:
        # This process's own device: in a multi-process job jax.devices()[0] is process 0's.
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      restore_args[path] = ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(spec.shape),
                                                dtype=spec.dtype)
    restored = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
        item=_nest({p: np.zeros((), np.float32) for p in target}),
        restore_args=_nest(restore_args)))
  return _flatten(restored)


class TrainCheckpointer:
  """Orbax ``CheckpointManager`` for training: the whole train state plus the data iterator.

  Saves are asynchronous and atomic (Orbax finalises a step directory only when
  every file is written), the newest ``keep`` steps are kept, and restoring
  onto abstract arrays with shardings places each shard where the current mesh
  wants it, whatever mesh wrote it.
  """

  def __init__(self, directory: str, *, keep: int = 3, asynchronous: bool = True):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.directory = directory
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=asynchronous)
    # Handlers named up front, so that a fresh manager can read a step's metadata
    # (state_paths) before anything is saved or restored through it.
    self._manager = ocp.CheckpointManager(
        directory, options=options,
        item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                           data=ocp.JsonCheckpointHandler(), meta=ocp.JsonCheckpointHandler()))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, *, data_state: Mapping[str, Any] | None = None,
           meta: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    ocp = self._ocp
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(dict(data_state or {})),
        meta=ocp.args.JsonSave(dict(meta or {}))), force=force)

  def restore(self, abstract_state, step: int | None = None):
    """Returns ``(state, data_state, meta)`` of ``step`` (default: the latest)."""
    ocp = self._ocp
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["data"] or {}), dict(restored["meta"] or {})

  def meta(self, step: int | None = None) -> dict[str, Any]:
    """The ``meta`` saved with ``step`` (default: the latest), without reading any array."""
    ocp = self._ocp
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"] or {})

  def state_paths(self, step: int | None = None) -> list[tuple[str, ...]]:
    """Key paths of the saved train state of ``step`` (default: the latest), read from the
    checkpoint's metadata without reading any array."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    tree = self._manager.item_metadata(step)["state"]
    tree = getattr(tree, "tree", tree)
    return [tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
