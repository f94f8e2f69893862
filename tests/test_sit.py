"""SiT on 1-D tokens: float32 parity with the PyTorch reference, samplers, conversion, sizes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import FIXTURES, rel_err
from flax import nnx

from softvq_jax.convert import generator as convert_generator
from softvq_jax.convert.core import ConversionError, map_state_dict
from softvq_jax.generator import Generator, build_model, count_params, variable_shapes
from softvq_jax.models.config import ConfigError
from softvq_jax.models.sit import GeneratorConfig, SiT, sincos_pos_embed_1d
from softvq_jax.transport.loss import sit_loss

TOL = 1e-5
HF = FIXTURES / "sit_tiny_hf"


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(FIXTURES / "sit_tiny.npz"))


@pytest.fixture(scope="module")
def meta():
  return json.load(open(FIXTURES / "sit_tiny.json"))


@pytest.fixture(scope="module")
def config(meta):
  return GeneratorConfig.from_json_dict(meta["config"])


@pytest.fixture(scope="module")
def model(ref, config):
  state = {k[len("param/"):]: v for k, v in ref.items() if k.startswith("param/")}
  target = {p: tuple(s.shape) for p, s in variable_shapes(config).items()}
  flat, ignored = map_state_dict(state, target, convert_generator.GENERATOR_RULES)
  assert not ignored
  return build_model(config, flat)


@pytest.fixture(scope="module")
def gen(model):
  return Generator(model)


def test_config_from_released_fields(meta, config):
  assert config.kind == "sit" and not config.learn_sigma
  assert config.latent_shape == (16, 8) and config.hidden_size == 64 and config.depth == 2
  assert count_params(config) == meta["num_params"]


def test_forward_intermediates(model, ref):
  out, taps = model(ref["in/x"], ref["in/t"], ref["in/y"], return_intermediates=True)
  for name in ("x_embedder", "tokens_in", "t_freq", "t_emb", "y_emb", "c", "block0", "block1"):
    assert rel_err(taps[name], ref[f"out/{name}"]) < TOL, name
  assert out.dtype == jnp.float32
  assert rel_err(out, ref["out/forward"]) < TOL
  assert rel_err(out, ref["out_f64/forward"]) < TOL


def test_pos_embed_rebuilds_the_stored_table(ref):
  table = sincos_pos_embed_1d(64, 16)
  np.testing.assert_allclose(table, ref["param/pos_embed"][0], atol=1e-6)
  # A freshly built model starts from the same fixed table.
  fresh = SiT(GeneratorConfig.from_json_dict(json.load(open(HF / "config.json"))), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(fresh.pos_embed[...][0], ref["param/pos_embed"][0], atol=1e-6)


def test_cfg_evaluation(model, ref):
  n = ref["in/x"].shape[0]
  x2 = np.concatenate([ref["in/x"]] * 2)
  y2 = np.concatenate([ref["in/y"], np.full(n, 1000)])
  v = np.asarray(model(x2, np.concatenate([ref["in/t"]] * 2), y2), np.float64)
  cond, uncond = v[:n], v[n:]
  assert rel_err(cond, ref["out/cfg_cond"]) < TOL
  assert rel_err(uncond, ref["out/cfg_uncond"]) < TOL
  s = float(ref["in/cfg_scale"])
  assert rel_err(uncond + s * (cond - uncond), ref["out/cfg_velocity"]) < TOL


SAMPLES = {
    "ode_euler": dict(method="euler", num_steps=8),
    "ode_heun": dict(method="heun", num_steps=5),
    "ode_euler_cfg": dict(method="euler", num_steps=8, cfg_scale=1.75, guidance_interval=(0.0, 0.7)),
    "ode_heun_cfg": dict(method="heun", num_steps=4, cfg_scale=4.0),
    "sde_linear": dict(method="euler_maruyama", num_steps=6, eps="in/sde_linear_eps"),
    "sde_cosine_cfg": dict(method="euler_maruyama", num_steps=6, cfg_scale=1.75,
                           guidance_interval=(0.0, 0.7), path="cosine",
                           eps="in/sde_cosine_cfg_eps"),
}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_samplers_match_reference(gen, ref, name):
  kw = dict(SAMPLES[name])
  eps = kw.pop("eps", None)
  out = gen.sample(ref["in/sample_latents"], ref["in/sample_y"],
                   step_noise=None if eps is None else ref[eps], **kw)
  assert out.shape == (2, 16, 8)
  assert rel_err(out, ref[f"out/{name}"]) < TOL, name
  if name == "ode_euler":
    assert rel_err(out, ref["out_f64/ode_euler"]) < TOL


def test_sde_sampling_with_a_key_is_deterministic(gen, ref):
  z, y = ref["in/sample_latents"], ref["in/sample_y"]
  a = gen.sample(z, y, method="euler_maruyama", num_steps=6, key=jax.random.key(0))
  b = gen.sample(z, y, method="euler_maruyama", num_steps=6, key=jax.random.key(0))
  c = gen.sample(z, y, method="euler_maruyama", num_steps=6, key=jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  with pytest.raises(ValueError, match="key"):
    gen.sample(z, y, method="euler_maruyama", num_steps=6)
  with pytest.raises(ValueError, match="method"):
    gen.sample(z, y, method="ddpm")


def test_generator_call_and_input_checks(gen, ref):
  assert rel_err(gen(ref["in/x"], ref["in/t"], ref["in/y"]), ref["out/forward"]) < TOL
  with pytest.raises(ValueError, match="shape"):
    gen(ref["in/x"][:, :8], ref["in/t"], ref["in/y"])
  with pytest.raises(ValueError, match="labels"):
    gen(ref["in/x"], ref["in/t"], np.array([0, 1, 2, 1001]))
  # jax arrays too: a gather would clamp the label to the last row, silently.
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 1000\]"):
    gen(ref["in/x"], ref["in/t"], jnp.array([0, 1, 2, 1001]))


def test_user_path_convert_save_load(ref, tmp_path):
  gen = Generator.from_pytorch(str(HF / "model.safetensors"), str(HF / "config.json"))
  assert gen.kind == "sit"
  assert rel_err(gen(ref["in/x"], ref["in/t"], ref["in/y"]), ref["out/forward"]) < TOL
  gen.save(str(tmp_path / "sit"))
  loaded = Generator.load(str(tmp_path / "sit"))
  assert loaded.config == gen.config
  np.testing.assert_array_equal(loaded(ref["in/x"], ref["in/t"], ref["in/y"]),
                                gen(ref["in/x"], ref["in/t"], ref["in/y"]))


def test_checkpoint_without_pos_embed_rebuilds_it(ref, tmp_path):
  from safetensors.numpy import load_file, save_file
  state = load_file(str(HF / "model.safetensors"))
  del state["pos_embed"]
  save_file(state, str(tmp_path / "model.safetensors"))
  cfg, flat, _ = convert_generator.convert(str(tmp_path / "model.safetensors"),
                                           str(HF / "config.json"))
  model = build_model(cfg, flat)
  assert rel_err(model(ref["in/x"], ref["in/t"], ref["in/y"]), ref["out/forward"]) < TOL


def test_converter_reports_every_problem(tmp_path):
  from safetensors.numpy import load_file, save_file
  state = load_file(str(HF / "model.safetensors"))
  del state["blocks.1.mlp.fc2.weight"]
  state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"][:-1]
  state["blocks.0.attn.q_norm.weight"] = np.ones(16, np.float32)
  save_file(state, str(tmp_path / "bad.safetensors"))
  with pytest.raises(ConversionError) as e:
    convert_generator.convert(str(tmp_path / "bad.safetensors"), str(HF / "config.json"))
  msg = str(e.value)
  assert "blocks.1.mlp.fc2.kernel" in msg and "blocks.0.attn.qkv.weight" in msg
  assert "q_norm" in msg


def test_unsupported_configs_are_clear_errors():
  base = json.load(open(HF / "config.json"))
  for change, match in ((dict(vae_1d=False), "vae_1d"),
                        (dict(decoder_hidden_size=32), "decoder_hidden_size")):
    with pytest.raises(ConfigError, match=match):
      GeneratorConfig.from_json_dict(dict(base, **change))
  # qk_norm is supported (tests/test_sit_qknorm.py): only the model's layout changes.
  assert GeneratorConfig.from_json_dict(dict(base, qk_norm=True)).qk_norm
  no_tags = {k: v for k, v in base.items() if k != "tags"}
  assert GeneratorConfig.from_json_dict(no_tags).kind == "sit"  # the SiT-only fields tell
  with pytest.raises(ConfigError, match="SiT or a DiT"):
    GeneratorConfig.from_json_dict({k: base[k] for k in ("input_size", "in_channels",
                                                         "hidden_size", "depth", "num_heads",
                                                         "vae_1d")})


def test_label_dropout(model, ref):
  x, t = ref["in/x"], ref["in/t"]
  forced = model(x, t, ref["in/y"], force_drop_ids=np.ones(4, np.int32))
  null = model(x, t, np.full(4, 1000))
  np.testing.assert_array_equal(forced, null)
  labels = jnp.zeros((20000,), jnp.int32)
  dropped = model.y_embedder.drop_labels(labels, jax.random.key(0))
  frac = float(jnp.mean(dropped == 1000))
  assert abs(frac - 0.1) < 0.01
  # Without a key (evaluation) nothing is dropped.
  assert rel_err(model(x, t, ref["in/y"]), ref["out/forward"]) < TOL


def spec_count(tokens: int, channels: int, hidden: int, depth: int, learn_sigma: bool) -> int:
  """Elements of the reference state dict, from the key/shape table of the reference checkpoints."""
  h = hidden
  out = 2 * channels if learn_sigma else channels
  shapes = [(1, tokens, h), (h, channels), (h,), (h, 256), (h,), (h, h), (h,), (1001, h),
            (out, h), (out,), (2 * h, h), (2 * h,)]
  block = [(3 * h, h), (3 * h,), (h, h), (h,), (4 * h, h), (4 * h,), (h, 4 * h), (h,),
           (6 * h, h), (6 * h,)]
  return sum(int(np.prod(s)) for s in shapes) + depth * sum(int(np.prod(s)) for s in block)


def test_parameter_counts_of_the_released_sizes():
  sit = GeneratorConfig.preset("SiT-XL/1", input_size=64, in_channels=32)
  dit = GeneratorConfig.preset("DiT-XL/1", input_size=64, in_channels=32)
  assert count_params(sit) == spec_count(64, 32, 1152, 28, False)
  assert count_params(dit) == spec_count(64, 32, 1152, 28, True)
  assert round(count_params(sit) / 1e6, 1) == 674.9  # the reference checkpoint: 674.9M elements
  assert dit.learn_sigma and dit.out_channels == 64
  assert count_params(sit, include_pos_embed=False) == count_params(sit) - 64 * 1152


@pytest.mark.slow
def test_parameter_counts_of_the_other_presets():
  for name, (h, d) in {"SiT-B/1": (768, 12), "SiT-L/1": (1024, 24), "DiT-SL/1": (1024, 16),
                       "SiT-S/1": (384, 12)}.items():
    cfg = GeneratorConfig.preset(name, input_size=32, in_channels=64)
    assert count_params(cfg) == spec_count(32, 64, h, d, cfg.learn_sigma), name


def test_bfloat16_compute_is_close(model, ref):
  state = nnx.state(model)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: SiT(model.config, dtype=jnp.bfloat16,
                                                     rngs=nnx.Rngs(0))))
  bf16 = nnx.merge(graphdef, state)
  out = bf16(ref["in/x"], ref["in/t"], ref["in/y"])
  assert out.dtype == jnp.float32
  assert rel_err(out, ref["out/forward"]) < 5e-2
  assert bf16.blocks[0].attn.qkv.kernel[...].dtype == jnp.float32  # parameters stay float32


def test_training_step_reduces_the_loss(config):
  model = SiT(config, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  x0 = jax.random.normal(jax.random.key(1), (8, 16, 8)) * 0.5 + 0.3
  y = jnp.arange(8)
  key = jax.random.key(2)

  def loss_fn(m):
    return jnp.mean(sit_loss(lambda x, t, y, k: m(x, t, y, drop_key=k), x0, y, key,
                             weighting="lognormal")["loss"])

  @nnx.jit
  def step(m, o):
    loss, grads = nnx.value_and_grad(loss_fn)(m)
    o.update(m, grads)
    return loss

  pos = np.asarray(model.pos_embed[...])
  first = float(step(model, opt))
  for _ in range(5):
    last = float(step(model, opt))
  assert last < first
  np.testing.assert_array_equal(model.pos_embed[...], pos)  # the fixed table is not trained


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_sharded_generator_matches_single_device(gen, model, ref, axis_type):
  kind = {"explicit": jax.sharding.AxisType.Explicit, "auto": jax.sharding.AxisType.Auto}
  mesh = jax.make_mesh((8,), ("data",), axis_types=(kind[axis_type],))
  sharded = Generator(model, mesh=mesh)
  x, t, y = ref["in/x"], ref["in/t"], ref["in/y"]
  v = sharded(x, t, y)  # 4 items, padded to 8 and trimmed
  assert v.shape == (4, 16, 8)
  np.testing.assert_allclose(v, gen(x, t, y), atol=2e-6)
  kw = dict(method="euler_maruyama", num_steps=6, cfg_scale=1.75, guidance_interval=(0.0, 0.7),
            path="cosine", step_noise=ref["in/sde_cosine_cfg_eps"])
  out = sharded.sample(ref["in/sample_latents"], ref["in/sample_y"], **kw)
  assert rel_err(out, ref["out/sde_cosine_cfg"]) < TOL


def test_adaptive_sampling_on_a_mesh_ignores_the_padding_rows(gen, model, ref):
  """dopri5 shares its step size over the batch; the rows that fill 8 shards take no part."""
  sharded = Generator(model, mesh=jax.make_mesh((8,), ("data",)))
  # Three rows padded to eight: the padding repeats the last row five times, which would
  # weigh it six times in the step-size norm.
  z, y = ref["in/sample_latents"][:3], ref["in/sample_y"][:3]
  kw = dict(method="dopri5", rtol=1e-2, cfg_scale=1.75, guidance_interval=(0.0, 0.7))
  single = gen.sample(z, y, **kw)
  assert rel_err(sharded.sample(z, y, **kw), single) < 1e-5


def test_bfloat16_generator_keeps_float32_state(model, ref):
  bf16 = Generator(model, dtype="bfloat16")
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(bf16.state))
  out = bf16.sample(ref["in/sample_latents"], ref["in/sample_y"], method="euler", num_steps=8)
  assert out.dtype == jnp.float32
  assert rel_err(out, ref["out/ode_euler"]) < 5e-2


def test_guidance_scale_does_not_recompile(model, ref):
  gen = Generator(model)
  z, y = ref["in/sample_latents"], ref["in/sample_y"]
  a = gen.sample(z, y, method="euler", num_steps=8, cfg_scale=1.75, guidance_interval=(0.0, 0.7))
  b = gen.sample(z, y, method="euler", num_steps=8, cfg_scale=3.0, guidance_interval=(0.0, 0.7))
  assert len(gen._samplers) == 1  # pylint: disable=protected-access
  assert rel_err(a, ref["out/ode_euler_cfg"]) < TOL and not np.allclose(a, b)


def test_inference_compiler_options_are_gpu_only_and_valid(monkeypatch):
  from softvq_jax.models import layers
  assert layers.inference_compiler_options() is None  # nothing to undo off GPUs
  monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
  options = layers.inference_compiler_options()
  assert options == {"xla_disable_hlo_passes": "dot-merger"}
  # Passes the user disabled through XLA_FLAGS stay disabled: the option replaces the flag.
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                     "--xla_disable_hlo_passes=triton-softmax-rewriter,dot-merger,algsimp")
  assert layers.inference_compiler_options() == {
      "xla_disable_hlo_passes": "dot-merger,triton-softmax-rewriter,algsimp"}
  monkeypatch.setenv("XLA_FLAGS", "--xla_disable_hlo_passes=a --xla_disable_hlo_passes=b")
  assert layers.inference_compiler_options() == {"xla_disable_hlo_passes": "dot-merger,b"}
  monkeypatch.setenv("SOFTVQ_DOT_MERGER", "1")
  assert layers.inference_compiler_options() is None
  # XLA refuses unknown option names and malformed values at compile time: these compile.
  cfg = GeneratorConfig.preset("SiT-S/1", input_size=4, in_channels=2, hidden_size=16,
                               depth=2, num_heads=2)
  graphdef, state = nnx.split(SiT(cfg, rngs=nnx.Rngs(0)))
  forward = jax.jit(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y), compiler_options=options)
  out = forward(state, jnp.ones((2, 4, 2)), jnp.full((2,), 0.5), jnp.zeros((2,), jnp.int32))
  assert out.shape == (2, 4, 2)
  with pytest.raises(Exception, match="xla_no_such_option"):
    jax.jit(lambda x: x + 1, compiler_options={"xla_no_such_option": "dot-merger"})(1.0)
