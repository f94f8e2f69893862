"""ADM Gaussian diffusion for DiT: schedules, respacing, eps + learned-range variance,
the MSE + VB training loss, DDPM ancestral and DDIM sampling.

Port of the reference's ``modelling/diffusion`` (the IDDPM/ADM code) for
1-D tokens ``(B, T, C)``. Schedules are float64 NumPy arrays; every
coefficient is gathered and then cast to float32 before use, as the
reference's ``_extract_into_tensor`` does, so the arithmetic is float32 for
float32 inputs. Time indices ``t`` are indices of the (possibly respaced)
process; the model is always called with the original step number
``timestep_map[t]``.

The model is passed as ``model_fn(x, t_model) -> out`` with ``out`` of shape
``(B, T, 2C)`` = ``[eps | v]`` (learned sigma) or ``(B, T, C)`` (fixed variance);
bind the labels (and the guidance) in the closure.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
SCHEDULES = ("linear", "cosine")


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
  """``linear``: Ho et al.'s 1e-4 .. 0.02 (scaled to 1000 steps); ``cosine``: Nichol & Dhariwal."""
  if name == "linear":
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
  if name == "cosine":
    def alpha_bar(s):
      return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps),
                         0.999) for i in range(num_timesteps)], np.float64)
  raise ValueError(f"noise_schedule must be one of {SCHEDULES}, got {name!r}")


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
  """The kept steps of a respaced process (sorted), e.g. ``"250"`` or ``"10,15,20"``.

  Within each section the stride is fractional and accumulated by repeated
  addition, then rounded half-to-even, as the reference does; ``"ddimN"`` uses
  an integer stride.
  """
  if isinstance(section_counts, int):
    section_counts = [section_counts]
  if isinstance(section_counts, str):
    text = section_counts
    if not re.fullmatch(r"ddim[1-9][0-9]*|[0-9]+(,[0-9]+)*", text):
      raise ValueError(f"timestep respacing {text!r}: expected 'ddimN' or comma-separated step "
                       "counts such as '250' or '10,15,20'")
    if section_counts.startswith("ddim"):
      desired = int(section_counts[len("ddim"):])
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
          return list(range(0, num_timesteps, stride))
      raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
    section_counts = [int(x) for x in section_counts.split(",")]
  size_per, extra = divmod(num_timesteps, len(section_counts))
  start, steps = 0, []
  for i, count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f"cannot divide section of {size} steps into {count}")
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):
      steps.append(start + round(cur))
      cur += stride
    start += size
  if not steps:
    raise ValueError(f"timestep respacing {section_counts!r} keeps no step")
  return sorted(set(steps))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _cdf_logit(x):
  # approx_standard_normal_cdf(x) == sigmoid(_cdf_logit(x)).
  return 2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
  """Log-probability of the bin of width 2/255 around ``x`` (written for [-1, 1] pixels).

  Same quantity as the reference (tanh-approximated normal CDF, tails for
  |x| > 0.999, probabilities clamped at 1e-12), but evaluated in the log domain:
  the reference's ``log(cdf_plus - cdf_min)`` and ``log(1 - cdf_min)`` lose all
  float32 digits when the CDFs approach 1, which latents (unlike pixels, mostly
  inside the tails) hit often.
  """
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  a = _cdf_logit(inv_stdv * (centered + 1.0 / 255.0))
  b = _cdf_logit(inv_stdv * (centered - 1.0 / 255.0))
  floor = math.log(1e-12)
  log_cdf_plus = jnp.maximum(jax.nn.log_sigmoid(a), floor)
  log_one_minus_cdf_min = jnp.maximum(jax.nn.log_sigmoid(-b), floor)
  # sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - exp(b - a)), a > b.
  log_delta = (jax.nn.log_sigmoid(a) + jax.nn.log_sigmoid(-b)
               + jnp.log(-jnp.expm1(jnp.minimum(b - a, -1e-30))))
  log_delta = jnp.maximum(log_delta, floor)
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(x):
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


class GaussianDiffusion:
  """A (respaced) diffusion with eps prediction; learned-range or fixed-large variance.

  Args:
    betas: float64 betas of the base process (length ``num_timesteps`` of the base).
    use_timesteps: the base steps to keep (None: all); the kept steps get new
      betas ``1 - abar[m_k] / abar[m_{k-1}]``.
    learn_sigma: the model outputs ``[eps | v]`` with ``v`` in [-1, 1]
      interpolating the log-variance between the posterior variance and beta;
      otherwise the variance is the fixed "large" one.
  """

  def __init__(self, betas: np.ndarray, use_timesteps: Sequence[int] | None = None, *,
               learn_sigma: bool = True):
    base = np.asarray(betas, np.float64)
    self.original_num_steps = len(base)
    if use_timesteps is None:
      use_timesteps = range(len(base))
    keep = set(int(s) for s in use_timesteps)
    base_abar = np.cumprod(1.0 - base)
    new_betas, timestep_map, last = [], [], 1.0
    for i, abar in enumerate(base_abar):
      if i in keep:
        new_betas.append(1 - abar / last)
        last = abar
        timestep_map.append(i)
    self.timestep_map = np.asarray(timestep_map, np.int64)
    self.learn_sigma = learn_sigma
    b = np.asarray(new_betas, np.float64)
    if not ((b > 0).all() and (b <= 1).all()):
      raise ValueError("betas must lie in (0, 1]")
    self.betas = b
    self.num_timesteps = len(b)
    alphas = 1.0 - b
    self.alphas_cumprod = np.cumprod(alphas)
    self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
    self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
    self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
    self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
    self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
    self.posterior_variance = b * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
    # The posterior variance is 0 at t = 0; its log repeats entry 1 there.
    self.posterior_log_variance_clipped = (
        np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        if self.num_timesteps > 1 else np.array([np.log(b[0])]))
    self.posterior_mean_coef1 = b * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
    self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                 / (1.0 - self.alphas_cumprod))
    self.log_betas = np.log(b)
    fixed_large = np.append(self.posterior_variance[1], b[1:]) if self.num_timesteps > 1 else b
    self.fixed_large_log_variance = np.log(fixed_large)

  # ------------------------------------------------------------- coefficients
  @staticmethod
  def _extract(arr: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
    # Gather in float64 and cast to float32, like the reference's ``.float()``.
    vals = jnp.asarray(np.asarray(arr, np.float64).astype(np.float32))[t]
    return vals.reshape(vals.shape + (1,) * (ndim - 1))

  def model_timesteps(self, t: jax.Array) -> jax.Array:
    """Original step numbers the model sees for respaced indices ``t``."""
    return jnp.asarray(self.timestep_map.astype(np.int32))[t]

  def q_sample(self, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    n = x_start.ndim
    return (self._extract(self.sqrt_alphas_cumprod, t, n) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, n) * noise)

  def q_posterior_mean(self, x_start, x_t, t):
    n = x_t.ndim
    return (self._extract(self.posterior_mean_coef1, t, n) * x_start
            + self._extract(self.posterior_mean_coef2, t, n) * x_t)

  def predict_xstart_from_eps(self, x_t, t, eps):
    n = x_t.ndim
    return (self._extract(self.sqrt_recip_alphas_cumprod, t, n) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, n) * eps)

  def predict_eps_from_xstart(self, x_t, t, pred_xstart):
    n = x_t.ndim
    return ((self._extract(self.sqrt_recip_alphas_cumprod, t, n) * x_t - pred_xstart)
            / self._extract(self.sqrt_recipm1_alphas_cumprod, t, n))

  def p_mean_variance_from_output(self, model_output: jax.Array, x: jax.Array, t: jax.Array, *,
                                  clip_denoised: bool = False) -> dict[str, jax.Array]:
    """``mean``, ``log_variance``, ``pred_xstart`` of p(x_{t-1} | x_t) from a model output."""
    n, c = x.ndim, x.shape[-1]
    t = jnp.asarray(t)
    if self.learn_sigma:
      if model_output.shape[-1] != 2 * c:
        raise ValueError(f"a learned-sigma model must output {2 * c} channels, got "
                         f"{model_output.shape[-1]}")
      eps, var_values = model_output[..., :c], model_output[..., c:]
      min_log = self._extract(self.posterior_log_variance_clipped, t, n)
      max_log = self._extract(self.log_betas, t, n)
      frac = (var_values + 1) / 2
      log_variance = frac * max_log + (1 - frac) * min_log
    else:
      eps = model_output
      log_variance = jnp.broadcast_to(self._extract(self.fixed_large_log_variance, t, n), x.shape)
    pred_xstart = self.predict_xstart_from_eps(x, t, eps)
    if clip_denoised:
      pred_xstart = jnp.clip(pred_xstart, -1, 1)
    mean = self.q_posterior_mean(pred_xstart, x, t)
    return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}

  def p_mean_variance(self, model_fn: ModelFn, x, t, *, clip_denoised: bool = False):
    out = model_fn(x, self.model_timesteps(t))
    return self.p_mean_variance_from_output(out, x, t, clip_denoised=clip_denoised)

  def p_sample(self, model_fn: ModelFn, x, t, noise, *, clip_denoised: bool = False):
    """One ancestral step: ``mean + [t != 0] exp(log_var / 2) noise``."""
    out = self.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised)
    nonzero = (jnp.asarray(t) != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    sample = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}

  def ddim_sample(self, model_fn: ModelFn, x, t, noise, *, eta: float = 0.0,
                  clip_denoised: bool = False):
    """One DDIM step (eq. 12 of Song et al.), with eps re-derived from ``pred_xstart``."""
    out = self.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised)
    n = x.ndim
    eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
    abar = self._extract(self.alphas_cumprod, t, n)
    abar_prev = self._extract(self.alphas_cumprod_prev, t, n)
    sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar)) * jnp.sqrt(1 - abar / abar_prev)
    mean_pred = out["pred_xstart"] * jnp.sqrt(abar_prev) + jnp.sqrt(1 - abar_prev - sigma**2) * eps
    nonzero = (jnp.asarray(t) != 0).astype(x.dtype).reshape((-1,) + (1,) * (n - 1))
    return {"sample": mean_pred + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}

  # -------------------------------------------------------------------- loops
  def _loop(self, step_fn, x_T, key, noise, return_trajectory):
    x_T = jnp.asarray(x_T)
    steps = self.num_timesteps
    if noise is not None:
      noise = jnp.asarray(noise).astype(x_T.dtype)
      if noise.shape != (steps,) + x_T.shape:
        raise ValueError(f"noise must have shape {(steps,) + x_T.shape} (one tensor per step, "
                         f"the last one unused), got {noise.shape}")
    elif key is None:
      raise ValueError("sampling needs a PRNG key (or the per-step noise)")

    def body(x, inp):
      k, i, eps = inp
      if noise is None:
        eps = jax.random.normal(jax.random.fold_in(key, k), x.shape, x.dtype)
      t = jnp.full((x.shape[0],), i, jnp.int32)
      out = step_fn(x, t, eps)
      traj = (out["sample"], out["pred_xstart"]) if return_trajectory else None
      return out["sample"], traj

    ks = jnp.arange(steps)
    indices = jnp.arange(steps - 1, -1, -1, dtype=jnp.int32)
    eps_in = noise if noise is not None else jnp.zeros((steps,), x_T.dtype)
    x, traj = jax.lax.scan(body, x_T, (ks, indices, eps_in))
    if return_trajectory:
      return x, {"sample": traj[0], "pred_xstart": traj[1]}
    return x

  def p_sample_loop(self, model_fn: ModelFn, x_T: jax.Array, *, key: jax.Array | None = None,
                    noise: jax.Array | None = None, clip_denoised: bool = False,
                    return_trajectory: bool = False):
    """Ancestral sampling from ``x_T`` over all (respaced) steps, one ``lax.scan``.

    ``noise`` ``(num_timesteps, B, T, C)`` replays recorded per-step noise (the
    reference draws one tensor at every step, the last one masked out); otherwise
    it is drawn from ``key``.
    """
    step = lambda x, t, eps: self.p_sample(model_fn, x, t, eps, clip_denoised=clip_denoised)
    return self._loop(step, x_T, key, noise, return_trajectory)

  def ddim_sample_loop(self, model_fn: ModelFn, x_T: jax.Array, *, eta: float = 0.0,
                       key: jax.Array | None = None, noise: jax.Array | None = None,
                       clip_denoised: bool = False, return_trajectory: bool = False):
    """DDIM from ``x_T``; with ``eta = 0`` deterministic (no key needed)."""
    if noise is None and key is None and eta == 0.0:
      key = jax.random.key(0)  # drawn but multiplied by sigma = 0
    step = lambda x, t, eps: self.ddim_sample(model_fn, x, t, eps, eta=eta,
                                              clip_denoised=clip_denoised)
    return self._loop(step, x_T, key, noise, return_trajectory)

  # --------------------------------------------------------------- training
  def sample_timesteps(self, key: jax.Array, batch: int) -> jax.Array:
    """Uniform integer steps in [0, num_timesteps), as the DiT trainer draws them."""
    return jax.random.randint(key, (batch,), 0, self.num_timesteps)

  def vb_terms_bpd(self, model_output, x_start, x_t, t) -> jax.Array:
    """KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t)) in bits, or at t = 0 the decoder NLL."""
    true_mean = self.q_posterior_mean(x_start, x_t, t)
    true_log_var = self._extract(self.posterior_log_variance_clipped, t, x_t.ndim)
    out = self.p_mean_variance_from_output(model_output, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]))
    kl = kl / np.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"],
                                               log_scales=0.5 * out["log_variance"])
    nll = mean_flat(nll) / np.log(2.0)
    return jnp.where(jnp.asarray(t) == 0, nll, kl)

  def training_losses(self, model_fn: ModelFn, x_start: jax.Array, t: jax.Array,
                      noise: jax.Array) -> dict[str, jax.Array]:
    """Per-sample ``mse`` (eps), ``vb`` (learned sigma only, eps frozen) and ``loss = mse + vb``."""
    x_t = self.q_sample(x_start, t, noise)
    model_output = model_fn(x_t, self.model_timesteps(t))
    c = x_start.shape[-1]
    terms = {"x_t": x_t}
    if self.learn_sigma:
      eps = model_output[..., :c]
      # The VB term learns the variance only; the mean is trained by the MSE.
      frozen = jnp.concatenate([jax.lax.stop_gradient(eps), model_output[..., c:]], axis=-1)
      terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t)
    else:
      eps = model_output
    terms["mse"] = mean_flat(jnp.square(noise - eps))
    terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
    return terms


def model_diffusion(config, timestep_respacing: str | int | Sequence[int] | None = "",
                    noise_schedule: str | None = None) -> GaussianDiffusion:
  """The process a DiT was trained on, as its ``GeneratorConfig`` records it (schedule, step
  count, learned variance), respaced; ``noise_schedule`` overrides the recorded one."""
  return create_diffusion(timestep_respacing, noise_schedule or config.noise_schedule,
                          diffusion_steps=config.diffusion_steps, learn_sigma=config.learn_sigma)


def create_diffusion(timestep_respacing: str | int | Sequence[int] | None = "",
                     noise_schedule: str = "linear", *, diffusion_steps: int = 1000,
                     learn_sigma: bool = True) -> GaussianDiffusion:
  """The reference's factory: ``""``/None = all steps, ``"250"`` = 250 respaced steps."""
  betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
  if timestep_respacing is None or timestep_respacing == "":
    timestep_respacing = [diffusion_steps]
  return GaussianDiffusion(betas, space_timesteps(diffusion_steps, timestep_respacing),
                           learn_sigma=learn_sigma)
