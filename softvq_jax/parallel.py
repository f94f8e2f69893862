"""Meshes and shardings.

Our models are written for JAX's automatic (GSPMD) sharding propagation:
shardings are placed on inputs and parameters, and XLA propagates them
through reshapes and einsums. ``jax.make_mesh`` creates meshes with
*explicit* axes by default, under which every reshape of a sharded axis must
name its output sharding; ``auto_mesh`` gives the same devices with automatic
axes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import re
from typing import Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh


def auto_mesh(mesh: Mesh) -> Mesh:
  """``mesh`` with every axis of type ``Auto``."""
  if all(t == AxisType.Auto for t in mesh.axis_types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def create_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh from ``[(name, size), ...]``; one size may be -1 to take the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  names = [name for name, _ in axes]
  sizes = [size for _, size in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {axes}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot be split into mesh {axes}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(names, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"have {len(devices)}")
  return jax.make_mesh(tuple(sizes), tuple(names), axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


STRATEGIES = ("dp", "fsdp")

# Mesh axes every preset may name. A mesh without one of them behaves as if it had it with
# size 1, so the presets work on any of our meshes; any other mesh axis a rule names must exist.
STANDARD_AXES = ("data", "fsdp")

LogicalNames = tuple  # one logical axis name (str) or None per array dimension


def _block_rules(entries) -> tuple[tuple[str, LogicalNames], ...]:
  """Rules for a transformer block's parameters, in the loop layout (``blocks/3/...``) and
  the scanned layout (``blocks/...`` with a leading ``layers`` axis)."""
  rules = []
  for suffix, names in entries:
    rules.append((rf"(?:.*/)?blocks/\d+/{suffix}", names))
    rules.append((rf"(?:.*/)?blocks/{suffix}", ("layers",) + names))
  return tuple(rules)


# The logical axes of our transformer blocks (SiT/DiT, and the ViTs, whose names mirror timm).
# ``embed`` is the residual width; ``qkv``/``mlp``/``modulation`` the wide outputs of the fused
# attention input, the MLP and adaLN; ``heads`` the attention output entering ``proj``.
BLOCK_SHARDING_RULES = _block_rules([
    (r"attn/qkv/kernel", ("embed", "qkv")),
    (r"attn/qkv/bias", ("qkv",)),
    (r"attn/proj/kernel", ("heads", "embed")),
    (r"attn/proj/bias", ("embed",)),
    (r"mlp/fc1/kernel", ("embed", "mlp")),
    (r"mlp/fc1/bias", ("mlp",)),
    (r"mlp/fc2/kernel", ("mlp", "embed")),
    (r"mlp/fc2/bias", ("embed",)),
    (r"adaLN_modulation/1/kernel", ("embed", "modulation")),
    (r"adaLN_modulation/1/bias", ("modulation",)),
    # Per-head q/k LayerNorms (head_dim wide): too small to be worth splitting, and the
    # fsdp shape fallback would otherwise split them.
    (r"attn/[qk]_norm/(?:scale|bias)", (None,)),
])

_DP_AXES = (("batch", ("data", "fsdp")), ("length", None), ("act_embed", None),
            ("layers", None), ("embed", None), ("qkv", None), ("heads", None), ("mlp", None),
            ("modulation", None))
# FSDP (ZeRO-3): every block matrix split over ``fsdp`` along its wide dimension, which for
# these blocks is the dimension the shape rule (the fallback) picks too.
_FSDP_AXES = (("batch", ("data", "fsdp")), ("length", None), ("act_embed", None),
              ("layers", None), ("embed", None), ("qkv", "fsdp"), ("heads", "fsdp"),
              ("mlp", "fsdp"), ("modulation", "fsdp"))


def _as_axes(value, where: str) -> tuple[str, ...]:
  if value is None:
    return ()
  if isinstance(value, str):
    return (value,)
  if isinstance(value, (tuple, list)) and all(isinstance(a, str) for a in value):
    return tuple(value)
  raise ValueError(f"{where}: mesh axes must be None, a name or a tuple of names, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Regex -> logical axes -> mesh axes (big_vision's regex rules, MaxText's logical rules).

  ``param_rules``: ordered ``(regex, logical_names)``; the first regex that fully matches a
  parameter's path (``blocks/3/attn/qkv/kernel``, relative to the model) gives one logical
  name (or None) per dimension. ``logical_axis_rules``: ``(logical_name, mesh_axes)`` with
  mesh_axes None (replicated), an axis name or a tuple of names; the first entry of a name
  wins. Paths no regex matches use ``fallback``: ``"fsdp"`` (the largest dimension the
  ``fsdp`` axis divides) or ``"replicate"``. A mesh axis whose size does not divide a
  dimension leaves that dimension replicated (logged).
  """

  name: str
  param_rules: tuple = ()
  logical_axis_rules: tuple = ()
  fallback: str = "replicate"

  def __post_init__(self):
    if self.fallback not in ("fsdp", "replicate"):
      raise ValueError(f"fallback must be 'fsdp' or 'replicate', got {self.fallback!r}")
    logical = {}
    for entry in self.logical_axis_rules:
      if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
        raise ValueError(f"logical_axis_rules entries are (logical_name, mesh_axes), got {entry!r}")
      logical.setdefault(entry[0], _as_axes(entry[1], f"logical axis {entry[0]!r}"))
    object.__setattr__(self, "_logical", logical)
    compiled = []
    for entry in self.param_rules:
      if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
        raise ValueError(f"sharding_rules entries are (regex, logical_names), got {entry!r}")
      pattern, names = entry
      names = (names,) if isinstance(names, str) or names is None else tuple(names)
      try:
        regex = re.compile(pattern)
      except re.error as e:
        raise ValueError(f"sharding rule {pattern!r} is not a valid regex: {e}") from e
      for n in names:
        if n is not None and not isinstance(n, str):
          raise ValueError(f"sharding rule {pattern!r}: logical names must be strings or None, "
                           f"got {n!r}")
        if n is not None and n not in logical:
          raise ValueError(f"sharding rule {pattern!r} uses unknown logical axis {n!r}; "
                           f"logical_axis_rules define {sorted(logical)}")
      compiled.append((regex, names))
    object.__setattr__(self, "_compiled", tuple(compiled))

  def mesh_axes(self, logical_name: str) -> tuple[str, ...]:
    if logical_name not in self._logical:
      raise ValueError(f"unknown logical axis {logical_name!r}; logical_axis_rules define "
                       f"{sorted(self._logical)}")
    return self._logical[logical_name]

  def check_mesh(self, mesh) -> None:
    """Every mesh axis the rules name exists in ``mesh`` (``data``/``fsdp`` may be absent)."""
    for name, axes in self._logical.items():
      for axis in axes:
        if axis not in mesh.axis_names and axis not in STANDARD_AXES:
          raise ValueError(f"logical axis {name!r} maps to mesh axis {axis!r}, which mesh "
                           f"{dict(mesh.shape)} does not have")

  def match(self, path: str):
    """``(regex, logical_names)`` of the first rule matching ``path``, or None."""
    for regex, names in self._compiled:
      if regex.fullmatch(path):
        return regex.pattern, names
    return None

  def spec(self, logical_names, shape: tuple[int, ...], mesh, *, what: str = "array",
           note=None) -> jax.sharding.PartitionSpec:
    """The PartitionSpec of an array whose dimensions have ``logical_names`` on ``mesh``."""
    logical_names = tuple(logical_names)
    if len(logical_names) != len(shape):
      raise ValueError(f"{what}: {len(logical_names)} logical axes {logical_names} for an array "
                       f"of rank {len(shape)} (shape {tuple(shape)})")
    used: dict[str, int] = {}
    out = []
    for dim, (name, size) in enumerate(zip(logical_names, shape)):
      if name is None:
        out.append(None)
        continue
      axes = tuple(a for a in self.mesh_axes(name) if a in mesh.axis_names)
      for axis in axes:
        if axis in used:
          raise ValueError(f"{what}: mesh axis {axis!r} would split dimensions {used[axis]} and "
                           f"{dim} (logical axes {logical_names})")
      shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
      if shards == 1:
        out.append(None)
        continue
      if size % shards:
        (note or logging.info)(
            "%s: dimension %d (%s, size %d) is not divisible by mesh axes %s (%d shards); "
            "replicating it", what, dim, name, size, axes, shards)
        out.append(None)
        continue
      for axis in axes:
        used[axis] = dim
      out.append(axes[0] if len(axes) == 1 else axes)
    if all(o is None for o in out):
      return jax.sharding.PartitionSpec()
    return jax.sharding.PartitionSpec(*out)

  def param_spec(self, path: str, shape: tuple[int, ...], mesh) -> jax.sharding.PartitionSpec:
    """Spec of the parameter at ``path``: the first matching rule, else the fallback."""
    found = self.match(path)
    if found is None:
      if self.fallback == "fsdp":
        return param_spec(tuple(shape), mesh, "fsdp")
      return jax.sharding.PartitionSpec()
    pattern, names = found
    return self.spec(names, shape, mesh, what=f"{path} (rule {pattern!r})")


PRESETS = {
    "dp": ShardingRules("dp", BLOCK_SHARDING_RULES, _DP_AXES, "replicate"),
    "fsdp": ShardingRules("fsdp", BLOCK_SHARDING_RULES, _FSDP_AXES, "fsdp"),
}


def make_rules(strategy: str = "dp", sharding_rules=(), logical_axis_rules=()) -> ShardingRules:
  """A preset (``"dp"``/``"fsdp"``) with the config's own rules tried before the preset's.

  ``sharding_rules``: ``[(regex, logical_names), ...]``; ``logical_axis_rules``:
  ``[(logical_name, mesh_axes), ...]``; both are consulted first, then the preset's.
  """
  if strategy not in PRESETS:
    raise ValueError(f"sharding strategy must be one of {STRATEGIES}, got {strategy!r}")
  base = PRESETS[strategy]
  if not sharding_rules and not logical_axis_rules:
    return base
  return ShardingRules(f"{strategy}+config", tuple(tuple(r) for r in sharding_rules) +
                       base.param_rules,
                       tuple(tuple(r) for r in logical_axis_rules) + base.logical_axis_rules,
                       base.fallback)


def rules_from_config(config) -> ShardingRules:
  """``config.sharding`` (preset), ``config.sharding_rules``, ``config.logical_axis_rules``."""
  return make_rules(config.get("sharding", "dp"), config.get("sharding_rules", ()) or (),
                    config.get("logical_axis_rules", ()) or ())


def resolve_rules(strategy) -> ShardingRules:
  if isinstance(strategy, ShardingRules):
    return strategy
  return make_rules(strategy)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """Mesh axes the batch is split over: every data-like axis present."""
  return tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes(mesh)))


def param_spec(shape: tuple[int, ...], mesh: Mesh, strategy: str) -> jax.sharding.PartitionSpec:
  """The shape rule. ``dp``: replicated. ``fsdp``: the largest dimension divisible by the
  ``fsdp`` axis is split.

  It depends on the shape only; :class:`ShardingRules` uses it for paths no regex matches.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"sharding strategy must be one of {STRATEGIES}, got {strategy!r}")
  size = mesh.shape.get("fsdp", 1) if strategy == "fsdp" else 1
  if size == 1 or not shape:
    return jax.sharding.PartitionSpec()
  candidates = [i for i, d in enumerate(shape) if d % size == 0]
  if not candidates:
    return jax.sharding.PartitionSpec()
  dim = max(candidates, key=lambda i: (shape[i], -i))
  spec = [None] * len(shape)
  spec[dim] = "fsdp"
  return jax.sharding.PartitionSpec(*spec)


def _key_name(key) -> str:
  for attr in ("name", "key", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_parts(keypath) -> tuple[str, ...]:
  """``('blocks', '3', 'attn', 'qkv', 'kernel')`` of a JAX key path (NNX's ``.value`` dropped)."""
  parts = tuple(_key_name(k) for k in keypath)
  if parts and parts[-1] in ("value", "raw_value") and isinstance(
      keypath[-1], jax.tree_util.GetAttrKey):
    parts = parts[:-1]
  return parts


# Fields of a TrainState whose leaves mirror the parameters (or the other model variables).
_MODEL_FIELDS = ("params", "ema", "rest")


def state_specs(abstract_state, mesh: Mesh, strategy="dp"):
  """A PartitionSpec for every leaf of an abstract pytree (see :func:`state_shardings`)."""
  rules = resolve_rules(strategy)
  rules.check_mesh(mesh)
  params = getattr(abstract_state, "params", None)
  param_specs: dict[str, tuple] = {}
  if params is not None:
    for kp, leaf in jax.tree_util.tree_leaves_with_path(params):
      path = "/".join(path_parts(kp))
      param_specs[path] = (tuple(leaf.shape), rules.param_spec(path, tuple(leaf.shape), mesh))

  def leaf_spec(kp, leaf):
    shape = tuple(leaf.shape)
    parts = path_parts(kp)
    if params is not None and parts:
      parts = parts[1:] if parts[0] in _MODEL_FIELDS or parts[0] == "opt_state" else parts
      # Optimizer moments and EMA copies end with their parameter's path.
      for i in range(len(parts)):
        known = param_specs.get("/".join(parts[i:]))
        if known is not None and known[0] == shape:
          return known[1]
      if kp and _key_name(kp[0]) not in _MODEL_FIELDS:
        # Step, PRNG key, optimizer counters and leaves not shaped like a parameter.
        return param_spec(shape, mesh, "fsdp") if rules.fallback == "fsdp" else (
            jax.sharding.PartitionSpec())
    return rules.param_spec("/".join(parts), shape, mesh)

  return jax.tree_util.tree_map_with_path(leaf_spec, abstract_state)


def state_shardings(abstract_state, mesh: Mesh, strategy="dp"):
  """A NamedSharding for every leaf of an abstract pytree.

  ``strategy``: ``"dp"``, ``"fsdp"`` or a :class:`ShardingRules`. For a train state (a
  pytree with ``params``), rules match paths relative to the model (``blocks/0/mlp/fc1/
  kernel``); optimizer moments and EMA leaves get their parameter's sharding; other
  leaves (step, key, counters) use the fallback. For other pytrees, paths are from the root.
  """
  mesh = auto_mesh(mesh)
  specs = state_specs(abstract_state, mesh, strategy)
  return jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


# ------------------------------------------------------------------ activations
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("softvq_activation_sharding",
                                                         default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, strategy="dp"):
  """Within this block, :func:`constrain` (while tracing) places activations on ``mesh``."""
  rules = resolve_rules(strategy)
  rules.check_mesh(mesh)
  token = _ACTIVE.set((auto_mesh(mesh), rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def with_activation_sharding(fn, mesh: Mesh, strategy="dp"):
  """``fn`` (e.g. a jitted train step) traced under :func:`activation_sharding`."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with activation_sharding(mesh, strategy):
      return fn(*args, **kwargs)

  return wrapped


def constrain(x, logical_axes):
  """``with_sharding_constraint`` of ``x`` by logical axis names (e.g. ``("batch", None, None)``).

  Uses the mesh and rules of the enclosing :func:`activation_sharding`, or the ``dp``
  rules under ``jax.set_mesh``. A no-op outside ``jit`` and when no mesh is active, so
  models call it unconditionally.
  """
  if not isinstance(x, jax.core.Tracer):
    return x
  found = _active_mesh_and_rules()
  if found is None:
    return x
  mesh, rules, abstract = found
  spec = rules.spec(logical_axes, x.shape, mesh, what="activation", note=_quiet)
  return jax.lax.with_sharding_constraint(
      x, spec if abstract else jax.sharding.NamedSharding(mesh, spec))


def activation_placement(logical_axes, shape: tuple[int, ...]):
  """``(mesh, PartitionSpec)`` that :func:`constrain` would give an activation of ``shape``
  while tracing, or ``None`` when no mesh of more than one device is active. Custom kernels
  use it to run per device under ``shard_map``."""
  found = _active_mesh_and_rules()
  if found is None or found[0].size == 1:
    return None
  mesh, rules, _ = found
  return mesh, rules.spec(logical_axes, shape, mesh, what="activation", note=_quiet)


def per_device_rows(fn, x, *, rows: tuple = (), columns: tuple = (), per_example: tuple = ()):
  """``fn(x, *rows, *columns, *per_example)`` on each device's examples under an active mesh,
  for custom kernels (a ``pallas_call`` is opaque to the SPMD partitioner, which would
  gather it whole). ``x`` and ``rows`` are ``(B, T, D)`` activations, ``per_example``
  ``(B, ...)`` arrays, ``columns`` per-channel vectors (replicated); ``fn`` returns
  ``(B, T, ...)`` arrays. ``None`` (the caller takes another path) when the activation rules
  shard more than the batch axis, which a per-row kernel cannot follow."""
  args = (x,) + rows + columns + per_example
  placement = activation_placement(("batch", "length", "act_embed"), x.shape)
  if placement is None:
    return fn(*args)
  mesh, spec = placement
  spec = tuple(spec) + (None,) * (3 - len(tuple(spec)))
  if spec[1] is not None or spec[2] is not None:
    return None
  if spec[0] is None:
    return fn(*args)
  row_spec = jax.sharding.PartitionSpec(spec[0], None, None)
  example_spec = jax.sharding.PartitionSpec(spec[0], None)
  in_specs = ((row_spec,) * (1 + len(rows)) + (jax.sharding.PartitionSpec(),) * len(columns)
              + (example_spec,) * len(per_example))
  out_specs = jax.tree.map(lambda _: row_spec, jax.eval_shape(fn, *args))
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(*args)


def _active_mesh_and_rules():
  """``(mesh, rules, abstract)``: those of the enclosing :func:`activation_sharding`, else the
  ``jax.set_mesh`` mesh (abstract) with the ``dp`` rules; ``None`` without a mesh."""
  active = _ACTIVE.get()
  if active is not None:
    return active[0], active[1], False
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  return mesh, PRESETS["dp"], True


def _quiet(msg, *args):
  logging.log_first_n(logging.INFO, msg, 10, *args)


def global_batch(local_batch, mesh: Mesh):
  """Host-local numpy arrays -> global arrays split over the batch axes of ``mesh``."""
  sharding = batch_sharding(auto_mesh(mesh))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def pad_and_shard(arrays, mesh: Mesh, data_axis, axes=None):
  """Pads each array's batch axis to a multiple of the data shards and splits it over the mesh.

  Inference APIs accept any batch size: the padding repeats the last example and
  callers trim the outputs back to the returned original size.
  """
  axes = list(axes or [0] * len(arrays))
  n = arrays[0].shape[axes[0]]
  names = data_axis if isinstance(data_axis, tuple) else (data_axis,)
  shards = int(np.prod([mesh.shape[a] for a in names]))
  pad = (-n) % shards
  out = []
  for a, axis in zip(arrays, axes):
    a = jax.numpy.asarray(a)
    if pad:
      edge = jax.lax.slice_in_dim(a, n - 1, n, axis=axis)
      a = jax.numpy.concatenate([a, jax.numpy.repeat(edge, pad, axis=axis)], axis=axis)
    spec = [None] * a.ndim
    spec[axis] = data_axis
    out.append(jax.device_put(a, jax.sharding.NamedSharding(mesh,
                                                            jax.sharding.PartitionSpec(*spec))))
  return out, n


def to_host(x) -> np.ndarray:
  """``x`` in full as a NumPy array on every process.

  A global array over several processes cannot be read with ``np.asarray``: a replicated
  one is read from a local copy, a sharded one is gathered from every process.
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
