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
