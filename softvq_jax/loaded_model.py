"""What ``Tokenizer`` and ``Generator`` share: a model's weights and config, run in a compute dtype.

Subclasses name their config and module classes and the functions that build an
abstract model and one from flat arrays; loading, saving and the cast copy of
the weights that the compiled programs read live here once.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from softvq_jax import checkpoint, parallel
from softvq_jax.models import layers

Path = tuple
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype: Any):
  """``"bfloat16"`` or ``jnp.bfloat16`` -> ``jnp.bfloat16``; anything else is named in the error."""
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]
  dtype = jnp.dtype(dtype)
  if dtype.name not in _DTYPES:
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype.name}")
  return _DTYPES[dtype.name]


def _replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


class LoadedModel:
  """Weights, config, mesh and compute dtype of one model; subclasses add its programs.

  Subclasses set:
    config_class: the config dataclass (``from_json_dict``/``to_json_dict``).
    module_class: the NNX module, built as ``module_class(config, rngs=...)``.
    abstract: ``(config, dtype) ->`` the module with ``ShapeDtypeStruct`` leaves.
    stored_shapes: ``config ->`` every array ``save`` writes, by NNX path.
    build: ``(config, flat) ->`` the module whose arrays are ``flat``.
    saved_filter: the NNX filter of the variables ``save`` writes.
  """

  config_class: type
  family: str  # "tokenizer" | "generator", what load() accepts
  module_class: type
  abstract: Callable[[Any, Any], nnx.Module]
  stored_shapes: Callable[[Any], dict[Path, jax.ShapeDtypeStruct]]
  build: Callable[[Any, Mapping[Path, Any]], nnx.Module]
  saved_filter: Any = nnx.Param

  def __init__(self, model: nnx.Module, *, dtype: Any = "float32",
               mesh: jax.sharding.Mesh | None = None, data_axis: str | tuple[str, ...] = "data"):
    self.config = model.config
    self.dtype = resolve_dtype(dtype)
    # Auto axes: the programs place batches with NamedSharding and let XLA propagate.
    self.mesh = parallel.auto_mesh(mesh) if mesh is not None else None
    self.data_axis = data_axis
    if mesh is not None:
      missing = [a for a in (data_axis if isinstance(data_axis, tuple) else (data_axis,))
                 if a not in mesh.shape]
      if missing:
        raise ValueError(f"the mesh has no axis {', '.join(map(repr, missing))} to split batches "
                         f"over (its axes: {', '.join(mesh.axis_names)}); pass data_axis=")
    # The graph of a model built for the compute dtype, with the given weights.
    compute_model = self.abstract(self.config, self.dtype)
    self.graphdef, _ = nnx.split(compute_model)
    state = nnx.state(model)
    if self.mesh is not None:
      state = jax.device_put(state, _replicated(self.mesh))
    self.state = state
    # What the compiled programs run: on GPUs in low precision, the model rewritten into
    # the inference forms (layers.INFERENCE_FORMS), made once here; and the matmul weights
    # already in the compute dtype (same results, fewer kernels per call). ``graphdef``
    # and ``state`` keep the model as loaded, for ``model`` and ``save``.
    self._compute_graphdef, self._compute_state = layers.split_for_inference(
        nnx.merge(self.graphdef, state), self.dtype)
    # The programs take these arrays as a list: jit flattens its arguments on every call,
    # and a state of NNX variables costs host time per array (SoftVQ-B-64's 357 arrays:
    # 3.4 ms per encode call as variables, 0.6 ms as a list, on a 2-core host).
    self._compute_leaves, self._compute_treedef = jax.tree.flatten(self._compute_state)

  def _program(self, fn: Callable, *static, **jit_kwargs):
    """``jax.jit`` of ``fn(compute_graphdef, *static, compute_state, *args)`` that is called
    as ``program(self._compute_leaves, *args)``."""
    graphdef, treedef = self._compute_graphdef, self._compute_treedef

    def on_leaves(leaves, *args):
      return fn(graphdef, *static, jax.tree.unflatten(treedef, leaves), *args)

    return jax.jit(on_leaves, **jit_kwargs)

  @staticmethod
  def _trim(out: jax.Array, n: int) -> jax.Array:
    """Drops the padding rows that sharding the batch added (no slicing op when none)."""
    # The mesh has Auto axes, so slicing a batch-sharded array is allowed.
    return out if out.shape[0] == n else out[:n]

  @classmethod
  def load(cls, directory: str, **kwargs):
    """Loads a directory written by ``save`` or by ``python -m softvq_jax.convert``."""
    config = cls.config_class.from_json_dict(checkpoint.read_config(directory, family=cls.family))
    target = cls.stored_shapes(config)
    shardings = None
    if kwargs.get("mesh") is not None:
      replicated = _replicated(parallel.auto_mesh(kwargs["mesh"]))
      shardings = {p: replicated for p in target}
    flat = checkpoint.read_param_dir(directory, target, shardings)
    return cls(cls.build(config, flat), **kwargs)

  @classmethod
  def random(cls, config, *, seed: int = 0, **kwargs):
    """A freshly initialised model (tests, demos, training from scratch)."""
    if not isinstance(config, cls.config_class):
      config = cls.config_class.from_json_dict(config)
    return cls(cls.module_class(config, rngs=nnx.Rngs(seed)), **kwargs)

  def save(self, directory: str, *, overwrite: bool = False) -> str:
    """Writes ``config.json`` + ``params/`` (float32), loadable with ``load``."""
    flat = {tuple(p): np.asarray(jax.device_get(v.get_value()))
            for p, v in nnx.to_flat_state(nnx.state(self.model(), self.saved_filter))}
    return checkpoint.write_param_dir(directory, flat, self.config.to_json_dict(),
                                      overwrite=overwrite)

  def model(self) -> nnx.Module:
    """The NNX model (compute dtype of this object) holding the float32 weights."""
    return nnx.merge(self.graphdef, self.state)

  @property
  def latent_shape(self) -> tuple[int, int]:
    return self.config.latent_shape

