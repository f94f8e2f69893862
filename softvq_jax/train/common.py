"""Pieces every trainer uses: mesh, optimizer, writer, checkpoint set-up, resume."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import optax
from absl import logging

from softvq_jax import config_lib
from softvq_jax import parallel
from softvq_jax.checkpoint import TrainCheckpointer
from softvq_jax.train import events
from softvq_jax.train import state as state_lib
from softvq_jax.transport import diffusion
from softvq_jax.transport import paths
from softvq_jax.utils import fs
from softvq_jax.utils.errors import JobError


# config.dtype -> the compute dtype the models take (None: float32 at HIGHEST precision).
COMPUTE_DTYPES = {"float32": None, "bfloat16": jax.numpy.bfloat16}
ENCODER_INITS = ("dinov2", "random", "scratch")  # "scratch" (MAETok) is "random"


def check_run_settings(config: ml_collections.ConfigDict, *, steps_from_epochs: bool = False
                       ) -> None:
  """Refuses, each by name and before anything is built, the settings no run can use.

  ``steps_from_epochs``: ``total_steps=0`` means "from ``total_epochs``" (the tokenizer
  recipes); elsewhere a run needs at least one step.
  """
  problems = []

  def lookup(name: str):
    """The value at a dotted ``name``, or ``missing`` where the config has no such field."""
    node = config
    for part in name.split("."):
      if not hasattr(node, "keys") or part not in node:
        return missing
      node = node[part]
    return node

  missing = object()

  def integer(name: str, minimum: int, meaning: str = "") -> None:
    value = lookup(name)
    problem = None if value is missing else config_lib.integer_problem(name, value, minimum,
                                                                       meaning)
    if problem:
      problems.append(problem)

  def one_of(name: str, allowed) -> None:
    value = lookup(name)
    if value is not missing and value not in allowed:
      problems.append(f"{name}={value!r} must be one of {tuple(allowed)}")

  integer("global_batch_size", 1)
  integer("log_every", 1)
  integer("ckpt_every", 1)
  integer("vis_every", 1)
  integer("sample_every", 0, " (0: no sample grids)")
  integer("eval_every", 0, " (0: no evaluation)")
  if steps_from_epochs:
    integer("total_steps", 0, " (0: from total_epochs)")
    if config.get("total_steps", 0) == 0 and "total_epochs" in config and not (
        isinstance(config.total_epochs, (int, float)) and config.total_epochs > 0):
      problems.append(f"total_epochs={config.total_epochs!r} must be positive when total_steps "
                      "is 0")
  else:
    integer("total_steps", 1)
  one_of("dtype", COMPUTE_DTYPES)
  if "ema_decay" in config and not (isinstance(config.ema_decay, (int, float))
                                    and 0.0 <= config.ema_decay <= 1.0):
    problems.append(f"ema_decay={config.ema_decay!r} must lie in [0, 1]")
  one_of("encoder_init", ENCODER_INITS)
  integer("sample.num", 1, " (the images of each sample grid)")
  integer("sample.num_steps", 1)
  integer("diffusion.num_steps", 1)
  one_of("transport.path", paths.PATHS)
  one_of("transport.weighting", paths.WEIGHTINGS)
  one_of("diffusion.noise_schedule", diffusion.SCHEDULES)
  integer("model.num_classes", 1)
  integer("data.num_classes", 1)
  problems += _mesh_problems(config.get("mesh", (("data", -1),)))
  if problems:
    raise JobError("invalid config: " + "; ".join(problems))


def _mesh_problems(mesh) -> list[str]:
  form = "a tuple of (axis name, size) pairs such as (('data', -1),)"
  if isinstance(mesh, str) or not isinstance(mesh, (tuple, list)) or not mesh:
    return [f"mesh={mesh!r} must be {form}"]
  for entry in mesh:
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)
            and isinstance(entry[1], int) and not isinstance(entry[1], bool)
            and (entry[1] > 0 or entry[1] == -1)):
      return [f"mesh entry {entry!r} must be (axis name, size) with size > 0 or -1; the mesh "
              f"is {form}"]
  names = [name for name, _ in mesh]
  if not set(names) & set(parallel.STANDARD_AXES):
    # The batch splits over these axes only: without one, every device computes all of it.
    return [f"mesh axes {names} include no batch axis {parallel.STANDARD_AXES}"]
  return []


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
    raise JobError(f"global_batch_size {global_batch_size} does not split over the "
                   f"{shards} batch shards of mesh {dict(mesh.shape)}")
  logging.info("Batch: global %d, per process %d, per device %d", global_batch_size,
               global_batch_size // jax.process_count(), global_batch_size // shards)


def warn_if_the_ema_stays_near_init(ema_decay: float, total_steps: int) -> float:
  """Warns when the exported (EMA) weights would be mostly the initial ones: their share
  after ``total_steps`` updates is ``ema_decay ** total_steps``, which is returned."""
  share = float(ema_decay) ** max(int(total_steps), 0)
  if share > 0.5:
    logging.warning(
        "ema_decay=%g over %d steps: %.0f%% of the EMA weights, which are the ones exported, "
        "are still the random initial ones; for a run this short set --config.ema_decay=%.3g "
        "(1%% left)", ema_decay, total_steps, 100 * share, 0.01 ** (1 / max(total_steps, 1)))
  return share


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
    raise JobError(f"optim.name must be 'adam' or 'adamw', got {name!r}")
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


RUN_CONFIG_META = "run_config"  # the checkpoint meta's copy of the job config that wrote it


def run_config_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The job config as the checkpoint meta keeps it (JSON; ``RUN_CONFIG_META``)."""
  return json.loads(config.to_json_best_effort())


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  flat = {}
  for key, value in tree.items():
    flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
  return flat


def warn_of_other_run_settings(checkpointer: TrainCheckpointer,
                               config: ml_collections.ConfigDict) -> list[str]:
  """Logs, as one warning, every job-config field of this run that differs from the run
  that wrote the checkpoint it resumes; returns those differences.

  Model settings are refused by ``check_resumable``; the rest (data, optimizer, schedule,
  step counts) may change on purpose, but a rerun that names another data folder or
  learning rate by mistake would otherwise continue silently on it. Checkpoints written
  before the config was recorded are not compared.
  """
  if checkpointer.latest_step() is None:
    return []
  stored = checkpointer.meta().get(RUN_CONFIG_META)
  if not isinstance(stored, dict):
    return []
  old, new = _flatten(stored), _flatten(run_config_record(config))
  shown = lambda fields, key: repr(fields[key]) if key in fields else "(absent)"
  diffs = [f"{key}: checkpoint {shown(old, key)}, this run {shown(new, key)}"
           for key in sorted(set(old) | set(new))
           if key not in old or key not in new or old[key] != new[key]]
  if diffs:
    logging.warning("Resuming step %d of %s with settings other than those of the run that "
                    "wrote it (the data iterator continues where it stopped; use a new workdir "
                    "to start over): %s", checkpointer.latest_step(), checkpointer.directory,
                    "; ".join(diffs))
  return diffs


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

  stored = checkpoint.read_config(directory, family="generator")
  kind = stored.get("kind", gen_config.kind)
  if kind != gen_config.kind:
    raise JobError(f"init_from={directory!r} holds a {kind}, this trainer trains a "
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
    raise JobError(f"init_from={directory!r} is another {kind}: " + "; ".join(differ))
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
