"""``Tokenizer``: encode images to 1-D latents and decode them back, jit-compiled.

>>> tok = Tokenizer.load("converted/softvq-l-64")
>>> z = tok.encode(images)          # (B, H, W, 3) float in [-1, 1] -> (B, L, d)
>>> x = tok.decode(z)               # -> (B, H, W, 3), not clamped
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from softvq_jax import parallel
from softvq_jax.models import layers
from softvq_jax.models.config import TokenizerConfig
from softvq_jax.loaded_model import LoadedModel
from softvq_jax.models.tokenizer import TokenizerModel
from softvq_jax.utils.nnx_utils import model_from_flat

Path = tuple


def abstract_model(config: TokenizerConfig, dtype=jnp.float32) -> TokenizerModel:
  """The model with ``ShapeDtypeStruct`` leaves: no memory is allocated."""
  return nnx.eval_shape(lambda: TokenizerModel(config, dtype=dtype, rngs=nnx.Rngs(0)))


def param_shapes(config: TokenizerConfig) -> dict[Path, jax.ShapeDtypeStruct]:
  state = nnx.state(abstract_model(config), nnx.Param)
  return {tuple(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def build_model(config: TokenizerConfig, flat: Mapping[Path, Any]) -> TokenizerModel:
  """A ``TokenizerModel`` whose parameters are ``flat`` (paths as in ``param_shapes``)."""
  return model_from_flat(abstract_model(config), flat)


def count_params(config: TokenizerConfig) -> int:
  return sum(int(np.prod(s.shape)) for s in param_shapes(config).values())


def _encode_fn(graphdef, state, images):
  model = nnx.merge(graphdef, state)
  return model.encode(images).quant


# The entries of ``encode(return_info=True)`` with one row per example (the rest are batch
# statistics).
_PER_EXAMPLE_INFO = frozenset({"h", "probs", "mean", "logvar"})


def _encode_info_fn(graphdef, state, images, num_valid):
  from softvq_jax.models.quantizers import code_usage  # pylint: disable=g-import-not-at-top
  model = nnx.merge(graphdef, state)
  out = model.encode(images)
  info = {"h": out.h}
  if out.softvq is not None:
    # Batch statistics over the caller's examples only, not the mesh padding; a traced
    # count, so batches that pad to the same shape share one program.
    valid = jnp.arange(images.shape[0]) < num_valid
    info.update(probs=out.softvq.probs,
                **code_usage(out.softvq, model.config.num_codebooks, valid=valid))
  if out.posterior is not None:
    info.update(mean=out.posterior.mean, logvar=out.posterior.logvar)
  return out.quant, info


def _decode_fn(graphdef, state, latents):
  return nnx.merge(graphdef, state).decode(latents)


class Tokenizer(LoadedModel):
  """A tokenizer with its weights, ready for inference.

  Args:
    model: a ``TokenizerModel`` holding the weights.
    dtype: compute dtype, ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``;
      parameters, norms, softmax and the SoftVQ logits stay float32. With bfloat16 the
      compiled programs read a bfloat16 copy of the matmul weights, made once
      here (``state`` and ``save`` keep float32); on GPUs that copy is in the
      inference forms of ``layers.INFERENCE_FORMS`` (LayerScale folded into the
      weights, separate q/k/v matmuls: the same function, rounded differently).
    mesh: optional ``jax.sharding.Mesh``; batches are split over ``data_axis``
      and parameters replicated.

  ``load``, ``random``, ``save`` and ``model`` come from ``LoadedModel``.
  """

  config: TokenizerConfig
  config_class = TokenizerConfig
  family = "tokenizer"
  module_class = TokenizerModel
  abstract = staticmethod(abstract_model)
  stored_shapes = staticmethod(param_shapes)
  build = staticmethod(build_model)

  def __init__(self, model: TokenizerModel, **kwargs):
    super().__init__(model, **kwargs)
    options = layers.inference_compiler_options()
    program = lambda fn: self._program(fn, compiler_options=options)
    self._encode = program(_encode_fn)
    self._encode_info = program(_encode_info_fn)
    self._decode = program(_decode_fn)

  @classmethod
  def from_pytorch(cls, checkpoint_path: str, config: str | Mapping[str, Any], *,
                   weights: str = "auto", **kwargs) -> "Tokenizer":
    """Builds from a PyTorch ``model.safetensors``/``.pt`` and its ``config.json``."""
    from softvq_jax.convert import tokenizer as convert_tokenizer  # pylint: disable=g-import-not-at-top
    tok_config, flat, _ = convert_tokenizer.convert(checkpoint_path, config, weights=weights)
    return cls(build_model(tok_config, flat), **kwargs)

  # --------------------------------------------------------------- inference
  @property
  def image_size(self) -> int:
    return self.config.image_size

  def encode(self, images, *, return_info: bool = False):
    """``(B, H, W, 3)`` float images in [-1, 1] -> latents ``(B, L, d)`` (float32).

    Shapes and dtypes are always checked; value ranges only for NumPy input (a ``[0, 255]``
    or ``[0, 1]`` batch, or a NaN, is named). A ``jax.Array``'s values are not read, as that
    would wait for the device: map them to [-1, 1] yourself (``x / 127.5 - 1``).

    With ``return_info=True`` also returns a dict with ``h`` (the pre-bottleneck
    latents) and, for SoftVQ, ``probs`` ``(B, L, K)``, per-codebook ``usage`` and
    ``perplexity`` ``(G,)``, and the batch scalars ``avg_probs``, ``max_probs`` and
    ``zq_z_cos`` (``quantizers.code_usage``).
    """
    images = self._check_images(images)
    images, n = self._shard_batch(images)
    if return_info:
      quant, info = self._encode_info(self._compute_leaves, images, np.int32(n))
      # By name, not by shape: a per-codebook statistic can be as long as the padded batch.
      return self._trim(quant, n), {
          key: self._trim(value, n) if key in _PER_EXAMPLE_INFO else value
          for key, value in info.items()}
    return self._trim(self._encode(self._compute_leaves, images), n)

  def decode(self, latents) -> jax.Array:
    """``(B, L, d)`` latents -> ``(B, H, W, 3)`` images (float32, not clamped)."""
    latents = self._check_latents(latents)
    latents, n = self._shard_batch(latents)
    return self._trim(self._decode(self._compute_leaves, latents), n)

  def reconstruct(self, images) -> jax.Array:
    return self.decode(self.encode(images))

  def normalize(self, latents) -> jax.Array:
    """``(z - vq_mean) / vq_std``: the latents generators are trained on (``(..., L, d)``)."""
    return (jnp.asarray(self._check_latents(latents, what="normalize's latents", batched=False))
            - self.config.vq_mean) / self.config.vq_std

  def denormalize(self, latents) -> jax.Array:
    """``z * vq_std + vq_mean``: a generator's latents back to the decoder's (``(..., L, d)``)."""
    return (jnp.asarray(self._check_latents(latents, what="denormalize's latents",
                                            batched=False))
            * self.config.vq_std + self.config.vq_mean)

  # ------------------------------------------------------------- validation
  def _check_images(self, images) -> jax.Array:
    shape = tuple(getattr(images, "shape", ()))
    dtype = getattr(images, "dtype", None)
    if dtype is None:
      images = np.asarray(images)
      shape, dtype = images.shape, images.dtype
    size = self.config.image_size
    if len(shape) != 4:
      raise ValueError(f"images must be a 4-D batch (B, H, W, 3), got shape {shape}")
    if shape[-1] != 3:
      hint = " (this looks like NCHW: transpose with x.transpose(0, 2, 3, 1))" if shape[1] == 3 else ""
      raise ValueError(f"images must be NHWC with 3 channels last, got shape {shape}{hint}")
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"images must be float in [-1, 1], got dtype {np.dtype(dtype).name}"
                      + (" (convert uint8 with x / 127.5 - 1)" if np.dtype(dtype) == np.uint8 else ""))
    patch = self.config.encoder.patch_size
    h, w = shape[1:3]
    if h % patch or w % patch:
      raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    if (h, w) != (size, size):
      raise ValueError(f"this tokenizer takes {size}x{size} images (its position table has "
                       f"{(size // patch) ** 2} patches), got {h}x{w}")
    if shape[0] == 0:
      raise ValueError("images is an empty batch")
    if isinstance(images, np.ndarray):
      # Host arrays are checked where it costs no device sync: a [0, 255] float batch or
      # a NaN would otherwise encode without a word. (Resampling may overshoot [-1, 1] a little.)
      low, high = float(np.min(images)), float(np.max(images))
      if not (-1.5 <= low and high <= 1.5):
        raise ValueError(f"images must be floats in [-1, 1], got values in [{low:g}, {high:g}]"
                         + (" (from [0, 255] use x / 127.5 - 1)" if high > 2 else ""))
      if low >= 0 and high > 0:
        # A [0, 1] batch passes the range check and encodes into the wrong latents; a real
        # [-1, 1] batch with no pixel darker than mid-grey is rare enough to mention.
        warnings.warn(f"images have no negative value (they lie in [{low:g}, {high:g}]): "
                      "the tokenizer takes [-1, 1]; from [0, 1] use x * 2 - 1", stacklevel=3)
    return images

  def _check_latents(self, latents, *, what: str = "latents", batched: bool = True) -> jax.Array:
    """``latents`` as an array, checked: ``(B, L, d)`` and B > 0 where ``batched``, else
    ``(..., L, d)``; floating point. ``what`` names them in the errors."""
    if getattr(latents, "dtype", None) is None:  # nested lists, as encode accepts them
      latents = np.asarray(latents)
    shape, dtype = tuple(latents.shape), latents.dtype
    want = self.config.latent_shape
    if shape[-2:] != want or (batched and len(shape) != 3):
      raise ValueError(f"{what} must have shape ({'B' if batched else '...'}, {want[0]}, "
                       f"{want[1]}), got {shape}")
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"{what} must be floating point, got dtype {np.dtype(dtype).name}")
    if batched and shape[0] == 0:
      raise ValueError(f"{what} is an empty batch")
    return latents

  def _shard_batch(self, batch) -> tuple[jax.Array, int]:
    if self.mesh is None:
      return jnp.asarray(batch), batch.shape[0]
    (batch,), n = parallel.pad_and_shard([batch], self.mesh, self.data_axis)
    return batch, n

