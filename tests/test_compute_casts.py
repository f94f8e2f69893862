"""The fast GELU and the ahead-of-time weight casts of bfloat16 inference.

GELU is checked against PyTorch's own kernels and a float64 closed form; the
casts must leave every output bit-identical while moving the casts out of the
compiled programs.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from softvq_jax import Generator, Tokenizer
from softvq_jax.models import layers
from softvq_jax.models.sit import GeneratorConfig, SiT
from conftest import jaxpr_equations
from test_tokenizer_api import SMALL


def _points():
  # Dense over the body, plus tails where erf saturates and cancellation could show.
  return np.concatenate([np.linspace(-6, 6, 4001), [-30.0, -9.5, 9.5, 30.0]]).astype(np.float32)


# PyTorch's float32 GELU is off the float64 value by up to 9e-7 in absolute terms: in
# the negative tail 1 + erf(x/sqrt 2) cancels. The same form here may not do worse.
GELU_ATOL = 1e-6


@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_matches_float64_closed_form_and_torch(approximate):
  x = _points()
  ours = np.asarray(layers.gelu(jnp.asarray(x), approximate=approximate))
  v = x.astype(np.float64)
  if approximate:
    closed = 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))
  else:
    closed = np.array([0.5 * a * (1.0 + math.erf(a / math.sqrt(2.0))) for a in v])
  np.testing.assert_allclose(ours, closed, rtol=1e-6, atol=GELU_ATOL)
  ref = torch.nn.functional.gelu(torch.from_numpy(x),
                                 approximate="tanh" if approximate else "none").numpy()
  np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=2 * GELU_ATOL)


@pytest.mark.parametrize("approximate", [False, True])
def test_bfloat16_gelu_is_the_float32_value_rounded_once(approximate):
  x = jnp.asarray(_points()).astype(jnp.bfloat16)
  out = layers.gelu(x, approximate=approximate)
  assert out.dtype == jnp.bfloat16
  expected = layers.gelu(x.astype(jnp.float32), approximate=approximate).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))
  # PyTorch computes bf16 GELU in float32 and rounds once too.
  mode = "tanh" if approximate else "none"
  ref = torch.nn.functional.gelu(torch.from_numpy(np.asarray(x, np.float32)).bfloat16(),
                                 approximate=mode).float().numpy()
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=2**-7, atol=1e-6)


@pytest.fixture
def gelu_mode():
  previous = layers.gelu_implementation()
  yield layers.set_gelu_implementation
  layers.set_gelu_implementation(previous)


def _all_bfloat16_values(limit=20.0):
  bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
  x = np.asarray(jnp.asarray(bits).view(jnp.bfloat16).astype(jnp.float32))
  return x[np.isfinite(x) & (np.abs(x) < limit)]


def test_gelu_implementation_choice(gelu_mode):
  bf16 = jnp.ones((4,), jnp.bfloat16)
  uses_epilogue = lambda x, approximate=True: "_tanh_gelu_epilogue" in str(
      jax.make_jaxpr(lambda v: layers.gelu(v, approximate))(x))
  gelu_mode("auto")
  assert not uses_epilogue(bf16)  # no cuBLASLt to fold it into off GPUs
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(layers.jax, "default_backend", lambda: "gpu")
    assert uses_epilogue(bf16)
  gelu_mode("epilogue")
  assert uses_epilogue(bf16) and uses_epilogue(bf16.astype(jnp.float16))
  # float32 compute (parity) and the exact GELU never take it.
  assert not uses_epilogue(bf16.astype(jnp.float32))
  assert not uses_epilogue(bf16, approximate=False)
  gelu_mode("float32")
  assert not uses_epilogue(bf16)
  with pytest.raises(ValueError, match="GELU implementation must be one of"):
    layers.set_gelu_implementation("fast")
  with pytest.raises(ValueError, match="GELU implementation must be one of"):
    layers.gelu(bf16, True, implementation="fast")


def test_epilogue_gelu_forward_error_is_bounded_even_unfused():
  """Fused, cuBLASLt evaluates GELU in float32 on the accumulator and rounds once. Unfused
  (as here on CPU) the bfloat16 ops round one by one: measured over every bfloat16 input
  with |x| < 20, its error stays within 2 bfloat16 steps at the input's scale, against 1
  for the float32 form."""
  x = _all_bfloat16_values()
  v = x.astype(np.float64)
  closed = 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))
  xb = jnp.asarray(x, jnp.bfloat16)
  step = np.maximum(np.abs(v), 1.0) * 2.0**-8
  for fn, bound in ((layers._tanh_gelu_epilogue, 2.0),
                    (lambda a: layers._gelu_float32(a, True), 1.0)):
    out = jax.jit(fn)(xb)
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float64) - closed) / step
    assert err.max() <= bound, err.max()


def test_differentiated_epilogue_gelu_keeps_its_forward_and_the_float32_slope(gelu_mode):
  """Training keeps the epilogue form (fused on GPUs, GELU_AUX): the forward values are the
  undifferentiated form's, the slope is the float32 formula at x."""
  x = jnp.asarray(_points()).astype(jnp.bfloat16)
  loss = lambda v: jnp.sum(layers.gelu(v, True).astype(jnp.float32) ** 2)
  gelu_mode("float32")
  plain = jax.jit(jax.value_and_grad(loss))(x)
  gelu_mode("epilogue")
  fused = jax.jit(jax.value_and_grad(loss))(x)
  forward = jax.jit(layers._tanh_gelu_epilogue)(x)  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.asarray(fused[0]), np.asarray(jax.jit(loss)(x)))
  x64 = np.asarray(x, np.float64)
  c = math.sqrt(2.0 / math.pi)
  th = np.tanh(c * (x64 + 0.044715 * x64**3))
  slope = 0.5 * (1 + th) + 0.5 * x64 * (1 - th**2) * c * (1 + 3 * 0.044715 * x64**2)
  # The gradients, 2 * gelu(x) * slope(x), differ by the forward forms' rounding (together at
  # most 3 bfloat16 steps at the input's scale, above) times 2 * slope, and by the rounding
  # of the bfloat16 gradient itself.
  step = np.maximum(np.abs(x64), 1.0) * 2.0**-8
  bound = 2 * 3 * step * np.abs(slope) + 2**-7 * np.abs(np.asarray(plain[1], np.float64)) + 1e-6
  gap = np.abs(np.asarray(fused[1], np.float64) - np.asarray(plain[1], np.float64))
  assert np.all(gap <= bound), (gap / bound).max()
  _, grad = jax.vjp(lambda v: layers.gelu(v, True), x)
  g = grad(jnp.ones_like(x))[0]
  np.testing.assert_allclose(np.asarray(g, np.float64), slope, rtol=2**-7, atol=4e-6)
  # Forward mode works, and the backward pass keeps only x (bfloat16), no float32 copies.
  primal, tangent = jax.jvp(lambda v: layers.gelu(v, True), (x,), (jnp.ones_like(x),))
  np.testing.assert_array_equal(np.asarray(primal), np.asarray(forward))
  np.testing.assert_allclose(np.asarray(tangent, np.float32), np.asarray(g, np.float32),
                             rtol=2**-7, atol=4e-6)
  _, backward = jax.vjp(lambda v: layers.gelu(v, True), x)
  kept = [leaf for leaf in jax.tree.leaves(backward) if getattr(leaf, "size", 0) >= x.size]
  assert kept and all(leaf.dtype == jnp.bfloat16 for leaf in kept)
  # Second order (the slope is differentiable too): d2/dx2 by finite differences of the slope.
  curvature = jax.grad(lambda v: jnp.sum(jax.grad(lambda u: jnp.sum(
      layers.gelu(u, True).astype(jnp.float32)))(v).astype(jnp.float32)))
  x32 = jnp.asarray([-1.5, -0.25, 0.5, 2.0], jnp.float32)
  h = 1e-3
  slope_at = layers._tanh_gelu_slope  # pylint: disable=protected-access
  d2 = (slope_at(x32 + h) - slope_at(x32 - h)) / (2 * h)
  np.testing.assert_allclose(np.asarray(curvature(x32.astype(jnp.bfloat16)), np.float32),
                             np.asarray(d2), rtol=2**-6, atol=2e-3)


def test_exact_gelu_uses_erf_not_erfc():
  """jax.nn.gelu's erfc form expands into a kernel slower than the matmul before it on GPUs."""
  jaxpr = str(jax.make_jaxpr(layers.gelu)(jnp.ones((4,), jnp.bfloat16)))
  assert " erf " in jaxpr and "erfc" not in jaxpr


def _tiny_tokenizer():
  from softvq_jax.models.config import TokenizerConfig
  from softvq_jax.models.tokenizer import TokenizerModel
  return TokenizerModel(TokenizerConfig.from_json_dict(SMALL), rngs=nnx.Rngs(0),
                        dtype=jnp.bfloat16)


def test_cast_paths_are_exactly_the_matmul_weights():
  model = _tiny_tokenizer()
  paths = layers.compute_cast_paths(model, jnp.bfloat16)
  expected = set()
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Linear):
      expected |= {path + ("kernel",), path + ("bias",)}
  expected |= {("encoder", "model", "patch_embed", "proj", "kernel"),
               ("encoder", "model", "patch_embed", "proj", "bias")}
  assert paths == expected
  # What runs in float32 stays out: norms, position tables, latent tokens, codebooks.
  assert not any("norm1" in p or "pos_embed" in p or "latent_tokens" in p for p in paths)
  assert layers.compute_cast_paths(model, jnp.float16) == set()


def test_cast_for_compute_is_bit_identical_and_leaves_the_state_alone():
  model = _tiny_tokenizer()
  graphdef, state = nnx.split(model)
  cast = layers.cast_for_compute(model, state, jnp.bfloat16)
  dtypes = {jnp.dtype(x.dtype) for x in jax.tree.leaves(state)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  n_cast = sum(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(cast))
  assert n_cast == len(layers.compute_cast_paths(model, jnp.bfloat16))
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3), minval=-1, maxval=1)
  run = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
  np.testing.assert_array_equal(np.asarray(run(state, images)), np.asarray(run(cast, images)))
  assert layers.cast_for_compute(model, state, jnp.float32) is state


def test_tokenizer_and_generator_run_on_cast_weights_but_keep_float32_ones():
  tok = Tokenizer.random(SMALL, seed=3, dtype="bfloat16")
  kernels = [x for x in jax.tree.leaves(tok._compute_state) if x.dtype == jnp.bfloat16]
  assert kernels and all(x.dtype == jnp.float32 for x in jax.tree.leaves(tok.state))
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  # The same program on the float32 weights (both jitted: eager bfloat16 rounds differently).
  direct = jax.jit(lambda s, x: nnx.merge(tok.graphdef, s).encode(x).quant)(tok.state, images)
  np.testing.assert_array_equal(np.asarray(tok.encode(images)), np.asarray(direct))

  cfg = GeneratorConfig.preset("SiT-S/1", input_size=8, in_channels=4, hidden_size=32, depth=2,
                               num_heads=2)
  gen = Generator(SiT(cfg, rngs=nnx.Rngs(0)), dtype="bfloat16")
  assert any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(gen._compute_state))
  x = np.random.default_rng(1).normal(size=(2, 8, 4)).astype(np.float32)
  t, y = np.full((2,), 0.3, np.float32), np.array([1, 2], np.int32)
  direct = jax.jit(lambda s, *a: nnx.merge(gen.graphdef, s)(*a))(gen.state, x, t, y)
  np.testing.assert_array_equal(np.asarray(gen(x, t, y)), np.asarray(direct))


@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_gradient_matches_torch_autograd_and_plain_autodiff(approximate):
  x = _points()
  grad = np.asarray(jax.grad(lambda v: jnp.sum(layers.gelu(v, approximate)))(jnp.asarray(x)))
  plain = np.asarray(jax.grad(
      lambda v: jnp.sum(layers._gelu_float32(v, approximate)))(jnp.asarray(x)))
  np.testing.assert_allclose(grad, plain, rtol=1e-6, atol=1e-7)
  t = torch.from_numpy(x).requires_grad_(True)
  torch.nn.functional.gelu(t, approximate="tanh" if approximate else "none").sum().backward()
  # Differentiating the formula and PyTorch's hand-written backward differ by float32
  # rounding in the tails (at most 4e-6 here).
  np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-5, atol=5e-6)
  # Forward mode still works (a custom VJP would not allow it).
  _, tangent = jax.jvp(lambda v: layers.gelu(v, approximate), (jnp.asarray(x),),
                       (jnp.ones_like(jnp.asarray(x)),))
  np.testing.assert_allclose(np.asarray(tangent), grad, rtol=1e-6, atol=2e-6)


def test_gelu_backward_keeps_only_its_bfloat16_input():
  """Autodiff of the float32 formula would keep five float32 copies of the activation."""
  import contextlib
  import io
  from jax import ad_checkpoint
  x = jnp.ones((4, 8), jnp.bfloat16)
  for approximate in (False, True):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      ad_checkpoint.print_saved_residuals(lambda v: jnp.sum(layers.gelu(v, approximate)), x)
    saved = out.getvalue().strip().splitlines()
    assert len(saved) == 1 and saved[0].startswith("bf16[4,8] from the argument"), saved


def _float64_attention(q, k, v):
  """softmax(q k^T / sqrt(hd)) v of ``(B, N, H, hd)`` arrays in float64 NumPy."""
  logits = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k.astype(np.float64))
  logits /= math.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v.astype(np.float64))


def test_float32_attention_forms_match_float64_softmax_attention():
  """CPU programs divide by the softmax's sum after the second matmul, other platforms before
  it: both are softmax(q k^T / sqrt(hd)) v, checked against float64 NumPy, with gradients."""
  rng = np.random.default_rng(3)
  q, k, v = (rng.standard_normal((2, 37, 3, 16)).astype(np.float32) * 2 for _ in range(3))
  expected = _float64_attention(q, k, v)
  highest = jax.lax.Precision.HIGHEST
  results, programs = {}, {}
  for platform in ("cpu", "gpu"):
    # A fresh function per platform: traces are cached per function, not per platform.
    attend = lambda a, b, c: layers._einsum_attention(a, b, c, highest)  # pylint: disable=protected-access,cell-var-from-loop
    with layers.compiling_for(platform):
      programs[platform] = jax.jit(attend).lower(q, k, v).as_text()
      results[platform] = jax.jit(attend)(q, k, v)
      results[platform + "_grads"] = jax.jit(jax.grad(
          lambda a, b, c: jnp.sum(jnp.sin(attend(a, b, c))), argnums=(0, 1, 2)))(q, k, v)  # pylint: disable=cell-var-from-loop
    assert results[platform].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(results[platform]), expected, rtol=1e-5, atol=5e-6)
  for cpu_grad, other_grad in zip(results["cpu_grads"], results["gpu_grads"]):
    np.testing.assert_allclose(np.asarray(cpu_grad), np.asarray(other_grad), rtol=1e-4, atol=1e-5)
  # The two forms really differ (one divides the (N, N) weights, the other the output).
  assert programs["cpu"] != programs["gpu"]
  assert "tensor<2x3x37x37xf32>" in programs["gpu"].split("divide")[1].split("\n")[0]
  assert "tensor<2x3x37x16xf32>" in programs["cpu"].split("divide")[1].split("\n")[0]


def test_odd_length_attention_on_one_masked_extra_token_is_the_plain_attention():
  """The even-length form cuDNN trains with: one padded token, masked as a key and dropped as
  a query, leaves the values (float64 NumPy) and the gradients (unpadded attention) as they are."""
  rng = np.random.default_rng(5)
  q, k, v = (rng.standard_normal((2, 37, 3, 16)).astype(np.float32) for _ in range(3))
  cotangent = rng.standard_normal(q.shape).astype(np.float32)
  expected = _float64_attention(q, k, v)
  padded = lambda a, b, c: layers._even_length_attention(a, b, c, implementation="xla")  # pylint: disable=protected-access
  plain = lambda a, b, c: jax.nn.dot_product_attention(a, b, c, implementation="xla")
  np.testing.assert_allclose(np.asarray(jax.jit(padded)(q, k, v)), expected, rtol=1e-5, atol=5e-6)
  grads = {}
  for name, attend in (("padded", padded), ("plain", plain)):
    grads[name] = jax.jit(jax.grad(lambda a, b, c, f=attend: jnp.sum(f(a, b, c) * cotangent),
                                   argnums=(0, 1, 2)))(q, k, v)
  for got, want in zip(grads["padded"], grads["plain"]):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.fixture
def cudnn_checks_pass(monkeypatch):
  """JAX's cuDNN attention traces on this CPU as it would on a Hopper GPU with cuDNN 9.10
  (only its Python-side checks look at the device; nothing here compiles or runs it)."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(cudnn_attention, "check_compute_capability", lambda capability: True)
  monkeypatch.setattr(cudnn_attention, "is_cuda_compute_capability_equal", lambda capability: False)


def _attention_primitives(fn, *args) -> tuple[set[str], set[str]]:
  """The cuDNN attention primitives and all primitive names in ``fn``'s jaxpr."""
  names = {e.primitive.name for e in jaxpr_equations(jax.make_jaxpr(fn)(*args).jaxpr)}
  return {n for n in names if "dot_product_attention" in n}, names


@pytest.mark.parametrize("tokens", [321, 64])
def test_gpu_training_attention_takes_cudnn_for_odd_and_even_lengths(cudnn_checks_pass, tokens):
  """The tokenizers' 321 tokens: JAX refuses cuDNN's training form for odd lengths, so the
  gradient goes through the padded form; forward-only programs and even lengths keep the
  plain call (no pad)."""
  del cudnn_checks_pass
  q = jnp.ones((2, tokens, 4, 64), jnp.bfloat16)
  loss = lambda a: layers.dot_product_attention(a, a * 2, a * 3).astype(jnp.float32).sum()
  with layers.compiling_for("gpu"):
    grad_cudnn, grad_ops = _attention_primitives(jax.grad(loss), q)
    forward_cudnn, forward_ops = _attention_primitives(loss, q)
  assert {"dot_product_attention_fwd_wrapper", "dot_product_attention_bwd_wrapper"} <= grad_cudnn
  assert forward_cudnn
  assert "pad" not in forward_ops
  assert ("pad" in grad_ops) == (tokens % 2 == 1)


def test_refused_cudnn_attention_is_logged_once_per_shape(caplog, monkeypatch):
  """Without cuDNN (this CPU), a GPU program's bfloat16 attention falls back to XLA and says so
  once per shape."""
  monkeypatch.setattr(layers, "_logged_attention_fallbacks", set())
  q = jnp.ones((1, 9, 2, 8), jnp.bfloat16)
  with layers.compiling_for("gpu"), caplog.at_level("WARNING"):
    for _ in range(2):
      out = jax.eval_shape(lambda a: layers.dot_product_attention(a, a, a), q)
  assert out.shape == q.shape
  messages = [r.getMessage() for r in caplog.records if "cuDNN attention refused" in r.getMessage()]
  assert len(messages) == 1 and "(1, 9, 2, 8)" in messages[0]


def test_forced_cudnn_attention_off_a_gpu_is_refused_by_name(monkeypatch):
  """attention "cudnn" is a GPU kernel: elsewhere it is named, not JAX's internal error."""
  monkeypatch.setenv("SOFTVQ_ATTENTION", "cudnn")
  layers.set_attention_implementation(None)
  q = jnp.ones((1, 9, 2, 8), jnp.bfloat16)
  try:
    with pytest.raises(ValueError, match="'cudnn' needs an NVIDIA GPU; this program compiles "
                                         "for cpu"):
      with layers.compiling_for("cpu"):
        jax.eval_shape(lambda a: layers.dot_product_attention(a, a, a), q)
  finally:
    monkeypatch.delenv("SOFTVQ_ATTENTION")
    layers.set_attention_implementation(None)


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="runs cuDNN: needs an NVIDIA GPU and JAX_PLATFORMS=cuda")
def test_odd_length_cudnn_training_attention_on_a_gpu():
  """On a GPU, the padded cuDNN form's values and gradients (bfloat16) against float32 XLA
  attention and its autodiff: relative L2 errors of bfloat16 size, and cuDNN in the gradient."""
  rng = np.random.default_rng(7)
  q, k, v = (rng.standard_normal((4, 321, 6, 64)).astype(np.float32) for _ in range(3))
  cotangent = rng.standard_normal(q.shape).astype(np.float32)
  def loss(attend, *qkv):
    return jnp.sum(attend(*qkv).astype(jnp.float32) * cotangent)
  ours = lambda a, b, c: layers.dot_product_attention(a, b, c)
  reference = lambda a, b, c: jax.nn.dot_product_attention(a, b, c, implementation="xla")
  low = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
  grad = lambda attend: jax.jit(jax.grad(functools.partial(loss, attend), argnums=(0, 1, 2)))
  cudnn_ops, _ = _attention_primitives(jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2)),
                                       *low)
  assert "dot_product_attention_bwd_wrapper" in cudnn_ops
  rel = lambda got, want: float(np.linalg.norm(np.asarray(got, np.float32) - want)
                                / np.linalg.norm(want))
  assert rel(jax.jit(ours)(*low), _float64_attention(q, k, v)) < 1e-2
  for got, want in zip(grad(ours)(*low), grad(reference)(q, k, v)):
    assert rel(got, np.asarray(want)) < 2e-2


def test_even_length_attention_lengths_follow_the_batch_sharding():
  """Under the trainers' activation sharding (8 fake devices), the key lengths are sharded like
  the examples, so each device's cuDNN call reads its own examples' lengths; values unchanged."""
  from softvq_jax import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.create_mesh([("data", 8)])
  rng = np.random.default_rng(9)
  q, k, v = (rng.standard_normal((8, 5, 2, 8)).astype(np.float32) for _ in range(3))
  batch = NamedSharding(mesh, PartitionSpec("data"))
  attend = jax.jit(lambda a, b, c: layers._even_length_attention(a, b, c, implementation="xla"),  # pylint: disable=protected-access
                   in_shardings=(batch,) * 3)
  with parallel.activation_sharding(mesh):
    jaxpr = jax.make_jaxpr(attend)(q, k, v)
    out = attend(q, k, v)
  np.testing.assert_allclose(np.asarray(out), _float64_attention(q, k, v), rtol=1e-5, atol=5e-6)
  constraints = [e for e in jaxpr_equations(jaxpr.jaxpr) if e.primitive.name == "sharding_constraint"
                 and e.invars[0].aval.dtype == jnp.int32]
  assert len(constraints) == 1
  assert constraints[0].params["sharding"].spec == PartitionSpec("data")
