"""Nothing recompiles across steps or batches of the same shape (counted by JAX's compile events)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import count_compiles

from softvq_jax import Generator, GeneratorConfig, Tokenizer, parallel
from softvq_jax.models import layers
from softvq_jax.models.sit import SiT
from softvq_jax.train import state as state_lib
from softvq_jax.transport.loss import sit_loss

TOK = dict(enc_type="vit", dec_type="vit", encoder_model="vit_small_patch14_dinov2.lvd142m",
           decoder_model="vit_small_patch14_dinov2.lvd142m",
           encoder_kwargs=dict(embed_dim=32, depth=1, num_heads=2),
           decoder_kwargs=dict(embed_dim=32, depth=1, num_heads=2), image_size=16,
           enc_patch_size=8, dec_patch_size=8, num_latent_tokens=4, codebook_embed_dim=4,
           codebook_size=8, num_codebooks=2, tau=0.07)
GEN = GeneratorConfig(input_size=4, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                      num_classes=4)


def test_the_counter_sees_compiles():
  with count_compiles() as n:
    jax.jit(lambda x: x * 3 + 1)(jnp.ones(7))
  assert n[0] >= 1


def test_tokenizer_encode_decode_compile_once_per_shape():
  tok = Tokenizer.random(TOK, seed=0)
  rng = np.random.default_rng(0)
  batches = [rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32) for _ in range(3)]
  tok.decode(tok.encode(batches[0]))  # first call of each shape compiles
  with count_compiles() as n:
    for x in batches[1:]:
      tok.decode(tok.encode(x))
      tok.reconstruct(x)
  assert n[0] == 0


def test_sampling_loop_compiles_once():
  gen = Generator.random(GEN, seed=0)
  noise = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4))
  labels = jnp.array([0, 1])
  gen.sample(noise, labels, method="euler", num_steps=5, cfg_scale=1.5)
  with count_compiles() as n:
    for seed in (1, 2):
      noise = jax.random.normal(jax.random.PRNGKey(seed), (2, 4, 4))
      gen.sample(noise, labels, method="euler", num_steps=5, cfg_scale=2.5)
  assert n[0] == 0  # a new guidance scale is a traced value, not a new program


def test_train_steps_compile_once():
  mesh = parallel.create_mesh([("data", -1)])
  tx = optax.adamw(1e-3)

  def loss_fn(model, batch, key, step):
    del step
    out = sit_loss(lambda x, t, y, k: model(x, t, y, drop_key=k), batch["latent"],
                   batch["label"], key)
    return jnp.mean(out["loss"]), {}

  graphdef, state, shardings = state_lib.create_train_state(
      lambda rngs: SiT(GEN, rngs=rngs), tx, mesh, seed=0)
  step = state_lib.make_train_step(graphdef, tx, loss_fn, ema_decay=0.9,
                                   state_shardings=shardings,
                                   batch_sharding=parallel.batch_sharding(mesh))
  rng = np.random.default_rng(0)
  n_dev = jax.device_count()

  def batch():
    return parallel.global_batch({"latent": rng.normal(size=(n_dev, 4, 4)).astype(np.float32),
                                  "label": rng.integers(0, 4, n_dev).astype(np.int32)}, mesh)
  state, _ = step(state, batch())
  with count_compiles() as n:
    for _ in range(3):
      state, metrics = step(state, batch())
    float(metrics["loss"])
  assert n[0] == 0


@pytest.mark.parametrize("impl", ["auto", "xla", "einsum"])
def test_low_precision_attention_equals_float64(impl):
  """bfloat16 attention through each implementation vs a float64 NumPy softmax(QK^T/sqrt(d))V."""
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 9, 3, 8)).astype(np.float32) for _ in range(3))
  qb, kb, vb = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
  q64, k64, v64 = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (qb, kb, vb))
  logits = np.einsum("bqhd,bkhd->bhqk", q64, k64) / np.sqrt(8)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  expected = np.einsum("bhqk,bkhd->bqhd", w, v64)
  previous = layers.attention_implementation()
  try:
    layers.set_attention_implementation(impl)
    out = jax.jit(layers.dot_product_attention)(qb, kb, vb)
  finally:
    layers.set_attention_implementation(previous)
  assert out.dtype == jnp.bfloat16 and out.shape == q.shape
  np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=3e-2, rtol=3e-2)


def test_float32_attention_keeps_the_exact_path():
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 5, 2, 4)), jnp.float32) for _ in range(3))
  previous = layers.attention_implementation()
  try:
    layers.set_attention_implementation("xla")
    a = layers.dot_product_attention(q, k, v, precision=jax.lax.Precision.HIGHEST)
    layers.set_attention_implementation("einsum")
    b = layers.dot_product_attention(q, k, v, precision=jax.lax.Precision.HIGHEST)
  finally:
    layers.set_attention_implementation(previous)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="attention implementation"):
    layers.set_attention_implementation("flash9")


@pytest.mark.parametrize("batch,budget_examples", [(5, 2), (4, 1)])
def test_float32_attention_loops_over_the_batch_on_one_cpu_device(monkeypatch, batch,
                                                                   budget_examples):
  """Single-device CPU attention runs in example groups whose scores fit the cache budget.

  The loop must give the numbers of the whole-batch form (float64 NumPy here),
  with its gradients, remainder group included.
  """
  heads, tokens, head_dim = 3, 11, 8
  monkeypatch.setattr(layers, "CPU_SCORES_BUDGET_BYTES", budget_examples * heads * tokens**2 * 4)
  monkeypatch.setattr(jax, "device_count", lambda *a, **k: 1)
  rng = np.random.default_rng(2)
  q, k, v = (rng.normal(size=(batch, tokens, heads, head_dim)) for _ in range(3))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  expected = np.einsum("bhqk,bkhd->bqhd", w, v)
  qf, kf, vf = (jnp.asarray(a, jnp.float32) for a in (q, k, v))
  highest = jax.lax.Precision.HIGHEST

  def looped(q):
    return layers.dot_product_attention(q, kf, vf, precision=highest)

  def whole(q):
    return layers._einsum_attention(q, kf, vf, highest)  # pylint: disable=protected-access

  assert layers.cpu_attention_group(qf) == budget_examples
  assert "scan" in str(jax.make_jaxpr(looped)(qf))
  assert "scan" not in str(jax.make_jaxpr(whole)(qf))
  np.testing.assert_allclose(np.asarray(jax.jit(looped)(qf)), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.grad(lambda q: (looped(q) ** 2).sum())(qf)),
                             np.asarray(jax.grad(lambda q: (whole(q) ** 2).sum())(qf)),
                             rtol=1e-5, atol=1e-6)


def test_cpu_attention_keeps_the_batch_when_one_example_overflows_the_budget(monkeypatch):
  monkeypatch.setattr(jax, "device_count", lambda *a, **k: 1)
  q = jnp.zeros((4, 7, 2, 8), jnp.float32)
  monkeypatch.setattr(layers, "CPU_SCORES_BUDGET_BYTES", 2 * 7 * 7 * 4 - 1)
  assert layers.cpu_attention_group(q) == 4
  monkeypatch.setattr(layers, "CPU_SCORES_BUDGET_BYTES", 2 * 7 * 7 * 4)
  assert layers.cpu_attention_group(q) == 1


def test_multi_device_attention_never_loops_over_the_batch(monkeypatch):
  monkeypatch.setattr(layers, "CPU_SCORES_BUDGET_BYTES", 1)
  q = jnp.zeros((4, 7, 2, 8), jnp.float32)
  assert jax.device_count() > 1  # conftest's fake devices
  assert layers.cpu_attention_group(q) == 4
  assert "scan" not in str(jax.make_jaxpr(
      lambda q: layers.dot_product_attention(q, q, q))(q))
