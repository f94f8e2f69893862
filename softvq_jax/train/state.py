"""The train state and the pure, jitted train step shared by every trainer.

The model is split once into a graph definition and state; the state (model
parameters, other variables, optimizer state, EMA parameters, PRNG key and
step) is one pytree that is created already sharded, donated to each step
and checkpointed as a whole. The step merges the graph back inside ``jit``.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from softvq_jax import parallel

# loss_fn(model, batch, key, step) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[nnx.Module, Any, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State       # nnx.Param variables: what the optimizer updates
  rest: nnx.State         # every other variable (fixed tables, statistics)
  opt_state: Any
  ema: nnx.State          # exponential moving average of ``params``
  rng: jax.Array          # raw uint32 key: checkpointable as a plain array


def split_model(model: nnx.Module):
  return nnx.split(model, nnx.Param, ...)


def _init(model_fn: Callable[[nnx.Rngs], nnx.Module], tx: optax.GradientTransformation,
          seed: int) -> TrainState:
  key = jax.random.PRNGKey(seed)
  init_key, train_key = jax.random.split(key)
  model = model_fn(nnx.Rngs(params=init_key))
  _, params, rest = split_model(model)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                    opt_state=tx.init(params), ema=jax.tree.map(jnp.copy, params), rng=train_key)


def create_train_state(model_fn: Callable[[nnx.Rngs], nnx.Module], tx: optax.GradientTransformation,
                       mesh: jax.sharding.Mesh, *, seed: int, strategy: str = "dp"):
  """Builds the state directly in its sharded layout (no full copy on one device).

  Returns ``(graphdef, state, state_shardings)``.
  """
  abstract = jax.eval_shape(lambda: _init(model_fn, tx, seed))
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_fn(nnx.Rngs(0))))
  shardings = parallel.state_shardings(abstract, mesh, strategy)
  state = jax.jit(lambda: _init(model_fn, tx, seed), out_shardings=shardings)()
  return graphdef, state, shardings


def abstract_train_state(model_fn, tx, mesh, *, seed: int, strategy: str = "dp"):
  """Shapes, dtypes and shardings of the state, for restoring a checkpoint onto ``mesh``."""
  abstract = jax.eval_shape(lambda: _init(model_fn, tx, seed))
  shardings = parallel.state_shardings(abstract, mesh, strategy)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings), shardings


def compiled_memory(compiled) -> dict[str, int]:
  """XLA's memory analysis of a compiled program, per device, in bytes (empty where the
  backend gives none); ``per_device_total_bytes`` = arguments + outputs - aliased + temporaries
  + code."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return {}
  if m is None:
    return {}
  out = {}
  for name in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
               "temp_size_in_bytes", "generated_code_size_in_bytes"):
    if hasattr(m, name):
      out[name.replace("_in_bytes", "_bytes")] = int(getattr(m, name))
  if out:
    out["per_device_total_bytes"] = (out.get("argument_size_bytes", 0)
                                     + out.get("output_size_bytes", 0)
                                     - out.get("alias_size_bytes", 0)
                                     + out.get("temp_size_bytes", 0)
                                     + out.get("generated_code_size_bytes", 0))
  return out


def ema_update(ema: nnx.State, params: nnx.State, decay: float) -> nnx.State:
  return jax.tree.map(lambda e, p: e * decay + p.astype(e.dtype) * (1.0 - decay), ema, params)


def optimizer_step(tx: optax.GradientTransformation, grads, opt_state, params):
  """One update: ``(params, opt_state, {"grad_norm": ...})``.

  The parameter norm is not computed here: fused into the update, its per-tensor
  reductions cost the GPU SiT-XL step ~300 small kernels and a copy of each updated
  adaLN weight. The train loop computes it (:func:`param_norm`) when it logs.
  """
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return params, opt_state, {"grad_norm": optax.global_norm(grads)}


@jax.jit
def param_norm(params) -> jax.Array:
  """Global L2 norm of a parameter tree (logged by the train loop)."""
  return optax.global_norm(params)


def make_train_step(graphdef, tx: optax.GradientTransformation, loss_fn: LossFn, *,
                    ema_decay: float, state_shardings, batch_sharding,
                    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
                    frozen_shardings=None):
  """A jitted ``(state, batch[, frozen]) -> (state, metrics)`` that donates the state
  (a :class:`LeafStep`: pass a :class:`LeafState` to skip the pytree per call).

  ``frozen`` (given when ``frozen_shardings`` is) is a pytree of arrays the
  loss needs but never updates, e.g. the LPIPS network; the loss then takes it
  as a fifth argument. Passing it, rather than closing over it, keeps large
  weights out of the compiled program.
  """

  def step(state: TrainState, batch, frozen=None) -> tuple[TrainState, dict[str, jax.Array]]:
    key = jax.random.fold_in(state.rng, state.step)

    def compute(params):
      model = nnx.merge(graphdef, params, state.rest)
      if frozen_shardings is not None:
        return loss_fn(model, batch, key, state.step, frozen)
      return loss_fn(model, batch, key, state.step)

    (loss, aux), grads = jax.value_and_grad(compute, has_aux=True)(state.params)
    params, opt_state, norms = optimizer_step(tx, grads, state.opt_state, state.params)
    metrics = dict(aux)
    metrics.update(loss=loss, **norms)
    if learning_rate_fn is not None:
      metrics["learning_rate"] = learning_rate_fn(state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema=ema_update(state.ema, params, ema_decay))
    return new_state, metrics

  arg_shardings = (batch_sharding,) if frozen_shardings is None else (batch_sharding,
                                                                      frozen_shardings)
  return LeafStep(step, state_shardings, arg_shardings)


class LeafState:
  """A train state held as its list of arrays: what the training loop passes between steps.

  ``jax.jit`` flattens every argument on each call, and NNX variables are pytree nodes
  written in Python, so a state passed as a ``TrainState`` costs host time per array.
  Attribute access (``state.ema``, ``state.step``) reads the state rebuilt from the
  arrays (once per ``LeafState``), so hooks and logging use it like the train state.
  """

  __slots__ = ("treedef", "leaves", "_tree")

  def __init__(self, treedef, leaves):
    self.treedef = treedef
    self.leaves = list(leaves)
    self._tree = None

  @classmethod
  def of(cls, state) -> "LeafState":
    if isinstance(state, LeafState):
      return state
    leaves, treedef = jax.tree.flatten(state)
    return cls(treedef, leaves)

  def tree(self):
    """The state as the pytree it was made from (arrays shared, not copied)."""
    if self._tree is None:
      self._tree = jax.tree.unflatten(self.treedef, self.leaves)
    return self._tree

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return getattr(self.tree(), name)


class LeafStep:
  """``jax.jit`` of a ``(state, *args) -> (state, metrics)`` step whose program takes the
  state as its list of arrays, donated.

  Called with a :class:`LeafState` it returns one (the training loop's form: no pytree
  of NNX variables is flattened or rebuilt per step); called with the state pytree it
  returns the pytree. Measured on a 2-core host, the SoftVQ-B-64 train step (1,431
  arrays) returned to Python after 11 ms as a pytree and 5.5 ms as a list; on a GPU
  that time comes before the device starts and lengthens every synchronised step.
  """

  def __init__(self, step, state_shardings, arg_shardings: tuple):
    treedef = jax.tree.structure(state_shardings)
    leaf_shardings = jax.tree.leaves(state_shardings)

    def on_leaves(leaves, *args):
      state, metrics = step(jax.tree.unflatten(treedef, leaves), *args)
      if jax.tree.structure(state) != treedef:
        raise ValueError("the step returned a state of another structure than it was given")
      return jax.tree.leaves(state), metrics

    self.fn = step  # the step on the state pytree, unjitted
    self.treedef = treedef
    # What the training loop checks. An instance attribute: wrappers made with
    # functools.wraps copy the instance's __dict__, so it reaches the loop through them.
    self.takes_leaf_state = True
    self.jitted = jax.jit(on_leaves, in_shardings=(leaf_shardings, *arg_shardings),
                          out_shardings=(leaf_shardings, None), donate_argnums=0)

  def leaves_of(self, state) -> list:
    """The arrays of ``state`` (a :class:`LeafState` or the state pytree) in program order."""
    if isinstance(state, LeafState):
      treedef, leaves = state.treedef, state.leaves
    else:
      leaves, treedef = jax.tree.flatten(state)
    if treedef is not self.treedef and treedef != self.treedef:
      raise ValueError(f"the state does not have the structure this step was built for: "
                       f"{len(leaves)} arrays given, {self.treedef.num_leaves} expected"
                       + ("" if len(leaves) != self.treedef.num_leaves else
                          " (same count, different names, kinds or nesting)"))
    return leaves

  def __call__(self, state, *args):
    leaves, metrics = self.jitted(self.leaves_of(state), *args)
    if isinstance(state, LeafState):
      return LeafState(self.treedef, leaves), metrics
    return jax.tree.unflatten(self.treedef, leaves), metrics

  def lower(self, state, *args):
    """Lowers the program for ``state`` (a pytree of arrays or ``ShapeDtypeStruct``s)."""
    return self.jitted.lower(self.leaves_of(state), *args)

  def _cache_size(self) -> int:
    return self.jitted._cache_size()  # pylint: disable=protected-access
