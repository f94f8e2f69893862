"""Moving arrays between flat ``{path: array}`` dicts and NNX models."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx


def model_from_flat(abstract: nnx.Module, flat: Mapping[tuple, Any]) -> nnx.Module:
  """``abstract`` (from ``nnx.eval_shape``) with its variables replaced by ``flat``."""
  graphdef, state = nnx.split(abstract)
  pure: dict = {}
  for path, value in flat.items():
    node = pure
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value if isinstance(value, jax.Array) else jnp.asarray(value)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def flat_arrays(state) -> dict[tuple, Any]:
  """``{path: array}`` of an ``nnx.State`` (or of a module's state)."""
  if isinstance(state, nnx.Module):
    state = nnx.state(state)
  return {tuple(p): v.get_value() for p, v in nnx.to_flat_state(state)}
