"""The packed short-sequence attention kernels (softvq_jax.models.short_attention).

On CPUs the Pallas kernels run in Pallas' interpreter; the GPU-only test and compiles for an
H200 target check Triton's side.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from softvq_jax import parallel
from softvq_jax.models import layers, short_attention
from softvq_jax.models.sit import GeneratorConfig, SiT


def numpy_attention(qkv, bias, heads):
  """Attention of the bfloat16-rounded ``qkv + bias`` in float64, output and a VJP closure."""
  x = np.asarray(jnp.asarray(np.asarray(qkv, np.float32) + np.asarray(bias, np.float32),
                             jnp.bfloat16), np.float64)
  b, t, w3 = x.shape
  hd = w3 // 3 // heads
  x = x.reshape(b, t, 3, heads, hd)
  q, k, v = x[:, :, 0], x[:, :, 1], x[:, :, 2]
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * hd ** -0.5
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, t, heads * hd)

  def vjp(grad):
    g = np.asarray(grad, np.float64).reshape(b, t, heads, hd)
    dv = np.einsum("bhqk,bqhd->bkhd", p, g)
    dp = np.einsum("bqhd,bkhd->bhqk", g, v)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))
    dq = np.einsum("bhqk,bkhd->bqhd", ds, k) * hd ** -0.5
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * hd ** -0.5
    dqkv = np.stack([dq, dk, dv], axis=2).reshape(b, t, w3)
    return dqkv, dqkv.sum((0, 1))

  return out, vjp


def _inputs(b, t, heads, hd, seed=0):
  rng = np.random.default_rng(seed)
  qkv = jnp.asarray(rng.normal(size=(b, t, 3 * heads * hd)), jnp.bfloat16)
  bias = jnp.asarray(rng.normal(size=(3 * heads * hd,)) * 0.5, jnp.bfloat16)
  grad = jnp.asarray(rng.normal(size=(b, t, heads * hd)), jnp.bfloat16)
  return qkv, bias, grad


def _close(got, want, tol):
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_head_pieces_cover_the_head_with_power_of_two_tiles():
  for head_dim in range(1, 257):
    one = short_attention._head_pieces(head_dim, split=False)  # pylint: disable=protected-access
    split = short_attention._head_pieces(head_dim, split=True)  # pylint: disable=protected-access
    assert len(one) == 1 and one[0][0] == 0 and one[0][1] >= max(16, head_dim)
    starts = [start for start, _ in split]
    assert starts == [0] + list(np.cumsum([extent for _, extent in split])[:-1])
    covered = sum(extent for _, extent in split)
    assert head_dim <= covered < head_dim + 16 and covered <= one[0][1]
    assert all(extent >= 16 and extent & (extent - 1) == 0 for _, extent in split)
  assert short_attention._head_pieces(72, split=True) == ((0, 64), (64, 16))  # pylint: disable=protected-access


# Token counts and head widths that do and do not fill the power-of-two tiles; each head as
# one tile and as several (40: 32 + 16, 72: 64 + 16); the backward's loads early and late.
@pytest.mark.parametrize("b,t,heads,hd,split,late", [
    (3, 7, 2, 12, False, False), (2, 16, 3, 16, False, False), (1, 33, 1, 40, False, False),
    (1, 33, 1, 40, True, False), (2, 5, 2, 72, True, False), (3, 7, 2, 12, False, True),
    (2, 5, 2, 72, True, True)])
def test_kernels_match_numpy_values_and_cotangents(b, t, heads, hd, split, late, monkeypatch):
  monkeypatch.setattr(short_attention, "_SPLIT_HEAD_DIM", split)
  monkeypatch.setattr(short_attention, "_LATE_LOADS", late)
  qkv, bias, grad = _inputs(b, t, heads, hd)
  out, vjp = jax.vjp(lambda a, c: short_attention.packed_attention(a, c, heads), qkv, bias)
  want, want_vjp = numpy_attention(qkv, bias, heads)
  # bfloat16 inputs, outputs and probabilities: a few bfloat16 ulps.
  _close(out, want, 2e-2)
  dqkv, dbias = vjp(grad)
  want_dqkv, want_dbias = want_vjp(grad)
  _close(dqkv, want_dqkv, 3e-2)
  _close(dbias, want_dbias, 3e-2)
  assert dqkv.dtype == qkv.dtype and dbias.dtype == bias.dtype


def test_bad_shapes_are_refused():
  qkv, bias, _ = _inputs(1, 4, 2, 8)
  with pytest.raises(ValueError, match="not 3 x num_heads"):
    short_attention.packed_attention(qkv, bias, 5)
  with pytest.raises(ValueError, match="bias must have shape"):
    short_attention.packed_attention(qkv, bias[:-1], 2)


def _pallas_calls(fn, *args) -> int:
  return str(jax.make_jaxpr(fn)(*args)).count("pallas_call")


@pytest.fixture
def pallas_attention():
  previous = layers.attention_implementation()
  layers.set_attention_implementation("pallas")
  yield
  layers.set_attention_implementation(previous)


def _attention_module(qk_norm=False, dtype=jnp.bfloat16):
  return layers.Attention(32, 4, rngs=nnx.Rngs(0), dtype=dtype, qk_norm=qk_norm)


def test_attention_takes_the_kernel_only_where_it_applies(pallas_attention):
  del pallas_attention
  x = jnp.ones((2, 6, 32), jnp.float32)
  assert _pallas_calls(_attention_module(), x) == 1
  assert _pallas_calls(_attention_module(qk_norm=True), x) == 0
  assert _pallas_calls(_attention_module(dtype=None), x) == 0
  long = jnp.ones((1, short_attention.MAX_TOKENS + 1, 32), jnp.float32)
  assert _pallas_calls(_attention_module(), long) == 0
  with layers.compiling_for("tpu"):
    assert _pallas_calls(_attention_module(), x) == 0


def test_auto_takes_the_kernel_in_gpu_programs_only():
  assert layers.attention_implementation() == "auto"
  x = jnp.ones((2, 6, 32), jnp.float32)
  with layers.compiling_for("cpu"):
    assert _pallas_calls(_attention_module(), x) == 0
  with layers.compiling_for("gpu"):
    assert _pallas_calls(_attention_module(), x) == 1
    assert _pallas_calls(_attention_module(qk_norm=True), x) == 0
    long = jnp.ones((1, short_attention.MAX_TOKENS + 1, 32), jnp.float32)
    assert _pallas_calls(_attention_module(), long) == 0
  layers.set_attention_implementation("xla")
  try:
    with layers.compiling_for("gpu"):
      assert _pallas_calls(_attention_module(), x) == 0
  finally:
    layers.set_attention_implementation(None)


def test_attention_module_matches_the_default_path(pallas_attention):
  del pallas_attention
  module = _attention_module()
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 9, 32)), jnp.float32)
  graphdef, state = nnx.split(module)
  state = jax.tree.map(lambda a: a + 0.1 * jnp.ones_like(a), state)  # a non-zero bias

  def loss(state, impl):
    layers.set_attention_implementation(impl)
    return jnp.sum(nnx.merge(graphdef, state)(x).astype(jnp.float32) ** 2)

  # Jitted: the interpreted kernels run eagerly op by op otherwise (several times slower).
  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  got = value_and_grad(state, "pallas")
  want = value_and_grad(state, "xla")
  layers.set_attention_implementation("pallas")
  np.testing.assert_allclose(got[0], want[0], rtol=2e-2)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    w = np.asarray(w, np.float32)
    np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=3e-2 * np.abs(w).max())


def test_sharded_batch_runs_per_device_without_gathering():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
  qkv, bias, grad = _inputs(8, 5, 2, 8, seed=4)

  def loss(qkv, bias):
    out = short_attention.packed_attention(qkv, bias, 2)
    return jnp.sum(out.astype(jnp.float32) * grad.astype(jnp.float32))

  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  args = (jax.device_put(qkv, rows),
          jax.device_put(bias, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
  grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
  with parallel.activation_sharding(mesh):
    compiled = grad_fn.lower(*args).compile().as_text()
    got = grad_fn(*args)
  assert "all-gather" not in compiled
  want = jax.grad(loss, argnums=(0, 1))(qkv, bias)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=1e-2, atol=1e-2)


def test_sit_trains_through_the_kernels(pallas_attention):
  del pallas_attention
  cfg = GeneratorConfig(input_size=6, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                        num_classes=5)
  model = SiT(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  x = jnp.ones((2, 6, 4), jnp.float32)
  fn = lambda m: jnp.mean(m(x, jnp.asarray([0.2, 0.7]), jnp.asarray([1, 2])) ** 2)
  assert _pallas_calls(lambda s: fn(nnx.merge(*s)), nnx.split(model)) >= cfg.depth
  grads = nnx.jit(nnx.grad(fn))(model)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="compiles Triton kernels: needs a GPU and JAX_PLATFORMS=cuda")
@pytest.mark.parametrize("split,late", [(False, False), (True, False), (False, True),
                                        (True, True)])
def test_kernels_on_a_gpu_match_numpy(split, late, monkeypatch):
  monkeypatch.setattr(short_attention, "_SPLIT_HEAD_DIM", split)
  monkeypatch.setattr(short_attention, "_LATE_LOADS", late)
  for b, t, heads, hd in [(64, 64, 16, 72), (3, 7, 2, 12), (2, 5, 2, 40)]:
    qkv, bias, grad = _inputs(b, t, heads, hd, seed=5)
    out, vjp = jax.vjp(jax.jit(lambda a, c: short_attention.packed_attention(a, c, heads)),
                       qkv, bias)
    want, want_vjp = numpy_attention(qkv, bias, heads)
    _close(out, want, 2e-2)
    for got, expected in zip(vjp(grad), want_vjp(grad)):
      _close(got, expected, 3e-2)
