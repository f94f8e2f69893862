"""k-NN precision/recall (ADM ManifoldEstimator, k=3) against a NumPy version written here."""

from __future__ import annotations

import numpy as np
import pytest

from softvq_jax.eval import precision_recall as pr


def numpy_precision_recall(ref: np.ndarray, sample: np.ndarray, k: int = 3):
  """Squared distances; radius = index k of the sorted row (self included); ball test ``<=``."""
  def sqdist(a, b):
    return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)
  r_ref = np.sort(sqdist(ref, ref), axis=1)[:, k]
  r_sample = np.sort(sqdist(sample, sample), axis=1)[:, k]
  d = sqdist(ref, sample)  # (n_ref, n_sample)
  precision = np.mean(np.any(d <= r_ref[:, None], axis=0))
  recall = np.mean(np.any(d <= r_sample[None, :], axis=1))
  return precision, recall, r_ref


@pytest.mark.parametrize("distance_dtype", ["float16", "float32"])
def test_integer_features_exact(distance_dtype):
  # Small integers: every distance is exact in float16 and float32, ties included.
  rng = np.random.default_rng(0)
  ref = rng.integers(-4, 5, (61, 8)).astype(np.float32)
  sample = (rng.integers(-4, 5, (47, 8)) + np.array([1] * 4 + [0] * 4)).astype(np.float32)
  expected_p, expected_r, expected_radii = numpy_precision_recall(ref, sample)
  radii = pr.manifold_radii(ref, row_block=16, col_block=13, distance_dtype=distance_dtype)
  np.testing.assert_array_equal(radii, expected_radii)
  got = pr.precision_recall(ref, sample, row_block=16, col_block=13, distance_dtype=distance_dtype)
  assert got == (expected_p, expected_r)
  assert 0 < expected_p < 1 and 0 < expected_r < 1


def test_gaussian_features_and_block_sizes_agree():
  rng = np.random.default_rng(1)
  ref = rng.normal(size=(150, 32)).astype(np.float32)
  sample = (rng.normal(size=(120, 32)) * 1.3 + 0.2).astype(np.float32)
  expected_p, expected_r, _ = numpy_precision_recall(ref, sample)
  one_block = pr.precision_recall(ref, sample, distance_dtype="float32")
  blocked = pr.precision_recall(ref, sample, row_block=32, col_block=50, distance_dtype="float32")
  assert one_block == blocked
  assert one_block[0] == pytest.approx(expected_p, abs=1.5 / len(sample))
  assert one_block[1] == pytest.approx(expected_r, abs=1.5 / len(ref))


def test_float16_overflow_falls_back_to_float32():
  rng = np.random.default_rng(2)
  ref = (rng.integers(-4, 5, (30, 8)) * 64).astype(np.float32)  # distances up to ~2e6 > 65504
  sample = (rng.integers(-4, 5, (30, 8)) * 64).astype(np.float32)
  d16 = np.asarray(pr.pairwise_distances(ref, sample, "float16"))
  assert np.isfinite(d16).all()
  expected = ((ref[:, None].astype(np.float64) - sample[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(d16, expected)
  p, r, _ = numpy_precision_recall(ref, sample)
  assert pr.precision_recall(ref, sample) == (p, r)


def test_identical_sets_have_full_precision_and_recall():
  x = np.random.default_rng(3).normal(size=(40, 16)).astype(np.float32)
  assert pr.precision_recall(x, x, distance_dtype="float32") == (1.0, 1.0)


def test_float16_distances_follow_tf_rounding_steps():
  """ADM's block in float16: squares and products rounded to float16, sums in float32."""
  rng = np.random.default_rng(4)
  u = np.abs(rng.normal(size=(40, 64))).astype(np.float32)  # ReLU-like, as pool_3 features
  v = np.abs(rng.normal(size=(30, 64))).astype(np.float32)
  f16, f32 = np.float16, np.float32
  u16, v16 = u.astype(f16), v.astype(f16)
  nu = (u16 * u16).astype(f32).sum(1).astype(f16)[:, None]
  nv = (v16 * v16).astype(f32).sum(1).astype(f16)[None, :]
  uv = (u16.astype(f32) @ v16.astype(f32).T).astype(f16)
  expected = np.maximum(((nu - (2 * uv).astype(f16)).astype(f16) + nv).astype(f16), f16(0))
  got = np.asarray(pr.pairwise_distances(u, v, "float16"))
  np.testing.assert_allclose(got, expected.astype(f32), rtol=2e-3)  # one float16 ulp at most
  assert np.mean(got == expected.astype(f32)) > 0.97
  exact = ((u[:, None].astype(np.float64) - v[None]) ** 2).sum(-1)
  assert np.max(np.abs(got - exact) / exact) < 0.05  # float16 is coarse, but not wrong
