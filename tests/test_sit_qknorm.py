"""SiT with ``qk_norm=True``: parity with the PyTorch reference, layouts, conversion, configs.

``sit_qknorm.npz`` holds a tiny random SiT built with ``qk_norm=True`` (an affine
``nn.LayerNorm(head_dim)`` on each head's q and k, before the scaling) and run by
the reference in float32; the ``.json`` records the config, how the weights were
drawn and what every array is. Weights go through ``model.safetensors`` +
``config.json`` and ``Generator.from_pytorch``, as a released model would.
"""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, rel_err
from flax import nnx

from softvq_jax import Generator, parallel
from softvq_jax.config_lib import sit_recipe
from softvq_jax.convert import generator as convert_generator
from softvq_jax.convert.core import ConversionError
from softvq_jax.generator import build_model, count_params, variable_shapes
from softvq_jax.models.config import ConfigError
from softvq_jax.models.sit import GeneratorConfig, SiT
from softvq_jax.train.sit_trainer import generator_config

pytestmark = pytest.mark.usefixtures("few_xla_optimisations")  # tiny programs, many compiles

TOL = 1e-5  # observed 3e-7 (forward) and 2e-7 (sample); the norms themselves move it by 0.17
META = json.load(open(FIXTURES / "sit_qknorm.json"))
P = jax.sharding.PartitionSpec


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(FIXTURES / "sit_qknorm.npz"))


def _torch_state(ref):
  return {k[len("param/"):]: v.astype(np.float32) for k, v in ref.items() if k.startswith("param/")}


def _write(folder, state, config):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(state, str(folder / "model.safetensors"))
  (folder / "config.json").write_text(json.dumps(config))
  return str(folder / "model.safetensors"), str(folder / "config.json")


@pytest.fixture(scope="module")
def gen(ref, tmp_path_factory):
  paths = _write(tmp_path_factory.mktemp("qknorm"), _torch_state(ref), META["config"])
  return Generator.from_pytorch(*paths)


def test_forward_matches_reference(gen, ref):
  assert gen.config.qk_norm and gen.config.kind == "sit"
  assert count_params(gen.config) == META["num_params"]  # the reference's state_dict size
  attn = gen.model().blocks[1].attn
  np.testing.assert_array_equal(attn.k_norm.bias[...], ref["param/blocks.1.attn.k_norm.bias"])
  assert attn.q_norm.eps == 1e-5  # PyTorch's LayerNorm default, not the blocks' 1e-6
  assert rel_err(gen(ref["in/x"], ref["in/t"], ref["in/y"]), ref["out/forward"]) < TOL


def test_guided_euler_sample_matches_reference(gen, ref):
  kw = META["samplers"]["euler5_cfg"]
  out = gen.sample(ref["in/euler5_cfg_z"], ref["in/euler5_cfg_y"], method="euler",
                   num_steps=kw["num_steps"], cfg_scale=kw["cfg_scale"],
                   guidance_interval=(kw["guidance_low"], kw["guidance_high"]))
  assert rel_err(out, ref["out/euler5_cfg"]) < TOL


def test_the_norms_are_not_skipped(ref, tmp_path):
  # The same weights without q/k norms give a visibly different network.
  state = {k: v for k, v in _torch_state(ref).items() if "_norm." not in k}
  config, flat, _ = convert_generator.convert(
      *_write(tmp_path, state, dict(META["config"], qk_norm=False)))
  plain = build_model(config, flat)
  assert rel_err(plain(ref["in/x"], ref["in/t"], ref["in/y"]), ref["out/forward"]) > 1e-2


def test_converter_requires_the_norms_and_names_them_when_unexpected(ref, tmp_path):
  state = _torch_state(ref)
  del state["blocks.1.attn.q_norm.weight"]
  with pytest.raises(ConversionError) as e:
    convert_generator.convert(*_write(tmp_path, state, META["config"]))
  assert "missing tensor for blocks.1.attn.q_norm.scale" in str(e.value)
  off = tmp_path / "off"
  off.mkdir()
  with pytest.raises(ConversionError) as e:
    convert_generator.convert(*_write(off, _torch_state(ref), dict(META["config"], qk_norm=False)))
  msg = str(e.value)
  assert "(8 problem(s))" in msg  # q/k x weight/bias x 2 blocks, nothing else
  assert "unexpected tensor blocks.0.attn.k_norm.bias" in msg


def test_save_load_round_trip_keeps_qk_norm(gen, ref, tmp_path):
  assert gen.config.to_json_dict()["qk_norm"] is True
  gen.save(str(tmp_path / "out"))
  assert json.loads((tmp_path / "out" / "config.json").read_text())["qk_norm"] is True
  back = Generator.load(str(tmp_path / "out"))
  assert back.config == gen.config
  np.testing.assert_array_equal(back(ref["in/x"], ref["in/t"], ref["in/y"]),
                                gen(ref["in/x"], ref["in/t"], ref["in/y"]))


def test_random_and_trainer_configs_set_qk_norm():
  fields = dict(kind="sit", input_size=4, in_channels=3, hidden_size=16, depth=2, num_heads=2,
                num_classes=5, vae_1d=True)
  shapes = variable_shapes(Generator.random(dict(fields, qk_norm=True)).config)
  assert shapes[("blocks", 1, "attn", "q_norm", "scale")].shape == (8,)
  assert shapes[("blocks", 0, "attn", "k_norm", "bias")].shape == (8,)
  plain = Generator.random(fields).config
  assert not plain.qk_norm and not any("q_norm" in p for p in variable_shapes(plain))
  config = sit_recipe("softvq-b-64", "runlocal")
  assert config.model.qk_norm is False
  config.model.qk_norm = True
  tok = types.SimpleNamespace(latent_shape=(16, 32))
  assert generator_config(config, tok).qk_norm


def test_invalid_qk_norm_configs():
  with pytest.raises(ConfigError, match="SiT option"):
    GeneratorConfig(kind="dit", hidden_size=16, depth=1, num_heads=2, learn_sigma=True,
                    qk_norm=True)
  with pytest.raises(ConfigError, match="qk_norm must be"):
    GeneratorConfig.from_json_dict(dict(META["config"], qk_norm="false"))


def test_bfloat16_keeps_the_norms_in_float32(gen, ref):
  bf16 = Generator(gen.model(), dtype="bfloat16")
  compute = {tuple(p): v for p, v in nnx.to_flat_state(bf16._compute_state)}  # pylint: disable=protected-access
  assert compute[("blocks", 0, "attn", "q_norm", "scale")].get_value().dtype == jnp.float32
  assert compute[("blocks", 0, "attn", "qkv", "kernel")].get_value().dtype == jnp.bfloat16
  assert rel_err(bf16(ref["in/x"], ref["in/t"], ref["in/y"]), ref["out/forward"]) < 5e-2


def test_norms_are_replicated_in_both_layouts():
  config = GeneratorConfig(kind="sit", input_size=4, in_channels=4, hidden_size=32, depth=2,
                           num_heads=2, num_classes=4, qk_norm=True)
  mesh = parallel.create_mesh([("data", 2), ("fsdp", 4)])
  for scan in (False, True):
    abstract = nnx.state(nnx.eval_shape(lambda s=scan: SiT(config, rngs=nnx.Rngs(0),
                                                           scan_layers=s)))
    specs = {"/".join(parallel.path_parts(kp)): s for kp, s in jax.tree_util.tree_leaves_with_path(
        parallel.state_specs(abstract, mesh, "fsdp"), is_leaf=lambda x: isinstance(x, P))}
    norms = {p: s for p, s in specs.items() if "_norm/" in p}
    assert len(norms) == (4 if scan else 8), norms
    assert set(norms.values()) == {P()}, norms  # head_dim 16 would split 4 ways otherwise
    assert specs["blocks/attn/qkv/kernel" if scan else "blocks/0/attn/qkv/kernel"] != P()
