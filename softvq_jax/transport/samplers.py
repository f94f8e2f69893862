"""SiT samplers: Euler / Heun probability-flow ODE and Euler–Maruyama SDE, with CFG.

Port of the reference's ``euler_sampler`` / ``euler_maruyama_sampler``. Time
runs from t = 1 (noise) to t = 0 (data). Each whole loop is one
``lax.scan``, so it jit-compiles once for a given ``num_steps`` and is
deterministic for a given PRNG key (or injected noise).

The time grid, the classifier-free-guidance decision for each step and the
SDE's per-step coefficients are computed in float64 NumPy before tracing,
exactly as the reference computes them; the state itself is float32 (or the
noise's dtype when x64 is enabled). Guidance doubles the batch with the null
label and combines ``v_u + s (v_c - v_u)`` on all channels, only on steps
whose ``t_cur`` lies in ``[guidance_low, guidance_high]``.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from softvq_jax.transport import paths

# velocity_fn(x (B, T, C), t (B,), y (B,)) -> v (B, T, C)
VelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

SDE_T_MIN = 0.04  # the reference stops the stochastic steps here, then takes one mean step to 0


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
  """``torch.linspace`` in float64, bit for bit.

  torch computes ``start + step * i`` for the first half and
  ``end - step * (steps - 1 - i)`` for the second as one fused multiply-add
  (a single rounding). Rounding the product first, as plain float64
  arithmetic does, is off by one ulp at some points, and a point that sits on
  a guidance-interval boundary (``t = 0.55`` with 20 steps) then flips that
  step's guidance decision. The products are formed exactly with fractions,
  so the grid does not depend on the host's FMA support.
  """
  if steps == 1:
    return np.array([start], np.float64)
  start, end = float(start), float(end)
  step = (end - start) / (steps - 1)
  halfway = steps // 2
  exact_step, exact_start, exact_end = Fraction(step), Fraction(start), Fraction(end)
  # Fraction -> float is correctly rounded (int / int true division).
  return np.array([float(exact_start + exact_step * i) if i < halfway
                   else float(exact_end - exact_step * (steps - 1 - i)) for i in range(steps)],
                  np.float64)


def ode_time_grid(num_steps: int) -> np.ndarray:
  return torch_linspace(1.0, 0.0, num_steps + 1)


def sde_time_grid(num_steps: int) -> np.ndarray:
  return np.concatenate([torch_linspace(1.0, SDE_T_MIN, num_steps), [0.0]])


def guidance_mask(t_cur: np.ndarray, guided: bool, interval: tuple[float, float]) -> np.ndarray:
  low, high = interval
  return np.asarray([guided and (low <= t <= high) for t in t_cur], bool)


def _is_guided(cfg_scale, guided: bool | None) -> bool:
  if guided is not None:
    return guided
  try:
    return float(cfg_scale) > 1.0
  except (TypeError, jax.errors.ConcretizationTypeError):
    return True  # a traced scale: assume guidance is wanted (s = 1 is then the conditional model)


def _check_steps(num_steps: int, minimum: int = 1) -> None:
  if not isinstance(num_steps, (int, np.integer)) or num_steps < minimum:
    raise ValueError(f"num_steps must be an integer >= {minimum}, got {num_steps!r}")


class _Velocity:
  """The model's velocity at (x, t), guided on the steps that ask for it."""

  def __init__(self, velocity_fn: VelocityFn, labels: jax.Array, cfg_scale, null_label: int,
               mask: np.ndarray, state_dtype, model_dtype):
    self.fn = velocity_fn
    self.labels = jnp.asarray(labels)
    self.cfg_scale = cfg_scale
    self.null = jnp.full_like(self.labels, null_label)
    self.any_cfg = bool(mask.any())
    self.all_cfg = bool(mask.all())
    self.state_dtype = state_dtype
    self.model_dtype = model_dtype

  def _plain(self, x, t):
    tt = jnp.full((x.shape[0],), t, self.model_dtype)
    return self.fn(x.astype(self.model_dtype), tt, self.labels).astype(self.state_dtype)

  def _guided(self, x, t):
    x2 = jnp.concatenate([x, x], axis=0).astype(self.model_dtype)
    tt = jnp.full((x2.shape[0],), t, self.model_dtype)
    v = self.fn(x2, tt, jnp.concatenate([self.labels, self.null], axis=0)).astype(self.state_dtype)
    cond, uncond = jnp.split(v, 2, axis=0)
    scale = jnp.asarray(self.cfg_scale, self.state_dtype)
    return uncond + scale * (cond - uncond)

  def __call__(self, x, t, use_cfg):
    if not self.any_cfg:
      return self._plain(x, t)
    if self.all_cfg:
      return self._guided(x, t)
    return jax.lax.cond(use_cfg, self._guided, self._plain, x, t)


def _state_dtype(noise) -> jnp.dtype:
  dtype = jnp.asarray(noise).dtype
  return dtype if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize >= 4 else jnp.float32


def euler_sampler(velocity_fn: VelocityFn, noise: jax.Array, labels: jax.Array, *,
                  num_steps: int = 50, heun: bool = False, cfg_scale: float | jax.Array = 1.0,
                  guidance_interval: tuple[float, float] = (0.0, 1.0), null_label: int = 1000,
                  guided: bool | None = None, model_dtype=jnp.float32) -> jax.Array:
  """Probability-flow ODE from ``noise`` (t = 1) to a sample (t = 0) on ``num_steps`` steps.

  Euler: ``x += (t_next - t_cur) v(x, t_cur)``. Heun adds the corrector
  ``x = x_cur + dt (v_cur + v(x_euler, t_next)) / 2`` on every step but the
  last; its guidance decision is the one made at ``t_cur`` (as the reference).
  ``guided`` overrides the ``cfg_scale > 1`` test (needed when ``cfg_scale`` is traced).
  """
  _check_steps(num_steps)
  t = ode_time_grid(num_steps)
  t_cur, t_next = t[:-1], t[1:]
  mask = guidance_mask(t_cur, _is_guided(cfg_scale, guided), guidance_interval)
  dtype = _state_dtype(noise)
  vel = _Velocity(velocity_fn, labels, cfg_scale, null_label, mask, dtype, model_dtype)
  xs = (jnp.asarray(t_cur, dtype), jnp.asarray(t_next, dtype),
        jnp.asarray(t_next - t_cur, dtype), jnp.asarray(mask))

  def euler_step(x, step):
    tc, _, dt, flag = step
    return x + dt * vel(x, tc, flag), None

  def heun_step(x, step):
    tc, tn, dt, flag = step
    d_cur = vel(x, tc, flag)
    d_prime = vel(x + dt * d_cur, tn, flag)
    return x + dt * (0.5 * d_cur + 0.5 * d_prime), None

  x = jnp.asarray(noise).astype(dtype)
  if heun:
    # Every step but the last gets the corrector.
    x, _ = jax.lax.scan(heun_step, x, jax.tree.map(lambda a: a[:-1], xs))
    x, _ = euler_step(x, jax.tree.map(lambda a: a[-1], xs))
  else:
    x, _ = jax.lax.scan(euler_step, x, xs)
  return x


def euler_maruyama_sampler(velocity_fn: VelocityFn, noise: jax.Array, labels: jax.Array, *,
                           num_steps: int = 50, cfg_scale: float | jax.Array = 1.0,
                           guidance_interval: tuple[float, float] = (0.0, 1.0),
                           path: str = "linear", key: jax.Array | None = None,
                           step_noise: jax.Array | None = None, null_label: int = 1000,
                           guided: bool | None = None, model_dtype=jnp.float32) -> jax.Array:
  """Reverse SDE with diffusion ``w(t) = 2t`` on the grid ``linspace(1, 0.04, num_steps), 0``.

  Each of the first ``num_steps - 1`` steps does
  ``x += (v - w/2 score) dt + sqrt(w) sqrt(|dt|) eps`` with the score derived
  from the velocity for ``path`` (here the path matters); the last step
  (0.04 -> 0) is the mean only. ``eps`` comes from ``step_noise``
  ``(num_steps - 1, B, T, C)`` if given (to replay recorded noise), else from ``key``.
  """
  _check_steps(num_steps)
  t = sde_time_grid(num_steps)
  t_cur, t_next = t[:-1], t[1:]
  dt = t_next - t_cur
  diffusion = 2 * t_cur
  a, b = paths.score_coefficients(path, t_cur)
  # drift = v - w/2 (a v + b x) = cv v + cx x, computed per step in float64.
  cv, cx = 1 - 0.5 * diffusion * a, -0.5 * diffusion * b
  noise_scale = np.sqrt(diffusion) * np.sqrt(np.abs(dt))
  mask = guidance_mask(t_cur, _is_guided(cfg_scale, guided), guidance_interval)
  dtype = _state_dtype(noise)
  vel = _Velocity(velocity_fn, labels, cfg_scale, null_label, mask, dtype, model_dtype)
  x = jnp.asarray(noise).astype(dtype)
  n_stoch = num_steps - 1
  if step_noise is not None:
    step_noise = jnp.asarray(step_noise).astype(dtype)
    if step_noise.shape != (n_stoch,) + x.shape:
      raise ValueError(f"step_noise must have shape {(n_stoch,) + x.shape}, got {step_noise.shape}")
  elif key is None and n_stoch > 0:
    raise ValueError("the SDE sampler needs a PRNG key (or step_noise)")

  def as_dtype(arr):
    return jnp.asarray(arr, dtype)

  def drift(x, i, flag):
    v = vel(x, as_dtype(t_cur)[i], flag)
    return as_dtype(cv)[i] * v + as_dtype(cx)[i] * x

  def sde_step(x, inp):
    i, eps = inp
    if step_noise is None:
      eps = jax.random.normal(jax.random.fold_in(key, i), x.shape, dtype)
    flag = jnp.asarray(mask)[i]
    x = x + drift(x, i, flag) * as_dtype(dt)[i] + as_dtype(noise_scale)[i] * eps
    return x, None

  if n_stoch:
    steps = jnp.arange(n_stoch)
    x, _ = jax.lax.scan(sde_step, x, (steps, step_noise if step_noise is not None
                                      else jnp.zeros((n_stoch,), dtype)))
  last = num_steps - 1
  return x + as_dtype(dt)[last] * drift(x, last, jnp.asarray(mask)[last])


def _leading_rows_rms(num_valid: int | jax.Array | None):
  """The root mean square over the first ``num_valid`` rows of every leaf (all rows if None)."""

  def norm(tree):
    total, count = jnp.float32(0.0), jnp.float32(0.0)
    for leaf in jax.tree.leaves(tree):
      leaf = jnp.asarray(leaf, jnp.float32)
      rows = leaf.shape[0] if num_valid is None else jnp.minimum(num_valid, leaf.shape[0])
      kept = jnp.arange(leaf.shape[0]) < rows
      per_row = jnp.sum(jnp.square(leaf).reshape(leaf.shape[0], -1), axis=1)
      total = total + jnp.sum(jnp.where(kept, per_row, 0.0))
      count = count + jnp.asarray(rows, jnp.float32) * (leaf.size // leaf.shape[0])
    return jnp.sqrt(total / count)

  return norm


ADAPTIVE_SOLVERS = ("dopri5", "tsit5", "dopri8")


def adaptive_ode_sampler(velocity_fn: VelocityFn, noise: jax.Array, labels: jax.Array, *,
                         solver: str = "dopri5", rtol: float = 1e-3, atol: float = 1e-6,
                         cfg_scale: float | jax.Array = 1.0,
                         guidance_interval: tuple[float, float] = (0.0, 1.0),
                         null_label: int = 1000, guided: bool | None = None,
                         max_steps: int = 4096, model_dtype=jnp.float32,
                         num_valid: int | jax.Array | None = None,
                         return_num_steps: bool = False):
  """The probability-flow ODE from t = 1 to t = 0 with an adaptive Runge-Kutta solver.

  Uses diffrax (``Dopri5`` by default, as the SiT repository's torchdiffeq ODE
  sampler does) with a PID step-size controller; the step count follows from
  ``rtol``/``atol``. Guidance is applied wherever ``low <= t <= high``.

  The step size is shared by the batch: it follows the RMS of the scaled error over
  all samples, as torchdiffeq's does. ``num_valid`` restricts that RMS to the first
  ``num_valid`` rows, so that rows added to fill a mesh do not steer the real ones.
  """
  import diffrax  # pylint: disable=g-import-not-at-top
  solvers = {"dopri5": diffrax.Dopri5, "tsit5": diffrax.Tsit5, "dopri8": diffrax.Dopri8}
  if solver not in solvers:
    raise ValueError(f"solver must be one of {ADAPTIVE_SOLVERS}, got {solver!r}")
  use_guidance = _is_guided(cfg_scale, guided)
  dtype = _state_dtype(noise)
  # Guidance is decided per evaluation from t, so both branches must be compiled.
  mask = np.array([True, False]) if use_guidance else np.array([False])
  vel = _Velocity(velocity_fn, labels, cfg_scale, null_label, mask, dtype, model_dtype)
  low, high = guidance_interval

  def field(t, x, args):
    del args
    flag = jnp.logical_and(t >= low, t <= high) if use_guidance else False
    return vel(x, t.astype(dtype), flag)

  solution = diffrax.diffeqsolve(
      diffrax.ODETerm(field), solvers[solver](), t0=1.0, t1=0.0, dt0=None,
      y0=jnp.asarray(noise).astype(dtype),
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol,
                                                norm=_leading_rows_rms(num_valid)),
      saveat=diffrax.SaveAt(t1=True), max_steps=max_steps)
  sample = solution.ys[-1]
  if return_num_steps:
    return sample, solution.stats["num_steps"]
  return sample
