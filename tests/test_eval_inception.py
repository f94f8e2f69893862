"""The FID InceptionV3: parity with the TorchScript model run by torch, and the TF1 resize."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from softvq_jax.eval import inception, torchscript
from conftest import rel_err


def _torch_or_skip():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f"SKIP reason: torch is not installed ({e}); Inception parity needs it")
    pytest.skip(f"torch is not installed ({e}); Inception parity needs it")
  return torch


def tf1_resize_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """TF1 ResizeBilinear, align_corners=False, half_pixel_centers=False, written as loops.

  Source coordinate of output index i is ``i * (in / out)`` (the scale in float32, as TF
  computes it), neighbours ``floor`` and ``min(floor + 1, in - 1)``, linear weights.
  """
  in_h, in_w, _ = image.shape
  img = image.astype(np.float64)
  out = np.zeros((out_h, out_w, image.shape[2]))
  sy, sx = np.float32(in_h) / np.float32(out_h), np.float32(in_w) / np.float32(out_w)
  for i in range(out_h):
    fy = float(np.float32(i) * sy)
    y0 = int(np.floor(fy))
    y1 = min(y0 + 1, in_h - 1)
    wy = fy - y0
    for j in range(out_w):
      fx = float(np.float32(j) * sx)
      x0 = int(np.floor(fx))
      x1 = min(x0 + 1, in_w - 1)
      wx = fx - x0
      top = img[y0, x0] * (1 - wx) + img[y0, x1] * wx
      bottom = img[y1, x0] * (1 - wx) + img[y1, x1] * wx
      out[i, j] = top * (1 - wy) + bottom * wy
  return out


@pytest.fixture(scope="module")
def model():
  return inception.load_fid_inception()


@pytest.fixture(scope="module")
def torch_model():
  torch = _torch_or_skip()
  return torch.jit.load(inception.default_weights_path(), map_location="cpu").eval()


@pytest.fixture(scope="module")
def photos_299():
  from softvq_jax.data.photos import center_crop_resize  # pylint: disable=g-import-not-at-top
  from skimage import data as skdata  # pylint: disable=g-import-not-at-top
  return np.stack([center_crop_resize(skdata.astronaut(), 299),
                   center_crop_resize(skdata.coffee(), 299)]).astype(np.float32)


def _torch_features(torch_model, scaled_nhwc: np.ndarray):
  """pool_3 from the TorchScript forward and mixed_6/conv (first 7 channels, NHWC order)."""
  torch = _torch_or_skip()
  x = torch.from_numpy(np.ascontiguousarray(scaled_nhwc.transpose(0, 3, 1, 2), np.float32))
  with torch.no_grad():
    pool = torch_model(x).numpy()
    layers, h = torch_model.net.layers, x
    for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed",
                 "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"):
      h = getattr(layers, name)(h)
    spatial = layers.mixed_6.conv(h).permute(0, 2, 3, 1)[..., :7].reshape(len(x), -1).numpy()
  return pool, spatial


def test_weights_file_is_read_completely():
  tensors, attributes = inception.module_tree(inception.default_weights_path())
  assert len(tensors) == 376  # 94 conv layers x (weight, beta, mean, var)
  assert sum(k.endswith(".padding") for k in attributes) == 94


def test_features_match_torchscript_on_photos(model, torch_model, photos_299):
  out = jax.jit(lambda m, x: m(x))(model, photos_299)
  pool, spatial = _torch_features(torch_model, photos_299 / 128.0 - 1.0)
  assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 17 * 17 * 7)
  assert "logits" not in out
  assert rel_err(out["pool"], pool) < 1e-4
  assert rel_err(out["spatial"], spatial) < 1e-4
  assert float(np.abs(pool).max()) > 0.1  # not a trivially zero comparison


def test_full_pipeline_with_resize_matches_torch_on_numpy_resize(model, torch_model):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 64, 48, 3)).astype(np.uint8)
  out = jax.jit(lambda m, x: m(x))(model, images)
  resized = np.stack([tf1_resize_reference(im, 299, 299) for im in images])
  pool, spatial = _torch_features(torch_model, resized / 128.0 - 1.0)
  assert rel_err(out["pool"], pool) < 1e-4
  assert rel_err(out["spatial"], spatial) < 1e-4


@pytest.mark.parametrize("shape", [(37, 23), (256, 256), (600, 301)])
def test_resize_matches_numpy_tf1(shape):
  rng = np.random.default_rng(shape[0])
  image = rng.uniform(0, 255, shape + (3,)).astype(np.float32)
  ours = np.asarray(inception.resize_bilinear_tf1(image[None], (299, 299)))[0]
  np.testing.assert_allclose(ours, tf1_resize_reference(image, 299, 299), atol=2e-3, rtol=0)


def test_resize_is_identity_at_299_and_not_half_pixel():
  image = np.arange(299 * 299 * 3, dtype=np.float32).reshape(1, 299, 299, 3)
  assert np.array_equal(np.asarray(inception.resize_bilinear_tf1(image, (299, 299))), image)
  # Legacy TF1 maps output 0 to input 0 exactly: the corner pixel is copied.
  small = np.random.default_rng(1).uniform(0, 255, (1, 5, 7, 3)).astype(np.float32)
  out = np.asarray(inception.resize_bilinear_tf1(small, (10, 14)))
  np.testing.assert_allclose(out[0, 0, 0], small[0, 0, 0], rtol=0, atol=1e-6)
  np.testing.assert_allclose(out[0, 2, 2], small[0, 1, 1], rtol=0, atol=1e-5)


def test_logits_are_pool_times_user_weight(tmp_path, model):
  w = np.random.default_rng(2).normal(size=(2048, 1008)).astype(np.float32) * 0.01
  np.savez(tmp_path / "w.npz", w)
  with_logits = inception.load_fid_inception(
      logits_weight=inception.read_logits_weight(str(tmp_path / "w.npz")), verify_sha1=False)
  images = np.random.default_rng(3).integers(0, 256, (1, 299, 299, 3)).astype(np.uint8)
  out = with_logits(images)
  np.testing.assert_allclose(np.asarray(out["logits"]),
                             np.asarray(out["pool"], np.float64) @ w, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(out["pool"]), np.asarray(model(images)["pool"]),
                             rtol=0, atol=1e-6)


def test_rejects_wrong_inputs(model):
  with pytest.raises(ValueError, match="NHWC"):
    model(jnp.zeros((1, 3, 299, 299)))
  with pytest.raises(ValueError, match="resize=False"):
    model(jnp.zeros((1, 64, 64, 3)), resize=False)


def test_loader_reports_missing_tensors_and_geometry_mismatch(monkeypatch):
  tensors, attributes = inception.module_tree(inception.default_weights_path())
  tensors = dict(tensors)
  del tensors["net.layers.mixed_6.conv.beta"]
  tensors["net.layers.extra.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  attributes = dict(attributes, **{"net.layers.mixed_4.tower.conv_1.padding": [3, 0]})
  monkeypatch.setattr(inception, "module_tree", lambda path: (tensors, attributes))
  with pytest.raises(ValueError) as e:
    inception.load_fid_inception(verify_sha1=False)
  message = str(e.value)
  assert "layers.mixed_6.conv.beta not found" in message
  assert "net.layers.extra.weight has no place" in message
  assert "mixed_4.tower.conv_1.padding: file has [3, 0]" in message


def test_torchscript_reader_runs_no_pickled_code(tmp_path):
  import pickle  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  marker = tmp_path / "pwned"

  class Evil:
    def __reduce__(self):
      return (__import__("os").system, (f"touch {marker}",))

  path = tmp_path / "evil.pt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("m/code/__torch__/m.py", "")
    z.writestr("m/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
  tree = torchscript.load_torchscript(str(path))
  assert not marker.exists()
  assert type(tree["x"]).__module__.startswith("opaque.")


def test_resize_matches_torch_grid_sample_formulation():
  """A second, independent route to TF1's legacy resize: NVIDIA's affine-grid trick.

  Shifting the normalised grid by ``1/in - 1/out`` makes ``grid_sample`` (align_corners=False,
  border padding) sample input coordinate ``j * in / out``, which is TF1's rule.
  """
  torch = _torch_or_skip()
  rng = np.random.default_rng(7)
  image = rng.uniform(0, 255, (2, 256, 200, 3)).astype(np.float32)
  x = torch.from_numpy(image.transpose(0, 3, 1, 2).copy())
  theta = torch.eye(2, 3, dtype=torch.float64)
  theta[0, 2] += 1 / x.shape[3] - 1 / 299
  theta[1, 2] += 1 / x.shape[2] - 1 / 299
  theta = theta.unsqueeze(0).repeat(2, 1, 1)
  grid = torch.nn.functional.affine_grid(theta, [2, 3, 299, 299], align_corners=False)
  ref = torch.nn.functional.grid_sample(x.double(), grid, mode="bilinear", padding_mode="border",
                                        align_corners=False).permute(0, 2, 3, 1).numpy()
  ours = np.asarray(inception.resize_bilinear_tf1(image, (299, 299)))
  # TF (and we) compute source coordinates in float32, this reference in float64: weights
  # differ by ~1e-5, i.e. up to ~4e-3 on a 0..255 scale.
  np.testing.assert_allclose(ours, ref, rtol=0, atol=5e-3)
  assert np.mean(np.abs(ours - ref)) < 1e-3
