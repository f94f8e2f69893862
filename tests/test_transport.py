"""Closed-form checks of the SiT transport (paths, loss, ODE/SDE samplers) and the ADM diffusion."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softvq_jax.transport import diffusion, paths, samplers
from softvq_jax.transport.loss import sit_loss

NULL = 1000


@pytest.fixture(scope="module")
def x0_noise():
  k1, k2 = jax.random.split(jax.random.key(0))
  return jax.random.normal(k1, (4, 6, 3)), jax.random.normal(k2, (4, 6, 3))


# ------------------------------------------------------------------ interpolants
def test_linear_interpolant_and_velocity(x0_noise):
  x0, eps = x0_noise
  t = jnp.array([0.0, 0.25, 0.5, 1.0])
  xt = paths.interpolate("linear", x0, eps, t)
  np.testing.assert_allclose(xt[0], x0[0], atol=0)            # t = 0 is data
  np.testing.assert_allclose(xt[3], eps[3], atol=0)           # t = 1 is noise
  np.testing.assert_allclose(xt[1], 0.75 * x0[1] + 0.25 * eps[1], rtol=1e-6)
  np.testing.assert_allclose(paths.velocity_target("linear", x0, eps, t), eps - x0, rtol=1e-6)


def test_cosine_interpolant_and_velocity(x0_noise):
  x0, eps = x0_noise
  t = jnp.array([0.0, 0.5, 1.0, 1 / 3])
  xt = paths.interpolate("cosine", x0, eps, t)
  np.testing.assert_allclose(xt[0], x0[0], atol=1e-7)
  np.testing.assert_allclose(xt[1], (x0[1] + eps[1]) / math.sqrt(2), rtol=1e-6)
  np.testing.assert_allclose(xt[2], eps[2], atol=1e-6)
  np.testing.assert_allclose(xt[3], math.cos(math.pi / 6) * x0[3] + 0.5 * eps[3], rtol=1e-6)
  v = paths.velocity_target("cosine", x0, eps, t)
  np.testing.assert_allclose(v[1], math.pi / 2 / math.sqrt(2) * (eps[1] - x0[1]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", paths.PATHS)
def test_velocity_is_the_time_derivative_of_the_interpolant(path, x0_noise):
  x0, eps = x0_noise
  t = jnp.array([0.1, 0.3, 0.6, 0.9])
  _, dxdt = jax.jvp(lambda s: paths.interpolate(path, x0, eps, s), (t,), (jnp.ones_like(t),))
  np.testing.assert_allclose(dxdt, paths.velocity_target(path, x0, eps, t), rtol=1e-5, atol=1e-6)


def gaussian_velocity(path, s):
  """E[v | x_t] for data x0 ~ N(0, s^2 I): linear in x, ``k(t) x``."""
  def k(t):
    c = paths.coefficients(path, t)
    return (c.d_alpha * c.alpha * s**2 + c.d_sigma * c.sigma) / (c.alpha**2 * s**2 + c.sigma**2)
  return k


@pytest.mark.parametrize("path", paths.PATHS)
def test_score_from_velocity_of_a_gaussian(path):
  s = 0.7
  x = jax.random.normal(jax.random.key(1), (5, 4, 2))
  t = jnp.array([0.05, 0.2, 0.5, 0.8, 0.97])
  k = gaussian_velocity(path, s)(t)[:, None, None]
  c = paths.coefficients(path, t[:, None, None])
  exact_score = -x / (c.alpha**2 * s**2 + c.sigma**2)
  np.testing.assert_allclose(paths.score_from_velocity(path, k * x, x, t), exact_score,
                             rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("path", paths.PATHS)
def test_time_sampling(path):
  key = jax.random.key(3)
  u = paths.sample_time(key, (20000,), weighting="uniform", path=path)
  assert float(u.min()) >= 0 and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
  t = np.asarray(paths.sample_time(key, (20000,), weighting="lognormal", path=path))
  assert t.min() > 0 and t.max() < 1
  # log sigma ~ N(0, 1) with sigma = sigma_t / alpha_t.
  c = paths.coefficients(path, t.astype(np.float64))
  log_sigma = np.log(c.sigma / c.alpha)
  assert abs(log_sigma.mean()) < 0.03 and abs(log_sigma.std() - 1) < 0.03
  with pytest.raises(ValueError):
    paths.sample_time(key, (2,), weighting="bogus")


# ------------------------------------------------------------------------- loss
def test_sit_loss_closed_form(x0_noise):
  x0, eps = x0_noise
  y = jnp.arange(4)
  t = jnp.array([0.1, 0.4, 0.7, 0.9])
  seen = {}

  def zero(x, t, y, key):
    seen["key"] = key
    return jnp.zeros_like(x)

  out = sit_loss(zero, x0, y, jax.random.key(0), path="linear", t=t, noise=eps)
  np.testing.assert_allclose(out["loss"], np.mean(np.square(eps - x0), axis=(1, 2)), rtol=1e-6)
  assert seen["key"] is not None
  identity = lambda x, t, y, key: x
  out = sit_loss(identity, x0, y, None, path="cosine", t=t, noise=eps, label_dropout=False)
  tt = np.asarray(t)[:, None, None]
  xt = np.cos(np.pi * tt / 2) * x0 + np.sin(np.pi * tt / 2) * eps
  v = np.pi / 2 * (-np.sin(np.pi * tt / 2) * x0 + np.cos(np.pi * tt / 2) * eps)
  np.testing.assert_allclose(out["loss"], np.mean(np.square(xt - v), axis=(1, 2)), rtol=1e-5)
  drawn = sit_loss(zero, x0, y, jax.random.key(7), weighting="lognormal")
  again = sit_loss(zero, x0, y, jax.random.key(7), weighting="lognormal")
  np.testing.assert_array_equal(drawn["loss"], again["loss"])
  assert drawn["loss"].shape == (4,)


# --------------------------------------------------------------------- samplers
def test_torch_linspace_grid():
  grid = samplers.ode_time_grid(8)
  assert grid[0] == 1.0 and grid[-1] == 0.0 and len(grid) == 9
  np.testing.assert_allclose(grid, np.linspace(1, 0, 9), atol=1e-15)
  sde = samplers.sde_time_grid(6)
  assert len(sde) == 7 and sde[-2] == 0.04 and sde[-1] == 0.0
  np.testing.assert_allclose(sde[:-1], np.linspace(1, 0.04, 6), atol=1e-15)


def linear_flow(s, path="linear"):
  k = gaussian_velocity(path, s)
  return lambda x, t, y: k(t)[:, None, None] * x


@pytest.fixture(scope="module")
def ode_solver():
  fns = {}

  def solve(num_steps, heun, s=0.5):
    key = (num_steps, heun, s)
    if key not in fns:
      fns[key] = jax.jit(lambda z: samplers.euler_sampler(linear_flow(s), z, jnp.zeros(z.shape[0], jnp.int32),
                                                          num_steps=num_steps, heun=heun))
    return fns[key]
  return solve


def test_ode_of_a_gaussian_target_converges_to_the_exact_map(ode_solver):
  # The probability-flow ODE of N(0, s^2) data scales the noise: x(0) = s * x(1).
  s = 0.5
  z = jax.random.normal(jax.random.key(0), (8, 4, 3))
  exact = s * np.asarray(z)
  err = {}
  for heun in (False, True):
    for n in (16, 32):
      err[heun, n] = float(np.max(np.abs(np.asarray(ode_solver(n, heun, s)(z)) - exact)))
  assert err[True, 32] < 5e-3
  assert err[False, 32] < 0.1
  # First-order Euler, second-order Heun.
  assert 1.6 < err[False, 16] / err[False, 32] < 2.4
  assert 3.0 < err[True, 16] / err[True, 32] < 5.0


def label_velocity(x, t, y):
  """Velocity 1 for real labels, 0 for the null label (independent of x and t)."""
  return jnp.broadcast_to((y != NULL).astype(x.dtype)[:, None, None], x.shape)


@pytest.mark.parametrize("heun", [False, True])
def test_cfg_and_guidance_interval(heun):
  z = jnp.zeros((2, 3, 2))
  y = jnp.array([1, 2])
  s = 3.0
  # t_cur = 1, .75, .5, .25: guided (velocity s) only inside [0, 0.5], else 1.
  out = samplers.euler_sampler(label_velocity, z, y, num_steps=4, heun=heun, cfg_scale=s,
                               guidance_interval=(0.0, 0.5), null_label=NULL)
  np.testing.assert_allclose(out, -(1 + 1 + s + s) / 4 * np.ones(z.shape), rtol=1e-6)
  plain = samplers.euler_sampler(label_velocity, z, y, num_steps=4, heun=heun, null_label=NULL)
  np.testing.assert_allclose(plain, -np.ones(z.shape), rtol=1e-6)
  every = samplers.euler_sampler(label_velocity, z, y, num_steps=4, heun=heun, cfg_scale=s,
                                 null_label=NULL)
  np.testing.assert_allclose(every, -s * np.ones(z.shape), rtol=1e-6)


def test_sde_cfg_matches_guided_drift():
  # v_c = 1, v_u = 0: with guidance the stochastic steps use s, the mean step too.
  z = jnp.ones((1, 2, 2))
  zero_noise = jnp.zeros((3, 1, 2, 2))
  out = samplers.euler_maruyama_sampler(label_velocity, z, jnp.array([5]), num_steps=4,
                                        cfg_scale=2.0, step_noise=zero_noise, null_label=NULL)
  # Replay by hand: drift = v - t (a v + b x) with the linear-path score.
  grid = samplers.sde_time_grid(4)
  x = 1.0
  for tc, tn in zip(grid[:-1], grid[1:]):
    a, b = paths.score_coefficients("linear", tc)
    v = 2.0
    x = x + (v - 0.5 * 2 * tc * (a * v + b * x)) * (tn - tc)
  np.testing.assert_allclose(out, np.full(z.shape, x), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("path", paths.PATHS)
def test_sde_samples_a_gaussian_target(path):
  s = 0.5
  z = jax.random.normal(jax.random.key(0), (4096, 2, 2))
  fn = jax.jit(lambda z, key: samplers.euler_maruyama_sampler(
      linear_flow(s, path), z, jnp.zeros(z.shape[0], jnp.int32), num_steps=100, path=path, key=key))
  out = np.asarray(fn(z, jax.random.key(1)))
  assert abs(out.std() - s) < 0.03 * s
  assert abs(out.mean()) < 0.03
  again = np.asarray(fn(z, jax.random.key(1)))
  np.testing.assert_array_equal(out, again)  # deterministic for a key
  assert not np.array_equal(out, np.asarray(fn(z, jax.random.key(2))))


def test_sde_is_deterministic_for_a_key_and_checks_noise_shape():
  z = jax.random.normal(jax.random.key(0), (3, 2, 2))
  fn = lambda key: samplers.euler_maruyama_sampler(linear_flow(0.5), z, jnp.zeros(3, jnp.int32),
                                                   num_steps=5, key=key)
  np.testing.assert_array_equal(fn(jax.random.key(4)), fn(jax.random.key(4)))
  assert not np.array_equal(fn(jax.random.key(4)), fn(jax.random.key(5)))
  with pytest.raises(ValueError, match="step_noise"):
    samplers.euler_maruyama_sampler(linear_flow(0.5), z, jnp.zeros(3, jnp.int32), num_steps=5,
                                    step_noise=jnp.zeros((5, 3, 2, 2)))
  with pytest.raises(ValueError, match="key"):
    samplers.euler_maruyama_sampler(linear_flow(0.5), z, jnp.zeros(3, jnp.int32), num_steps=5)


# -------------------------------------------------------------------- diffusion
def test_schedules_closed_form():
  lin = diffusion.get_named_beta_schedule("linear", 1000)
  assert lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02)
  cos = diffusion.get_named_beta_schedule("cosine", 1000)
  abar = np.cumprod(1 - cos)
  f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
  np.testing.assert_allclose(abar[:900], [f((i + 1) / 1000) / f(0) for i in range(900)], rtol=1e-9)
  assert cos.max() <= 0.999
  with pytest.raises(ValueError):
    diffusion.get_named_beta_schedule("quad", 10)


def test_respacing_keeps_alpha_bar():
  base = diffusion.create_diffusion("", "cosine")
  spaced = diffusion.create_diffusion("10", "cosine")
  assert list(spaced.timestep_map) == diffusion.space_timesteps(1000, "10")
  np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map],
                             rtol=1e-8)
  assert diffusion.space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
  assert diffusion.space_timesteps(100, "10,5") == sorted(
      set([round(i * 49 / 9) for i in range(10)] + [50 + round(i * 49 / 4) for i in range(5)]))


def gaussian_eps_model(diff, s, learn_sigma):
  """E[eps | x_t] for x0 ~ N(0, s^2): the optimal eps prediction, in the model's time."""
  abar_by_step = np.ones(diff.original_num_steps)
  abar_by_step[diff.timestep_map] = diff.alphas_cumprod
  table = jnp.asarray(abar_by_step, jnp.float32)

  def fn(x, t_model):
    ab = table[t_model][:, None, None]
    eps = jnp.sqrt(1 - ab) * x / (ab * s**2 + 1 - ab)
    return jnp.concatenate([eps, jnp.zeros_like(eps)], -1) if learn_sigma else eps
  return fn


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_diffusion_samples_a_gaussian_target(method):
  s = 0.5
  diff = diffusion.create_diffusion("50", "linear", learn_sigma=method == "ddpm")
  model = gaussian_eps_model(diff, s, diff.learn_sigma)
  z = jax.random.normal(jax.random.key(0), (4096, 2, 2))
  if method == "ddpm":
    out = jax.jit(lambda z: diff.p_sample_loop(model, z, key=jax.random.key(1)))(z)
  else:
    out = jax.jit(lambda z: diff.ddim_sample_loop(model, z))(z)
  out = np.asarray(out)
  assert abs(out.std() - s) < 0.05 * s and abs(out.mean()) < 0.03


def test_vb_is_zero_for_the_true_posterior():
  # A model whose eps gives x0 exactly and whose variance is the posterior one has KL = 0.
  diff = diffusion.create_diffusion("", "cosine")
  x0 = jax.random.normal(jax.random.key(0), (3, 4, 2))
  noise = jax.random.normal(jax.random.key(1), (3, 4, 2))
  t = jnp.array([5, 300, 900])
  # v = -1 selects the posterior log-variance exactly.
  out = jnp.concatenate([noise, -jnp.ones_like(noise)], -1)
  terms = diffusion.GaussianDiffusion.training_losses(diff, lambda x, tt: out, x0, t, noise)
  np.testing.assert_allclose(terms["mse"], 0, atol=0)
  np.testing.assert_allclose(terms["vb"], 0, atol=2e-4)


def test_ddpm_and_ddim_noise_handling():
  diff = diffusion.create_diffusion("4", "linear", learn_sigma=False)
  model = gaussian_eps_model(diff, 0.5, False)
  z = jax.random.normal(jax.random.key(0), (2, 3, 2))
  a = diff.p_sample_loop(model, z, key=jax.random.key(3))
  np.testing.assert_array_equal(a, diff.p_sample_loop(model, z, key=jax.random.key(3)))
  assert not np.array_equal(a, diff.p_sample_loop(model, z, key=jax.random.key(4)))
  # DDIM with eta = 0 ignores its noise.
  d1 = diff.ddim_sample_loop(model, z, noise=jnp.zeros((4, 2, 3, 2)))
  d2 = diff.ddim_sample_loop(model, z, noise=jnp.ones((4, 2, 3, 2)))
  np.testing.assert_allclose(d1, d2, rtol=1e-6)
  with pytest.raises(ValueError, match="noise"):
    diff.p_sample_loop(model, z, noise=jnp.zeros((3, 2, 3, 2)))


def test_adaptive_ode_sampler_transports_a_gaussian_exactly():
  """Data N(mu, s^2) on the linear path: the exact velocity field maps z to mu + s z."""
  from softvq_jax.transport.samplers import adaptive_ode_sampler
  mu, s = 0.7, 0.4

  def velocity(x, t, y):
    del y
    t = t[:, None, None]
    var = (1 - t) ** 2 * s**2 + t**2
    centred = x - (1 - t) * mu
    e_x0 = mu + (1 - t) * s**2 / var * centred
    e_eps = t / var * centred
    return e_eps - e_x0

  noise = jax.random.normal(jax.random.key(0), (3, 5, 2))
  labels = jnp.zeros((3,), jnp.int32)
  sample, steps = adaptive_ode_sampler(velocity, noise, labels, rtol=1e-6, atol=1e-8,
                                       return_num_steps=True)
  np.testing.assert_allclose(sample, mu + s * np.asarray(noise), atol=1e-4)
  assert 3 <= int(steps) < 4096


def test_adaptive_sampler_agrees_with_fine_heun():
  from softvq_jax import Generator, GeneratorConfig
  gen = Generator.random(GeneratorConfig(kind="sit", input_size=8, in_channels=4, hidden_size=32,
                                         depth=1, num_heads=2, num_classes=4), seed=1)
  noise = jax.random.normal(jax.random.key(1), (2, 8, 4))
  labels = jnp.array([0, 3])
  fine = gen.sample(noise, labels, method="heun", num_steps=200, cfg_scale=2.0,
                    guidance_interval=(0.0, 0.7))
  adaptive = gen.sample(noise, labels, method="dopri5", rtol=1e-6, cfg_scale=2.0,
                        guidance_interval=(0.0, 0.7))
  # The guidance switch at t = 0.7 is a discontinuity both solvers resolve to ~1/steps.
  np.testing.assert_allclose(adaptive, fine, atol=2e-2)
  with pytest.raises(ValueError, match="solver must be one of"):
    from softvq_jax.transport.samplers import adaptive_ode_sampler
    adaptive_ode_sampler(lambda x, t, y: x, noise, labels, solver="rk4")
