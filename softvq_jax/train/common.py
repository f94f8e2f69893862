"""Pieces every trainer uses: mesh, optimizer, writer, checkpoint set-up, resume."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import optax
from absl import logging

from softvq_jax import parallel
from softvq_jax.checkpoint import TrainCheckpointer
from softvq_jax.train import events
from softvq_jax.train import state as state_lib
from softvq_jax.utils import fs


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  axes = [tuple(a) for a in config.get("mesh", [("data", -1)])]
  mesh = parallel.create_mesh(axes)
  logging.info("Mesh %s over %d devices in %d process(es)", dict(mesh.shape), jax.device_count(),
               jax.process_count())
  return mesh


def check_batch(global_batch_size: int, mesh: jax.sharding.Mesh) -> None:
  shards = 1
  for axis in parallel.batch_axes(mesh):
    shards *= mesh.shape[axis]
  if global_batch_size % shards:
    raise ValueError(f"global_batch_size {global_batch_size} does not split over the "
                     f"{shards} batch shards of mesh {dict(mesh.shape)}")
  logging.info("Batch: global %d, per process %d, per device %d", global_batch_size,
               global_batch_size // jax.process_count(), global_batch_size // shards)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int):
  """Returns ``(tx, learning_rate_fn)``."""
  lr = optim.lr
  warmup = int(optim.get("warmup_steps", 0))
  if optim.get("schedule", "constant") == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=optim.get("warmup_lr", 0.0), peak_value=lr, warmup_steps=max(warmup, 1),
        decay_steps=max(total_steps, warmup + 1), end_value=optim.get("min_lr", 0.0))
  elif warmup:
    schedule = optax.linear_schedule(optim.get("warmup_lr", 0.0), lr, warmup)
  else:
    schedule = optax.constant_schedule(lr)
  name = optim.get("name", "adamw")
  if name == "adamw":
    base = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                       weight_decay=optim.get("weight_decay", 0.0))
  elif name == "adam":
    base = optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
  else:
    raise ValueError(f"optim.name must be 'adam' or 'adamw', got {name!r}")
  parts = []
  if optim.get("grad_clip"):
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts.append(base)
  return optax.chain(*parts), schedule


def make_writer(workdir: str, resumed_step: int = 0):
  """TensorBoard (process 0) and log writer. ``resumed_step``: the step restored from a
  checkpoint; earlier runs' events after it are removed first (they are logged again)."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  if jax.process_index() == 0 and resumed_step > 0:
    events.drop_events_after(workdir, resumed_step)
  return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)


def train_checkpointer(workdir: str, keep: int) -> TrainCheckpointer:
  return TrainCheckpointer(os.path.join(fs.abspath(workdir), "checkpoints"), keep=keep)


def check_resumable(checkpointer: TrainCheckpointer, current: dict[str, Any],
                    ignore: tuple[str, ...] = ()) -> None:
  """Refuses to resume a workdir whose checkpoint was written with other model settings:
  ``current`` maps names of the saved ``meta`` to this run's values (dicts compared field by
  field, ``ignore`` naming fields that may change between runs)."""
  if checkpointer.latest_step() is None:
    return
  stored = checkpointer.meta()
  # As the meta was saved: JSON (tuples are lists there).
  current = json.loads(json.dumps(current, default=str))
  diffs = []
  for name, value in current.items():
    if name not in stored:
      continue  # written before the field was recorded
    old = stored[name]
    if isinstance(value, dict) and isinstance(old, dict):
      # A field the checkpoint lacks was added to the config after it was written.
      for key in sorted(set(value) | set(old)):
        if key not in ignore and key in old and value.get(key) != old.get(key):
          diffs.append(f"{name}.{key}: checkpoint {old.get(key)!r}, this run {value.get(key)!r}")
    elif value != old:
      diffs.append(f"{name}: checkpoint {old!r}, this run {value!r}")
  if diffs:
    from softvq_jax.models.config import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(f"{checkpointer.directory} holds a run with other settings ("
                      + "; ".join(diffs) + "): resume with its settings or use a new workdir")


def init_or_restore(model_fn, tx, mesh, *, seed: int, strategy: str, workdir: str, keep: int,
                    data=None, checkpointer: TrainCheckpointer | None = None):
  """Restores the latest checkpoint of ``workdir`` if there is one, else initialises.

  Returns ``(graphdef, state, shardings, checkpointer)``.
  """
  checkpointer = checkpointer or train_checkpointer(workdir, keep)
  latest = checkpointer.latest_step()
  if latest is None:
    graphdef, state, shardings = state_lib.create_train_state(model_fn, tx, mesh, seed=seed,
                                                              strategy=strategy)
    logging.info("Initialised a new train state")
  else:
    from flax import nnx  # pylint: disable=g-import-not-at-top
    abstract, shardings = state_lib.abstract_train_state(model_fn, tx, mesh, seed=seed,
                                                         strategy=strategy)
    state, data_state, _ = checkpointer.restore(abstract, latest)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_fn(nnx.Rngs(0))))
    if data is not None and data_state:
      data.set_state(data_state)
    logging.info("Resumed from step %d of %s", latest, checkpointer.directory)
  return graphdef, state, shardings, checkpointer


def log_parameter_overview(state) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  leaves = jax.tree.leaves(state.params)
  total = sum(int(np.prod(l.shape)) for l in leaves)
  logging.info("Parameters: %d arrays, %s elements", len(leaves), f"{total:,}")


def sharding_rules(config: ml_collections.ConfigDict) -> parallel.ShardingRules:
  """The preset ``config.sharding`` with ``config.sharding_rules``/``logical_axis_rules`` first."""
  return parallel.rules_from_config(config)


def profile_options(config: ml_collections.ConfigDict) -> dict:
  """``train_loop`` keyword arguments of ``config.profile_steps`` (0 = off) and
  ``config.profile_first_step``."""
  return dict(profile_steps=int(config.get("profile_steps", 0) or 0),
              profile_first_step=int(config.get("profile_first_step", 10)))


def init_generator_from(state: state_lib.TrainState, directory: str, gen_config, *,
                        scan_layers: bool = False) -> state_lib.TrainState:
  """Parameters (and the fixed tables) of a generator directory in a fresh train state.

  ``directory``: written by ``Generator.save`` or the converter (loop layout); stacked
  when the model is scanned. The optimizer state stays fresh and the EMA starts at the
  loaded parameters. A tensor whose name or shape differs from the model's is an error
  that names it.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from softvq_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from softvq_jax import generator as generator_lib  # pylint: disable=g-import-not-at-top
  from softvq_jax.models import sit as sit_lib  # pylint: disable=g-import-not-at-top

  stored = checkpoint.read_config(directory)
  kind = stored.get("kind", gen_config.kind)
  if kind != gen_config.kind:
    raise ValueError(f"init_from={directory!r} holds a {kind}, this trainer trains a "
                     f"{gen_config.kind}")
  # Settings that change the function without changing any shape (heads at one width...).
  from softvq_jax.models.sit import GeneratorConfig  # pylint: disable=g-import-not-at-top
  try:
    theirs = GeneratorConfig.from_json_dict(stored).to_json_dict()
  except (KeyError, TypeError, ValueError):
    theirs = {}
  ours = gen_config.to_json_dict()
  differ = [f"{k}: {theirs[k]!r} there, {ours[k]!r} here" for k in ("num_heads", "mlp_ratio",
                                                                     "qk_norm", "patch_size")
            if k in theirs and k in ours and theirs[k] != ours[k]]
  if differ:
    raise ValueError(f"init_from={directory!r} is another {kind}: " + "; ".join(differ))
  try:
    flat = checkpoint.read_param_dir(directory, generator_lib.variable_shapes(gen_config))
  except checkpoint.CheckpointError as e:
    raise checkpoint.CheckpointError(
        f"init_from={directory!r} does not fit the configured {gen_config.kind} "
        f"(hidden {gen_config.hidden_size}, depth {gen_config.depth}, tokens "
        f"{gen_config.latent_shape}): {e}") from e
  flat = {p: np.asarray(v) for p, v in flat.items()}
  if scan_layers:
    flat = sit_lib.stack_layers(flat, gen_config.depth)
  by_name = {tuple(str(k) for k in p): v for p, v in flat.items()}
  used = set()

  def load(kp, old):
    name = parallel.path_parts(kp)
    if name not in by_name:
      raise checkpoint.CheckpointError(f"init_from={directory!r} has no tensor "
                                       f"{'.'.join(name)} {tuple(old.shape)}")
    value = by_name[name]
    if tuple(value.shape) != tuple(old.shape):
      raise checkpoint.CheckpointError(
          f"init_from={directory!r}: tensor {'.'.join(name)} has shape {tuple(value.shape)}, "
          f"the model needs {tuple(old.shape)}")
    used.add(name)
    return jax.device_put(jnp.asarray(value, old.dtype), old.sharding)

  params = jax.tree_util.tree_map_with_path(load, state.params)
  rest = jax.tree_util.tree_map_with_path(load, state.rest)
  ema = jax.tree_util.tree_map_with_path(load, state.ema)  # fresh buffers, same values
  unused = sorted(set(by_name) - used)
  if unused:
    raise checkpoint.CheckpointError(f"init_from={directory!r}: tensors the model does not "
                                     f"have: {['.'.join(n) for n in unused]}")
  logging.info("Initialised the %s parameters from %s (optimizer fresh, EMA = parameters)",
               gen_config.kind, directory)
  return state.replace(params=params, rest=rest, ema=ema)
