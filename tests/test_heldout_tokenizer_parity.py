"""Float32 parity with the reference on settings the tiny fixtures do not cover.

``heldout_tokenizers.npz`` holds three tiny random tokenizers built by the
PyTorch reference (its json says how): a 1-codebook SoftVQ without L2 norm on
8-pixel patches, a MAETok on a 5x5 grid whose MoVQ decoder keeps its class
token, and a SoftVQ with DINOv2-reg4 ViTs, different encoder/decoder patch
sizes and a decoder without LayerScale. Each goes through the public API:
a ``model.safetensors`` + ``config.json`` pair, ``Tokenizer.from_pytorch``.
"""

import copy
import json

import numpy as np
import pytest
from conftest import FIXTURES, rel_err
from safetensors.numpy import save_file

from softvq_jax import Tokenizer
from softvq_jax.convert.tokenizer import infer_bottleneck
from softvq_jax.models.config import ConfigError, TokenizerConfig
from softvq_jax.tokenizer import param_shapes

TOL = 1e-5
META = json.load(open(FIXTURES / "heldout_tokenizers.json"))
# The non-linear pixel heads (conv, siren), built the same way in a file of their own.
HEADS_META = json.load(open(FIXTURES / "heldout_to_pixel.json"))
FILES = {**{name: "heldout_tokenizers" for name in META["cases"]},
         **{name: "heldout_to_pixel" for name in HEADS_META["cases"]}}
CASES = sorted(FILES)
CONFIGS = {**{n: c["config_json"] for n, c in META["cases"].items()},
           **{n: c["config_json"] for n, c in HEADS_META["cases"].items()}}


@pytest.fixture(scope="module")
def files():
  return {stem: dict(np.load(FIXTURES / f"{stem}.npz")) for stem in set(FILES.values())}


@pytest.fixture(scope="module", params=CASES)
def case(request, files, tmp_path_factory):
  name = request.param
  arrays = files[FILES[name]]
  folder = tmp_path_factory.mktemp(name)
  prefix = f"{name}/param/"
  state = {k[len(prefix):]: v.astype(np.float32) for k, v in arrays.items()
           if k.startswith(prefix)}
  save_file(state, str(folder / "model.safetensors"))
  with open(folder / "config.json", "w") as f:
    json.dump(CONFIGS[name], f)
  tok = Tokenizer.from_pytorch(str(folder / "model.safetensors"), str(folder / "config.json"))
  ref = {k[len(name) + 1:]: v for k, v in arrays.items()
         if k.startswith(name + "/") and not k.startswith(prefix)}
  return name, tok, ref


def nhwc(x):
  return np.asarray(x, np.float32).transpose(0, 2, 3, 1)


def test_encode(case):
  name, tok, ref = case
  quant, info = tok.encode(nhwc(ref["in/images"]), return_info=True)
  assert rel_err(info["h"], ref["out/h"]) < TOL, name
  assert rel_err(quant, ref["out/quant"]) < TOL, name
  if "out/probs" in ref:
    assert rel_err(info["probs"], ref["out/probs"]) < TOL, name
  else:
    assert "probs" not in info


def test_decode_and_reconstruct(case):
  name, tok, ref = case
  latents = ref["in/random_latents"].astype(np.float32)
  assert rel_err(tok.decode(latents), nhwc(ref["out/decode_random"])) < TOL, name
  assert rel_err(tok.reconstruct(nhwc(ref["in/images"])), nhwc(ref["out/recon"])) < TOL, name


def test_architecture_read_from_config(case):
  name, tok, _ = case
  cfg = tok.config
  if name == "maetok_grid5_cls":
    assert cfg.bottleneck == "ae" and cfg.decoder.movq and cfg.decoder_cls_token
    assert cfg.use_rope and cfg.rope_theta == 100.0 and not cfg.decoder_use_ape
  if name == "softvq_reg4_mixedpatch":
    assert (cfg.encoder.reg_tokens, cfg.decoder.reg_tokens) == (4, 4)
    assert (cfg.encoder.patch_size, cfg.decoder.patch_size) == (16, 8)
    assert cfg.decoder.layerscale_init is None and cfg.decoder.mlp_ratio == 2.0
    # Reloading our own config.json keeps the architecture.
    assert TokenizerConfig.from_json_dict(cfg.to_json_dict()) == cfg
  if name == "softvq_p8_g1_nol2":
    assert not cfg.codebook_l2_norm and cfg.num_codebooks == 1 and cfg.tau == 0.1
  if name in HEADS_META["cases"]:
    assert cfg.to_pixel == CONFIGS[name]["to_pixel"] != "linear"
    assert TokenizerConfig.from_json_dict(cfg.to_json_dict()) == cfg


def _base_config():
  return copy.deepcopy(META["cases"]["softvq_p8_g1_nol2"]["config_json"])


# Settings the reference cannot run (its forward or its constructor fails): a
# released config cannot hold them, and building something else would be a guess.
@pytest.mark.parametrize("change, message", [
    (dict(use_ape=False), "use_ape=False without use_rope"),
    (dict(use_ape=False, rope_mixed=True), "use_ape=False without use_rope"),
    (dict(dec_cls_token=False), "dec_cls_token=False with absolute positions"),
    (dict(decoder_model="vit_large_patch14_dinov2_movqv2"), "registers no such model"),
    (dict(encoder_model="vit_giant_patch14_dinov2.lvd142m"), "SwiGLU"),
    (dict(decoder_model="vit_base_patch14_dinov2_movqv2", bottleneck="kl"), "MoVQ decoder"),
    # The conv head upsamples 16 times; the SIREN head's output is an image only when
    # image_size == patch_size**2 (the reference's view fails otherwise).
    (dict(to_pixel="conv"), "needs a decoder patch size of 16, got 8"),
    (dict(to_pixel="siren"), r"needs image_size equal to the decoder patch size squared \(64\)"),
])
def test_configs_the_reference_cannot_run_are_refused(change, message):
  cfg = _base_config()
  cfg.update(change)
  with pytest.raises(ConfigError, match=message):
    TokenizerConfig.from_json_dict(cfg)


def test_valid_neighbours_of_refused_configs():
  # Register-token decoders keep a patches-only table: no class token is fine there.
  cfg = _base_config()
  cfg.update(dec_cls_token=False, decoder_model="vit_base_patch14_reg4_dinov2.lvd142m")
  assert not TokenizerConfig.from_json_dict(cfg).decoder_cls_token
  # With RoPE the position table is not used, so neither is its class row.
  cfg = _base_config()
  cfg.update(dec_cls_token=False, use_ape=False, use_rope=True, rope_mixed=True)
  assert not TokenizerConfig.from_json_dict(cfg).decoder_use_ape


@pytest.mark.parametrize("init_values, has_layerscale", [(None, True), (1e-5, True), (0.0, False)])
def test_layerscale_follows_timm_init_values(init_values, has_layerscale):
  # timm's create_model drops None-valued kwargs (default 1e-5); 0 removes LayerScale.
  cfg = _base_config()
  cfg["encoder_kwargs"] = dict(cfg["encoder_kwargs"], init_values=init_values)
  config = TokenizerConfig.from_json_dict(cfg)
  names = {".".join(map(str, p)) for p in param_shapes(config)}
  assert ("encoder.model.blocks.0.ls1.gamma" in names) == has_layerscale
  assert TokenizerConfig.from_json_dict(config.to_json_dict()) == config


def test_hard_vq_checkpoint_is_refused():
  state = {"quantize.embedding.weight": np.zeros((16, 4), np.float32)}
  with pytest.raises(ConfigError, match="hard-VQ"):
    infer_bottleneck(state, _base_config())
