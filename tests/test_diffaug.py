"""DiffAugment: each op against NumPy written from the reference's NCHW formulas, and the
policy / probability logic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softvq_jax.losses import diffaug

B, H, W, C = 4, 16, 12, 3


pytestmark = pytest.mark.usefixtures("few_xla_optimisations")


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).uniform(-1, 1, (B, H, W, C)).astype(np.float32)


@pytest.fixture(scope="module")
def augment():
  """One compiled function per (policy, prob), shared by the tests."""
  cache = {}

  def get(policy, prob):
    if (policy, prob) not in cache:
      cache[(policy, prob)] = jax.jit(lambda x, k: diffaug.diff_augment(x, k, policy, prob))
    return cache[(policy, prob)]

  return get


def _nchw(x):
  return np.transpose(x, (0, 3, 1, 2)).astype(np.float64)


def _nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


def np_color(x, rb, rs, rc):
  """Brightness, saturation, contrast on NCHW as the reference writes them."""
  x = _nchw(x)
  x = x + (rb[:, None, None, None] - 0.5)
  m = x.mean(axis=1, keepdims=True)
  x = (x - m) * (rs[:, None, None, None] * 2) + m
  m = x.mean(axis=(1, 2, 3), keepdims=True)
  x = (x - m) * (rc[:, None, None, None] + 0.5) + m
  return _nhwc(x)


def np_translate(x, tx, ty):
  """Pad by one zero pixel, clamp the shifted grid into the padded image, gather."""
  x = _nchw(x)
  b, _, h, w = x.shape
  pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
  gx = np.clip(np.arange(h)[None, :, None] + tx[:, None, None] + 1, 0, h + 1)
  gy = np.clip(np.arange(w)[None, None, :] + ty[:, None, None] + 1, 0, w + 1)
  gb = np.broadcast_to(np.arange(b)[:, None, None], (b, h, w))
  out = pad.transpose(0, 2, 3, 1)[gb, np.broadcast_to(gx, (b, h, w)), np.broadcast_to(gy, (b, h, w))]
  return out  # already NHWC


def np_cutout(x, ox, oy, ratio):
  """Clamp the box's grid into the image and scatter zeros into a mask."""
  x = _nchw(x)
  b, _, h, w = x.shape
  cs = int(h * ratio + 0.5), int(w * ratio + 0.5)
  mask = np.ones((b, h, w))
  for i in range(b):
    rows = np.clip(np.arange(cs[0]) + ox[i] - cs[0] // 2, 0, h - 1)
    cols = np.clip(np.arange(cs[1]) + oy[i] - cs[1] // 2, 0, w - 1)
    mask[i][np.ix_(rows, cols)] = 0
  return _nhwc(x * mask[:, None])


def test_color_ops_match_numpy(images):
  rng = np.random.default_rng(1)
  rb, rs, rc = (rng.uniform(size=B).astype(np.float32) for _ in range(3))
  x = jnp.asarray(images)
  got = diffaug.contrast(diffaug.saturation(diffaug.brightness(x, rb), rs), rc)
  np.testing.assert_allclose(np.asarray(got), np_color(images, rb, rs, rc), rtol=1e-5, atol=1e-5)


def test_translation_matches_numpy_for_every_shift(images):
  s_h, s_w = diffaug.translation_shift(H), diffaug.translation_shift(W)
  assert (s_h, s_w) == (2, 2)  # int(16 * .125 + .5), int(12 * .125 + .5)
  fn = jax.jit(diffaug.translate)
  for tx in range(-s_h, s_h + 1):
    for ty in (-s_w, 0, s_w):
      dx = np.array([tx, -tx, 0, tx], np.int32)
      dy = np.array([ty, ty, -ty, 0], np.int32)
      np.testing.assert_array_equal(np.asarray(fn(images, dx, dy)), np_translate(images, dx, dy))


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_cutout_matches_numpy_including_borders(images, ratio):
  ch, cw = diffaug.cutout_size(H, ratio), diffaug.cutout_size(W, ratio)
  fn = jax.jit(diffaug.cutout, static_argnums=3)
  hi_x, hi_y = H + 1 - ch % 2, W + 1 - cw % 2  # exclusive bounds of the reference's randint
  for ox, oy in [(0, 0), (hi_x - 1, hi_y - 1), (1, hi_y - 1), (H // 2, W // 2)]:
    oxs = np.array([ox, H // 2, 0, hi_x - 1], np.int32)
    oys = np.array([oy, 0, W // 2, hi_y - 1], np.int32)
    np.testing.assert_array_equal(np.asarray(fn(images, oxs, oys, ratio)),
                                  np_cutout(images, oxs, oys, ratio).astype(np.float32))


def test_prob_zero_is_identity(images, augment):
  for seed in range(5):
    out = augment(diffaug.DEFAULT_POLICY, 0.0)(images, jax.random.key(seed))
    np.testing.assert_array_equal(np.asarray(out), images)


def test_prob_one_translation_is_always_a_valid_shift(images, augment):
  s = diffaug.translation_shift(H)
  for seed in range(4):
    out = np.asarray(augment("translation", 1.0)(images, jax.random.key(seed)))
    for b in range(B):
      shifted = [np_translate(images[b:b + 1], np.array([dx]), np.array([dy]))[0]
                 for dx in range(-s, s + 1) for dy in range(-s, s + 1)]
      assert any(np.array_equal(out[b], c) for c in shifted), (seed, b)


def test_prob_one_cutout_zeroes_a_clipped_box(augment):
  ones = np.ones((8, H, W, C), np.float32)
  ch, cw = diffaug.cutout_size(H, 0.5), diffaug.cutout_size(W, 0.5)
  areas = []
  for seed in range(6):
    out = np.asarray(augment("cutout_0.5", 1.0)(ones, jax.random.key(seed)))
    assert set(np.unique(out)) <= {0.0, 1.0}
    for b in range(out.shape[0]):
      zero = out[b, :, :, 0] == 0
      assert (out[b] == out[b, :, :, :1]).all()  # same mask on every channel
      rows, cols = np.nonzero(zero.any(1))[0], np.nonzero(zero.any(0))[0]
      # A rectangle, at most the nominal box, at least the half of it that
      # survives clipping when the centre sits on the border.
      assert zero.sum() == len(rows) * len(cols)
      assert ch - ch // 2 <= len(rows) <= ch and cw - cw // 2 <= len(cols) <= cw
      areas.append(zero.sum())
  assert max(areas) == ch * cw  # interior boxes have the full area


def test_coin_is_per_batch_and_draws_are_per_sample(images, augment):
  fn = augment("cutout_0.5", 0.5)
  applied = 0
  for seed in range(40):
    out = np.asarray(fn(np.ones_like(images), jax.random.key(seed)))
    cut = (out == 0).any(axis=(1, 2, 3))
    assert cut.all() or not cut.any()  # one coin for the whole batch
    applied += int(cut.all())
  assert 10 <= applied <= 30
  out = np.asarray(augment("color", 1.0)(images, jax.random.key(0)))
  # Per-sample brightness: the mean shift differs between samples.
  shifts = (out - images).mean(axis=(1, 2, 3))
  assert np.ptp(shifts) > 1e-3


def test_full_policy_shapes_dtypes_and_keys(images, augment):
  fn = augment(diffaug.DEFAULT_POLICY, 1.0)
  a = fn(images, jax.random.key(3))
  assert a.shape == images.shape and a.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(a), np.asarray(fn(images, jax.random.key(3))))
  assert not np.array_equal(np.asarray(a), np.asarray(fn(images, jax.random.key(4))))
  bf = augment(diffaug.STRONG_POLICY, 0.5)(jnp.asarray(images, jnp.bfloat16), jax.random.key(5))
  assert bf.dtype == jnp.bfloat16 and bf.shape == images.shape


def test_gradient_flows_through_applied_ops(images):
  g = jax.jit(jax.grad(lambda x: jnp.sum(diffaug.diff_augment(x, jax.random.key(0), "color",
                                                              1.0))))(images)
  # Brightness adds a constant; saturation keeps each pixel's channel sum and
  # contrast each image's sum, so the sum of the output is sum(x) + const.
  np.testing.assert_allclose(np.asarray(g), 1.0, rtol=1e-5)
  g = jax.jit(jax.grad(lambda x: jnp.sum(diffaug.diff_augment(x, jax.random.key(0), "cutout_0.5",
                                                              1.0))))(images)
  assert 0 < (np.asarray(g) == 0).sum() < g.size  # cut pixels get no gradient


def test_policy_parsing():
  assert diffaug.parse_policy("color,translation,cutout_0.2") == (
      ("color", 0.0), ("translation", 0.125), ("cutout", 0.2))
  for bad in ("colour", "cutout_x", "cutout"):
    with pytest.raises(ValueError):
      diffaug.parse_policy(bad)
