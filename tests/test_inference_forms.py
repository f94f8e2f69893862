"""The inference forms of GPU bfloat16 inference: separate q/k/v matmuls and LayerScale
folded into the matmul weights, made once by the inference classes.

They must compute the same function, apply only where they were chosen, leave what is
saved untouched, and reach the compiler with the option that keeps XLA from undoing them.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from softvq_jax import Generator, Tokenizer
from softvq_jax.models import layers
from softvq_jax.models.layers import Block
from softvq_jax.models.sit import GeneratorConfig, SiT
from test_tokenizer_api import SMALL

WIDTH, HEADS = 32, 4


@pytest.fixture
def forms():
  previous = layers.inference_forms()
  yield layers.set_inference_forms
  layers.set_inference_forms(previous)


def _block(dtype=None):
  # LayerScale far from 1 and non-zero biases, so that a missing or doubled scale shows.
  block = Block(WIDTH, HEADS, layerscale_init=0.3, rngs=nnx.Rngs(0), dtype=dtype)
  graphdef, state = nnx.split(block)
  keys = iter(jax.random.split(jax.random.PRNGKey(3), 64))
  randomise = lambda path, v: (0.1 * jax.random.normal(next(keys), v.shape)
                               if "bias" in jax.tree_util.keystr(path) else v)
  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(randomise, state))


def _paths(module):
  return {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(module))}


def test_prepared_block_is_the_same_function():
  block = _block()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, WIDTH))
  before = np.asarray(block(x))
  original = nnx.state(block)
  kept = jax.tree.map(np.asarray, original)
  layers.prepare_for_inference(block)
  assert {"attn.q_proj.kernel", "attn.k_proj.bias", "attn.v_proj.kernel"} <= _paths(block)
  assert not any(p.startswith(("ls1", "ls2", "attn.qkv")) for p in _paths(block))
  after = np.asarray(block(x))
  np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6 * np.abs(before).max())
  # Rounded once in float32: not bit-identical, so the scale really moved into the weights.
  assert not np.array_equal(after, before)
  # The state split before still holds the original weights.
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, original), kept)
  # Preparing twice changes nothing more.
  layers.prepare_for_inference(block)
  np.testing.assert_array_equal(np.asarray(block(x)), after)


def test_folded_weights_are_the_float32_products():
  block = _block()
  proj = np.asarray(block.attn.proj.kernel[...])
  fc2_bias = np.asarray(block.mlp.fc2.bias[...])
  qkv = np.asarray(block.attn.qkv.kernel[...])
  g1, g2 = np.asarray(block.ls1.gamma[...]), np.asarray(block.ls2.gamma[...])
  layers.prepare_for_inference(block)
  np.testing.assert_array_equal(np.asarray(block.attn.proj.kernel[...]), proj * g1[None])
  np.testing.assert_array_equal(np.asarray(block.mlp.fc2.bias[...]), fc2_bias * g2)
  np.testing.assert_array_equal(np.asarray(block.attn.k_proj.kernel[...]),
                                qkv[:, WIDTH:2 * WIDTH])


def test_where_the_forms_apply(forms, monkeypatch):
  forms("auto")
  assert not layers.inference_forms_apply(jnp.bfloat16)  # no cuBLASLt/cuDNN off GPUs
  monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
  assert layers.inference_forms_apply(jnp.bfloat16) and layers.inference_forms_apply("float16")
  # float32 compute keeps the reference's own rounding order.
  assert not layers.inference_forms_apply(None) and not layers.inference_forms_apply(jnp.float32)
  # Attention that does not go through cuDNN reads q, k, v through its own kernels.
  monkeypatch.setattr(layers._ATTENTION, "_value", "xla")  # pylint: disable=protected-access
  block = layers.prepare_for_inference(_block(jnp.bfloat16))
  assert block.attn.qkv is not None and block.ls1 is None
  forms("never")
  assert not layers.inference_forms_apply(jnp.bfloat16)
  forms("always")
  assert layers.inference_forms_apply(None)
  with pytest.raises(ValueError, match="inference forms must be one of"):
    layers.set_inference_forms("fast")
  forms(None)  # back to the environment's choice
  monkeypatch.setenv("SOFTVQ_INFERENCE_FORMS", "fast")
  with pytest.raises(ValueError, match="SOFTVQ_INFERENCE_FORMS must be one of"):
    layers.inference_forms_apply(jnp.bfloat16)


def test_choices_come_from_code_then_environment_then_default(monkeypatch):
  """Every kernel choice reads its variable when used (not at import), a value set from code
  wins until it is reset with None, and a wrong value names its variable."""
  from softvq_jax.models import adaln  # pylint: disable=g-import-not-at-top
  choices = [(layers.set_attention_implementation, layers.attention_implementation,
              "SOFTVQ_ATTENTION", "auto", "xla"),
             (layers.set_gelu_implementation, layers.gelu_implementation, "SOFTVQ_GELU",
              "auto", "float32"),
             (layers.set_inference_forms, layers.inference_forms, "SOFTVQ_INFERENCE_FORMS",
              "auto", "never"),
             (layers.set_inference_gelu, layers.inference_gelu, "SOFTVQ_INFERENCE_GELU",
              "exact", "tanh"),
             (adaln.set_adaln_implementation, adaln.adaln_implementation, "SOFTVQ_ADALN",
              "auto", "xla")]
  for set_choice, get_choice, variable, default, other in choices:
    previous = get_choice()
    try:
      set_choice(None)
      monkeypatch.delenv(variable, raising=False)
      assert get_choice() == default
      monkeypatch.setenv(variable, other)
      assert get_choice() == other
      set_choice(default)
      assert get_choice() == default  # code wins over the environment
      set_choice(None)
      assert get_choice() == other
      monkeypatch.setenv(variable, "fastest")
      with pytest.raises(ValueError, match=f"{variable} must be one of .*'fastest'"):
        get_choice()
      with pytest.raises(ValueError, match="must be one of .*'fastest'"):
        set_choice("fastest")
    finally:
      monkeypatch.delenv(variable, raising=False)
      set_choice(previous)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("bfloat16", 2**-6)])
def test_tokenizer_in_the_forms(forms, dtype, tol, tmp_path):
  images = np.asarray(jax.random.uniform(jax.random.PRNGKey(2), (2, 32, 32, 3), minval=-1))
  forms("never")
  plain = Tokenizer.random(SMALL, seed=1, dtype=dtype)
  forms("always")
  tok = Tokenizer.random(SMALL, seed=1, dtype=dtype)
  z, z_plain = np.asarray(tok.encode(images)), np.asarray(plain.encode(images))
  np.testing.assert_allclose(z, z_plain, rtol=0, atol=tol * np.abs(z_plain).max())
  x, x_plain = np.asarray(tok.decode(z_plain)), np.asarray(plain.decode(z_plain))
  np.testing.assert_allclose(x, x_plain, rtol=0, atol=tol * np.abs(x_plain).max())
  # What is saved is the checkpoint's layout, not the inference forms.
  tok.save(str(tmp_path / "tok"))
  again = Tokenizer.load(str(tmp_path / "tok"))
  assert any(".ls1." in p or ".qkv." in p for p in _paths(again.model()))


def _gelu_mlps(tok, approximate: bool) -> int:
  """How many MLPs of the tokenizer's compiled inference model have the GELU form asked."""
  model = nnx.merge(tok._compute_graphdef, tok._compute_state)  # pylint: disable=protected-access
  return sum(1 for _, m in nnx.iter_modules(model)
             if isinstance(m, layers.Mlp) and m.approximate_gelu == approximate)


def test_tanh_gelu_is_opt_in_for_16_bit_inference_only(tmp_path):
  """``INFERENCE_GELU="tanh"``: bfloat16 inference runs the tanh GELU, which is as close to the
  float32 exact network as bfloat16 with the exact GELU is; float32 keeps the exact GELU bit
  for bit; what is saved keeps it too."""
  images = np.asarray(jax.random.uniform(jax.random.PRNGKey(7), (2, 32, 32, 3), minval=-1))
  # LayerScale 1 (not SMALL's 1e-5 start) and fc1 weights scaled up, so that the MLPs count
  # and their GELUs see inputs of order 1, where the two forms differ.
  config = dict(SMALL, encoder_kwargs=dict(SMALL["encoder_kwargs"], init_values=1.0),
                decoder_kwargs=dict(SMALL["decoder_kwargs"], init_values=1.0))
  model = Tokenizer.random(config, seed=3).model()
  for _, module in nnx.iter_modules(model):
    if isinstance(module, layers.Mlp):
      module.fc1.kernel[...] = 10 * module.fc1.kernel[...]
  exact32 = Tokenizer(model)
  exact16 = Tokenizer(model, dtype="bfloat16")
  layers.set_inference_gelu("tanh")
  try:
    tanh32 = Tokenizer(model)
    tanh16 = Tokenizer(model, dtype="bfloat16")
  finally:
    layers.set_inference_gelu(None)
  assert _gelu_mlps(tanh16, approximate=True) == 2 and _gelu_mlps(tanh16, approximate=False) == 0
  assert _gelu_mlps(tanh32, approximate=True) == 0 and _gelu_mlps(exact16, approximate=True) == 0

  def error(approx, exact):
    approx, exact = (np.ravel(np.asarray(a, np.float64)) for a in (approx, exact))
    return np.linalg.norm(approx - exact) / np.linalg.norm(exact)

  z = np.asarray(exact32.encode(images))
  np.testing.assert_array_equal(np.asarray(tanh32.encode(images)), z)
  z_tanh, z_exact16 = np.asarray(tanh16.encode(images)), np.asarray(exact16.encode(images))
  assert not np.array_equal(z_tanh, z_exact16)
  assert error(z_tanh, z) < 1.5 * error(z_exact16, z) + 1e-3
  x = np.asarray(exact32.decode(z))
  x_tanh, x_exact16 = np.asarray(tanh16.decode(z)), np.asarray(exact16.decode(z))
  assert not np.array_equal(x_tanh, x_exact16)
  assert error(x_tanh, x) < 1.5 * error(x_exact16, x) + 1e-3
  tanh16.save(str(tmp_path / "tok"))
  again = Tokenizer.load(str(tmp_path / "tok"), dtype="bfloat16")
  assert _gelu_mlps(again, approximate=False) == 2


def test_generator_in_the_forms(forms):
  cfg = GeneratorConfig.preset("SiT-S/1", input_size=4, in_channels=2, hidden_size=32,
                               depth=2, num_heads=2)
  from softvq_jax.models.sit import SiT  # pylint: disable=g-import-not-at-top
  model = SiT(cfg, rngs=nnx.Rngs(0))
  # adaLN-Zero starts at zero: give the blocks something to compute.
  graphdef, state = nnx.split(model)
  keys = iter(jax.random.split(jax.random.PRNGKey(4), 256))
  state = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(next(keys), v.shape), state)
  model = nnx.merge(graphdef, state)
  noise = jax.random.normal(jax.random.PRNGKey(5), (2, 4, 2))
  labels = jnp.array([1, 3])
  forms("never")
  plain = Generator(model).sample(noise, labels, method="euler", num_steps=4)
  forms("always")
  gen = Generator(model)
  assert any(".q_proj." in p for p in
             {".".join(map(str, p)) for p, _ in nnx.to_flat_state(gen._compute_state)})  # pylint: disable=protected-access
  ours = gen.sample(noise, labels, method="euler", num_steps=4)
  np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-5 * np.abs(plain).max())


def test_inference_programs_compile_with_the_inference_compiler_options(monkeypatch):
  """The option that keeps the dot merger from re-merging q/k/v reaches the compiler:
  XLA refuses unknown option names, so a bogus one must surface from encode/decode."""
  monkeypatch.setattr(layers, "inference_compiler_options", lambda: {"xla_no_such_option": "1"})
  tok = Tokenizer.random(SMALL, seed=1)
  images = np.zeros((1, 32, 32, 3), np.float32)
  with pytest.raises(Exception, match="xla_no_such_option"):
    tok.encode(images)
  with pytest.raises(Exception, match="xla_no_such_option"):
    tok.decode(np.zeros((1, 8, 4), np.float32))


def test_sharded_tokenizer_in_the_forms(forms):
  """The rewritten weights are made from replicated ones and stay replicated on the mesh."""
  images = np.asarray(jax.random.uniform(jax.random.PRNGKey(6), (5, 32, 32, 3), minval=-1))
  forms("never")
  plain = Tokenizer.random(SMALL, seed=1)
  forms("always")
  sharded = Tokenizer(plain.model(), mesh=jax.make_mesh((8,), ("data",)))
  for leaf in jax.tree.leaves(sharded._compute_state):  # pylint: disable=protected-access
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
  z, z_plain = np.asarray(sharded.encode(images)), np.asarray(plain.encode(images))
  np.testing.assert_allclose(z, z_plain, rtol=0, atol=1e-6 * np.abs(z_plain).max())


def _pallas_kernels(fn, *args) -> set[str]:
  """Which of the project's Pallas kernels the program of ``fn`` calls."""
  program = str(jax.make_jaxpr(fn)(*args))
  return {name for name in ("short_attention_fwd", "residual_adaln_fwd", "adaln_fwd")
          if re.search(rf"\b{name}\b", program)}


def _sit(tokens: int, qk_norm: bool = False, hidden_size: int = 32, dtype=jnp.bfloat16):
  config = GeneratorConfig.preset("SiT-S/1", input_size=tokens, in_channels=4,
                                  hidden_size=hidden_size, depth=1, num_heads=2, qk_norm=qk_norm)
  return SiT(config, rngs=nnx.Rngs(0), dtype=dtype)


def _sit_program(graphdef, state, tokens: int):
  x = jnp.ones((2, tokens, 4), jnp.float32)
  t, y = jnp.full((2,), 0.5), jnp.zeros((2,), jnp.int32)
  return lambda state: nnx.merge(graphdef, state)(x, t, y)


def test_gpu_inference_keeps_the_packed_qkv_where_the_packed_attention_runs(forms):
  """Default choices, bfloat16: a GPU program of a SiT over at most MAX_TOKENS tokens keeps the
  packed ``qkv`` that the short-attention kernels read; a longer SiT, and CPU programs, get
  separate q/k/v for the library attention."""
  from softvq_jax.models import short_attention  # pylint: disable=g-import-not-at-top
  assert layers.attention_implementation() == "auto"
  for tokens, packed in ((8, True), (short_attention.MAX_TOKENS + 1, False)):
    with layers.compiling_for("gpu"):
      graphdef, state = layers.split_for_inference(_sit(tokens), jnp.bfloat16)
      kernels = _pallas_kernels(_sit_program(graphdef, state, tokens), state)
    paths = _paths(nnx.merge(graphdef, state))
    assert ("blocks.0.attn.qkv.kernel" in paths) == packed
    assert ("blocks.0.attn.q_proj.kernel" in paths) == (not packed)
    assert ("short_attention_fwd" in kernels) == packed
  with layers.compiling_for("gpu"):  # q/k norms: the library attention, which reads q/k/v
    graphdef, state = layers.split_for_inference(_sit(8, qk_norm=True), jnp.bfloat16)
  assert "blocks.0.attn.q_proj.kernel" in _paths(nnx.merge(graphdef, state))
  forms("always")
  with layers.compiling_for("gpu"):  # float32, and heads wider than the kernels take
    for model, dtype in ((_sit(8, dtype=None), None), (_sit(8, hidden_size=2 * 264), jnp.bfloat16)):
      graphdef, state = layers.split_for_inference(model, dtype)
      assert "blocks.0.attn.q_proj.kernel" in _paths(nnx.merge(graphdef, state))
      assert "short_attention_fwd" not in _pallas_kernels(_sit_program(graphdef, state, 8), state)
  # CPU programs: the forms only where asked, and the library attention
  graphdef, state = layers.split_for_inference(_sit(8), jnp.bfloat16)
  assert "blocks.0.attn.q_proj.kernel" in _paths(nnx.merge(graphdef, state))
  assert not _pallas_kernels(_sit_program(graphdef, state, 8), state)


def _encode_program(tok, images):
  """The tokenizer's compiled encode as a function of its compute state."""
  graphdef = tok._compute_graphdef  # pylint: disable=protected-access
  return lambda state: nnx.merge(graphdef, state).encode(images).quant


def test_vit_norm_kernels_run_in_gpu_inference_programs(forms):
  """Default choices, bfloat16 GPU programs: the tokenizer's inference model runs its ViT
  LayerNorms as the adaLN kernels; the model as trained keeps XLA's norms unless "pallas" is
  chosen."""
  from softvq_jax.models import adaln  # pylint: disable=g-import-not-at-top
  images = jnp.zeros((2, 32, 32, 3), jnp.float32)
  with layers.compiling_for("gpu"):
    tok = Tokenizer.random(SMALL, seed=1, dtype="bfloat16")
    kernels = _pallas_kernels(_encode_program(tok, images), tok._compute_state)  # pylint: disable=protected-access
    assert {"residual_adaln_fwd", "adaln_fwd"} <= kernels
    trained = tok.model()
    training = lambda m: m.encode(images).quant
    assert not {"residual_adaln_fwd", "adaln_fwd"} & _pallas_kernels(training, trained)
    adaln.set_adaln_implementation("pallas")
    try:
      # A new function: a traced one is cached with the choice it was traced under.
      assert "residual_adaln_fwd" in _pallas_kernels(lambda m: m.encode(images).quant, trained)
    finally:
      adaln.set_adaln_implementation(None)
  with layers.compiling_for("cpu"):
    forms("always")
    cpu = Tokenizer.random(SMALL, seed=1, dtype="bfloat16")
    assert not _pallas_kernels(_encode_program(cpu, images), cpu._compute_state)  # pylint: disable=protected-access
