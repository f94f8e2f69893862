"""The photographs bundled with scikit-image: real images that need no download."""

from __future__ import annotations

import numpy as np
from PIL import Image

# Colour photographs (RGB) shipped inside the scikit-image package.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "immunohistochemistry",
                  "hubble_deep_field", "cat")


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """Square centre crop, then bicubic resize to ``size``; uint8 HWC in and out."""
  h, w = image.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  crop = Image.fromarray(image[top:top + side, left:left + side])
  return np.asarray(crop.resize((size, size), Image.BICUBIC))


def skimage_photos(size: int, names=SKIMAGE_PHOTOS) -> tuple[np.ndarray, list[str]]:
  """The bundled photos as a float batch in [-1, 1], NHWC, ``size`` x ``size``."""
  from skimage import data as skdata  # pylint: disable=g-import-not-at-top
  images, kept = [], []
  for name in names:
    loader = getattr(skdata, name, None)
    if loader is None:
      continue
    image = np.asarray(loader())
    if image.ndim != 3 or image.shape[-1] != 3:
      continue
    images.append(center_crop_resize(image.astype(np.uint8), size))
    kept.append(name)
  if not images:
    raise RuntimeError("scikit-image ships none of the expected photos")
  return np.stack(images).astype(np.float32) / 127.5 - 1.0, kept
