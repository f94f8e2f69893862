"""``Generator``: a SiT or DiT on 1-D latent tokens with its samplers, jit-compiled.

>>> gen = Generator.load("converted/sit-xl_softvq-l-64")
>>> z = gen.sample(jax.random.normal(key, (8, *gen.latent_shape)), labels,
...                method="euler", num_steps=250, cfg_scale=1.75, guidance_interval=(0.0, 0.7),
...                key=key)
>>> images = tok.decode(tok.denormalize(z))   # samples live in the normalised latent space
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from softvq_jax import parallel
from softvq_jax.loaded_model import LoadedModel
from softvq_jax.models.layers import inference_compiler_options
from softvq_jax.models.sit import GeneratorConfig, SiT
from softvq_jax.utils.nnx_utils import model_from_flat
from softvq_jax.transport import diffusion as diffusion_lib
from softvq_jax.transport import samplers
from softvq_jax.transport.paths import PATHS

Path = tuple
SIT_METHODS = ("euler", "heun", "euler_maruyama", "dopri5")
DIT_METHODS = ("ddpm", "ddim")


def abstract_model(config: GeneratorConfig, dtype=jnp.float32) -> SiT:
  """The model with ``ShapeDtypeStruct`` leaves: no memory is allocated."""
  return nnx.eval_shape(lambda: SiT(config, dtype=dtype, rngs=nnx.Rngs(0)))


def variable_shapes(config: GeneratorConfig) -> dict[Path, jax.ShapeDtypeStruct]:
  """Every stored array (parameters and the fixed ``pos_embed``) by NNX path."""
  state = nnx.state(abstract_model(config))
  return {tuple(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def count_params(config: GeneratorConfig, *, include_pos_embed: bool = True) -> int:
  """Elements of the state dict; the reference counts its stored ``pos_embed`` too."""
  return sum(int(np.prod(s.shape)) for p, s in variable_shapes(config).items()
             if include_pos_embed or p != ("pos_embed",))


def build_model(config: GeneratorConfig, flat: Mapping[Path, Any]) -> SiT:
  """A ``SiT`` whose arrays are ``flat`` (paths as in ``variable_shapes``)."""
  return model_from_flat(abstract_model(config), flat)


def _forward_fn(graphdef, state, x, t, y):
  return nnx.merge(graphdef, state)(x, t, y)


def _velocity_fn(model: SiT):
  return lambda x, t, y: model(x, t, y)


def dit_model_fn(model: SiT, labels, cfg_scale, guided: bool):
  """``(x, t) -> [eps | v]`` for the diffusion; guided, it is the reference's forward_with_cfg
  (guided eps, the conditional half's variance)."""
  if not guided:
    return lambda x, t: model(x, t, labels)
  null = jnp.full_like(labels, model.config.null_label)
  c = model.config.in_channels

  def fn(x, t):
    out = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                jnp.concatenate([labels, null]))
    cond, uncond = jnp.split(out, 2, axis=0)
    eps = uncond[..., :c] + cfg_scale * (cond[..., :c] - uncond[..., :c])
    return jnp.concatenate([eps, cond[..., c:]], axis=-1)
  return fn


def _as_float(value) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def _check_sampler_options(sit: bool, *, num_steps, guidance_interval, path, eta, noise_schedule,
                           rtol, timestep_respacing, method) -> None:
  """Refuses the other family's options and malformed values, which would otherwise be
  ignored silently."""
  kind = "a SiT" if sit else "a DiT"
  given = {"eta": eta != 0.0, "noise_schedule": noise_schedule is not None,
           "timestep_respacing": timestep_respacing is not None} if sit else {
               "path": path != "linear", "rtol": rtol != 1e-3,
               "guidance_interval": tuple(guidance_interval) != (0.0, 1.0)}
  foreign = sorted(name for name, is_set in given.items() if is_set)
  if foreign:
    raise ValueError(f"{', '.join(foreign)}: not an option of {kind}'s samplers "
                     f"({'SiT' if not sit else 'DiT'} only)")
  if (isinstance(num_steps, bool) or not isinstance(num_steps, (int, float, np.integer))
      or int(num_steps) != num_steps or num_steps < 1):
    raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
  if sit:
    if path not in PATHS:
      raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    interval = tuple(np.ravel(guidance_interval))
    if len(interval) != 2 or not 0.0 <= _as_float(interval[0]) <= _as_float(interval[1]) <= 1.0:
      raise ValueError(f"guidance_interval must be (low, high) with 0 <= low <= high <= 1, "
                       f"got {guidance_interval!r}")
    if method == "dopri5" and not rtol > 0:
      raise ValueError(f"rtol must be positive, got {rtol!r}")
    if method != "dopri5" and rtol != 1e-3:
      raise ValueError(f"rtol is a dopri5 option; method {method!r} does not take it")
  elif eta != 0.0 and method != "ddim":
    raise ValueError(f"eta is a DDIM option; method {method!r} does not take it")
  elif isinstance(eta, bool) or not 0.0 <= _as_float(eta) < math.inf:
    raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")


def _sample_fn(graphdef, static, state, noise, labels, cfg_scale, key, step_noise, num_valid):
  method, num_steps, guided, interval, path, eta, schedule, rtol = static
  model = nnx.merge(graphdef, state)
  if method in SIT_METHODS:
    common = dict(num_steps=num_steps, cfg_scale=cfg_scale, guidance_interval=interval,
                  null_label=model.config.null_label, guided=guided)
    if method == "euler_maruyama":
      return samplers.euler_maruyama_sampler(_velocity_fn(model), noise, labels, path=path,
                                             key=key, step_noise=step_noise, **common)
    if method == "dopri5":
      del common["num_steps"]  # adaptive: the tolerance sets the steps
      return samplers.adaptive_ode_sampler(_velocity_fn(model), noise, labels, rtol=rtol,
                                           num_valid=num_valid, **common)
    return samplers.euler_sampler(_velocity_fn(model), noise, labels, heun=method == "heun",
                                  **common)
  diff = diffusion_lib.model_diffusion(model.config, num_steps, schedule)
  model_fn = dit_model_fn(model, labels, cfg_scale, guided)
  if method == "ddpm":
    return diff.p_sample_loop(model_fn, noise, key=key, noise=step_noise)
  return diff.ddim_sample_loop(model_fn, noise, eta=eta, key=key, noise=step_noise)


class Generator(LoadedModel):
  """A SiT or DiT with its weights, ready for inference.

  Args:
    model: a ``SiT`` (``config.kind`` says SiT or DiT) holding the weights.
    dtype: compute dtype, ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``;
      parameters, norms, softmax, the residual stream and the sampler state stay float32.
      With bfloat16 the compiled programs read a bfloat16 copy of the matmul
      weights, made once here (``state`` keeps float32); on GPUs with separate
      q/k/v matmuls (``layers.INFERENCE_FORMS``; the same function).
    mesh: optional ``jax.sharding.Mesh``; batches are split over ``data_axis``
      and the weights replicated.
  """

  config: GeneratorConfig
  config_class = GeneratorConfig
  family = "generator"
  module_class = SiT  # adaLN-Zero: a fresh one outputs zeros until trained
  abstract = staticmethod(abstract_model)
  stored_shapes = staticmethod(variable_shapes)
  build = staticmethod(build_model)
  saved_filter = ...  # parameters and the fixed pos_embed, as the reference's state dict

  def __init__(self, model: SiT, **kwargs):
    super().__init__(model, **kwargs)
    self._forward = self._program(_forward_fn, compiler_options=inference_compiler_options())
    self._samplers: dict[tuple, Any] = {}

  @classmethod
  def from_pytorch(cls, checkpoint_path: str, config: str | Mapping[str, Any], *,
                   weights: str = "auto", kind: str | None = None, **kwargs) -> "Generator":
    """Builds from a released ``model.safetensors`` (or ``.pt``) and its ``config.json``."""
    from softvq_jax.convert import generator as convert_generator  # pylint: disable=g-import-not-at-top
    gen_config, flat, _ = convert_generator.convert(checkpoint_path, config, weights=weights,
                                                    kind=kind)
    return cls(build_model(gen_config, flat), **kwargs)

  @property
  def kind(self) -> str:
    return self.config.kind

  # --------------------------------------------------------------- inference
  def __call__(self, x, t, y) -> jax.Array:
    """One network evaluation: SiT velocity ``(B, T, C)``; DiT ``eps`` ``(B, T, C)``, or
    ``[eps | v]`` ``(B, T, 2C)`` with ``learn_sigma`` (the released DiTs)."""
    x = self._check_latents(x, "x")
    n = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t), (n,))
    y = self._check_labels(y, n)
    (x, t, y), n = self._shard(x, t, y)
    return self._trim(self._forward(self._compute_leaves, x, t, y), n)

  def check_sample_options(self, *, method: str | None = None, num_steps: int = 250,
                           cfg_scale: float = 1.0, guidance_interval=(0.0, 1.0),
                           path: str = "linear", eta: float = 0.0,
                           noise_schedule: str | None = None, rtol: float = 1e-3,
                           timestep_respacing: str | None = None) -> str:
    """Raises for the options :meth:`sample` would refuse (the other family's, malformed
    ones, guidance without a null class), before anything runs; returns the method."""
    sit = self.config.kind == "sit"
    methods = SIT_METHODS if sit else DIT_METHODS
    method = method or ("euler_maruyama" if sit else "ddpm")
    if method not in methods:
      raise ValueError(f"method must be one of {methods} for a {self.config.kind}, got {method!r}")
    scale = _as_float(cfg_scale)
    if isinstance(cfg_scale, bool) or not 1.0 <= scale < math.inf:
      # Below 1 the reference (and this sampler) does not guide at all: a user asking for
      # 0 would get conditional samples, not unconditional ones.
      raise ValueError(f"cfg_scale must be a finite number >= 1 (1: no guidance), got "
                       f"{cfg_scale!r}; for unconditional samples pass the null class "
                       f"{self.config.null_label} as every label")
    if scale > 1.0 and not self.config.has_null_label:
      raise ValueError("this model has no null-class row (class_dropout_prob = 0), so it "
                       "cannot be sampled with classifier-free guidance")
    _check_sampler_options(sit, num_steps=num_steps, guidance_interval=guidance_interval,
                           path=path, eta=eta, noise_schedule=noise_schedule, rtol=rtol,
                           timestep_respacing=timestep_respacing, method=method)
    if not sit:
      # Built here so that a bad respacing string or schedule fails with its own message.
      diffusion_lib.model_diffusion(
          self.config,
          str(timestep_respacing) if timestep_respacing is not None else str(int(num_steps)),
          noise_schedule)
    return method

  def sample(self, noise, labels, *, method: str | None = None, num_steps: int = 250,
             cfg_scale: float = 1.0, guidance_interval: tuple[float, float] = (0.0, 1.0),
             key: jax.Array | None = None, step_noise=None, path: str = "linear",
             eta: float = 0.0, noise_schedule: str | None = None, rtol: float = 1e-3,
             timestep_respacing: str | None = None) -> jax.Array:
    """Generates normalised latents ``(B, T, C)`` from ``noise`` (x at t = 1 / step T).

    Args:
      noise: ``(B, T, C)`` starting noise (e.g. ``jax.random.normal``).
      labels: ``(B,)`` class labels (``num_classes`` = the null class).
      method: SiT ``"euler"`` | ``"heun"`` (ODE) | ``"euler_maruyama"`` (SDE, default) |
        ``"dopri5"`` (adaptive ODE, steps set by ``rtol``);
        DiT ``"ddpm"`` (default) | ``"ddim"``.
      num_steps: sampler steps (DiT: respaced steps of the 1000-step process).
      cfg_scale: classifier-free guidance scale; > 1 doubles the batch with null labels.
      guidance_interval: SiT only: guide the steps with ``low <= t_cur <= high``.
      key: PRNG key for the stochastic samplers (SDE, DDPM, DDIM with eta > 0).
      step_noise: recorded per-step noise to replay instead of ``key``
        (SDE ``(num_steps - 1, B, T, C)``, DDPM/DDIM ``(num_steps, B, T, C)``).
      path: SiT only: interpolant (``linear`` | ``cosine``) for the SDE's velocity-to-score
        conversion.
      eta: DiT only: DDIM noise level.
      noise_schedule: DiT only: the diffusion schedule (``cosine`` | ``linear``); default the
        one the model was trained with (``config.noise_schedule``).
      rtol: SiT ``dopri5`` only: relative tolerance. Adaptive steps are shared by the batch
        (as in the reference), so a sample depends on its batch companions to within a few
        times this tolerance; the rows that fill a mesh's shards take no part.
      timestep_respacing: DiT only: the reference's respacing string in place of
        ``num_steps`` (``"ddim25"`` = integer stride, ``"10,15,20"`` = per-section counts);
        ``num_steps=N`` is ``"N"``.
    """
    sit = self.config.kind == "sit"
    method = self.check_sample_options(
        method=method, num_steps=num_steps, cfg_scale=cfg_scale,
        guidance_interval=guidance_interval, path=path, eta=eta, noise_schedule=noise_schedule,
        rtol=rtol, timestep_respacing=timestep_respacing)
    noise = self._check_latents(noise, "noise")
    n = noise.shape[0]
    labels = self._check_labels(labels, n)
    guided = float(cfg_scale) > 1.0
    if noise_schedule is None:
      noise_schedule = self.config.noise_schedule
    steps: int | str = int(num_steps)
    if not sit:
      # The DiT loop runs on the respaced process; "N" is what num_steps=N means.
      steps = str(timestep_respacing) if timestep_respacing is not None else str(steps)
    stochastic = method in ("euler_maruyama", "ddpm") or (method == "ddim" and eta != 0.0)
    if key is not None and not (isinstance(key, (jax.Array, np.ndarray)) and (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or key.shape[-1:] == (2,))):
      raise TypeError(f"key must be a JAX PRNG key (jax.random.key(seed)), got "
                      f"{type(key).__name__} {getattr(key, 'shape', '')}".rstrip())
    if stochastic and key is None and step_noise is None:
      raise ValueError(f"method {method!r} is stochastic: pass key= (or step_noise=)")
    if not stochastic and step_noise is not None:
      raise ValueError(f"method {method!r}{' with eta=0' if method == 'ddim' else ''} is "
                       "deterministic: it takes no step_noise")
    static = (method, steps, guided, tuple(float(g) for g in guidance_interval), path,
              float(eta), noise_schedule, float(rtol))
    if static not in self._samplers:
      self._samplers[static] = self._program(_sample_fn, static,
                                             compiler_options=inference_compiler_options())
    pad_axes = [0, 0]
    arrays = [noise, labels]
    if step_noise is not None:
      arrays.append(jnp.asarray(step_noise, jnp.float32))
      pad_axes.append(1)
    arrays, n = self._shard(*arrays, axes=pad_axes)
    noise, labels = arrays[0], arrays[1]
    step_noise = arrays[2] if step_noise is not None else None
    out = self._samplers[static](self._compute_leaves, noise, labels, jnp.float32(cfg_scale), key,
                                 step_noise, jnp.int32(n))
    return self._trim(out, n)

  # ------------------------------------------------------------- validation
  def _check_latents(self, x, name: str) -> jax.Array:
    shape = tuple(getattr(x, "shape", np.shape(x)))
    want = self.config.latent_shape
    if len(shape) != 3 or shape[1:] != want:
      raise ValueError(f"{name} must have shape (B, {want[0]}, {want[1]}), got {shape}")
    if shape[0] == 0:
      raise ValueError(f"{name} is an empty batch")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating point, got {x.dtype}")
    return x.astype(jnp.float32)

  def _check_labels(self, y, n: int) -> jax.Array:
    y = np.asarray(y) if not isinstance(y, jax.Array) else y
    if y.shape != (n,):
      raise ValueError(f"labels must have shape ({n},), got {tuple(y.shape)}")
    if not jnp.issubdtype(y.dtype, jnp.integer):
      raise TypeError(f"labels must be integers, got {y.dtype}")
    if isinstance(y, jax.Array) and y.is_fully_addressable:
      y = np.asarray(y)  # a few integers: checked here, as an out-of-range gather would clamp
    if isinstance(y, np.ndarray):
      top = self.config.null_label if self.config.has_null_label else self.config.num_classes - 1
      if y.min() < 0 or y.max() > top:
        raise ValueError(f"labels must lie in [0, {top}], got [{y.min()}, {y.max()}]")
    return jnp.asarray(y, jnp.int32)

  def _shard(self, *arrays, axes=None):
    """Pads the batch to a multiple of the data shards and places it on the mesh."""
    if self.mesh is None:
      return (list(arrays) if len(arrays) > 1 else arrays), arrays[0].shape[0]
    return parallel.pad_and_shard(arrays, self.mesh, self.data_axis, axes)
