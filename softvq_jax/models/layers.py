"""Building blocks shared by the tokenizer ViTs and the SiT/DiT backbones.

Parameters are stored in ``param_dtype`` (float32 by default); matmuls run in
``dtype``. LayerNorm statistics and attention softmax are always float32, as
the reference's autocast does, so bfloat16 compute keeps the numerically
sensitive parts exact enough to train.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
from flax import nnx

from softvq_jax.parallel import constrain

Dtype = Any
Array = jax.Array

# timm initialises Linear weights and position tables with trunc_normal(std=.02)
# truncated at +-2 in absolute value, which at std .02 is effectively untruncated.
trunc_normal_02 = nnx.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)
# PyTorch's default Linear/Conv init (kaiming_uniform with a=sqrt(5)).
torch_default_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class NamedChoice:
  """A process-wide choice among named forms of a computation (which attention kernel,
  which GELU...): set from code, else from an environment variable, else the default.

  Read when a function is traced or a model built, so set it before the first ``jit``.
  The environment is read at that moment, and a value it names wrongly is an error that
  names the variable.
  """

  def __init__(self, what: str, options: tuple[str, ...], env: str, default: str = "auto"):
    self.what, self.options, self.env, self.default = what, options, env, default
    self._value: str | None = None

  def check(self, name: str, source: str | None = None) -> str:
    if name not in self.options:
      raise ValueError(f"{source or self.what} must be one of {self.options}, got {name!r}")
    return name

  def set(self, name: str | None) -> None:
    """``None`` returns to the environment variable's value (or the default)."""
    self._value = None if name is None else self.check(name)

  def get(self) -> str:
    if self._value is not None:
      return self._value
    return self.check(os.environ.get(self.env, self.default), self.env)

  def resolve(self, name: str | None) -> str:
    """``name`` (checked) where a caller gives one for itself, else the current choice."""
    return self.check(name) if name else self.get()


def matmul_precision(dtype: Dtype | None):
  """HIGHEST for float32 compute: GPUs/TPUs otherwise round f32 matmuls to TF32/bf16."""
  if dtype is None or jnp.dtype(dtype) == jnp.float32:
    return jax.lax.Precision.HIGHEST
  return None


def torch_default_bias_init(fan_in: int) -> Callable:
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def linear(
    in_features: int,
    out_features: int,
    *,
    rngs: nnx.Rngs,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    kernel_init: Callable = trunc_normal_02,
    bias_init: Callable = nnx.initializers.zeros_init(),
) -> nnx.Linear:
  """An ``nnx.Linear`` (kernel ``[in, out]``) with the project's precision policy."""
  return nnx.Linear(
      in_features,
      out_features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      precision=matmul_precision(dtype),
      kernel_init=kernel_init,
      bias_init=bias_init,
      rngs=rngs,
  )


def linear_without_bias(layer: nnx.Linear, x: Array) -> tuple[Array, Array | None]:
  """``layer(x)`` split into its matmul and its bias, both cast as the layer casts them, for a
  consumer that adds the bias in its own kernel: ``y + bias`` is ``layer(x)``."""
  kernel = layer.kernel[...]
  bias = layer.bias[...] if layer.bias is not None else None
  x, kernel, bias = layer.promote_dtype((x, kernel, bias), dtype=layer.dtype)
  kwargs = {}
  if layer.preferred_element_type is not None:
    kwargs["preferred_element_type"] = layer.preferred_element_type
  y = layer.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=layer.precision,
                        **kwargs)
  return y, bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast_over_batch(table: Array, batch: int) -> Array:
  """``table`` ``(1, ...)`` repeated ``batch`` times, for learned tokens and position tables.

  Same values as ``jnp.broadcast_to``; only the gradient is built differently. Autodiff
  sums the cotangent over the batch axis alone, and XLA's GPU layout assignment gives such
  a reduction a batch-minor operand layout, which then spreads through the residual stream
  of the whole backward pass: a transpose after every matmul and LayerNorms left out of
  their Triton fusions (SoftVQ-B-64 train step, compiled for an H200: 520 transposing
  kernels, 7% more bytes). Adding adjacent pairs of examples first, an elementwise step,
  stops the spread. Programs compiled for GPUs do that; others keep the plain sum, since
  with a sharded batch a pair stays on one device only when each device holds an even
  number of examples (a TPU pod often holds one: the pairing would add collectives there).
  A custom VJP: reverse-mode differentiation only.
  """
  return jnp.broadcast_to(table, (batch,) + table.shape[1:])


def _broadcast_over_batch_fwd(table: Array, batch: int):
  return broadcast_over_batch(table, batch), None


def _broadcast_over_batch_bwd(batch: int, _, cotangent: Array):
  del batch
  b = cotangent.shape[0]
  if b % 2 == 0 and compile_target() == "gpu":
    pairs = cotangent.reshape((b // 2, 2) + cotangent.shape[1:])
    cotangent = pairs[:, 0] + pairs[:, 1]
  return (jnp.sum(cotangent, axis=0, keepdims=True),)


broadcast_over_batch.defvjp(_broadcast_over_batch_fwd, _broadcast_over_batch_bwd)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, computed in float32 with two-pass variance.

  ``use_affine=False`` gives the parameter-free norm of SiT/DiT and MoVQ blocks.
  The output is cast back to the input dtype.
  """

  def __init__(self, dim: int, *, eps: float = 1e-6, use_affine: bool = True,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs  # deterministic init
    self.eps = eps
    self.use_affine = use_affine
    if use_affine:
      self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
      self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + self.eps)
    if self.use_affine:
      y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


# How attention runs when compute is not float32 (float32 always takes the explicit
# einsum path below: float32 matmuls and softmax as in the reference, which parity
# depends on).
#   "auto":  fused kernels where the backend has them: on NVIDIA GPUs the packed
#            short-sequence kernels of ``models.short_attention`` where they apply (up to
#            128 tokens, no q/k norm or rotation: SiT/DiT on 1-D tokens; 2.6x cuDNN's
#            forward and backward at SiT-XL's training shape on an H100), cuDNN flash
#            attention for the rest; XLA's fused softmax(QK^T)V elsewhere;
#   "cudnn" / "xla": force one of jax.nn.dot_product_attention's implementations;
#   "einsum": the explicit two-einsum form, for comparisons;
#   "pallas": the packed kernels where they apply, also on CPUs (Pallas' interpreter, for
#            tests), "auto" elsewhere.
ATTENTION_IMPLEMENTATIONS = ("auto", "cudnn", "xla", "einsum", "pallas")
_ATTENTION = NamedChoice("attention implementation", ATTENTION_IMPLEMENTATIONS,
                         "SOFTVQ_ATTENTION")


def set_attention_implementation(name: str | None) -> None:
  """Selects the low-precision attention kernel (see ``ATTENTION_IMPLEMENTATIONS``;
  ``None``: ``$SOFTVQ_ATTENTION`` or "auto").

  Read when a function is traced: call it before the first ``jit`` of a model.
  """
  _ATTENTION.set(name)


def attention_implementation() -> str:
  return _ATTENTION.get()


def packed_attention_chosen() -> bool:
  """Whether attention that the packed short-sequence kernels take runs on them: under
  "pallas", and under "auto" in GPU programs."""
  implementation = attention_implementation()
  return implementation == "pallas" or (implementation == "auto" and compile_target() == "gpu")


def _einsum_attention(q: Array, k: Array, v: Array, precision) -> Array:
  head_dim = q.shape[-1]
  q = q * jnp.asarray(head_dim**-0.5, q.dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision,
                      preferred_element_type=jnp.float32)
  if compile_target() == "cpu":
    # The softmax's division moves after the second matmul, onto the (N, head_dim) output
    # instead of the (N, N) weights: on CPUs that pass, and the transposing copy of the
    # weights XLA fused into it, cost more than the matmul after them (SoftVQ-B-64 encode at
    # batch 8 on 2 cores: 4% more images/s). Same function, rounded in another order.
    unnormalised = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    out = jnp.einsum("bhqk,bkhd->bhqd", unnormalised.astype(v.dtype), v, precision=precision,
                     preferred_element_type=jnp.float32)
    return jnp.swapaxes(out / total, 1, 2).astype(v.dtype)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=precision)


# Attention scores of this many bytes stay in a server CPU's last-level cache
# alongside their softmax; a whole batch's (B, H, N, N) float32 scores do not
# (40 MB at B=8, N=321), and the matmuls and softmax then run at memory speed.
CPU_SCORES_BUDGET_BYTES = 8 << 20


# The platform programs are built for. Normally the backend JAX runs on; the bench's
# deviceless GPU compile (``--what kernels``) traces on a CPU host for a GPU target and sets
# it, so every choice below (attention kernel, GELU form, inference forms, compiler options,
# the CPU attention loop) is the one a GPU would make.
_compile_target: str | None = None


def compile_target() -> str:
  """``"gpu"``, ``"tpu"`` or ``"cpu"``: the platform the traced programs are for."""
  return _compile_target or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str):
  """Programs traced inside the block make the choices of ``platform`` (``"gpu"``, ``"tpu"``,
  ``"cpu"``), whatever backend this process runs on."""
  global _compile_target
  if platform not in ("gpu", "tpu", "cpu"):
    raise ValueError(f"platform must be gpu, tpu or cpu, got {platform!r}")
  previous, _compile_target = _compile_target, platform
  try:
    yield
  finally:
    _compile_target = previous


def cpu_attention_group(q: Array) -> int:
  """Examples per step when single-device CPU attention loops over the batch (B: no loop).

  Multi-device programs never loop: a loop over a sharded batch axis would
  gather it onto every device. Nor do examples whose scores alone overflow the
  budget (512² images): there the loop only takes parallelism from the matmuls
  (measured 40% slower on 2 cores).
  """
  b, n, h, _ = q.shape
  if compile_target() != "cpu" or jax.device_count() != 1:
    return b
  per_example = h * n * n * 4
  if per_example > CPU_SCORES_BUDGET_BYTES:
    return b
  return min(b, CPU_SCORES_BUDGET_BYTES // per_example)


def _einsum_attention_batched(q: Array, k: Array, v: Array, precision) -> Array:
  """``_einsum_attention`` over groups of examples on one CPU device (same numbers, 2x faster)."""
  group = cpu_attention_group(q)
  if group >= q.shape[0]:
    return _einsum_attention(q, k, v, precision)
  def one_example(qkv):
    return _einsum_attention(*(t[None] for t in qkv), precision)[0]
  return jax.lax.map(one_example, (q, k, v), batch_size=group if group > 1 else None)


def _cudnn_supported(q: Array) -> bool:
  return (compile_target() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
          and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0)


def dot_product_attention(q: Array, k: Array, v: Array, *, precision=None) -> Array:
  """softmax((q * hd^-0.5) k^T) v on ``(B, N, H, hd)`` inputs, softmax in float32.

  The scale is applied to q before the product, as timm does, so float32 runs
  round the same way as the reference. Lower precisions go through
  ``jax.nn.dot_product_attention`` (fused; its softmax also runs in float32); on GPUs an
  odd sequence length that is differentiated takes ``_even_length_attention``.
  """
  impl = attention_implementation()
  if q.dtype == jnp.float32 or impl == "einsum":
    return _einsum_attention_batched(q, k, v, precision)
  if q.dtype == jnp.float16 and compile_target() == "cpu":
    # XLA's CPU dot has no float16 x float16 -> float32 form: attend in float32.
    f32 = lambda t: t.astype(jnp.float32)
    return _einsum_attention_batched(f32(q), f32(k), f32(v), precision).astype(q.dtype)
  if impl in ("auto", "pallas"):
    if _cudnn_supported(q):
      try:
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
      except (RuntimeError, ValueError, NotImplementedError) as plain_error:
        reason = plain_error
      if q.shape[1] % 2:
        try:
          return _even_length_attention(q, k, v, implementation="cudnn")
        except (RuntimeError, ValueError, NotImplementedError) as padded_error:
          reason = padded_error
      _log_attention_fallback(q, reason)
    impl = "xla"
  if impl == "cudnn" and compile_target() != "gpu":
    raise ValueError(f"attention implementation 'cudnn' needs an NVIDIA GPU; this program "
                     f"compiles for {compile_target()} (auto and xla run everywhere)")
  return jax.nn.dot_product_attention(q, k, v, implementation=impl)


def _even_length_attention(q: Array, k: Array, v: Array, implementation: str) -> Array:
  """Attention over an odd number of tokens, computed on one more, masked, token.

  JAX's cuDNN training form takes only even sequence lengths (its differentiation rule
  checks them as if a bias were given), so the tokenizers' 321 tokens (256 patches,
  class token, 64 latents) would train on XLA's unfused attention. The extra key is
  excluded through cuDNN's padding mask (its score never enters the softmax) and the
  extra query's output is dropped, so the values and gradients are those of the
  unpadded attention.
  """
  b, n = q.shape[:2]
  pad = ((0, 0), (0, 1), (0, 0), (0, 0))
  # Sharded like the batch, so that each device's cuDNN call gets its own examples' lengths.
  lengths = constrain(jnp.full((b,), n, jnp.int32), ("batch",))
  out = jax.nn.dot_product_attention(jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad),
                                     key_value_seq_lengths=lengths,
                                     implementation=implementation)
  return out[:, :n]


_logged_attention_fallbacks: set[tuple[int, ...]] = set()


def refused_cudnn_attention_shapes() -> list[tuple[int, ...]]:
  """The q shapes whose attention cuDNN refused in this process (XLA's attention ran instead)."""
  return sorted(_logged_attention_fallbacks)


def _log_attention_fallback(q: Array, reason: Exception) -> None:
  """Says once per shape that cuDNN refused it: XLA's attention is several times slower."""
  if q.shape not in _logged_attention_fallbacks:
    _logged_attention_fallbacks.add(q.shape)
    logging.warning("cuDNN attention refused q of shape %s (%s); using XLA's attention.",
                    q.shape, reason)


# Inference-only rewrites of two matmuls, made once to the weights of the inference
# classes (``Tokenizer``, ``Generator``; ``prepare_for_inference``). They change which GPU
# kernels XLA emits, not the function; training never sees them.
#   separate q/k/v: the ``qkv`` projection becomes three (``q_proj``, ``k_proj``,
#     ``v_proj``). cuDNN attention reads each operand as a whole array, so the slices of
#     one wide output are copied first: three extra passes over q, k and v per layer. The
#     dot merger would merge the three matmuls back; the inference programs compile with
#     ``inference_compiler_options()``.
#   folded LayerScale: ``(h @ W + b) * gamma`` becomes ``h @ (W * gamma) + b * gamma``
#     (folded in float32, rounded once to the compute dtype). Without the multiply between
#     them, XLA's GEMM rewriter can make the residual add the matmul's C operand (cuBLASLt
#     beta=1) where the stream has the matmul's dtype; the tokenizers' float32 stream (as
#     under autocast) has not, and by default their ViT norm kernels take the adds instead.
# INFERENCE_FORMS chooses where they apply:
#   "auto":   NVIDIA GPUs with bfloat16/float16 compute (separate q/k/v only where
#             attention takes cuDNN);
#   "always": everywhere, float32 included (tests and A/B measurements);
#   "never":  nowhere.
INFERENCE_FORMS = ("auto", "always", "never")
_INFERENCE_FORMS = NamedChoice("inference forms", INFERENCE_FORMS, "SOFTVQ_INFERENCE_FORMS")


def set_inference_forms(name: str | None) -> None:
  """Selects where the inference-only matmul forms apply (see ``INFERENCE_FORMS``;
  ``None``: ``$SOFTVQ_INFERENCE_FORMS`` or "auto").

  Read when an inference object (``Tokenizer``, ``Generator``) is built.
  """
  _INFERENCE_FORMS.set(name)


def inference_forms() -> str:
  return _INFERENCE_FORMS.get()


def inference_forms_apply(dtype: Dtype | None) -> bool:
  """Whether models run in compute ``dtype`` (None: float32) get the inference forms."""
  forms = inference_forms()
  if forms != "auto":
    return forms == "always"
  return compile_target() == "gpu" and dtype is not None and jnp.dtype(dtype) in (
      jnp.bfloat16, jnp.float16)


def prepare_for_inference(model: nnx.Module, sequence_length: int | None = None) -> nnx.Module:
  """Rewrites ``model`` in place into the inference forms (see ``INFERENCE_FORMS``).

  The caller decides whether they apply (``inference_forms_apply``). ``sequence_length``:
  the tokens every attention layer outside the ViT blocks sees (a SiT's), if known; where
  the packed attention kernels take it, that attention keeps its packed ``qkv``. The new
  weights are new arrays: a ``State`` split from the model before still holds the original
  ones.
  """
  attention, forms = attention_implementation(), inference_forms()
  # The tokenizers' sequences are longer than the packed kernels take: their attention
  # runs on cuDNN, which reads separate q, k, v best.
  separate_in_vit_blocks = forms == "always" or attention in ("auto", "cudnn", "pallas")
  # Wherever this separates, the ViT blocks' attention is separated too (by its block, if
  # not here first), so it needs no test of its own.
  separate_elsewhere = forms == "always" or attention in ("auto", "cudnn")
  for _, module in list(nnx.iter_modules(model)):
    if isinstance(module, Block):
      module.fold_layerscale()
      module.prepared_for_inference = True
      if separate_in_vit_blocks:
        module.attn.separate_qkv()
    # The packed kernels read the packed qkv; the library attention (q/k norms, float32,
    # long sequences, wide heads) reads q, k, v best separate.
    if (isinstance(module, Attention) and separate_elsewhere
        and not (sequence_length is not None and module.packed_kernels_take(sequence_length))):
      module.separate_qkv()
  return model


# The ViTs' exact (erf) GELU has no cuBLASLt epilogue, so on GPUs it is an elementwise
# kernel of its own that re-reads and rewrites the MLP's widest activation: about 1.1 of
# 14.6 ms of a SoftVQ-B-64 encode at batch 64, estimated for an H100. INFERENCE_GELU chooses
# the function the inference objects (``Tokenizer``; ``split_for_inference``) run there:
#   "exact": the reference's exact GELU, always;
#   "tanh":  in 16-bit compute, the tanh approximation, which XLA folds into fc1's bias+GELU
#            epilogue on GPUs (evaluated in float32 on the accumulator, rounded once) when
#            the matmul's rows (batch x tokens) are a multiple of 8: for the 321-token
#            SoftVQ encoders, batches of 8, 16, ... It is another function: it differs
#            from the exact GELU by up to 4.7e-4 (at x = -2.70). Float32 programs keep the
#            exact GELU, whatever the choice.
# Opt-in (it changes the outputs beyond rounding); on an H100 it measured no faster
# (SoftVQ-B-64 at batch 64, 2026-11-27).
INFERENCE_GELU = ("exact", "tanh")
_INFERENCE_GELU = NamedChoice("inference GELU", INFERENCE_GELU, "SOFTVQ_INFERENCE_GELU",
                              default="exact")


def set_inference_gelu(name: str | None) -> None:
  """Selects the GELU of 16-bit inference programs (see ``INFERENCE_GELU``; ``None``:
  ``$SOFTVQ_INFERENCE_GELU`` or "exact"). Read when an inference object is built."""
  _INFERENCE_GELU.set(name)


def inference_gelu() -> str:
  return _INFERENCE_GELU.get()


def approximate_gelu_for_inference(model: nnx.Module, dtype: Dtype | None) -> nnx.Module:
  """Turns ``model``'s exact-GELU MLPs to the tanh form in place where ``INFERENCE_GELU``
  says so for compute ``dtype``."""
  if inference_gelu() == "tanh" and dtype is not None and jnp.dtype(dtype).itemsize == 2:
    for _, module in list(nnx.iter_modules(model)):
      if isinstance(module, Mlp):
        module.approximate_gelu = True
  return model


def inference_compiler_options() -> dict[str, str] | None:
  """``jax.jit(..., compiler_options=...)`` for programs that only run models forward
  (tokenizer encode/decode, SiT/DiT forwards and samplers) on GPUs.

  XLA's dot merger is disabled there:
  - It would merge the separate q/k/v matmuls (see ``INFERENCE_FORMS``) back into one.
  - In SiT/DiT it merges the depth-many adaLN modulation matmuls, which all read
    silu(c), into one matmul whose weight is a fresh concatenation of all of theirs,
    rebuilt on every call because weights are arguments: one extra read and write of
    every modulation weight (0.9 GB for SiT-XL in bfloat16) per sampler step.
    Unmerged, each matmul reads its own weight once.
  Training keeps the merger: there the concatenation happens once per step, and the
  merged weight gradient is one matmul. ``SOFTVQ_DOT_MERGER=1`` keeps the merger here
  too (for A/B measurements).

  Passes that ``XLA_FLAGS`` disables (``--xla_disable_hlo_passes=a,b``) stay disabled:
  a compile option of that name replaces the flag's list rather than adding to it.
  """
  if compile_target() == "gpu" and os.environ.get("SOFTVQ_DOT_MERGER") != "1":
    passes = ["dot-merger"]
    for name in _flag_disabled_passes():
      if name not in passes:
        passes.append(name)
    return {"xla_disable_hlo_passes": ",".join(passes)}
  return None


def _flag_disabled_passes() -> list[str]:
  """The HLO passes ``XLA_FLAGS`` disables, in order (the last occurrence of the flag wins,
  as in XLA's own parsing)."""
  passes: list[str] = []
  for token in os.environ.get("XLA_FLAGS", "").split():
    name, sep, value = token.partition("=")
    if sep and name.lstrip("-") == "xla_disable_hlo_passes":
      passes = [p for p in value.strip("'\"").split(",") if p]
  return passes


def _replace_linear(layer: nnx.Linear, kernel: Array, bias: Array | None) -> nnx.Linear:
  """A copy of ``layer`` (same dtype and precision) with the given weights."""
  new = nnx.eval_shape(lambda: linear(kernel.shape[0], kernel.shape[1], rngs=nnx.Rngs(0),
                                      dtype=layer.dtype, param_dtype=kernel.dtype,
                                      use_bias=bias is not None))
  new.kernel = nnx.Param(kernel)
  if bias is not None:
    new.bias = nnx.Param(bias)
  return new


def _scale_linear(layer: nnx.Linear, gamma: Array) -> nnx.Linear:
  """``layer`` followed by a per-output-channel scale, as one Linear (products in float32)."""
  gamma32 = gamma.astype(jnp.float32)
  scale = lambda w: (w.astype(jnp.float32) * gamma32).astype(w.dtype)
  bias = layer.bias[...] if layer.bias is not None else None
  return _replace_linear(layer, scale(layer.kernel[...]),
                         scale(bias) if bias is not None else None)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused ``qkv`` projection (rows q | k | v, head-major).

  ``qk_norm``: an affine LayerNorm over each head's channels of q and of k (``q_norm`` /
  ``k_norm``, PyTorch's default eps 1e-5), applied before the scaling and any rotation.
  """

  def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, rngs: nnx.Rngs,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
               kernel_init: Callable = trunc_normal_02, qk_norm: bool = False,
               qk_norm_eps: float = 1e-5):
    if dim % num_heads:
      raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.precision = matmul_precision(dtype)
    self.qkv = linear(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=kernel_init, rngs=rngs)
    if qk_norm:
      self.q_norm = LayerNorm(self.head_dim, eps=qk_norm_eps, param_dtype=param_dtype)
      self.k_norm = LayerNorm(self.head_dim, eps=qk_norm_eps, param_dtype=param_dtype)
    else:
      self.q_norm = self.k_norm = None
    self.proj = linear(dim, dim, dtype=dtype, param_dtype=param_dtype,
                       kernel_init=kernel_init, rngs=rngs)

  def split_heads(self, x: Array) -> tuple[Array, Array, Array]:
    """``(B, N, D)`` -> q, k, v each ``(B, N, H, hd)``."""
    b, n, _ = x.shape
    if self.qkv is None:  # separate_qkv() was applied
      heads = (b, n, self.num_heads, self.head_dim)
      return (self.q_proj(x).reshape(heads), self.k_proj(x).reshape(heads),
              self.v_proj(x).reshape(heads))
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

  def separate_qkv(self) -> None:
    """Replaces ``qkv`` by ``q_proj``, ``k_proj``, ``v_proj`` (see ``INFERENCE_FORMS``)."""
    if self.qkv is None:
      return
    kernel = self.qkv.kernel[...]
    bias = self.qkv.bias[...] if self.qkv.bias is not None else None
    width = kernel.shape[1] // 3
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
      cols = slice(i * width, (i + 1) * width)
      setattr(self, name, _replace_linear(self.qkv, kernel[:, cols],
                                          bias[cols] if bias is not None else None))
    self.qkv = None

  def __call__(self, x: Array, rope: "RopeTables | None" = None) -> Array:
    return self.proj(self.attend(x, rope))

  def packed_kernels_take(self, tokens: int) -> bool:
    """Whether this attention, over ``tokens`` tokens without rotary embeddings, runs on the
    packed short-attention kernels (which read the packed ``qkv``) on the compile target.
    Sharded activations may still send it elsewhere (``packed_attention``)."""
    if not (packed_attention_chosen() and self.qkv is not None and self.q_norm is None
            and self.qkv.dtype is not None):
      return False
    from softvq_jax.models import short_attention  # pylint: disable=g-import-not-at-top
    return short_attention.supported(tokens, self.head_dim, self.qkv.dtype)

  def attend(self, x: Array, rope: "RopeTables | None" = None) -> Array:
    """The heads' outputs ``(B, N, D)`` before ``proj``."""
    b, n, d = x.shape
    if rope is None and self.packed_kernels_take(n):
      from softvq_jax.models import short_attention  # pylint: disable=g-import-not-at-top
      qkv, bias = linear_without_bias(self.qkv, x)
      out = short_attention.packed_attention(qkv, bias, self.num_heads)
      if out is not None:
        return out
    q, k, v = self.split_heads(x)
    if self.q_norm is not None:
      # In float32 (LayerNorm's own rule) whatever the compute dtype, and at every
      # precision: the reference's half-precision flash-attention branch skips these
      # norms, which would make a qk_norm model a different network under autocast.
      q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
      q, k = rope.rotate(q), rope.rotate(k)
    out = dot_product_attention(q, k, v, precision=self.precision)
    return out.reshape(b, n, d)


class RopeTables(NamedTuple):
  """cos/sin of the rotation angles of one layer, ``(N, H, hd/2)``, for rows ``start..start+N``.

  Only those rows (the image tokens) rotate; class and latent tokens do not.
  Channels ``(2j, 2j+1)`` of a head form one complex number (interleaved
  pairs), rotated in float32 as the reference does.
  """

  cos: Array
  sin: Array
  start: int

  def rotate(self, x: Array) -> Array:
    b, _, h, hd = x.shape
    n = self.cos.shape[0]
    rows = x[:, self.start:self.start + n].astype(jnp.float32).reshape(b, n, h, hd // 2, 2)
    re, im = rows[..., 0], rows[..., 1]
    rotated = jnp.stack([re * self.cos - im * self.sin, re * self.sin + im * self.cos], axis=-1)
    rotated = rotated.reshape(b, n, h, hd).astype(x.dtype)
    return jnp.concatenate([x[:, :self.start], rotated, x[:, self.start + n:]], axis=1)


_TANH_GELU_SCALE, _TANH_GELU_CUBIC = math.sqrt(2.0 / math.pi), 0.044715


def _tanh_gelu_inner(x32: Array) -> Array:
  """The tanh GELU's tanh argument, sqrt(2/pi) (x + 0.044715 x^3)."""
  return _TANH_GELU_SCALE * (x32 + _TANH_GELU_CUBIC * (x32**3))


def _gelu_float32(x: Array, approximate: bool) -> Array:
  x32 = x.astype(jnp.float32)
  if approximate:
    cdf = 0.5 * (1.0 + jnp.tanh(_tanh_gelu_inner(x32)))
  else:
    cdf = 0.5 * (1.0 + jax.lax.erf(x32 * (1.0 / math.sqrt(2.0))))
  return (x32 * cdf).astype(x.dtype)


# How the tanh GELU (SiT/DiT) runs when compute is bfloat16/float16:
#   "auto":    "epilogue" on NVIDIA GPUs, "float32" elsewhere;
#   "epilogue": written in the input dtype, in the form XLA's GEMM rewriter folds into
#              cuBLASLt's bias+GELU epilogue, so the widest activation is written once,
#              by the matmul, instead of being re-read by a separate elementwise kernel.
#              The epilogue evaluates GELU in float32 on the float32 accumulator.
#              Differentiated, the matmul also writes its pre-activation for the backward
#              pass (cuBLASLt's GELU_AUX epilogues), and the slope is the float32 formula
#              recomputed from it there;
#   "float32": the explicit float32 formula (a separate kernel on GPUs).
# The exact (erf) GELU of the ViTs has no cuBLASLt epilogue and always takes "float32".
GELU_IMPLEMENTATIONS = ("auto", "epilogue", "float32")
_GELU = NamedChoice("GELU implementation", GELU_IMPLEMENTATIONS, "SOFTVQ_GELU")


def set_gelu_implementation(name: str | None) -> None:
  """Selects the low-precision tanh-GELU form (see ``GELU_IMPLEMENTATIONS``; ``None``:
  ``$SOFTVQ_GELU`` or "auto").

  Read when a function is traced: call it before the first ``jit`` of a model.
  """
  _GELU.set(name)


def gelu_implementation() -> str:
  return _GELU.get()


def _tanh_gelu_slope(x: Array) -> Array:
  """d/dx of the tanh GELU, in float32."""
  x32 = x.astype(jnp.float32)
  tanh = jnp.tanh(_tanh_gelu_inner(x32))
  inner_slope = _TANH_GELU_SCALE * (1.0 + 3 * _TANH_GELU_CUBIC * x32 * x32)
  return 0.5 * (1.0 + tanh) + 0.5 * x32 * (1.0 - tanh * tanh) * inner_slope


def _tanh_gelu_tangent(x: Array, x_dot: Array) -> Array:
  return (x_dot.astype(jnp.float32) * _tanh_gelu_slope(x)).astype(x_dot.dtype)


@jax.custom_jvp
def _tanh_gelu_epilogue(x: Array) -> Array:
  # jax.nn.gelu's tanh form on x's own dtype is the HLO pattern the rewriter matches;
  # upcasting first (as the float32 path does) hides it.
  return jax.nn.gelu(x, approximate=True)


@_tanh_gelu_epilogue.defjvp
def _tanh_gelu_epilogue_jvp(primals, tangents):
  (x,), (x_dot,) = primals, tangents
  # The primal keeps the rewriter's pattern, and x gains one more user: the rewriter then
  # emits the GELU_AUX epilogue, whose second output is x itself. Autodiff of the pattern
  # would share its subexpressions with the slope and break the match. Checkpointed with
  # the tangent (so that it is on the backward side of linearisation), the slope keeps only
  # x (bfloat16) for the backward pass, as the float32 path does.
  return jax.nn.gelu(x, approximate=True), jax.checkpoint(_tanh_gelu_tangent)(x, x_dot)


def _use_gelu_epilogue(x: Array, approximate: bool, implementation: str) -> bool:
  if not approximate or x.dtype not in (jnp.bfloat16, jnp.float16):
    return False
  if implementation == "auto":
    return compile_target() == "gpu"
  return implementation == "epilogue"


def gelu(x: Array, approximate: bool = False, *, implementation: str | None = None) -> Array:
  """GELU evaluated in float32 and returned in ``x``'s dtype, as PyTorch's kernels do.

  The exact form is PyTorch's ``x/2 * (1 + erf(x/sqrt(2)))``. ``jax.nn.gelu``'s
  exact form goes through ``erfc``, which XLA expands into a long piecewise
  polynomial with an exponential; on GPUs that one elementwise kernel cost more
  than the matmul feeding it.

  For gradients only ``x`` is kept and the float32 intermediates are recomputed
  in the backward pass, as PyTorch's GELU backward does: otherwise autodiff
  keeps several float32 copies of the MLP's widest activation per layer.
  ``jax.checkpoint`` (unlike a custom VJP) keeps forward-mode AD working.

  The bfloat16 tanh form may instead run fused into the preceding matmul, in training too
  (``implementation``, default: the global choice, see ``GELU_IMPLEMENTATIONS``); float32
  compute always takes the formula above.
  """
  implementation = _GELU.resolve(implementation)
  if _use_gelu_epilogue(x, approximate, implementation):
    return _tanh_gelu_epilogue(x)
  return jax.checkpoint(_gelu_float32, static_argnums=(1,))(x, approximate)


class Mlp(nnx.Module):
  """fc1 -> GELU -> fc2. Exact (erf) GELU for the ViTs, tanh GELU for SiT/DiT."""

  def __init__(self, dim: int, hidden_dim: int, *, approximate_gelu: bool = False,
               rngs: nnx.Rngs, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
               kernel_init: Callable = trunc_normal_02):
    self.approximate_gelu = approximate_gelu
    self.fc1 = linear(dim, hidden_dim, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=kernel_init, rngs=rngs)
    self.fc2 = linear(hidden_dim, dim, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=kernel_init, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.fc2(self.hidden(x))

  def hidden(self, x: Array) -> Array:
    """``GELU(fc1(x))``, the input of ``fc2``."""
    return gelu(self.fc1(x), approximate=self.approximate_gelu)


class LayerScale(nnx.Module):
  def __init__(self, dim: int, init_value: float = 1e-5, *, param_dtype: Dtype = jnp.float32):
    self.gamma = nnx.Param(jnp.full((dim,), init_value, param_dtype))

  def __call__(self, x: Array) -> Array:
    return x * self.gamma[...].astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm ViT block: x + ls1 * attn(norm1(x)); x + ls2 * mlp(norm2(x))."""

  def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0,
               layerscale_init: float | None = 1e-5, rngs: nnx.Rngs,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32):
    self.dtype = dtype
    self.norm1 = LayerNorm(dim, param_dtype=param_dtype)
    self.attn = Attention(dim, num_heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ls1 = (LayerScale(dim, layerscale_init, param_dtype=param_dtype)
                if layerscale_init is not None else None)
    self.norm2 = LayerNorm(dim, param_dtype=param_dtype)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ls2 = (LayerScale(dim, layerscale_init, param_dtype=param_dtype)
                if layerscale_init is not None else None)
    # Set by ``prepare_for_inference``: the inference programs may take the fused norms
    # (``models.adaln.vit_kernels_apply``).
    self.prepared_for_inference = False

  def __call__(self, x: Array, rope: RopeTables | None = None) -> Array:
    # The residual stream stays in the input dtype (float32 by default): branch
    # outputs are promoted, as under PyTorch autocast.
    h = self.attn(self.norm1(x), rope)
    if self.ls1 is not None:
      h = self.ls1(h)
    x = x + h.astype(x.dtype)
    h = self.mlp(self.norm2(x))
    if self.ls2 is not None:
      h = self.ls2(h)
    return x + h.astype(x.dtype)

  def chained(self, x: Array, pending: "PendingBranch | None" = None,
              rope: RopeTables | None = None) -> tuple[Array, "PendingBranch"]:
    """The block with its last residual add left to the next norm, as ``AdaLNBlock.chained``:
    ``pending`` (the previous block's MLP branch before fc2's bias, that bias and its
    LayerScale) is added to ``x`` in the same fused kernel as this block's first norm, and
    the block returns ``(x, its own pending branch)``. The affine LayerNorms run as the
    adaLN kernels with the same modulation for every example (``scale = weight``,
    ``scale_offset = 0``).
    Only for 16-bit compute where ``models.adaln.vit_kernels_apply``; otherwise
    ``__call__``'s exact operations run.
    """
    from softvq_jax.models import adaln  # pylint: disable=g-import-not-at-top
    shift, weight = norm_affine(self.norm1)
    x, h = adaln.pending_add_and_norm(x, pending, shift, weight, eps=self.norm1.eps,
                                      out_dtype=self.dtype, scale_offset=0.0)
    attn, bias = linear_without_bias(self.attn.proj, self.attn.attend(h, rope))
    shift, weight = norm_affine(self.norm2)
    x, h = adaln.gated_residual_adaln(x, attn, _layerscale_gate(self.ls1, x), shift, weight,
                                      bias=bias, eps=self.norm2.eps, out_dtype=self.dtype,
                                      scale_offset=0.0)
    branch, bias = linear_without_bias(self.mlp.fc2, self.mlp.hidden(h))
    return x, PendingBranch(branch, bias, _layerscale_gate(self.ls2, x))

  def fold_layerscale(self) -> None:
    """Folds ``ls1``/``ls2`` into ``attn.proj``/``mlp.fc2`` (see ``INFERENCE_FORMS``)."""
    if self.ls1 is not None:
      self.attn.proj = _scale_linear(self.attn.proj, self.ls1.gamma[...])
      self.ls1 = None
    if self.ls2 is not None:
      self.mlp.fc2 = _scale_linear(self.mlp.fc2, self.ls2.gamma[...])
      self.ls2 = None


class PendingBranch(NamedTuple):
  """A chained block's last branch, not yet added to the residual stream: ``x + gate * (h +
  bias)`` is the block's output. ``h`` ``(B, T, D)``, ``bias`` ``(D,)`` or None, ``gate``
  ``(B, D)``, or ``(D,)`` when every example has the same one (a ViT's LayerScale)."""
  h: Array
  bias: Array | None
  gate: Array


def norm_affine(norm: LayerNorm) -> tuple[Array, Array]:
  """``(bias, weight)`` of an affine LayerNorm in float32: the adaLN kernels' shared ``(D,)``
  ``shift`` and ``scale`` with ``scale_offset=0``, ``LN(x) * weight + bias`` = ``norm(x)``."""
  if not norm.use_affine:
    raise ValueError("only an affine LayerNorm maps onto the adaLN kernels' modulation")
  return norm.bias[...].astype(jnp.float32), norm.scale[...].astype(jnp.float32)


def _layerscale_gate(layerscale: "LayerScale | None", x: Array) -> Array:
  """The LayerScale as a shared ``(D,)`` gate (ones without one)."""
  if layerscale is None:
    return jnp.ones(x.shape[-1:], jnp.float32)
  return layerscale.gamma[...].astype(jnp.float32)


class PatchEmbed(nnx.Module):
  """Non-overlapping patch embedding; ``proj.kernel`` is a conv kernel in HWIO.

  Implemented as a matmul over flattened ``(p_row, p_col, channel)`` patches,
  which is the same sum as the strided conv and runs faster on CPU.
  """

  def __init__(self, patch_size: int, in_chans: int, embed_dim: int, *, rngs: nnx.Rngs,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32):
    self.patch_size = patch_size
    self.dtype = dtype
    self.precision = matmul_precision(dtype)
    fan_in = in_chans * patch_size * patch_size
    self.proj = _ConvKernel(patch_size, in_chans, embed_dim, fan_in, rngs=rngs,
                            param_dtype=param_dtype)

  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    p = self.patch_size
    gh, gw = h // p, w // p
    patches = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)
    kernel = self.proj.kernel[...].reshape(p * p * c, -1)
    bias = self.proj.bias[...]
    if self.dtype is not None:
      patches, kernel, bias = (a.astype(self.dtype) for a in (patches, kernel, bias))
    return jnp.einsum("bnk,kd->bnd", patches, kernel, precision=self.precision) + bias


class _ConvKernel(nnx.Module):
  """Holds ``kernel`` (HWIO) and ``bias`` under the name ``proj`` like timm's Conv2d."""

  def __init__(self, patch_size: int, in_chans: int, out_chans: int, fan_in: int, *,
               rngs: nnx.Rngs, param_dtype: Dtype = jnp.float32):
    shape = (patch_size, patch_size, in_chans, out_chans)
    self.kernel = nnx.Param(torch_default_kernel_init(rngs.params(), shape, param_dtype))
    self.bias = nnx.Param(torch_default_bias_init(fan_in)(rngs.params(), (out_chans,), param_dtype))


def _casts_to(module_dtype: Dtype | None, dtype: Dtype) -> bool:
  return module_dtype is not None and jnp.dtype(module_dtype) == jnp.dtype(dtype)


def compute_cast_paths(model: nnx.Module, dtype: Dtype) -> set[tuple]:
  """Paths of the parameters ``model`` casts to ``dtype`` on every call.

  These are the kernels and biases of the linear, convolution and patch-embedding
  layers that compute in ``dtype``; norms, position tables and codebooks are
  used in float32 or cast elsewhere and are left out.
  """
  paths = set()
  for path, node in nnx.iter_graph(model):
    if isinstance(node, (nnx.Linear, nnx.Conv)) and _casts_to(node.dtype, dtype):
      paths.add(tuple(path) + ("kernel",))
      if node.bias is not None:
        paths.add(tuple(path) + ("bias",))
    elif isinstance(node, PatchEmbed) and _casts_to(node.dtype, dtype):
      paths.update({tuple(path) + ("proj", "kernel"), tuple(path) + ("proj", "bias")})
  return paths


def _key_path(path) -> tuple:
  keys = []
  for entry in path:
    if isinstance(entry, jax.tree_util.DictKey):
      keys.append(entry.key)
    elif isinstance(entry, jax.tree_util.SequenceKey):
      keys.append(entry.idx)
  return tuple(keys)


def cast_for_compute(model: nnx.Module, state: Any, dtype: Dtype) -> Any:
  """A copy of ``state`` (of ``model``'s graph) with its per-call casts done once, ahead.

  For inference: the program then reads ``dtype`` weights instead of casting
  float32 ones on every call (one kernel launch and one weight read and write
  per layer saved). The results are bit-identical, since those weights would be
  cast to ``dtype`` before use anyway. ``state`` itself is not modified.
  ``dtype`` None (a model built for float32 compute) or float32: ``state`` as is.
  """
  if dtype is None or jnp.dtype(dtype) == jnp.float32:
    return state
  paths = compute_cast_paths(model, dtype)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x.astype(dtype) if _key_path(p) in paths else x, state)


def split_for_inference(model: nnx.Module, dtype: Dtype | None) -> tuple[nnx.GraphDef, Any]:
  """``(graphdef, state)`` of ``model`` as compiled inference programs run it: rewritten in
  place into the inference forms where they apply (``inference_forms_apply``) and with the
  chosen ``INFERENCE_GELU``, with the per-call weight casts to ``dtype`` done once
  (``cast_for_compute``)."""
  if inference_forms_apply(dtype):
    prepare_for_inference(model, getattr(model, "sequence_length", None))
  approximate_gelu_for_inference(model, dtype)
  graphdef, state = nnx.split(model)
  return graphdef, cast_for_compute(model, state, dtype)

