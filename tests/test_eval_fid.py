"""Streaming statistics, Fréchet distance and Inception Score against SciPy/NumPy written here."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from softvq_jax.eval import fid


def scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
  """The textbook formula with scipy's sqrtm of the product."""
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  covmean = np.real(covmean)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def random_stats(rng, n, d, shift=0.0):
  mix = rng.normal(size=(d, d)) / np.sqrt(d)
  x = rng.normal(size=(n, d)) @ mix + shift
  return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("n,d", [(500, 64), (300, 128)])
def test_frechet_equals_scipy_sqrtm(n, d):
  rng = np.random.default_rng(d)
  mu1, s1 = random_stats(rng, n, d)
  mu2, s2 = random_stats(rng, n, d, shift=0.3)
  expected = scipy_frechet(mu1, s1, mu2, s2)
  assert expected > 1.0
  for method in ("cholesky", "eigh", "sqrtm"):
    got = fid.frechet_distance(mu1, s1, mu2, s2, method=method)
    assert got == pytest.approx(expected, rel=1e-8), method


def test_frechet_rank_deficient_like_small_sample_sets():
  # Fewer samples than dimensions: singular covariances, as with 50 images of 2048 features.
  rng = np.random.default_rng(1)
  mu1, s1 = random_stats(rng, 40, 96)
  mu2, s2 = random_stats(rng, 40, 96, shift=0.1)
  expected = scipy_frechet(mu1, s1, mu2, s2)
  for method in ("cholesky", "eigh"):
    assert fid.frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(
        expected, rel=1e-5), method


def test_trace_sqrt_product_of_low_rank_covariances_is_a_nuclear_norm():
  # With centred rows A, B: tr((S1 S2)^(1/2)) = ||A B^T||_* / sqrt((n1 - 1)(n2 - 1)), exactly.
  rng = np.random.default_rng(6)
  a, b = rng.normal(size=(30, 200)), rng.normal(size=(45, 200)) * 2
  ca, cb = a - a.mean(0), b - b.mean(0)
  expected = scipy.linalg.svdvals(ca @ cb.T).sum() / np.sqrt(29 * 44)
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  # The pivoted Cholesky factor has exactly rank 29: no square roots of rounding noise.
  assert fid.trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-12)
  # eigh's 200x200 inner matrix has 171 rounding-level eigenvalues whose roots add up.
  assert fid.trace_sqrt_product(s1, s2, method="eigh") == pytest.approx(expected, rel=1e-6)
  assert fid.trace_sqrt_product(np.zeros((5, 5)), np.eye(5)) == 0.0


def test_fid_of_a_set_with_itself_is_zero():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(300, 256)) @ rng.normal(size=(256, 256))
  stats = fid.FeatureStats.from_features(x)
  scale = np.trace(stats.covariance)
  for method in ("cholesky", "eigh"):
    assert fid.fid_from_stats(stats, stats, method=method) < 1e-9 * scale
  # Rank-deficient (n < d) too, where sqrtm of a singular product is delicate.
  small = fid.FeatureStats.from_features(x[:50])
  assert fid.fid_from_stats(small, small) < 1e-8 * np.trace(small.covariance)


def test_streaming_stats_equal_one_shot():
  rng = np.random.default_rng(3)
  x = (rng.normal(size=(257, 33)) * 3 + 1000).astype(np.float32)  # large offset: cancellation-prone
  stats = fid.FeatureStats.empty(33)
  for a, b in [(0, 1), (1, 64), (64, 64), (64, 200), (200, 257)]:
    stats.update(x[a:b])
  x64 = x.astype(np.float64)
  assert stats.count == 257
  np.testing.assert_allclose(stats.mean, x64.mean(0), rtol=1e-13)
  np.testing.assert_allclose(stats.covariance, np.cov(x64, rowvar=False), rtol=1e-9, atol=1e-9)


def test_stats_merge_like_two_hosts_and_single_process_gather():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(100, 16))
  host0 = fid.FeatureStats.from_features(x[:37])
  host1 = fid.FeatureStats.empty(16).update(x[37:70]).update(x[70:])
  merged = host0.merge(host1)
  np.testing.assert_allclose(merged.mean, x.mean(0), rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(merged.covariance, np.cov(x, rowvar=False), rtol=1e-12, atol=1e-15)
  gathered = fid.merge_across_processes(merged)
  assert gathered.count == 100 and np.array_equal(gathered.scatter, merged.scatter)
  with pytest.raises(ValueError, match="dims"):
    host0.merge(fid.FeatureStats.empty(3))


def adm_inception_score(logits: np.ndarray, split_size: int) -> float:
  """guided-diffusion's evaluator: softmax, then chunks of split_size rows."""
  e = np.exp(logits - logits.max(1, keepdims=True))
  preds = e / e.sum(1, keepdims=True)
  scores = []
  for i in range(0, len(preds), split_size):
    part = preds[i:i + split_size]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return float(np.mean(scores))


def test_inception_score_equals_numpy_on_fixed_logits():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(230, 1008)) * 4
  for split in (5000, 50, 100):
    assert fid.inception_score(logits, split_size=split) == pytest.approx(
        adm_inception_score(logits, split), rel=1e-10)
  e = np.exp(logits - logits.max(1, keepdims=True))
  probs = e / e.sum(1, keepdims=True)
  assert fid.inception_score(probs=probs, split_size=50) == pytest.approx(
      adm_inception_score(logits, 50), rel=1e-10)


def test_inception_score_bounds():
  # One confident class per image, all classes equally used: IS = number of classes.
  logits = np.full((40, 10), -50.0)
  logits[np.arange(40), np.arange(40) % 10] = 50.0
  assert fid.inception_score(logits) == pytest.approx(10.0, rel=1e-9)
  assert fid.inception_score(np.zeros((20, 7))) == pytest.approx(1.0)
