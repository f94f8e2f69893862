"""GAN losses against NumPy closed forms (and torch for the reference's swapped BCE)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softvq_jax.losses import gan


pytestmark = pytest.mark.usefixtures("few_xla_optimisations")


def _softplus(x):
  return np.logaddexp(0.0, x)


@pytest.fixture(scope="module")
def logits():
  rng = np.random.default_rng(0)
  return (rng.normal(0.5, 1.5, (4, 10)).astype(np.float32),
          rng.normal(-0.5, 1.5, (4, 10)).astype(np.float32))


def test_hinge_and_vanilla(logits):
  real, fake = logits
  np.testing.assert_allclose(
      gan.hinge_d_loss(real, fake),
      0.5 * (np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean()), rtol=1e-6)
  np.testing.assert_allclose(gan.hinge_g_loss(fake), -fake.mean(), rtol=1e-6)
  np.testing.assert_allclose(gan.vanilla_d_loss(real, fake),
                             0.5 * (_softplus(-real).mean() + _softplus(fake).mean()), rtol=1e-6)
  # bfloat16 logits are reduced in float32.
  assert gan.hinge_d_loss(jnp.asarray(real, jnp.bfloat16), fake).dtype == jnp.float32


def test_non_saturating_and_the_reference_swap(logits):
  real, fake = logits
  np.testing.assert_allclose(gan.non_saturating_d_loss(real, fake), gan.vanilla_d_loss(real, fake),
                             rtol=1e-6)
  np.testing.assert_allclose(gan.non_saturating_g_loss(fake), _softplus(-fake).mean(), rtol=1e-6)
  # The swapped arguments reduce to closed forms: the fake term is log 2.
  bug_d = gan.non_saturating_d_loss(real, fake, reproduce_reference_bug=True)
  np.testing.assert_allclose(bug_d, 0.5 * (_softplus(1.0) - real.mean() + np.log(2.0)), rtol=1e-5)
  bug_g = gan.non_saturating_g_loss(fake, reproduce_reference_bug=True)
  np.testing.assert_allclose(bug_g, _softplus(1.0) - fake.mean(), rtol=1e-5)
  g_fake = jax.grad(lambda f: gan.non_saturating_d_loss(real, f, reproduce_reference_bug=True))(fake)
  assert not np.asarray(g_fake).any()

  torch = pytest.importorskip("torch", reason="torch checks the reference's exact call")
  bce = torch.nn.functional.binary_cross_entropy_with_logits
  r, f = torch.from_numpy(real), torch.from_numpy(fake)
  ref_d = 0.5 * (bce(torch.ones_like(r), r) + bce(torch.zeros_like(f), f))
  np.testing.assert_allclose(bug_d, ref_d.item(), rtol=1e-5)
  np.testing.assert_allclose(bug_g, bce(torch.ones_like(f), f).item(), rtol=1e-5)
  np.testing.assert_allclose(gan.non_saturating_d_loss(real, fake),
                             0.5 * (bce(r, torch.ones_like(r)) + bce(f, torch.zeros_like(f))).item(),
                             rtol=1e-5)


def test_loss_tables():
  assert gan.get_d_loss("hinge") is gan.hinge_d_loss
  assert gan.get_g_loss("non-saturating") is gan.non_saturating_g_loss
  with pytest.raises(ValueError):
    gan.get_d_loss("wgan")
  with pytest.raises(ValueError):
    gan.get_g_loss("vanilla")


def test_lecam_matches_reference_order_over_steps():
  rng = np.random.default_rng(1)
  state = gan.LecamState.create()
  ema_r = ema_f = 0.0  # the reference's Python floats
  step = jax.jit(gan.lecam_loss)
  for _ in range(4):
    real = rng.normal(1.0, 1.0, (3, 8)).astype(np.float32)
    fake = rng.normal(-1.0, 1.0, (3, 8)).astype(np.float32)
    reg, state = step(real, fake, state)
    # Update first, then regularise against the updated EMAs.
    ema_r = ema_r * 0.999 + real.mean() * 0.001
    ema_f = ema_f * 0.999 + fake.mean() * 0.001
    expected = (np.maximum(0, real - ema_f) ** 2).mean() + (np.maximum(0, ema_r - fake) ** 2).mean()
    np.testing.assert_allclose(reg, expected, rtol=1e-5)
    np.testing.assert_allclose([state.logits_real_ema, state.logits_fake_ema], [ema_r, ema_f],
                               rtol=1e-5)
  # A checkpointable pytree of two float32 scalars.
  leaves = jax.tree.leaves(state)
  assert len(leaves) == 2 and all(l.shape == () and l.dtype == jnp.float32 for l in leaves)


def test_lecam_gradient_does_not_flow_through_the_emas():
  real = jnp.asarray([[2.0, 0.5]])
  fake = jnp.asarray([[-2.0, 0.5]])
  state = gan.LecamState(jnp.float32(1.0), jnp.float32(-1.0))
  g = jax.grad(lambda r: gan.lecam_loss(r, fake, state)[0])(real)
  # d/dr mean relu(r - ema_f)^2 with ema_f fixed at its updated value.
  ema_f = -1.0 * 0.999 + float(jnp.mean(fake)) * 0.001
  np.testing.assert_allclose(g, 2 * np.maximum(0, np.asarray(real) - ema_f) / real.size, rtol=1e-5)


def test_consistency_loss(logits):
  real, fake = logits
  rng = np.random.default_rng(2)
  real_s, fake_s = real + rng.normal(size=real.shape), fake + rng.normal(size=fake.shape)
  expected = ((np.concatenate([real, fake]) - np.concatenate([real_s, fake_s])) ** 2).mean()
  np.testing.assert_allclose(gan.consistency_loss(real, fake, real_s, fake_s), expected, rtol=1e-5)
  g = jax.grad(lambda s: gan.consistency_loss(real, fake, s, fake_s))(jnp.asarray(real_s, jnp.float32))
  np.testing.assert_allclose(g, 2 * (real_s - real) / (2 * real.size), rtol=1e-4, atol=1e-7)


def test_adaptive_weight():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(8, 3)).astype(np.float32)
  b = rng.normal(size=(8, 3)).astype(np.float32) * 4
  np.testing.assert_allclose(gan.adaptive_weight(a, b), np.linalg.norm(a) / (np.linalg.norm(b) + 1e-4),
                             rtol=1e-5)
  # Pytrees are one flat vector; zero adversarial gradients clamp at 1e4.
  tree = {"kernel": a, "bias": a[0]}
  flat = np.sqrt((a**2).sum() + (a[0] ** 2).sum())
  np.testing.assert_allclose(gan.adaptive_weight(tree, b), flat / (np.linalg.norm(b) + 1e-4), rtol=1e-5)
  assert float(gan.adaptive_weight(a, np.zeros_like(b))) == 1e4
  assert float(gan.adaptive_weight(np.zeros_like(a), b)) == 0.0
  g = jax.grad(lambda x: gan.adaptive_weight(x, b) * 3.0)(jnp.asarray(a))
  assert not np.asarray(g).any()


def test_adopt_weight_gates_on_traced_steps():
  fn = jax.jit(lambda s: gan.adopt_weight(0.2, s, threshold=20000))
  assert float(fn(19999)) == 0.0
  np.testing.assert_allclose(fn(20000), 0.2)
  np.testing.assert_allclose(fn(250000), 0.2)
  assert float(gan.adopt_weight(0.2, 5, threshold=10, value=0.7)) == pytest.approx(0.7)


@pytest.mark.parametrize("global_step", [5, 10])
def test_discriminator_objective_composes_like_the_reference(logits, global_step):
  real, fake = logits
  rng = np.random.default_rng(4)
  real_s, fake_s = real + rng.normal(size=real.shape), fake + rng.normal(size=fake.shape)
  state = gan.LecamState(jnp.float32(0.3), jnp.float32(-0.2))
  fn = jax.jit(lambda r, f, st, s, rs, fs: gan.discriminator_objective(
      r, f, global_step=s, disc_start=10, disc_weight=0.2, lecam_state=st, lecam_weight=0.001,
      strong_logits=(rs, fs), cr_weight=4.0))
  loss, new_state, metrics = fn(real, fake, state, global_step, real_s, fake_s)

  ema_r = 0.3 * 0.999 + real.mean() * 0.001
  ema_f = -0.2 * 0.999 + fake.mean() * 0.001
  lecam = (np.maximum(0, real - ema_f) ** 2).mean() + (np.maximum(0, ema_r - fake) ** 2).mean()
  hinge = 0.5 * (np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean())
  cr = ((np.concatenate([real, fake]) - np.concatenate([real_s, fake_s])) ** 2).mean()
  on = global_step >= 10
  expected = (0.2 if on else 0.0) * (0.001 * lecam + hinge) + (4.0 if on else 0.0) * cr
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  # The EMAs move before disc_start too.
  np.testing.assert_allclose([new_state.logits_real_ema, new_state.logits_fake_ema], [ema_r, ema_f],
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["d_cr_loss"], cr, rtol=1e-5)
  np.testing.assert_allclose(metrics["lecam_reg"], lecam, rtol=1e-5)

  plain, same_state, _ = gan.discriminator_objective(real, fake, global_step=global_step,
                                                     disc_start=10, disc_weight=0.2,
                                                     lecam_state=state)
  np.testing.assert_allclose(plain, (0.2 if on else 0.0) * hinge, rtol=1e-5)
  assert same_state is state
  with pytest.raises(ValueError):
    gan.discriminator_objective(real, fake, global_step=1, disc_start=0, disc_weight=1.0,
                                lecam_weight=0.001)
