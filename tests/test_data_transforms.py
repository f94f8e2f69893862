"""Transforms and decoding checked against independent NumPy/PIL computations."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from softvq_jax.data import decode, transforms


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
  """A smooth uint8 image (random low-frequency field): resampling errors stay small on it."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  chans = []
  for _ in range(3):
    a, b, c, d = rng.uniform(0, 6, 4)
    chans.append(127.5 + 100 * np.sin(a * yy + b) * np.cos(c * xx + d))
  return np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)


def box_halve_numpy(a: np.ndarray) -> np.ndarray:
  """Rounded mean of 2x2 blocks (even sizes only): what a BOX resize to half size means."""
  h, w = a.shape[:2]
  assert h % 2 == 0 and w % 2 == 0
  return (a.astype(np.int64).reshape(h // 2, 2, w // 2, 2, 3).sum(axis=(1, 3)) + 2) // 4


def expected_resize(a: np.ndarray, short: int, halve=None) -> np.ndarray:
  """Independent: halve while the short side is >= 2*short, then bicubic to the short side.

  ``halve`` defaults to PIL's BOX resize to (w // 2, h // 2), which the result
  then matches bit for bit; ``box_halve_numpy`` gives a pure-NumPy variant.
  """
  if halve is None:
    halve = lambda x: np.asarray(Image.fromarray(x).resize(  # noqa: E731
        (x.shape[1] // 2, x.shape[0] // 2), Image.BOX))
  while min(a.shape[:2]) >= 2 * short:
    a = halve(a).astype(np.uint8)
  h, w = a.shape[:2]
  nh, nw = round(h * short / min(h, w)), round(w * short / min(h, w))
  return np.asarray(Image.fromarray(a).resize((nw, nh), Image.BICUBIC))


def noise_image(h: int, w: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("h, w, size", [(392, 520, 64), (97, 64, 32), (40, 41, 32), (28, 28, 64),
                                        (1000, 250, 60)])
def test_center_crop_matches_independent(h, w, size):
  a = noise_image(h, w, seed=h + w)
  got = transforms.center_crop_arr(Image.fromarray(a), size)
  r = expected_resize(a, size)
  top, left = (r.shape[0] - size) // 2, (r.shape[1] - size) // 2
  assert got.shape == (size, size, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, r[top:top + size, left:left + size])


def test_box_halving_is_a_block_mean():
  # PIL's fixed-point BOX differs from the exact rounded 2x2 mean by at most one level.
  a = noise_image(64, 96, seed=1)
  pil = np.asarray(Image.fromarray(a).resize((48, 32), Image.BOX)).astype(int)
  assert np.abs(pil - box_halve_numpy(a)).max() <= 1
  # And the whole centre crop through the NumPy halving stays within rounding noise.
  s = smooth_image(392, 520, seed=5)
  got = transforms.center_crop_arr(Image.fromarray(s), 64).astype(int)
  r = expected_resize(s, 64, halve=box_halve_numpy)
  top, left = (r.shape[0] - 64) // 2, (r.shape[1] - 64) // 2
  diff = np.abs(got - r[top:top + 64, left:left + 64])
  assert diff.max() <= 3 and diff.mean() < 0.5


def test_center_crop_is_central():
  # An odd-sized image already at the target short side: a pure crop, no resampling.
  a = smooth_image(32, 45, seed=3)
  got = transforms.center_crop_arr(Image.fromarray(a), 32)
  np.testing.assert_array_equal(got, a[:, 6:38])


def test_resized_size_predicts_resize():
  for (w, h), short in [((500, 375), 256), ((1000, 600), 300), ((333, 777), 64), ((28, 28), 80)]:
    img = Image.new("RGB", (w, h))
    assert transforms.resize_short_side(img, short).size == transforms.resized_size((w, h), short)


def test_random_crop_flip_matches_independent():
  a = noise_image(392, 520, seed=7)
  img = Image.fromarray(a)
  rng = np.random.default_rng(11)
  for _ in range(6):
    state = rng.bit_generator.state
    got = transforms.random_crop_flip(img, 64, rng)
    # Replay the same draws: short side, crop row, crop column, flip (documented order).
    replay = np.random.default_rng()
    replay.bit_generator.state = state
    short = int(replay.integers(64, math.ceil(64 / 0.8) + 1))
    r = expected_resize(a, short)
    top = int(replay.integers(0, r.shape[0] - 64 + 1))
    left = int(replay.integers(0, r.shape[1] - 64 + 1))
    want = r[top:top + 64, left:left + 64]
    if replay.random() < 0.5:
      want = want[:, ::-1]
    np.testing.assert_array_equal(got, want)


def test_random_crop_ranges_cover_reference():
  rng = np.random.default_rng(0)
  params = [transforms.sample_crop_params(rng, (500, 375), 256) for _ in range(2000)]
  shorts = {p.short_side for p in params}
  assert min(shorts) == 256 and max(shorts) == 320  # [S, ceil(S / 0.8)], both ends reached
  assert 0.45 < np.mean([p.flip for p in params]) < 0.55
  for p in params:
    w, h = transforms.resized_size((500, 375), p.short_side)
    assert 0 <= p.top <= h - 256 and 0 <= p.left <= w - 256
  fixed = transforms.sample_crop_params(rng, (500, 375), 256, 256, 256, flip=False)
  assert fixed.short_side == 256 and not fixed.flip


def test_bad_resize_range_is_named():
  with pytest.raises(ValueError, match="min_resize <= max_resize"):
    transforms.sample_crop_params(np.random.default_rng(0), (64, 64), 64, 80, 70)


def test_to_float_range():
  x = np.array([0, 1, 127, 128, 254, 255], np.uint8)
  got = transforms.to_float(x)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, x.astype(np.float64) / 127.5 - 1, atol=1e-7)
  assert got[0] == -1.0 and got[-1] == 1.0


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format=fmt, **kw)
  return buf.getvalue()


def test_decode_modes_to_rgb_uint8():
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
  gray16 = rng.integers(0, 65536, (8, 10), dtype=np.uint16)
  rgba = np.concatenate([rgb, rng.integers(0, 256, (8, 10, 1), dtype=np.uint8)], -1)
  cases = {
      "rgba_png": (_encode(Image.fromarray(rgba, "RGBA"), "PNG"), rgb),
      "gray16_png": (_encode(Image.fromarray(gray16), "PNG"),
                     np.repeat(((gray16.astype(np.int64) + 128) // 257)[..., None], 3, -1)),
      # A dark 16-bit image is scaled as a bright one is (200 / 257 -> 1), not read as 8-bit.
      "dark16_png": (_encode(Image.fromarray(np.full((8, 10), 200, np.uint16)), "PNG"),
                     np.full((8, 10, 3), 1, np.uint8)),
      "gray_png": (_encode(Image.fromarray(rgb[..., 0]), "PNG"), np.repeat(rgb[..., :1], 3, -1)),
      "palette_png": (_encode(Image.fromarray(rgb).quantize(16), "PNG"), None),
      "la_png": (_encode(Image.fromarray(rgba[..., [0, 3]], "LA"), "PNG"),
                 np.repeat(rgb[..., :1], 3, -1)),
  }
  for name, (data, want) in cases.items():
    got = np.asarray(decode.open_image(data, name))
    assert got.shape == (8, 10, 3) and got.dtype == np.uint8, name
    if want is not None:
      np.testing.assert_array_equal(got, want, err_msg=name)
  cmyk = _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
  red = np.asarray(decode.open_image(cmyk))
  assert red.shape == (16, 16, 3) and np.abs(red.astype(int) - [255, 0, 0]).max() < 12


def test_decode_arrays():
  a16 = np.full((4, 5), 65535, np.uint16)
  np.testing.assert_array_equal(decode.array_to_rgb(a16), np.full((4, 5, 3), 255, np.uint8))
  np.testing.assert_array_equal(decode.array_to_rgb(np.full((4, 5, 1), 7, np.uint8)),
                                np.full((4, 5, 3), 7, np.uint8))
  np.testing.assert_array_equal(decode.array_to_rgb(np.full((2, 2, 3), 0.5, np.float32)),
                                np.full((2, 2, 3), 128, np.uint8))
  with pytest.raises(decode.CorruptImageError, match="shape"):
    decode.array_to_rgb(np.zeros((4, 5, 2), np.uint8))


def test_corrupt_bytes_raise_named_error():
  jpeg = _encode(Image.fromarray(smooth_image(32, 32)), "JPEG")
  for data in (b"not an image", jpeg[:len(jpeg) // 2]):
    with pytest.raises(decode.CorruptImageError, match="broken.jpg"):
      decode.open_image(data, "broken.jpg")
