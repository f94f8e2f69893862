"""ADM npz formats, and the whole evaluator against torch features + SciPy/NumPy formulas."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from softvq_jax.eval import adm, inception, npz
from softvq_jax.eval.fid import FeatureStats
from test_eval_inception import _torch_features, _torch_or_skip


def test_sample_batch_round_trip_and_streaming(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (11, 8, 6, 3)).astype(np.uint8)
  labels = rng.integers(0, 1000, (11,))
  npz.write_sample_batch(str(tmp_path / "s.npz"), images, labels)
  got, got_labels = npz.read_sample_batch(str(tmp_path / "s.npz"))
  assert np.array_equal(got, images) and np.array_equal(got_labels, labels)
  assert npz.array_shape(str(tmp_path / "s.npz")) == (11, 8, 6, 3)
  np.savez_compressed(tmp_path / "c.npz", arr_0=images)
  np.savez(tmp_path / "f.npz", arr_0=np.asfortranarray(images))  # read whole, as ADM does
  for name in ("s.npz", "c.npz", "f.npz"):
    batches = list(npz.iter_images(str(tmp_path / name), 4))
    assert [len(b) for b in batches] == [4, 4, 3]
    assert np.array_equal(np.concatenate(batches), images)
  with pytest.raises(ValueError, match="uint8"):
    npz.write_sample_batch(str(tmp_path / "bad.npz"), images.astype(np.float32))


def test_reference_batch_round_trip(tmp_path):
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(20, 5))
  pool = FeatureStats.from_features(feats)
  npz.write_reference_batch(str(tmp_path / "r.npz"), pool=pool, spatial=pool)
  stats = npz.read_reference_stats(str(tmp_path / "r.npz"))
  assert sorted(stats) == ["mu", "mu_s", "sigma", "sigma_s"]
  np.testing.assert_allclose(stats["sigma"], np.cov(feats, rowvar=False), rtol=1e-12)
  np.testing.assert_allclose(stats["mu_s"], feats.mean(0), rtol=1e-12)


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
  """Reference and sample batches of 299x299 photo crops (no resize, so torch can run them)."""
  from skimage import data as skdata  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
  crops = []
  for i in range(11):
    p = photos[i % 4]
    y, x = rng.integers(0, p.shape[0] - 299), rng.integers(0, p.shape[1] - 299)
    crops.append(p[y:y + 299, x:x + 299])
  crops = np.stack(crops).astype(np.uint8)
  ref, sample = crops[:5], np.clip(crops[5:] + rng.normal(0, 20, crops[5:].shape), 0, 255)
  return ref, sample.astype(np.uint8), tmp_path_factory.mktemp("adm")


@pytest.fixture(scope="module")
def logits_weight():
  return (np.random.default_rng(3).normal(size=(2048, 1008)) * 0.3).astype(np.float32)


@pytest.fixture(scope="module")
def features(logits_weight):
  return adm.InceptionFeatures(inception.load_fid_inception(logits_weight=logits_weight),
                               batch_size=8)


def _scipy_fid(a, b):
  """FID of two small feature sets, exactly: with centred rows A, B, the non-zero eigenvalues
  of S1 S2 are the squared singular values of A B^T / sqrt((n1 - 1)(n2 - 1)), so
  tr((S1 S2)^(1/2)) is a nuclear norm (and 2048x2048 sqrtm's 25 s are not needed)."""
  ca, cb = a - a.mean(0), b - b.mean(0)
  na, nb = len(a) - 1, len(b) - 1
  tr_sqrt = scipy.linalg.svdvals(ca @ cb.T).sum() / np.sqrt(na * nb)
  diff = a.mean(0) - b.mean(0)
  return float(diff @ diff + (ca ** 2).sum() / na + (cb ** 2).sum() / nb - 2 * tr_sqrt)


def _numpy_pr(ref, sample, k=3):
  def sq(a, b):
    return ((a[:, None].astype(np.float64) - b[None]) ** 2).sum(-1)
  r_ref, r_s = np.sort(sq(ref, ref), 1)[:, k], np.sort(sq(sample, sample), 1)[:, k]
  d = sq(ref, sample)
  return np.mean(np.any(d <= r_ref[:, None], 0)), np.mean(np.any(d <= r_s[None], 1))


def _adm_is(logits):
  e = np.exp(logits - logits.max(1, keepdims=True))
  p = e / e.sum(1, keepdims=True)
  return float(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0, keepdims=True))), 1))))


def test_evaluator_matches_torch_features_and_scipy(batches, features, logits_weight):
  torch = _torch_or_skip()
  ref, sample, tmp = batches
  torch_model = torch.jit.load(inception.default_weights_path(), map_location="cpu").eval()
  ref_pool, ref_spatial = _torch_features(torch_model, ref.astype(np.float32) / 128 - 1)
  s_pool, s_spatial = _torch_features(torch_model, sample.astype(np.float32) / 128 - 1)
  # Reference statistics as ADM stores them: np.mean / np.cov of the torch model's features.
  np.savez(tmp / "ref.npz", arr_0=ref, mu=ref_pool.mean(0, dtype=np.float64),
           sigma=np.cov(ref_pool.astype(np.float64), rowvar=False),
           mu_s=ref_spatial.mean(0, dtype=np.float64),
           sigma_s=np.cov(ref_spatial.astype(np.float64), rowvar=False))
  npz.write_sample_batch(str(tmp / "sample.npz"), sample, np.arange(len(sample)))
  out = adm.evaluate(str(tmp / "ref.npz"), str(tmp / "sample.npz"), features,
                     distance_dtype="float32")
  p64, r64 = ref_pool.astype(np.float64), s_pool.astype(np.float64)
  assert out["fid"] == pytest.approx(_scipy_fid(r64, p64), rel=1e-4)
  assert out["sfid"] == pytest.approx(
      _scipy_fid(s_spatial.astype(np.float64), ref_spatial.astype(np.float64)), rel=1e-4)
  assert out["inception_score"] == pytest.approx(_adm_is(r64 @ logits_weight), rel=1e-4)
  precision, recall = _numpy_pr(ref_pool, s_pool)
  assert (out["precision"], out["recall"]) == (precision, recall)
  assert out["num_samples"] == 6 and out["num_ref"] == 5 and out["fid"] > 1


def test_evaluating_a_batch_against_itself(batches, features):
  ref, _, tmp = batches
  npz.write_sample_batch(str(tmp / "self.npz"), ref)
  out = adm.evaluate(str(tmp / "self.npz"), str(tmp / "self.npz"), features)
  assert abs(out["fid"]) < 1e-6 and abs(out["sfid"]) < 1e-6
  assert out["precision"] == 1.0 and out["recall"] == 1.0


def test_stored_statistics_win_over_activations_as_in_adm():
  rng = np.random.default_rng(4)
  ref = adm.Activations(rng.normal(size=(30, 6)), rng.normal(size=(30, 4)))
  sample = adm.Activations(rng.normal(size=(25, 6)) + 1, rng.normal(size=(25, 4)))
  other = rng.normal(size=(40, 6)) * 2
  other_s = rng.normal(size=(40, 4)) * 3
  stored = {"mu": other.mean(0), "sigma": np.cov(other, rowvar=False),
            "mu_s": other_s.mean(0), "sigma_s": np.cov(other_s, rowvar=False)}
  out = adm.evaluate_activations(ref, sample, ref_stats=stored, distance_dtype="float32")
  assert out["fid"] == pytest.approx(_scipy_fid(sample.pool, other), rel=1e-9)
  assert out["sfid"] == pytest.approx(_scipy_fid(sample.spatial, other_s), rel=1e-9)
  assert "inception_score" not in out
  # Precision/recall always use the reference *activations*, never the stored statistics.
  assert (out["precision"], out["recall"]) == _numpy_pr(ref.pool, sample.pool)
  swapped = adm.evaluate_activations(ref, sample, sample_stats=stored)
  assert swapped["fid"] == pytest.approx(_scipy_fid(other, ref.pool), rel=1e-9)
  with pytest.raises(ValueError, match="lacks"):
    adm.evaluate_activations(ref, sample, ref_stats={"mu": other.mean(0)})


def test_stats_accumulator_streams_like_one_shot(batches, features):
  ref, sample, _ = batches
  acc = adm.StatsAccumulator(features, keep_pool=True)
  acc.add(sample[:2])
  acc.add(sample[2:])
  one_shot = features(sample)
  pool, spatial = acc.merged()
  np.testing.assert_allclose(pool.covariance, np.cov(one_shot["pool"].astype(np.float64),
                                                     rowvar=False), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(spatial.mean, one_shot["spatial"].mean(0, dtype=np.float64),
                             rtol=1e-6, atol=1e-9)
  np.testing.assert_array_equal(np.concatenate(acc.kept), one_shot["pool"])
  ref_feats = features(ref)["pool"].astype(np.float64)
  stored = {"mu": ref_feats.mean(0), "sigma": np.cov(ref_feats, rowvar=False)}
  got = acc.fid_against(stored)
  assert got["fid"] == pytest.approx(_scipy_fid(one_shot["pool"].astype(np.float64), ref_feats),
                                     rel=1e-4)
  assert "sfid" not in got
