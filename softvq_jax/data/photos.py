"""The photographs bundled with scikit-image: real images that need no download."""

from __future__ import annotations

import numpy as np
from PIL import Image

# Eight distinct colour photographs (RGB) shipped inside the scikit-image package (its
# ``cat`` is ``chelsea`` again, so the stereo pair's left motorcycle view takes that place).
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "immunohistochemistry",
                  "hubble_deep_field", "motorcycle")


def load_photo(name: str) -> np.ndarray | None:
  """The bundled photo ``name`` as uint8 HWC RGB; None where this scikit-image lacks it."""
  from skimage import data as skdata  # pylint: disable=g-import-not-at-top
  if name == "motorcycle":
    loader = getattr(skdata, "stereo_motorcycle", None)
    image = None if loader is None else loader()[0]
  else:
    loader = getattr(skdata, name, None)
    image = None if loader is None else loader()
  if image is None:
    return None
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    return None
  return image.astype(np.uint8)


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """Square centre crop, then bicubic resize to ``size``; uint8 HWC in and out."""
  h, w = image.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  crop = Image.fromarray(image[top:top + side, left:left + side])
  return np.asarray(crop.resize((size, size), Image.BICUBIC))


def skimage_photos(size: int, names=SKIMAGE_PHOTOS) -> tuple[np.ndarray, list[str]]:
  """The bundled photos as a float batch in [-1, 1], NHWC, ``size`` x ``size``."""
  images, kept = [], []
  for name in names:
    image = load_photo(name)
    if image is not None:
      images.append(center_crop_resize(image, size))
      kept.append(name)
  if not images:
    raise RuntimeError("scikit-image ships none of the expected photos")
  return np.stack(images).astype(np.float32) / 127.5 - 1.0, kept
