"""DiT on 1-D tokens and the ADM diffusion: float32 parity with the PyTorch reference."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, rel_err

from softvq_jax.convert import generator as convert_generator
from softvq_jax.convert.core import map_state_dict
from softvq_jax.generator import Generator, build_model, count_params, variable_shapes
from softvq_jax.models.sit import GeneratorConfig
from softvq_jax.transport import diffusion as D

TOL = 1e-5
HF = FIXTURES / "dit_tiny_hf"
NULL = 1000


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(FIXTURES / "dit_tiny.npz"))


@pytest.fixture(scope="module")
def meta():
  return json.load(open(FIXTURES / "dit_tiny.json"))


@pytest.fixture(scope="module")
def model(ref, meta):
  config = GeneratorConfig.from_json_dict(meta["config"], kind="dit")
  state = {k[len("param/"):]: v for k, v in ref.items() if k.startswith("param/")}
  target = {p: tuple(s.shape) for p, s in variable_shapes(config).items()}
  flat, _ = map_state_dict(state, target, convert_generator.GENERATOR_RULES)
  return build_model(config, flat)


@pytest.fixture(scope="module")
def diff8():
  return D.create_diffusion("8", "cosine")


@pytest.fixture(scope="module")
def cfg_fn(model, ref):
  y2 = np.concatenate([ref["in/sample_y"], [NULL, NULL]])
  s = float(ref["in/sample_cfg_scale"])
  return jax.jit(lambda x, t: model.forward_with_cfg(x, t, y2, s))


@pytest.fixture(scope="module")
def plain_fn(model, ref):
  return jax.jit(lambda x, t: model(x, t, ref["in/sample_y"]))


def test_config_from_released_fields(meta):
  cfg = GeneratorConfig.from_json_dict(json.load(open(HF / "config.json")))
  assert cfg.kind == "dit" and cfg.learn_sigma and cfg.out_channels == 16
  assert count_params(cfg) == meta["num_params"]


def test_forward_intermediates(model, ref):
  t = ref["in/t"]
  out, taps = model(ref["in/x"], t, ref["in/y"], return_intermediates=True)
  # sin/cos of t * f at t = 999: one float32 ulp of a frequency f moves the
  # argument by ~999 * ulp(f), and the reference's float32 exp rounds some f
  # differently. Check to that bound, and to 1e-7 against exact sin/cos of our args.
  half = 128
  freqs = np.exp(-math.log(10000) * np.arange(half, dtype=np.float32) / half).astype(np.float32)
  bound = 1e-6 + 2.0 * np.abs(t.astype(np.float64))[:, None] * freqs[None] * 2.0**-23
  diff = np.abs(np.asarray(taps["t_freq"], np.float64) - ref["out/t_freq"])
  assert np.all(diff <= np.concatenate([bound, bound], 1))
  args = np.asarray(t, np.float32)[:, None] * np.asarray(
      jnp.exp(-math.log(10000) * jnp.arange(half, dtype=jnp.float32) / half))[None]
  exact = np.concatenate([np.cos(args.astype(np.float64)), np.sin(args.astype(np.float64))], -1)
  assert np.max(np.abs(np.asarray(taps["t_freq"]) - exact)) < 1e-7
  for name in ("x_embedder", "tokens_in", "t_emb", "y_emb", "c", "block0", "block1"):
    assert rel_err(taps[name], ref[f"out/{name}"]) < TOL, name
  assert out.shape == (4, 16, 16)
  assert rel_err(out, ref["out/forward"]) < TOL
  assert rel_err(out, ref["out_f64/forward"]) < TOL


def test_forward_with_cfg(model, ref):
  out = model.forward_with_cfg(ref["in/cfg_x"], ref["in/cfg_t"], ref["in/cfg_y"],
                               float(ref["in/cfg_scale"]))
  assert rel_err(out, ref["out/forward_with_cfg"]) < TOL
  assert rel_err(out, ref["out_f64/forward_with_cfg"]) < TOL


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedules(ref, schedule):
  d = D.create_diffusion("", schedule)
  for name in ("betas", "alphas_cumprod", "posterior_log_variance_clipped",
               "posterior_mean_coef1", "posterior_mean_coef2"):
    np.testing.assert_allclose(getattr(d, name), ref[f"out/sched_{schedule}_{name}"],
                               rtol=1e-12, err_msg=name)
  np.testing.assert_array_equal(d.timestep_map, np.arange(1000))


def test_respacing(ref, diff8):
  for n in (250, 100, 50, 25, 8, 6, 5):
    np.testing.assert_array_equal(D.space_timesteps(1000, str(n)), ref[f"out/timestep_map_{n}"])
  np.testing.assert_array_equal(diff8.timestep_map, ref["out/resp8_timestep_map"])
  np.testing.assert_array_equal(D.create_diffusion("5", "linear").timestep_map,
                                ref["out/resp5_linear_timestep_map"])
  for name in ("betas", "alphas_cumprod", "posterior_log_variance_clipped",
               "posterior_mean_coef1", "posterior_mean_coef2"):
    np.testing.assert_allclose(getattr(diff8, name), ref[f"out/resp8_{name}"], rtol=1e-12)


def vb_float64(x0, mean, log_variance, t, diff):
  """The reference's decoder NLL / KL formulas evaluated in float64 (an independent re-derivation)."""
  x0, mean, lv = (np.asarray(a, np.float64) for a in (x0, mean, log_variance))
  t = np.asarray(t)
  cdf = lambda v: 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))
  inv = np.exp(-0.5 * lv)
  cp, cm = cdf(inv * (x0 - mean + 1 / 255)), cdf(inv * (x0 - mean - 1 / 255))
  logp = np.where(x0 < -0.999, np.log(np.maximum(cp, 1e-12)),
                  np.where(x0 > 0.999, np.log(np.maximum(1 - cm, 1e-12)),
                           np.log(np.maximum(cp - cm, 1e-12))))
  return -logp.mean(axis=(1, 2)) / math.log(2)


@pytest.mark.parametrize("schedule,prefix", [("cosine", "loss_"), ("linear", "loss_linear_")])
def test_training_losses(model, ref, schedule, prefix):
  d = D.create_diffusion("", schedule)
  x0, t, noise = ref["in/loss_x_start"], jnp.asarray(ref["in/loss_t"]), ref["in/loss_noise"]
  terms = d.training_losses(lambda x, tt: model(x, tt, ref["in/loss_y"]), x0, t, noise)
  if schedule == "cosine":
    assert rel_err(terms["x_t"], ref["out/loss_x_t"]) < TOL
    assert rel_err(model(terms["x_t"], t, ref["in/loss_y"]), ref["out/loss_model_out"]) < TOL
  assert rel_err(terms["mse"], ref[f"out/{prefix}mse"]) < TOL
  # The t = 0 term (decoder NLL of a 2/255 bin) subtracts CDFs near 1 in float32 in the
  # reference, which costs it up to ~3e-5 here; we evaluate it in the log domain. So vb
  # must match the reference within the reference's own rounding, and match the
  # float64 evaluation of the same formula to 1e-5.
  out = d.p_mean_variance_from_output(model(terms["x_t"], t, ref["in/loss_y"]), terms["x_t"], t)
  nll64 = vb_float64(x0, out["mean"], out["log_variance"], t, d)
  at0 = np.asarray(t) == 0
  assert rel_err(np.asarray(terms["vb"])[at0], nll64[at0]) < TOL
  ref_own_error = rel_err(ref[f"out/{prefix}vb"][at0], nll64[at0])
  assert rel_err(terms["vb"], ref[f"out/{prefix}vb"]) < TOL + ref_own_error
  assert rel_err(terms["vb"][~at0], ref[f"out/{prefix}vb"][~at0]) < TOL
  assert rel_err(terms["loss"], ref[f"out/{prefix}loss"]) < TOL + ref_own_error
  assert ref_own_error < 1e-4


def test_single_steps(diff8, cfg_fn, ref):
  for i in range(8):
    t = jnp.full((4,), i, jnp.int32)
    x, eps = ref["in/step_x"][i], ref["in/step_eps"][i]
    out = diff8.p_mean_variance(cfg_fn, x, t)
    assert rel_err(out["mean"], ref["out/step_mean"][i]) < TOL, i
    assert rel_err(out["log_variance"], ref["out/step_log_variance"][i]) < TOL, i
    assert rel_err(out["pred_xstart"], ref["out/step_pred_xstart"][i]) < TOL, i
    assert rel_err(diff8.p_sample(cfg_fn, x, t, eps)["sample"], ref["out/step_sample"][i]) < TOL
    ddim = diff8.ddim_sample(cfg_fn, x, t, eps, eta=0.5)["sample"]
    assert rel_err(ddim, ref["out/step_ddim_eta05"][i]) < TOL, i


def test_ddpm_cfg_chain(diff8, cfg_fn, ref):
  # The reference layout: a [z, z] batch with labels [y, null] through forward_with_cfg.
  z2 = np.concatenate([ref["in/sample_z"]] * 2)
  out, traj = diff8.p_sample_loop(cfg_fn, z2, noise=ref["in/ddpm_cfg_eps"], return_trajectory=True)
  # |x| reaches ~1.3e5 (a random model at abar = 2.4e-9): rel_err is relative to max |x|.
  assert rel_err(out, ref["out/ddpm_cfg"]) < TOL
  assert rel_err(traj["sample"], ref["out/ddpm_cfg_traj"]) < TOL
  assert rel_err(traj["pred_xstart"], ref["out/ddpm_cfg_pred_xstart"]) < TOL
  assert rel_err(out, ref["out_f64/ddpm_cfg"]) < TOL


def test_ddpm_ddim_chains(model, diff8, cfg_fn, plain_fn, ref):
  z, y = ref["in/sample_z"], ref["in/sample_y"]
  assert rel_err(diff8.p_sample_loop(plain_fn, z, noise=ref["in/ddpm_eps"]), ref["out/ddpm"]) < TOL
  d5 = D.create_diffusion("5", "linear")
  out = d5.p_sample_loop(lambda x, t: model(x, t, y), z, noise=ref["in/ddpm_linear5_eps"])
  assert rel_err(out, ref["out/ddpm_linear5"]) < TOL
  z2 = np.concatenate([z] * 2)
  out = diff8.ddim_sample_loop(cfg_fn, z2, noise=ref["in/ddim_cfg_eps"])
  assert rel_err(out, ref["out/ddim_cfg"]) < TOL
  out = diff8.ddim_sample_loop(plain_fn, z, eta=0.5, noise=ref["in/ddim_eta05_eps"])
  assert rel_err(out, ref["out/ddim_eta05"]) < TOL


@pytest.fixture(scope="module")
def gen(model):
  return Generator(model)


def test_generator_sampling(gen, ref):
  z, y = ref["in/sample_z"], ref["in/sample_y"]
  s = float(ref["in/sample_cfg_scale"])
  # Guided sampling of n samples replays the first half of the reference's doubled noise.
  out = gen.sample(z, y, method="ddpm", num_steps=8, cfg_scale=s,
                   step_noise=ref["in/ddpm_cfg_eps"][:, :2])
  assert rel_err(out, ref["out/ddpm_cfg"][:2]) < TOL
  out = gen.sample(z, y, method="ddim", num_steps=8, cfg_scale=s)
  assert rel_err(out, ref["out/ddim_cfg"][:2]) < TOL
  out = gen.sample(z, y, method="ddpm", num_steps=5, noise_schedule="linear",
                   step_noise=ref["in/ddpm_linear5_eps"])
  assert rel_err(out, ref["out/ddpm_linear5"]) < TOL
  a = gen.sample(z, y, method="ddpm", num_steps=8, key=jax.random.key(0))
  np.testing.assert_array_equal(a, gen.sample(z, y, method="ddpm", num_steps=8,
                                              key=jax.random.key(0)))
  with pytest.raises(ValueError, match="key"):
    gen.sample(z, y, method="ddpm", num_steps=8)
  with pytest.raises(ValueError, match="guidance_interval"):
    gen.sample(z, y, method="ddim", num_steps=8, guidance_interval=(0.0, 0.5))


def test_user_path_convert_save_load(ref, tmp_path):
  gen = Generator.from_pytorch(str(HF / "model.safetensors"), str(HF / "config.json"))
  assert gen.kind == "dit"
  assert rel_err(gen(ref["in/x"], ref["in/t"], ref["in/y"]), ref["out/forward"]) < TOL
  gen.save(str(tmp_path / "dit"))
  loaded = Generator.load(str(tmp_path / "dit"))
  assert loaded.config == gen.config
  np.testing.assert_array_equal(loaded(ref["in/x"], ref["in/t"], ref["in/y"]),
                                gen(ref["in/x"], ref["in/t"], ref["in/y"]))


def test_sampling_defaults_to_the_process_the_model_was_trained_on(gen, ref, tmp_path):
  """A DiT trained on the linear schedule records it in config.json (the trainers export
  it); sampling without noise_schedule= then runs that process, not cosine."""
  gen.save(str(tmp_path / "dit"))
  config_path = tmp_path / "dit" / "config.json"
  cfg = json.loads(config_path.read_text())
  assert (cfg["noise_schedule"], cfg["diffusion_steps"]) == ("cosine", 1000)
  cfg["noise_schedule"] = "linear"
  config_path.write_text(json.dumps(cfg))
  linear = Generator.load(str(tmp_path / "dit"))
  assert linear.config.noise_schedule == "linear"
  z, y = ref["in/sample_z"], ref["in/sample_y"]
  out = linear.sample(z, y, method="ddpm", num_steps=5, step_noise=ref["in/ddpm_linear5_eps"])
  assert rel_err(out, ref["out/ddpm_linear5"]) < TOL


def test_trainer_exports_its_diffusion_settings():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from types import SimpleNamespace  # pylint: disable=g-import-not-at-top
  from softvq_jax.train import sit_trainer  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(
      model=dict(hidden_size=32, depth=1, num_heads=2, num_classes=4, class_dropout_prob=0.1,
                 scan_layers=False, remat_policy="none"),
      diffusion=dict(noise_schedule="linear", num_steps=500)))
  tok = SimpleNamespace(latent_shape=(8, 4))
  gen_config = sit_trainer.generator_config(config, tok, kind="dit")
  assert (gen_config.noise_schedule, gen_config.diffusion_steps) == ("linear", 500)
  back = GeneratorConfig.from_json_dict(gen_config.to_json_dict())
  assert back == gen_config


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="ddpm", path="cosine"), "path: not an option of a DiT"),
    (dict(method="ddim", rtol=1e-2), "rtol: not an option of a DiT"),
    (dict(method="ddpm", eta=0.5), "eta is a DDIM option"),
    (dict(method="ddim", num_steps=2.5), "num_steps must be an integer"),
    (dict(method="ddim", num_steps=0), "num_steps must be an integer"),
    (dict(method="ddim", timestep_respacing="ddimx"), "expected 'ddimN'"),
    (dict(method="ddim", noise_schedule="quadratic"), "noise_schedule must be one of"),
    (dict(method="ddim", eta=-1.0), "eta must be a finite number >= 0, got -1.0"),
    (dict(method="ddim", eta=float("nan")), "eta must be a finite number >= 0, got nan"),
    (dict(method="ddim", cfg_scale=float("inf")), "cfg_scale must be a finite number >= 1"),
    (dict(method="ddim", step_noise=np.zeros((250, 2, 8, 8), np.float32)),
     "method 'ddim' with eta=0 is deterministic: it takes no step_noise")])
def test_dit_sampler_options_are_checked(gen, ref, kwargs, match):
  with pytest.raises(ValueError, match=match):
    gen.sample(ref["in/sample_z"], ref["in/sample_y"], key=jax.random.key(0), **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(eta=0.5), "eta: not an option of a SiT"),
    (dict(noise_schedule="linear"), "noise_schedule: not an option of a SiT"),
    (dict(timestep_respacing="ddim5"), "timestep_respacing: not an option of a SiT"),
    (dict(path="vp"), "path must be one of"),
    (dict(cfg_scale=2.0, guidance_interval=(0.7, 0.0)), "guidance_interval must be"),
    (dict(cfg_scale=2.0, guidance_interval=(0.5,)), r"guidance_interval must be .* got \(0.5,\)"),
    (dict(num_steps=2.5), "num_steps must be an integer"),
    # Below 1 nothing is guided: 0 would give conditional samples, not unconditional ones.
    (dict(cfg_scale=0.0), r"cfg_scale must be a finite number >= 1 \(1: no guidance\), got "
                          r"0.0; for unconditional samples pass the null class 3"),
    (dict(cfg_scale=0.5), "cfg_scale must be a finite number >= 1"),
    (dict(cfg_scale=float("nan")), "cfg_scale must be a finite number >= 1"),
    (dict(cfg_scale=np.array([2.0, 3.0])), "cfg_scale must be a finite number >= 1"),
    (dict(step_noise=np.zeros((3, 1, 4, 2), np.float32)),
     "method 'euler' is deterministic: it takes no step_noise"),
    (dict(num_steps=None), "num_steps must be an integer >= 1, got None"),
    (dict(cfg_scale=2.0, guidance_interval=0.5), r"guidance_interval must be .* got 0.5"),
    (dict(key=42), r"key must be a JAX PRNG key \(jax.random.key\(seed\)\), got int")])
def test_sit_sampler_options_are_checked(kwargs, match):
  sit = Generator.random(GeneratorConfig(kind="sit", input_size=4, in_channels=2, hidden_size=8,
                                         depth=1, num_heads=2, num_classes=3), seed=0)
  with pytest.raises((ValueError, TypeError), match=match):
    sit.sample(np.zeros((1, 4, 2), np.float32), [0], method="euler", **kwargs)
  with pytest.raises(Exception, match="DiT options"):
    GeneratorConfig(kind="sit", noise_schedule="linear")


def test_vb_gradient_reaches_only_the_variance_channels(model, ref):
  # The VB term must not push the eps half: its gradient flows to the variance channels only.
  d = D.create_diffusion("", "cosine")
  x0, t, noise = ref["in/loss_x_start"], jnp.asarray(ref["in/loss_t"]), ref["in/loss_noise"]

  def vb_of(out):
    return jnp.sum(d.vb_terms_bpd(jnp.concatenate([jax.lax.stop_gradient(out[..., :8]),
                                                   out[..., 8:]], -1), x0, d.q_sample(x0, t, noise), t))
  out = model(d.q_sample(x0, t, noise), t, ref["in/loss_y"])
  g = jax.grad(lambda o: d.training_losses(lambda x, tt: o, x0, t, noise)["vb"].sum())(out)
  assert np.all(np.asarray(g[..., :8]) == 0) and np.any(np.asarray(g[..., 8:]) != 0)
  np.testing.assert_allclose(g, jax.grad(vb_of)(out), rtol=1e-5, atol=1e-7)
