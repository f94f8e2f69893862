"""Image conversions and PNG grids (NHWC, float in [-1, 1])."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from softvq_jax.utils import fs


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 with the reference's rounding for real images and
  reconstructions (127.5 x + 128, truncated). Generated samples: ``samples_to_uint8``."""
  x = np.asarray(images, np.float32)
  return np.clip(127.5 * x + 128.0, 0, 255).astype(np.uint8)


def samples_to_uint8(images) -> np.ndarray:
  """Generated [-1, 1] floats -> uint8 as the reference's sampling scripts write them:
  clamped, mapped to [0, 1], times 255, truncated (float32 throughout). Half a level
  below ``to_uint8`` on average (0.0 becomes 127, not 128); gFID against the reference's
  numbers needs this one."""
  x = np.clip(np.asarray(images, np.float32), -1.0, 1.0)
  unit = (x + np.float32(1.0)) / np.float32(2.0)
  return np.clip(np.float32(255.0) * unit, 0, 255).astype(np.uint8)


def from_uint8(images) -> np.ndarray:
  return np.asarray(images, np.float32) / 127.5 - 1.0


def make_grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
  """Stacks equally long lists of uint8 NHWC batches into one image, one batch per row."""
  n, h, w, c = rows[0].shape
  grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), 255, np.uint8)
  for r, batch in enumerate(rows):
    for i, img in enumerate(batch):
      y, x = pad + r * (h + pad), pad + i * (w + pad)
      grid[y:y + h, x:x + w] = img
  return grid


def save_png(path: str, image: np.ndarray) -> str:
  """Writes a PNG atomically (local: temporary file, then rename; ``gs://``: one upload)."""
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
  return fs.write_bytes_atomic(path, buffer.getvalue())
