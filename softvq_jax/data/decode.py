"""Robust image decoding: whatever a file or array holds -> an RGB uint8 PIL image.

Training sets contain odd files (ImageNet has CMYK JPEGs and PNGs named .JPEG;
scraped folders have palette GIFs, 16-bit PNGs, RGBA icons). Every one of them
becomes an 8-bit RGB image here; a file PIL cannot decode raises
``CorruptImageError`` so the pipeline can skip and count it.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image


class CorruptImageError(ValueError):
  """An image that cannot be decoded; carries the name of the example."""

  def __init__(self, name: str, reason: str):
    super().__init__(f"cannot decode image {name}: {reason}")
    self.name = name
    self.reason = reason


def _wide_to_uint8(a: np.ndarray) -> np.ndarray:
  """Integer images wider than 8 bits -> uint8, scaling the 16-bit range down."""
  a = np.asarray(a)
  if a.dtype == np.uint8:
    return a
  if np.issubdtype(a.dtype, np.bool_):
    return a.astype(np.uint8) * 255
  if np.issubdtype(a.dtype, np.floating):
    a = np.nan_to_num(a.astype(np.float64))
    # Float images are conventionally in [0, 1]; larger values mean [0, 255].
    scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
    return np.clip(np.round(a * scale), 0, 255).astype(np.uint8)
  if a.dtype == np.uint16:
    # 16-bit data (PNG "I;16" modes) whatever its values: a dark image stays dark.
    return ((a.astype(np.int64) + 128) // 257).astype(np.uint8)
  a = a.astype(np.int64)
  if a.size and a.max() > 255:
    # 16-bit data (PNG "I;16"/"I" modes): PIL's own convert would clip at 255
    # and turn most of the image white, so rescale 0..65535 -> 0..255.
    return np.clip((a + 128) // 257, 0, 255).astype(np.uint8)
  return np.clip(a, 0, 255).astype(np.uint8)


def pil_to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB. Alpha is dropped (not composited), as torchvision's loader does."""
  mode = image.mode
  if mode == "RGB":
    return image
  if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
    gray = _wide_to_uint8(np.asarray(image))
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))
  if mode == "P":
    # Palette images with transparency must go through RGBA or PIL warns.
    image = image.convert("RGBA" if "transparency" in image.info else "RGB")
  return image.convert("RGB")


def array_to_rgb(array: Any, name: str = "<array>") -> np.ndarray:
  """An (H, W), (H, W, 1|3|4) array of any numeric dtype -> (H, W, 3) uint8."""
  a = np.asarray(array)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim == 2:
    a = np.repeat(_wide_to_uint8(a)[..., None], 3, axis=-1)
  elif a.ndim == 3 and a.shape[-1] in (3, 4):
    a = _wide_to_uint8(a[..., :3])
  else:
    raise CorruptImageError(name, f"array of shape {a.shape} is not an HxW, HxWx1, HxWx3 or "
                            "HxWx4 image")
  if a.shape[0] == 0 or a.shape[1] == 0:
    raise CorruptImageError(name, f"empty image of shape {a.shape}")
  return np.ascontiguousarray(a)


def open_image(data: bytes | str | os.PathLike, name: str | None = None) -> Image.Image:
  """Decodes encoded bytes or a file path fully into an RGB PIL image.

  Raises:
    CorruptImageError: the data is not an image PIL can decode (truncated,
      garbage, unknown format).
  """
  if name is None:
    name = os.fspath(data) if isinstance(data, (str, os.PathLike)) else "<bytes>"
  try:
    fp = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    with Image.open(fp) as image:
      image.load()  # decode now: Image.open only reads the header
      rgb = pil_to_rgb(image)
      if rgb is image:
        rgb = image.copy()  # the file is closed when the `with` ends
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise CorruptImageError(name, f"{type(e).__name__}: {e}") from e
  if rgb.width == 0 or rgb.height == 0:
    raise CorruptImageError(name, f"empty image of size {rgb.size}")
  return rgb


def to_pil_rgb(image: Any, name: str = "<image>") -> Image.Image:
  """Bytes, a path, a PIL image or an array -> RGB PIL image."""
  if isinstance(image, Image.Image):
    return pil_to_rgb(image)
  if isinstance(image, (bytes, bytearray, memoryview, str, os.PathLike)):
    return open_image(image, name)
  return Image.fromarray(array_to_rgb(image, name))
