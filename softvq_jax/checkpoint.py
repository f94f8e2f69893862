"""Checkpoint files: converted parameter directories (and, later, training checkpoints).

A parameter directory holds ``config.json``, ``params/`` (an Orbax PyTree
checkpoint, one zarr array per parameter) and any extra JSON files. It is
written into a temporary sibling and renamed into place, so a reader never
sees a half-written directory and an existing directory is replaced only when
asked to, after the new one is complete.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
import uuid
from typing import Any, Callable, Iterator, Mapping

from absl import logging
import jax
import numpy as np

from softvq_jax.utils import errors
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
  fs.remove_dead_writers_temps(out_dir)  # a converter killed earlier left its folder
  tmp = tempfile.mkdtemp(prefix=os.path.basename(fs.temp_sibling(out_dir)) + "-", dir=parent)
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


# The extra JSON files that write_param_dir's callers add (the converter's report).
_EXTRA_JSON = ("conversion.json",)


def write_param_dir(out_dir: str, flat_params: Mapping[Path, np.ndarray], config: Mapping[str, Any],
                    *, extra_json: Mapping[str, Any] | None = None, overwrite: bool = False) -> str:
  """Writes ``config.json`` + Orbax ``params/`` (+ extra JSON files) atomically.

  A bucket URL (``gs://...``) is written to a local temporary folder first and
  then uploaded with ``config.json`` last: readers require it, so they never load
  a partial upload. Replacing a folder on a bucket cannot be atomic (no rename):
  the new folder is uploaded beside it (``OUT.incoming-XXXXXXXX``), the old one is
  deleted (``config.json`` first) and the new one copied into its place, so a run
  that dies leaves a whole copy, old or new, on the bucket.
  """
  if overwrite and fs.exists(out_dir) and not fs.isdir(out_dir):
    raise FileExistsError(f"refusing to overwrite {out_dir}: it is a file, not an earlier "
                          "output of this writer (a folder); choose another path")
  if overwrite and fs.isdir(out_dir):
    # Only an earlier output of this writer is replaced, never a folder holding anything
    # else (e.g. the very checkpoint being converted).
    names = fs.listdir(out_dir)
    # The writer's outputs always hold params/ (a bucket upload that died, or a replacement
    # cut short, may have lost config.json, which goes up last and is deleted first): a
    # config.json or JSON report without it was written by someone else.
    ours = ({_CONFIG, _PARAMS} | set(_EXTRA_JSON) | set(extra_json or ())
            if _PARAMS in names else set())
    foreign = [name for name in names if name not in ours]
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
      if not fs.exists(out_dir):
        fs.upload_tree(staged, out_dir, last=_CONFIG)
        return out_dir
      # A bucket has no rename. The new folder goes up beside the old one first, so that
      # a whole copy is on the bucket at every moment, whenever the process dies.
      incoming = f"{out_dir.rstrip('/')}.incoming-{uuid.uuid4().hex[:8]}"
      fs.upload_tree(staged, incoming, last=_CONFIG)
      logging.info("Replacing %s with the new copy uploaded to %s", out_dir, incoming)
      # The old folder's config.json goes first, so no reader loads it while its params
      # are deleted; the copy brings the new config.json last.
      if fs.exists(f"{out_dir}/{_CONFIG}"):
        fs.remove(f"{out_dir}/{_CONFIG}")
      fs.rmtree(out_dir)
      fs.copy_tree(incoming, out_dir, fs.tree_files(staged, last=_CONFIG))
      fs.rmtree(incoming)
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


def read_config(directory: str, family: str | None = None) -> dict[str, Any]:
  """``config.json`` of a model directory; ``family`` ("tokenizer" | "generator") is checked."""
  path = os.path.join(directory, _CONFIG)
  if not fs.isfile(path):
    # A trainer's workdir holds its export one level down (tokenizer/, generator/).
    inside = [name for name in ("tokenizer", "generator")
              if fs.isfile(os.path.join(directory, name, _CONFIG))]
    hint = (f"; it holds a trained model in {os.path.join(directory, inside[0])}, the "
            "trainer's export" if inside else "")
    raise CheckpointError(f"{directory} has no {_CONFIG}: not a converted checkpoint "
                          f"directory{hint}")
  with fs.open(path) as f:
    try:
      config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path} is not valid JSON: {e}") from e
  if family is not None and isinstance(config, dict):
    # A tokenizer's config names its ViTs and tokens; a generator's its transformer. One
    # with neither mark (a damaged config) is left to the config's own missing-field error.
    marks = {"tokenizer": ("encoder_model", "decoder_model", "num_latent_tokens",
                           "codebook_embed_dim"),
             "generator": ("hidden_size", "in_channels", "input_size", "class_dropout_prob")}
    held = [name for name, keys in marks.items() if any(k in config for k in keys)]
    held = held[0] if len(held) == 1 else family
    if held != family:
      raise CheckpointError(f"{directory} holds a {held}, not a {family}: load it with "
                            f"{held.capitalize()}.load")
  return config


def read_param_dir(directory: str, target: Mapping[Path, jax.ShapeDtypeStruct],
                   shardings: Mapping[Path, jax.sharding.Sharding] | None = None
                   ) -> dict[Path, jax.Array]:
  """Restores ``params/`` onto ``target``'s shapes (and shardings), checking names and shapes."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  params_dir = os.path.join(fs.abspath(directory), _PARAMS)
  if not fs.isdir(params_dir):
    raise CheckpointError(f"{directory} has no {_PARAMS}/ directory")
  # TensorStore's errors name a chunk key, not the damage: say which folder failed.
  damaged = lambda cause: (f"{params_dir}: reading the parameters failed, its files are "
                           f"damaged ({cause})")
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    with _orbax_read(damaged):
      meta = ckptr.metadata(params_dir)
    tree_meta = getattr(meta, "item_metadata", meta)
    tree_meta = getattr(tree_meta, "tree", tree_meta)
    if not isinstance(tree_meta, Mapping):
      # Our writer keeps one folder per parameter: name the ones that are gone.
      absent = [".".join(map(str, p)) for p in sorted(target, key=str)
                if not fs.isdir(os.path.join(params_dir, ".".join(map(str, p))))]
      if fs.exists(os.path.join(params_dir, "_METADATA")) and 0 < len(absent) < len(target):
        raise CheckpointError(f"{params_dir} is incomplete: the folders of "
                              f"{', '.join(absent[:10])}{', ...' if len(absent) > 10 else ''} "
                              "are missing")
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
    with _orbax_read(damaged):
      restored = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
          item=_nest({p: np.zeros((), np.float32) for p in target}),
          restore_args=_nest(restore_args)))
  return _flatten(restored)


@contextlib.contextmanager
def _orbax_read(describe: Callable[[str], str]):
  """Runs an Orbax read; its failure becomes a :class:`CheckpointError` with the message
  ``describe(innermost cause)``, and the late errors of the reads it abandoned stay quiet
  (see :func:`errors.drop_orphans_of_failed_restores`)."""
  errors.drop_orphans_of_failed_restores()
  try:
    yield
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    errors.restore_failed()
    raise CheckpointError(describe(errors.root_line(e))) from e


_DATA_ITEM = "data_per_process"


def _process_file() -> str:
  """This process's file among the per-process files of one item."""
  return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


@functools.cache
def _per_process_json():
  """An Orbax handler and its save/restore args for one JSON value per process.

  The data iterator's state differs between hosts (each reads its own shard and
  skips its own unreadable records), so each process writes and reads its own file.
  Restoring with another process count gives ``None``: the saved positions index
  shards that no longer exist.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  class PerProcessJsonHandler(ocp.CheckpointHandler):

    def save(self, directory, args):
      directory.mkdir(parents=True, exist_ok=True)
      path = directory / _process_file()
      path.write_text(json.dumps(args.item))

    def restore(self, directory, args=None):
      del args
      path = directory / _process_file()
      if not path.exists():
        saved = sorted(p.name for p in directory.iterdir() if p.name.startswith("process_"))
        logging.warning("The data iterator states in %s were saved by another number of "
                        "processes (%s) than this run, which wants %s: the data iterators start "
                        "afresh.", directory, ", ".join(saved) or "none", path.name)
        return None
      return json.loads(path.read_text())

    def metadata(self, directory):
      del directory
      return None

    def finalize(self, directory):
      del directory

    def close(self):
      pass

  @ocp.args.register_with_handler(PerProcessJsonHandler, for_save=True)
  @dataclasses.dataclass
  class PerProcessJsonSave(ocp.args.CheckpointArgs):
    item: Any

  @ocp.args.register_with_handler(PerProcessJsonHandler, for_restore=True)
  @dataclasses.dataclass
  class PerProcessJsonRestore(ocp.args.CheckpointArgs):
    pass

  return PerProcessJsonHandler, PerProcessJsonSave, PerProcessJsonRestore


def _state_handler():
  """Orbax's standard handler, saving replicated arrays without replica parallelism when
  this is the only process.

  Replica parallelism splits the writing of a replicated array among the devices that hold
  it, which spreads the bytes over hosts; within one process it only adds an eager slice
  per device and array, and a compilation per distinct slice (14 s of the first save of a
  tiny tokenizer's stage-1 state on 8 CPU devices).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  handler = ocp.StandardCheckpointHandler()
  if jax.process_count() > 1:
    return handler
  th = ocp.type_handlers
  array_handler = th.get_type_handler(jax.Array)
  serial = th.ArrayHandler(
      array_metadata_store=getattr(array_handler, "_array_metadata_store", None),
      use_replica_parallel=False)
  registry = th.create_type_handler_registry(
      *[(ty, th.get_type_handler(ty)) for ty in th.supported_types() if ty is not jax.Array],
      (jax.Array, serial))
  # StandardCheckpointHandler takes no registry; it delegates to this PyTree handler, made
  # as it makes its own, with the registry added.
  handler._impl = ocp.PyTreeCheckpointHandler(  # pylint: disable=protected-access
      save_concurrent_gb=96, restore_concurrent_gb=96, type_handler_registry=registry)
  return handler


class TrainCheckpointer:
  """Orbax ``CheckpointManager`` for training: the whole train state plus each process's
  data iterator state.

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
    # `data` is the single data state of checkpoints written before states were per process.
    handler, self._save_data, self._restore_data = _per_process_json()
    self._manager = ocp.CheckpointManager(
        directory, options=options,
        item_handlers={"state": _state_handler(), _DATA_ITEM: handler(),
                       "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def _reading(self, step: int):
    """Around each read of ``step``: a failure names the step (TensorStore names a chunk key
    and prints its whole specification) and the step a user can fall back to."""
    def damaged(cause: str) -> str:
      earlier = [s for s in self.all_steps() if s < step]
      advice = (f"; if its files are damaged, move {self.directory}/{step} out of the way to "
                f"resume from step {earlier[-1]}" if earlier else "")
      return f"step {step} of {self.directory} could not be read ({cause}){advice}"
    return _orbax_read(damaged)

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, *, data_state: Mapping[str, Any] | None = None,
           meta: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    ocp = self._ocp
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(dict(meta or {})),
        **{_DATA_ITEM: self._save_data(dict(data_state or {}))}), force=force)

  def restore(self, abstract_state, step: int | None = None):
    """Returns ``(state, data_state, meta)`` of ``step`` (default: the latest).

    ``data_state`` is this process's, or ``{}`` where none applies to it.
    """
    ocp = self._ocp
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    with self._reading(step):
      saved_items = set(self._manager.item_metadata(step).keys())
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    if _DATA_ITEM in saved_items:
      items[_DATA_ITEM] = self._restore_data()
    elif "data" in saved_items:  # written before data states were per process
      items["data"] = ocp.args.JsonRestore()
    with self._reading(step):
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    data_state = restored.get(_DATA_ITEM) or restored.get("data") or {}
    return restored["state"], dict(data_state), dict(restored["meta"] or {})

  def meta(self, step: int | None = None) -> dict[str, Any]:
    """The ``meta`` saved with ``step`` (default: the latest), without reading any array."""
    ocp = self._ocp
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    with self._reading(step):
      restored = self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))
    return dict(restored["meta"] or {})

  def state_paths(self, step: int | None = None) -> list[tuple[str, ...]]:
    """Key paths of the saved train state of ``step`` (default: the latest), read from the
    checkpoint's metadata without reading any array."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    with self._reading(step):
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
