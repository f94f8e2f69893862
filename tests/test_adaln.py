"""The fused adaLN norm kernels (softvq_jax.models.adaln) against NumPy and the XLA form.

On CPUs the Pallas kernels run in Pallas' interpreter: the same kernel bodies, index
arithmetic and masks as on a GPU, so these tests pin what a GPU runs except Triton's own
code generation (checked by the GPU-only test and by compiling for an H200 target).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from softvq_jax import parallel
from softvq_jax.models import adaln, layers
from softvq_jax.models.sit import GeneratorConfig, SiT

EPS = 1e-6


def _over_tokens(modulation):
  """A ``(B, D)`` modulation as ``(B, 1, D)``; a shared ``(D,)`` one as it is."""
  modulation = np.asarray(modulation, np.float64)
  return modulation[:, None] if modulation.ndim == 2 else modulation


def _modulation_sum(a, like):
  """``a`` ``(B, T, D)`` summed to the shape of the modulation ``like``."""
  return a.sum(1) if np.ndim(like) == 2 else a.sum((0, 1))


def numpy_adaln(x, shift, scale, eps=EPS, scale_offset=1.0):
  x = np.asarray(x, np.float64)
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  normed = (x - mean) / np.sqrt(var + eps)
  return normed * (scale_offset + _over_tokens(scale)) + _over_tokens(shift)


def numpy_adaln_vjp(x, scale, grad, eps=EPS, scale_offset=1.0):
  """Closed-form cotangents of ``numpy_adaln`` for x, shift, scale."""
  x, grad = (np.asarray(a, np.float64) for a in (x, grad))
  width = x.shape[-1]
  mean = x.mean(-1, keepdims=True)
  rstd = 1 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
  normed = (x - mean) * rstd
  g = grad * (scale_offset + _over_tokens(scale))
  dx = rstd * (g - g.sum(-1, keepdims=True) / width
               - normed * (g * normed).sum(-1, keepdims=True) / width)
  return dx, _modulation_sum(grad, scale), _modulation_sum(grad * normed, scale)


def _inputs(shape, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  b, t, d = shape
  x = rng.normal(size=shape) * 1.7 + 0.3
  return (jnp.asarray(x, dtype), jnp.asarray(rng.normal(size=(b, d)), dtype),
          jnp.asarray(rng.normal(size=(b, d)) * 0.3, dtype),
          jnp.asarray(rng.normal(size=(b, d)), dtype),
          jnp.asarray(rng.normal(size=shape), dtype), jnp.asarray(rng.normal(size=shape), dtype))


# Widths that are and are not powers of two, token counts that do and do not fill the
# kernels' row tiles, a batch large and small against the backward grid's splits.
SHAPES = [(3, 7, 40), (2, 8, 64), (1, 5, 24), (130, 9, 16)]


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_numpy_values_and_cotangents(shape):
  x, shift, scale, _, grad, _ = _inputs(shape)
  out, vjp = jax.vjp(lambda *a: adaln.adaln_modulate(*a, eps=EPS, out_dtype=jnp.float32,
                                                      implementation="pallas"), x, shift, scale)
  np.testing.assert_allclose(out, numpy_adaln(x, shift, scale), rtol=1e-5, atol=2e-5)
  dx, dshift, dscale = vjp(grad)
  want = numpy_adaln_vjp(x, scale, grad)
  for got, expected in zip((dx, dshift, dscale), want):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("scale_offset", [1.0, 0.0])
def test_shared_modulations_match_numpy_values_and_cotangents(scale_offset):
  # A ViT's affine LayerNorm: one (D,) shift and scale for every example, whose cotangents
  # sum over the batch too; with scale_offset 0 the scale is the LayerNorm's weight.
  x, shift, scale, _, grad, _ = _inputs((3, 7, 40), seed=10)
  shift, scale = shift[1], scale[2]
  fn = lambda *a: adaln.adaln_modulate(*a, eps=EPS, out_dtype=jnp.float32,
                                       implementation="pallas", scale_offset=scale_offset)
  out, vjp = jax.vjp(fn, x, shift, scale)
  want = numpy_adaln(x, shift, scale, scale_offset=scale_offset)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=2e-5)
  # The XLA form (taken where a mesh shards more than the batch) computes the same.
  xla = adaln.adaln_modulate(x, shift, scale, eps=EPS, implementation="xla",
                             scale_offset=scale_offset)
  np.testing.assert_allclose(xla, want, rtol=1e-5, atol=2e-5)
  got = vjp(grad)
  assert [g.shape for g in got] == [x.shape, (40,), (40,)]
  for got, expected in zip(got, numpy_adaln_vjp(x, scale, grad, scale_offset=scale_offset)):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


# The last two: the backward kernel with other rows per loop step than the forward's.
@pytest.mark.parametrize("shape,shared,backward_rows", [
    (SHAPES[0], False, 2), (SHAPES[1], False, 2), (SHAPES[2], False, 2), (SHAPES[0], True, 2),
    (SHAPES[0], False, 1), (SHAPES[3], True, 3)])
def test_residual_kernel_matches_numpy_values_and_cotangents(shape, shared, backward_rows,
                                                             monkeypatch):
  monkeypatch.setattr(adaln, "_BACKWARD_ROWS_PER_STEP", backward_rows)
  x, shift, scale, gate, grad, x_grad = _inputs(shape, seed=1)
  # A ViT block's LayerScale and LayerNorm: (D,) for every example, the weight as the scale.
  offset = 0.0 if shared else 1.0
  if shared:
    shift, scale, gate = shift[0], scale[-1], gate[1]
  rng = np.random.default_rng(2)
  h = jnp.asarray(rng.normal(size=shape), jnp.float32)
  bias = jnp.asarray(rng.normal(size=shape[-1:]), jnp.float32)
  fn = lambda x, h, bias, gate, shift, scale: adaln.gated_residual_adaln(
      x, h, gate, shift, scale, bias=bias, eps=EPS, out_dtype=jnp.float32,
      implementation="pallas", scale_offset=offset)
  (x_new, out), vjp = jax.vjp(fn, x, h, bias, gate, shift, scale)
  branch = np.asarray(h, np.float64) + np.asarray(bias, np.float64)
  x_new_np = np.asarray(x, np.float64) + _over_tokens(gate) * branch
  np.testing.assert_allclose(x_new, x_new_np, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out, numpy_adaln(x_new_np, shift, scale, scale_offset=offset),
                             rtol=1e-5, atol=2e-5)
  _, out_xla = adaln.gated_residual_adaln(x, h, gate, shift, scale, bias=bias, eps=EPS,
                                          implementation="xla", scale_offset=offset)
  np.testing.assert_allclose(out_xla, out, rtol=1e-5, atol=2e-5)
  dx, dh, dbias, dgate, dshift, dscale = vjp((x_grad, grad))
  dnorm, dshift_np, dscale_np = numpy_adaln_vjp(x_new_np, scale, grad, scale_offset=offset)
  total = dnorm + np.asarray(x_grad, np.float64)
  dh_np = total * _over_tokens(gate)
  want = (total, dh_np, dh_np.sum((0, 1)), _modulation_sum(total * branch, gate), dshift_np,
          dscale_np)
  for got, expected in zip((dx, dh, dbias, dgate, dshift, dscale), want):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_residual_kernel_without_a_bias_is_the_zero_bias():
  x, shift, scale, gate, grad, x_grad = _inputs((2, 5, 24), seed=9)
  fn = lambda bias: lambda x, h: adaln.gated_residual_adaln(
      x, h, gate, shift, scale, bias=bias, eps=EPS, out_dtype=jnp.float32,
      implementation="pallas")
  got, vjp_none = jax.vjp(fn(None), x, grad)
  want, vjp_zero = jax.vjp(fn(jnp.zeros((24,))), x, grad)
  np.testing.assert_array_equal(got[1], want[1])
  for a, b in zip(vjp_none((x_grad, grad)), vjp_zero((x_grad, grad))):
    np.testing.assert_array_equal(a, b)


def test_bfloat16_output_is_the_float32_result_rounded_once():
  x, shift, scale, *_ = _inputs((2, 6, 48), seed=3)
  out = adaln.adaln_modulate(x, shift.astype(jnp.bfloat16), scale.astype(jnp.bfloat16), eps=EPS,
                             out_dtype=jnp.bfloat16, implementation="pallas")
  assert out.dtype == jnp.bfloat16
  exact = numpy_adaln(x, shift.astype(jnp.bfloat16).astype(jnp.float32),
                      scale.astype(jnp.bfloat16).astype(jnp.float32))
  # One rounding of a float32 value: within half a bfloat16 ulp (2^-8 relative) plus float32
  # noise; the XLA form rounds the norm to x's dtype first and may differ by one ulp.
  np.testing.assert_allclose(np.asarray(out, np.float64), exact, rtol=2 ** -8 + 1e-5, atol=1e-5)


def test_backward_cotangents_keep_the_input_dtypes():
  x, shift, scale, gate, grad, x_grad = _inputs((2, 5, 32), seed=4)
  lo = lambda a: a.astype(jnp.bfloat16)
  _, vjp = jax.vjp(lambda x, h, bias, *a: adaln.gated_residual_adaln(
      x, h, *a, bias=bias, eps=EPS, out_dtype=jnp.bfloat16, implementation="pallas"),
                   x, lo(grad), lo(shift[0]), lo(gate), lo(shift), lo(scale))
  dtypes = [g.dtype for g in vjp((x_grad, lo(grad)))]
  assert dtypes == [jnp.float32] + [jnp.bfloat16] * 5


def _perturbed(model, scale: float = 0.1):
  """``nnx.split(model)`` with every float parameter moved off its init (zero adaLN
  modulations, LayerScale 1e-5, unit norms), so that every cotangent of the fused norms
  matters."""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return graphdef, jax.tree.unflatten(treedef, [
      leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype)
      if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf for leaf, k in zip(leaves, keys)])


def _has_pallas_call(fn, *args) -> bool:
  return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def test_auto_takes_the_kernel_only_for_gpu_programs_with_16_bit_outputs():
  x, shift, scale, *_ = _inputs((2, 4, 32))

  def norm(out_dtype):
    return lambda *a: adaln.adaln_modulate(*a, eps=EPS, out_dtype=out_dtype, implementation="auto")

  with layers.compiling_for("cpu"):  # named: the suite also runs on GPU hosts
    assert not _has_pallas_call(norm(jnp.bfloat16), x, shift, scale)
  with layers.compiling_for("gpu"):
    assert _has_pallas_call(norm(jnp.bfloat16), x, shift, scale)
    assert not _has_pallas_call(norm(jnp.float32), x, shift, scale)
    assert not _has_pallas_call(norm(None), x, shift, scale)
    assert not _has_pallas_call(lambda *a: adaln.adaln_modulate(
        *a, eps=EPS, out_dtype=jnp.bfloat16, implementation="xla"), x, shift, scale)
    wide = jax.ShapeDtypeStruct((1, 2, adaln._MAX_KERNEL_WIDTH + 1), jnp.float32)
    modulation = jax.ShapeDtypeStruct((1, adaln._MAX_KERNEL_WIDTH + 1), jnp.float32)
    assert not _has_pallas_call(norm(jnp.bfloat16), wide, modulation, modulation)


def test_bad_shapes_and_names_are_refused():
  x, shift, scale, *_ = _inputs((2, 4, 32))
  with pytest.raises(ValueError, match="needs x"):
    adaln.adaln_modulate(x, shift[:1], scale, eps=EPS)
  with pytest.raises(ValueError, match=r"all \(B, D\) or all \(D,\)"):
    adaln.adaln_modulate(x, shift[0], scale, eps=EPS)
  with pytest.raises(ValueError, match="h must have"):
    adaln.gated_residual_adaln(x, x[:, :2], shift, shift, scale, eps=EPS)
  with pytest.raises(ValueError, match="bias must have"):
    adaln.gated_residual_adaln(x, x, shift, shift, scale, bias=shift, eps=EPS)
  with pytest.raises(ValueError, match="must be one of"):
    adaln.adaln_modulate(x, shift, scale, eps=EPS, out_dtype=jnp.bfloat16, implementation="triton")
  with pytest.raises(ValueError, match="must be one of"):
    adaln.set_adaln_implementation("fast")


@pytest.mark.parametrize("shared", [False, True])
def test_sharded_batch_runs_the_kernel_per_device_without_gathering(shared):
  # Shared (D,) modulations are replicated, and their cotangents summed over the devices.
  devices = np.array(jax.devices()[:4])
  mesh = jax.sharding.Mesh(devices, ("data",))
  x, shift, scale, gate, grad, _ = _inputs((8, 5, 32), seed=5)
  h, bias = grad, scale[0]
  if shared:
    gate, shift, scale = gate[1], shift[2], scale[3]

  def loss(x, h, gate, shift, scale, bias):
    x_new, y = adaln.gated_residual_adaln(x, h, gate, shift, scale, bias=bias, eps=EPS,
                                          out_dtype=jnp.float32, implementation="pallas")
    return jnp.sum(y * y) + jnp.sum(x_new * x_new)

  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  args = [jax.device_put(a, rows if a.ndim > 1 else replicated)
          for a in (x, h, gate, shift, scale, bias)]
  grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))
  with parallel.activation_sharding(mesh):
    lowered = grad_fn.lower(*args)
    got = grad_fn(*args)
  assert "shard_map" in lowered.as_text() or "manual" in lowered.as_text()
  assert "all-gather" not in lowered.compile().as_text()
  want = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))(x, h, gate, shift, scale, bias)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_sit_blocks_with_the_kernel_match_the_xla_form():
  cfg = GeneratorConfig(input_size=6, in_channels=4, hidden_size=48, depth=2, num_heads=3,
                        num_classes=5)
  # adaLN-Zero starts with zero modulations; random ones exercise every cotangent.
  graphdef, state = _perturbed(SiT(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16), 0.05)
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(3, 6, 4)), jnp.float32)
  t = jnp.asarray([0.1, 0.5, 0.9], jnp.float32)
  y = jnp.asarray([0, 3, 5])

  def loss(impl):
    def fn(state):
      adaln.set_adaln_implementation(impl)
      try:
        out = nnx.merge(graphdef, state)(x, t, y)
      finally:
        adaln.set_adaln_implementation("auto")
      return jnp.mean(out ** 2), out
    return fn

  (value_k, out_k), grads_k = jax.jit(jax.value_and_grad(loss("pallas"), has_aux=True))(state)
  (value_x, out_x), grads_x = jax.jit(jax.value_and_grad(loss("xla"), has_aux=True))(state)
  assert _has_pallas_call(lambda s: loss("pallas")(s)[0], state)
  # bfloat16 activations: the two forms round at different places.
  np.testing.assert_allclose(out_k, out_x, rtol=0.05, atol=0.02 * np.abs(out_x).max())
  flat_k, flat_x = jax.tree.leaves(grads_k), jax.tree.leaves(grads_x)
  for gk, gx in zip(flat_k, flat_x):
    scale = np.abs(np.asarray(gx, np.float32)).max() + 1e-6
    np.testing.assert_allclose(np.asarray(gk, np.float32), np.asarray(gx, np.float32),
                               atol=0.05 * scale)


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="compiles Triton kernels: needs a GPU and JAX_PLATFORMS=cuda")
@pytest.mark.parametrize("backward_rows,backward_warps", [(2, None), (1, 8), (1, 16)])
def test_kernels_on_a_gpu_match_numpy(backward_rows, backward_warps, monkeypatch):
  monkeypatch.setattr(adaln, "_BACKWARD_ROWS_PER_STEP", backward_rows)
  monkeypatch.setattr(adaln, "_BACKWARD_WARPS", backward_warps)
  # SiT-XL's training shape, a SoftVQ-B encoder's (321 tokens of width 768), an odd one.
  for shape in [(256, 64, 1152), (32, 321, 768), (5, 7, 40)]:
    x, shift, scale, gate, grad, x_grad = _inputs(shape, seed=7)
    h = x_grad
    bias = shift[0]
    fn = jax.jit(lambda x, h, *a: adaln.gated_residual_adaln(
        x, h, *a, bias=bias, eps=EPS, out_dtype=jnp.float32, implementation="pallas"))
    (x_new, out), vjp = jax.vjp(fn, x, h, gate, shift, scale)
    branch = np.asarray(h, np.float64) + np.asarray(bias, np.float64)
    x_new_np = np.asarray(x, np.float64) + np.asarray(gate, np.float64)[:, None] * branch
    np.testing.assert_allclose(out, numpy_adaln(x_new_np, shift, scale), rtol=1e-4, atol=1e-4)
    dx, dh, dgate, dshift, dscale = vjp((x_grad, grad))
    dnorm, dshift_np, dscale_np = numpy_adaln_vjp(x_new_np, scale, grad)
    total = dnorm + np.asarray(x_grad, np.float64)
    for got, expected in zip((dx, dgate, dshift, dscale),
                             (total, (total * branch).sum(1), dshift_np, dscale_np)):
      np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


@pytest.mark.parametrize("kind,remat", [("sit", "none"), ("dit", "dots_saveable")])
def test_chained_blocks_are_the_unchained_network_in_float32(kind, remat):
  # The reference-parity tests run the unchained blocks (they read every block's output);
  # the chained form every other call takes must be the same float32 program, bit for bit.
  cfg = GeneratorConfig(kind=kind, input_size=5, in_channels=4, hidden_size=32, depth=3,
                        num_heads=2, num_classes=7, learn_sigma=kind == "dit")
  model = SiT(cfg, rngs=nnx.Rngs(3), remat_policy=remat)
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(4), len(leaves))
  model = nnx.merge(graphdef, jax.tree.unflatten(treedef, [
      leaf + 0.1 * jax.random.normal(k, leaf.shape, leaf.dtype)
      if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf for leaf, k in zip(leaves, keys)]))
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32)
  t = jnp.asarray([0.25, 0.75]) if kind == "sit" else jnp.asarray([10, 900])
  y = jnp.asarray([1, 6])
  chained = model(x, t, y)
  unchained, taps = model(x, t, y, return_intermediates=True)
  assert len(taps) > cfg.depth
  np.testing.assert_array_equal(np.asarray(chained), np.asarray(unchained))


def test_vit_blocks_chained_through_the_kernels_are_as_accurate_as_xla():
  """Opt-in ("pallas"): a ViT's blocks run their affine LayerNorms, LayerScales and residual
  adds through the adaLN kernels, chained across blocks and into the final norm. In
  bfloat16 the output and every parameter gradient must be as close to the float32
  network's as XLA's bfloat16 form is; float32 programs never take the kernels. (With
  MAETok's rotary embeddings, which only change what ``attend`` computes.)"""
  from softvq_jax.models.config import ViTConfig  # pylint: disable=g-import-not-at-top
  from softvq_jax.models.vit import ViTEncoder  # pylint: disable=g-import-not-at-top
  vit = ViTConfig(embed_dim=40, depth=2, num_heads=2, patch_size=8)

  def encoder(dtype):
    return ViTEncoder(vit, 16, 3, use_rope=True, rngs=nnx.Rngs(0), dtype=dtype)

  _, state = _perturbed(encoder(None))
  images = jax.random.uniform(jax.random.key(2), (3, 16, 16, 3), jnp.float32, -1, 1)

  def run(dtype, impl):
    graphdef = nnx.graphdef(encoder(dtype))

    def loss(state):
      out = nnx.merge(graphdef, state)(images).astype(jnp.float32)
      return jnp.sum(jnp.sin(out)), out

    adaln.set_adaln_implementation(impl)
    try:
      uses_kernels = _has_pallas_call(lambda s: loss(s)[0], state)
      (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
    finally:
      adaln.set_adaln_implementation(None)
    return uses_kernels, out, jax.tree.leaves(grads)

  exact_kernels, out_exact, grads_exact = run(None, "pallas")
  xla_kernels, out_xla, grads_xla = run(jnp.bfloat16, "auto")  # CPUs: "auto" is XLA's form
  fused_kernels, out_fused, grads_fused = run(jnp.bfloat16, "pallas")
  assert (exact_kernels, xla_kernels, fused_kernels) == (False, False, True)

  def error(approx, exact):
    approx, exact = (np.ravel(np.asarray(a, np.float64)) for a in (approx, exact))
    return np.linalg.norm(approx - exact) / np.linalg.norm(exact)

  assert error(out_fused, out_exact) < 1.5 * error(out_xla, out_exact) + 1e-3
  assert len(grads_fused) == len(grads_exact)
  for fused, xla, exact in zip(grads_fused, grads_xla, grads_exact):
    assert error(fused, exact) < 1.5 * error(xla, exact) + 1e-3
