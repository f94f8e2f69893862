"""Meshes and shardings.

Our models are written for JAX's automatic (GSPMD) sharding propagation:
shardings are placed on inputs and parameters, and XLA propagates them
through reshapes and einsums. ``jax.make_mesh`` creates meshes with
*explicit* axes by default, under which every reshape of a sharded axis must
name its output sharding; ``auto_mesh`` gives the same devices with automatic
axes.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
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


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """Mesh axes the batch is split over: every data-like axis present."""
  return tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes(mesh)))


def param_spec(shape: tuple[int, ...], mesh: Mesh, strategy: str) -> jax.sharding.PartitionSpec:
  """``dp``: replicated. ``fsdp``: the largest dimension divisible by the ``fsdp`` axis is split.

  The rule depends on the shape only, so optimizer moments and EMA copies get
  the sharding of their parameter.
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


def state_shardings(abstract_state, mesh: Mesh, strategy: str = "dp"):
  """A NamedSharding for every leaf of an abstract pytree."""
  mesh = auto_mesh(mesh)
  return jax.tree.map(
      lambda leaf: jax.sharding.NamedSharding(mesh, param_spec(tuple(leaf.shape), mesh, strategy)),
      abstract_state)


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
