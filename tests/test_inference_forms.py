"""The inference-only matmul forms of GPU bfloat16 inference: separate q/k/v matmuls and
LayerScale folded into the matmul.

They must compute the same function as the plain forms, become the plain forms when
differentiated (training programs do not change), apply only where they were chosen,
and reach the compiler with the option that keeps XLA from undoing them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from softvq_jax import Tokenizer
from softvq_jax.models import layers
from softvq_jax.models.layers import Attention, Block
from test_tokenizer_api import SMALL

WIDTH, HEADS, TOKENS = 32, 4, 7


@pytest.fixture
def forms():
  previous = layers.inference_forms()
  yield layers.set_inference_forms
  layers.set_inference_forms(previous)


def _block(dtype):
  # LayerScale far from 1 and non-zero biases, so that a missing or doubled scale shows.
  graphdef, state = nnx.split(Block(WIDTH, HEADS, layerscale_init=0.3, rngs=nnx.Rngs(0),
                                    dtype=dtype))
  keys = iter(jax.random.split(jax.random.PRNGKey(3), 64))
  randomise = lambda path, v: (0.1 * jax.random.normal(next(keys), v.shape)
                               if "bias" in jax.tree_util.keystr(path) else v)
  return graphdef, jax.tree_util.tree_map_with_path(randomise, state)


def _inputs():
  return jax.random.normal(jax.random.PRNGKey(1), (2, TOKENS, WIDTH))


def _forward_and_grads(graphdef, state, x):
  forward = lambda s, x: nnx.merge(graphdef, s)(x)
  loss = lambda s, x: jnp.sum(forward(s, x).astype(jnp.float32) ** 2)
  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(state, x)
  return np.asarray(jax.jit(forward)(state, x), np.float32), value, grads


def _names(graphdef, state, x):
  return str(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))


def _uses(dtype, tokens=TOKENS):
  x = jnp.ones((2, tokens, WIDTH), dtype or jnp.float32)
  text = _names(*_block(dtype), x)
  return {name: text.count(f"name={name}") for name in ("_separate_qkv", "_layerscale_folded")
          if name in text}


def test_where_the_forms_apply(forms, monkeypatch):
  uses = lambda dtype: _uses(dtype, tokens=80)  # 160 rows: more than any kernel's 128
  forms("auto")
  assert uses(jnp.bfloat16) == {}  # no cuBLASLt/cuDNN off GPUs
  monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
  both = {"_separate_qkv": 1, "_layerscale_folded": 2}  # proj and fc2 folded
  assert uses(jnp.bfloat16) == both
  assert uses(jnp.float16) == both
  assert uses(None) == {}  # float32 compute keeps the reference's own rounding order
  # With fewer rows than the kernel, copying column blocks or scaling the kernel would
  # move more bytes than it saves: 14 rows against kernels of 32 and 128 rows.
  assert _uses(jnp.bfloat16, tokens=TOKENS) == {}
  # 80 rows: more than the 32 of qkv and proj, fewer than the 128 of fc2.
  assert _uses(jnp.bfloat16, tokens=40) == {"_separate_qkv": 1, "_layerscale_folded": 1}
  # Attention that does not go through cuDNN reads q, k, v through its own kernels.
  monkeypatch.setattr(layers, "_attention_implementation", "xla")
  assert uses(jnp.bfloat16) == {"_layerscale_folded": 2}
  forms("never")
  assert uses(jnp.bfloat16) == {}
  forms("always")
  assert uses(None) == both
  with pytest.raises(ValueError, match="inference forms must be one of"):
    layers.set_inference_forms("fast")
  monkeypatch.setattr(layers, "_inference_forms", "fast")  # a bad SOFTVQ_INFERENCE_FORMS
  with pytest.raises(ValueError, match="SOFTVQ_INFERENCE_FORMS must be one of"):
    uses(jnp.bfloat16)


def test_float32_forms_compute_the_same_block(forms):
  x = _inputs()
  graphdef, state = _block(None)
  forms("never")
  plain, plain_loss, plain_grads = _forward_and_grads(graphdef, state, x)
  forms("always")
  ours, loss, grads = _forward_and_grads(graphdef, state, x)
  np.testing.assert_allclose(ours, plain, rtol=1e-6, atol=1e-6 * np.abs(plain).max())
  np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())


def test_differentiated_bfloat16_forms_are_the_plain_forms(forms):
  """Training gets the plain forms bit for bit: its programs do not change."""
  x = _inputs().astype(jnp.bfloat16)
  graphdef, state = _block(jnp.bfloat16)
  forms("never")
  plain, plain_loss, plain_grads = _forward_and_grads(graphdef, state, x)
  forms("always")
  ours, loss, grads = _forward_and_grads(graphdef, state, x)
  np.testing.assert_array_equal(np.asarray(loss), np.asarray(plain_loss))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  # Evaluated, the folded scale rounds differently: the same function to bfloat16 rounding.
  assert not np.array_equal(ours, plain)
  np.testing.assert_allclose(ours, plain, rtol=0, atol=2**-6 * np.abs(plain).max())


def test_layerscale_is_folded_into_the_weights_not_applied_to_activations(forms):
  forms("always")
  graphdef, state = _block(jnp.bfloat16)
  x = _inputs().astype(jnp.bfloat16)
  jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  folded = [e for e in jaxpr.eqns
            if e.primitive.name == "custom_jvp_call" and "_layerscale_folded" in str(e)]
  assert len(folded) == 2  # attn.proj and mlp.fc2
  for eqn, kernel in zip(folded, [(WIDTH, WIDTH), (4 * WIDTH, WIDTH)]):
    inner = eqn.params["call_jaxpr"].jaxpr.eqns
    scaled = {tuple(e.outvars[0].aval.shape) for e in inner if e.primitive.name == "mul"}
    # The kernel and the bias are scaled, never the (B, N, W) activation.
    assert scaled == {kernel, (WIDTH,)}, scaled


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_separate_qkv_matches_the_fused_projection_in_both_ad_modes(forms, qkv_bias):
  attn = Attention(16, 2, qkv_bias=qkv_bias, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 16))
  forms("never")
  plain = attn.split_heads(x)
  plain_tangent = jax.jvp(attn.split_heads, (x,), (jnp.ones_like(x),))[1]
  forms("always")
  ours = attn.split_heads(x)
  tangent = jax.jvp(attn.split_heads, (x,), (jnp.ones_like(x),))[1]
  for a, b in zip(ours + tangent, plain + plain_tangent):
    assert a.shape == (2, 5, 2, 8)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_tokenizer_compiles_with_the_inference_compiler_options(monkeypatch):
  """The option that keeps the dot merger from re-merging q/k/v reaches the compiler:
  XLA refuses unknown option names, so a bogus one must surface from encode/decode."""
  monkeypatch.setattr(layers, "inference_compiler_options", lambda: {"xla_no_such_option": "1"})
  tok = Tokenizer.random(SMALL, seed=1)
  images = np.zeros((1, 32, 32, 3), np.float32)
  with pytest.raises(Exception, match="xla_no_such_option"):
    tok.encode(images)
  with pytest.raises(Exception, match="xla_no_such_option"):
    tok.decode(np.zeros((1, 8, 4), np.float32))
