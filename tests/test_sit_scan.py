"""Scan-over-layers with rematerialisation: same numbers and same checkpoint layout as the loop."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jaxpr_equations, rel_err
from flax import nnx

from softvq_jax.generator import build_model
from softvq_jax.models.config import ConfigError
from softvq_jax.models.sit import GeneratorConfig, SiT, stack_layers, unstack_layers
from softvq_jax.train.sit_trainer import ema_sampler
from softvq_jax.utils.nnx_utils import model_from_flat

CFG = GeneratorConfig(kind="sit", input_size=8, in_channels=4, hidden_size=32, depth=3,
                      num_heads=2, num_classes=4)


def _flat(model):
  return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _load(model, flat):
  return model_from_flat(model, flat)


@pytest.fixture(scope="module")
def looped():
  model = SiT(CFG, rngs=nnx.Rngs(0))
  # Random values everywhere: the zero-initialised adaLN and final layers would hide bugs.
  rng = np.random.default_rng(0)
  flat = {p: (v if p[0] == "pos_embed" else rng.normal(0, 0.2, v.shape).astype(np.float32))
          for p, v in _flat(model).items()}
  return _load(model, flat), flat


@pytest.fixture(scope="module")
def inputs():
  x = jax.random.normal(jax.random.key(0), (2, 8, 4))
  return x, jnp.array([0.3, 0.8]), jnp.array([1, 4])


@pytest.mark.parametrize("policy", ["none", "nothing_saveable", "dots_with_no_batch_dims_saveable"])
def test_scanned_forward_and_gradients_equal_the_loop(looped, inputs, policy):
  model, flat = looped
  scanned = _load(SiT(CFG, rngs=nnx.Rngs(1), scan_layers=True, remat_policy=policy),
                  stack_layers(flat, CFG.depth))
  _assert_scan_equals_loop(scanned, model, inputs)


def _assert_scan_equals_loop(scanned, looped, inputs):
  """Same outputs and per-layer gradients; returns the loop's gradients."""
  x, t, y = inputs
  np.testing.assert_allclose(scanned(x, t, y), looped(x, t, y), rtol=1e-5, atol=1e-6)

  def loss(m):
    return jnp.sum(jnp.square(m(x, t, y)))

  g_loop = _flat_grads(nnx.grad(loss)(looped))
  g_scan = unstack_layers(_flat_grads(nnx.grad(loss)(scanned)))
  assert set(g_loop) == set(g_scan)
  for path in g_loop:
    # Summation order differs between the loop and the scan: compare at float32 rounding
    # relative to the gradient's scale.
    assert rel_err(g_scan[path], g_loop[path]) < 1e-5, path
  return g_loop


def _flat_grads(grads):
  return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}


@pytest.mark.parametrize("scan,policy", [(True, "none"), (True, "dots_with_no_batch_dims_saveable"),
                                         (False, "nothing_saveable")])
def test_training_layouts_run_inside_the_samplers_loop(looped, scan, policy):
  """The trainers' sample grid and FID hook call the training model (scanned,
  rematerialised) inside the sampler's ``lax.scan``: NNX transforms had refused its
  modules there (another trace level), so a scanned run crashed at its first grid."""
  model, flat = looped
  trained = _load(SiT(CFG, rngs=nnx.Rngs(1), scan_layers=scan, remat_policy=policy),
                  stack_layers(flat, CFG.depth) if scan else flat)
  noise = jax.random.normal(jax.random.key(2), (2, 8, 4))
  labels = jnp.array([1, 3])

  def sample(m):
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    sampler = ema_sampler(graphdef, CFG, num_steps=3, cfg_scale=1.5)
    return sampler(SimpleNamespace(ema=params, rest=rest), noise, labels)

  np.testing.assert_allclose(sample(trained), sample(model), rtol=1e-5, atol=1e-6)


def test_layouts_convert_both_ways_and_count_the_same(looped):
  _, flat = looped
  stacked = stack_layers(flat, CFG.depth)
  assert stacked[("blocks", "attn", "qkv", "kernel")].shape == (3, 32, 96)
  scanned_shapes = {p: v.shape for p, v in _flat(SiT(CFG, rngs=nnx.Rngs(0), scan_layers=True)).items()}
  assert {p: v.shape for p, v in stacked.items()} == scanned_shapes
  back = unstack_layers(stacked)
  assert set(back) == set(flat)
  for path in flat:
    np.testing.assert_array_equal(back[path], flat[path])
  assert sum(v.size for v in stacked.values()) == sum(v.size for v in flat.values())
  with pytest.raises(ValueError, match="layers"):
    stack_layers({k: v for k, v in flat.items() if k[:2] != ("blocks", 1)}, CFG.depth)


def test_scanned_weights_load_into_the_inference_model(looped, inputs):
  model, flat = looped
  gen_model = build_model(CFG, unstack_layers(stack_layers(flat, CFG.depth)))
  x, t, y = inputs
  np.testing.assert_allclose(gen_model(x, t, y), model(x, t, y), rtol=1e-6, atol=1e-7)


def test_unknown_remat_policy():
  with pytest.raises(ConfigError, match="remat_policy"):
    SiT(CFG, rngs=nnx.Rngs(0), remat_policy="everything")


def test_qk_norm_scanned_equals_the_loop(inputs):
  cfg = GeneratorConfig(kind="sit", input_size=8, in_channels=4, hidden_size=32, depth=3,
                        num_heads=2, num_classes=4, qk_norm=True)
  rng = np.random.default_rng(1)
  flat = {p: (v if p[0] == "pos_embed" else rng.normal(0, 0.2, v.shape).astype(np.float32) +
              (1.0 if p[-1] == "scale" else 0.0))
          for p, v in _flat(SiT(cfg, rngs=nnx.Rngs(0))).items()}
  assert flat[("blocks", 2, "attn", "k_norm", "scale")].shape == (16,)
  looped = _load(SiT(cfg, rngs=nnx.Rngs(0)), flat)
  stacked = stack_layers(flat, cfg.depth)
  assert stacked[("blocks", "attn", "q_norm", "bias")].shape == (3, 16)
  scanned = _load(SiT(cfg, rngs=nnx.Rngs(1), scan_layers=True, remat_policy="nothing_saveable"),
                  stacked)
  g_loop = _assert_scan_equals_loop(scanned, looped, inputs)
  assert ("blocks", 1, "attn", "q_norm", "scale") in g_loop
  assert np.abs(g_loop[("blocks", 0, "attn", "k_norm", "bias")]).max() > 0
  back = unstack_layers(stacked)
  assert set(back) == set(flat)


def _with_residual(flat, residual_dtype, *, scan_layers=False):
  model = SiT(CFG, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, residual_dtype=residual_dtype,
              scan_layers=scan_layers)
  return _load(model, stack_layers(flat, CFG.depth) if scan_layers else flat)


def test_a_bfloat16_residual_stream_carries_bfloat16_between_blocks(looped, inputs):
  _, flat = looped
  x, t, y = inputs
  wide = _with_residual(flat, "float32")
  narrow = _with_residual(flat, "bfloat16")
  out_wide, taps_wide = wide(x, t, y, return_intermediates=True)
  out_narrow, taps_narrow = narrow(x, t, y, return_intermediates=True)
  assert taps_wide["block0"].dtype == jnp.float32 and taps_narrow["block0"].dtype == jnp.bfloat16
  assert out_narrow.dtype == jnp.float32
  # One bfloat16 rounding of the stream per block, against the float32 stream.
  assert 0 < rel_err(out_narrow, out_wide) < 3e-2
  # The scanned model carries the same dtype through its loop.
  scanned = _with_residual(flat, "bfloat16", scan_layers=True)
  graphdef, state = nnx.split(scanned)
  jaxpr = jax.make_jaxpr(lambda st, a: nnx.merge(graphdef, st)(a, t, y))(state, x)
  streams = [v.aval.dtype for e in jaxpr_equations(jaxpr.jaxpr) if e.primitive.name == "scan"
             for v in e.outvars if v.aval.shape == (2, 8, 32)]
  assert streams == [jnp.bfloat16]


@pytest.mark.parametrize("bad", ["int8", "float64x", "complex64"])
def test_residual_dtype_must_be_a_float_the_stream_can_take(bad):
  with pytest.raises(ConfigError, match="residual_dtype"):
    SiT(CFG, rngs=nnx.Rngs(0), residual_dtype=bad)
