"""Image transforms of the reference: ADM centre crop (eval) and random resize-crop-flip (train).

Both work on PIL images (the resampling filters are PIL's, as in the reference)
and return uint8 ``(S, S, 3)`` arrays; ``to_float`` maps uint8 to float32 in
[-1, 1] exactly as ``ToTensor`` + ``Normalize(0.5, 0.5)`` do (x / 127.5 - 1).
Randomness comes from a ``numpy.random.Generator`` so Grain can seed it per
example.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image


def resized_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
  """The (width, height) ``resize_short_side`` produces for a PIL ``size``, without resizing."""
  w, h = size
  while min(w, h) >= 2 * short_side:
    w, h = w // 2, h // 2
  scale = short_side / min(w, h)
  return round(w * scale), round(h * scale)


def resize_short_side(image: Image.Image, short_side: int) -> Image.Image:
  """ADM's resize: BOX-halve while the short side is >= 2x the target, then one bicubic resize.

  The halving is what the reference does by hand because its PIL lacked
  ``reducing_gap``; it changes pixel values, so we keep it for parity.
  """
  while min(*image.size) >= 2 * short_side:
    image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
  scale = short_side / min(*image.size)
  return image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
  """guided-diffusion's ``center_crop_arr``: short side to ``image_size``, central square."""
  arr = np.asarray(resize_short_side(image, image_size))
  top = (arr.shape[0] - image_size) // 2
  left = (arr.shape[1] - image_size) // 2
  return np.ascontiguousarray(arr[top:top + image_size, left:left + image_size])


@dataclasses.dataclass(frozen=True)
class CropParams:
  """The random choices of one training augmentation (in the order they are drawn)."""
  short_side: int
  top: int
  left: int
  flip: bool


def default_resize_range(image_size: int) -> tuple[int, int]:
  """The reference's short-side range: [S, ceil(S / 0.8)], i.e. [256, 320] at 256."""
  return image_size, math.ceil(image_size / 0.8)


def sample_crop_params(rng: np.random.Generator, size: tuple[int, int], image_size: int,
                       min_resize: int | None = None, max_resize: int | None = None,
                       flip: bool = True) -> CropParams:
  """Draws the short side in [min_resize, max_resize], the crop corner, then the flip.

  ``size`` is the PIL (width, height) of the decoded image.
  """
  lo, hi = default_resize_range(image_size)
  lo = lo if min_resize is None else min_resize
  hi = hi if max_resize is None else max_resize
  if not image_size <= lo <= hi:
    raise ValueError(f"need image_size <= min_resize <= max_resize, got {image_size}, {lo}, {hi}")
  short = int(rng.integers(lo, hi + 1))
  w, h = resized_size(size, short)
  top = int(rng.integers(0, h - image_size + 1))
  left = int(rng.integers(0, w - image_size + 1))
  flipped = bool(rng.random() < 0.5) if flip else False
  return CropParams(short, top, left, flipped)


def apply_crop(image: Image.Image, params: CropParams, image_size: int) -> np.ndarray:
  arr = np.asarray(resize_short_side(image, params.short_side))
  arr = arr[params.top:params.top + image_size, params.left:params.left + image_size]
  if params.flip:
    arr = arr[:, ::-1]
  return np.ascontiguousarray(arr)


def random_crop_flip(image: Image.Image, image_size: int, rng: np.random.Generator,
                     min_resize: int | None = None, max_resize: int | None = None,
                     flip: bool = True) -> np.ndarray:
  """The reference's training augmentation (``random_crop_arr`` + ``RandomHorizontalFlip``)."""
  params = sample_crop_params(rng, image.size, image_size, min_resize, max_resize, flip)
  return apply_crop(image, params, image_size)


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1] (x / 127.5 - 1)."""
  return np.asarray(images, np.float32) / np.float32(127.5) - np.float32(1.0)


def to_float_on_device(images):
  """``to_float`` inside a jitted program, for batches kept uint8 on the host.

  A lookup in ``to_float``'s own 256 values rather than the arithmetic: compilers may
  turn the division by 127.5 into a multiplication by its rounded reciprocal (XLA's CPU
  backend does), one ulp off for most values.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  table = jnp.asarray(to_float(np.arange(256, dtype=np.uint8)))
  return jnp.take(table, images.astype(jnp.int32), mode="clip")
