"""MAETok: float32 parity with the reference (mixed RoPE, MoVQ decoder), layer by layer."""

import json

import numpy as np
import pytest
from conftest import FIXTURES, rel_err

from softvq_jax import Tokenizer
from softvq_jax.convert.__main__ import main as convert_main
from softvq_jax.models import rope as rope_lib
from softvq_jax.models.layers import RopeTables
from softvq_jax.models.released import RELEASED_MAETOK, released_config
from softvq_jax.tokenizer import count_params

HF = FIXTURES / "maetok_tiny_hf"
TOL = 1e-5


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(FIXTURES / "maetok_tiny.npz"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  out = tmp_path_factory.mktemp("maetok") / "converted"
  assert convert_main(["--checkpoint", str(HF / "model.safetensors"), "--config",
                       str(HF / "config.json"), "--out", str(out)]) == 0
  report = json.load(open(out / "conversion.json"))
  assert set(report["ignored_tensors"]) == {
      "encoder.mask_token", "encoder.freqs_t_x", "encoder.freqs_t_y", "decoder.freqs_t_x",
      "decoder.freqs_t_y", "decoder.model.pos_embed", "decoder.model.patch_embed.proj.weight",
      "decoder.model.patch_embed.proj.bias"}
  return Tokenizer.load(str(out))


@pytest.fixture(scope="module")
def model(tok):
  return tok.model()


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def test_config_is_read_from_the_file(tok):
  cfg = tok.config
  assert cfg.bottleneck == "ae" and cfg.use_rope and cfg.decoder.movq
  assert not cfg.decoder_use_ape and not cfg.decoder_cls_token
  assert (cfg.vq_mean, cfg.vq_std) == (0.03, 0.6)


def _tables_as_reference(model_part, ref_grid):
  """Our per-layer tables laid out as the fixture's [depth, H, N, P]."""
  vit = model_part.model
  tables = [rope_lib.layer_tables(model_part.freqs[...], i, ref_grid, vit.num_heads, 0)
            for i in range(len(vit.blocks))]
  cos = np.stack([np.asarray(t.cos).transpose(1, 0, 2) for t in tables])
  sin = np.stack([np.asarray(t.sin).transpose(1, 0, 2) for t in tables])
  return cos, sin


def test_rope_positions_and_tables(model, ref):
  t_x, t_y = rope_lib.grid_positions(4, 4)
  for side in ("enc", "dec"):
    np.testing.assert_array_equal(t_x, ref[f"out/{side}_rope_t_x"])
    np.testing.assert_array_equal(t_y, ref[f"out/{side}_rope_t_y"])
  for side, part in (("enc", model.encoder), ("dec", model.decoder)):
    cos, sin = _tables_as_reference(part, (4, 4))
    assert rel_err(cos, ref[f"out/{side}_rope_cos"]) < TOL
    assert rel_err(sin, ref[f"out/{side}_rope_sin"]) < TOL


def test_rotated_queries_and_keys(model, ref, tok):
  images = nhwc(ref["in/images"])
  x = model.encoder.embed(images)
  assert rel_err(x, ref["out/enc_tokens_in"]) < TOL
  block = model.encoder.model.blocks[0]
  q, k, _ = block.attn.split_heads(block.norm1(x))
  rope = rope_lib.layer_tables(model.encoder.freqs[...], 0, (4, 4), 4, 1)
  img = slice(1, 17)
  # Fixture layout: [B, H, N, hd].
  assert rel_err(np.asarray(q[:, img]).transpose(0, 2, 1, 3), ref["out/enc_block0_q_img"]) < TOL
  assert rel_err(np.asarray(rope.rotate(q)[:, img]).transpose(0, 2, 1, 3),
                 ref["out/enc_block0_q_img_rope"]) < TOL
  assert rel_err(np.asarray(rope.rotate(k)[:, img]).transpose(0, 2, 1, 3),
                 ref["out/enc_block0_k_img_rope"]) < TOL
  # Class and latent rows are not rotated.
  np.testing.assert_array_equal(rope.rotate(q)[:, 0], q[:, 0])
  np.testing.assert_array_equal(rope.rotate(q)[:, 17:], q[:, 17:])


def test_encoder_layers(model, ref):
  images = nhwc(ref["in/images"])
  enc = model.encoder
  assert rel_err(enc.model.patch_embed(images), ref["out/enc_patch_embed"]) < TOL
  x = enc.embed(images)
  for i, block in enumerate(enc.model.blocks):
    x = block(x, rope_lib.layer_tables(enc.freqs[...], i, (4, 4), 4, 1))
    assert rel_err(x, ref[f"out/enc_block{i}"]) < TOL, f"encoder block {i}"
  assert rel_err(enc(images), ref["out/enc_out"]) < TOL
  assert rel_err(model.quant_conv(enc(images)), ref["out/quant"]) < TOL


def test_decoder_layers(model, ref):
  z = ref["out/quant"]
  dec = model.decoder
  post = model.post_quant_conv(z)
  assert rel_err(post, ref["out/post_quant"]) < TOL
  x = dec.embed(post)
  assert rel_err(x, ref["out/dec_tokens_in"]) < TOL
  for i, block in enumerate(dec.model.blocks):
    assert rel_err(block.modulation(z), ref[f"out/dec_block{i}_ada"]) < TOL
    x = block(x, z, rope_lib.layer_tables(dec.freqs[...], i, (4, 4), 2, 0))
    assert rel_err(x, ref[f"out/dec_block{i}"]) < TOL, f"decoder block {i}"
  assert rel_err(dec.model.norm.modulation(z), ref["out/dec_norm_ada"]) < TOL
  assert rel_err(dec.normed_tokens(post, z), ref["out/dec_norm_out"]) < TOL
  assert rel_err(dec.image_tokens(post, z), ref["out/dec_img_tokens"]) < TOL


def test_user_path_parity(tok, ref):
  images = nhwc(ref["in/images"])
  z = tok.encode(images)
  assert rel_err(z, ref["out/quant"]) < TOL
  assert rel_err(tok.decode(z), nhwc(ref["out/recon"])) < TOL
  assert rel_err(tok.decode(ref["in/random_latents"]), nhwc(ref["out/decode_random"])) < TOL
  assert rel_err(tok.decode(tok.denormalize(ref["in/norm_latents"])),
                 nhwc(ref["out/decode_denorm"])) < TOL


def test_float64_reference(model, ref):
  images = nhwc(ref["in/images"])
  z = model.quant_conv(model.encoder(images))
  assert rel_err(z, ref["out_f64/quant"]) < TOL
  post = model.post_quant_conv(z)
  assert rel_err(model.decoder.image_tokens(post, z), ref["out_f64/dec_img_tokens"]) < TOL


def _numpy_rope(x, freqs_layer, grid_h, grid_w, num_heads):
  """Independent rotation: complex multiplication of adjacent channel pairs."""
  b, n, h, hd = x.shape
  p = hd // 2
  out = np.empty_like(x, dtype=np.float64)
  for t in range(n):
    tx, ty = t % grid_w, t // grid_w
    for head in range(h):
      for j in range(p):
        phi = tx * freqs_layer[0, head * p + j] + ty * freqs_layer[1, head * p + j]
        c = (x[:, t, head, 2 * j] + 1j * x[:, t, head, 2 * j + 1]) * np.exp(1j * phi)
        out[:, t, head, 2 * j], out[:, t, head, 2 * j + 1] = c.real, c.imag
  return out


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (6, 2)])
def test_rope_equals_numpy(grid):
  rng = np.random.default_rng(sum(grid))
  heads, hd = 3, 8
  n = grid[0] * grid[1]
  x = rng.normal(size=(2, n + 3, heads, hd)).astype(np.float32)
  freqs = rng.normal(size=(2, 2, heads * hd // 2)).astype(np.float32)
  tables = rope_lib.layer_tables(freqs, 1, grid, heads, 1)
  rotated = np.asarray(tables.rotate(x))
  expected = _numpy_rope(x[:, 1:1 + n].astype(np.float64), freqs[:, 1].astype(np.float64),
                         *grid, heads)
  assert rel_err(rotated[:, 1:1 + n], expected) < 1e-5
  np.testing.assert_array_equal(rotated[:, 0], x[:, 0])
  np.testing.assert_array_equal(rotated[:, 1 + n:], x[:, 1 + n:])
  # Rotations keep the norm of every pair.
  np.testing.assert_allclose(np.linalg.norm(rotated, axis=-1), np.linalg.norm(x, axis=-1),
                             rtol=1e-5)


def test_rope_init_follows_the_reference_recipe():
  import jax
  freqs = np.asarray(rope_lib.init_mixed_freqs(jax.random.key(0), 2, 3, 8, 10.0))
  assert freqs.shape == (2, 2, 12)
  per_head = freqs.reshape(2, 2, 3, 4)
  mags = 10.0 ** (-4.0 * np.arange(2) / 8)
  # |(fx, fy)| of every pair is its magnitude; the second half is turned by 90 degrees.
  np.testing.assert_allclose(np.hypot(per_head[0], per_head[1]),
                             np.broadcast_to(np.tile(mags, 2), (2, 3, 4)), rtol=1e-5)
  first = np.arctan2(per_head[1, ..., 0], per_head[0, ..., 0])
  second = np.arctan2(per_head[1, ..., 2], per_head[0, ..., 2])
  np.testing.assert_allclose(np.cos(second - first), 0.0, atol=1e-5)


def test_maetok_b128_parameter_count():
  # Reference keys, counted here independently of the model code;
  # buffers (freqs_t_*), the unused decoder pos_embed/patch conv and the MAE
  # mask token do not shape inference.
  d, depth, n, tokens, e = 768, 12, 256, 128, 32
  enc_block = 4 * d + 3 * d * d + 3 * d + d * d + d + 2 * d + 8 * d * d + 5 * d
  encoder = (d + (1 + n) * d + d * 3 * 256 + d + depth * enc_block + 2 * d
             + 2 * tokens * d + 2 * depth * d // 2)
  dec_block = 3 * d * d + 3 * d + d * d + d + 8 * d * d + 5 * d + 4 * d * e + 4 * d
  decoder = (d + tokens * d + 2 * depth * d // 2 + depth * dec_block + 2 * d * e + 2 * d
             + 768 * d + 768)
  bottleneck = e * d + e + d * e + d
  assert count_params(released_config("maetok-b-128")) == encoder + decoder + bottleneck
  assert set(RELEASED_MAETOK) == {"maetok-b-128", "maetok-b-128-512"}


def test_a_checkpoint_at_another_resolution(tmp_path):
  # The 512 release has 1024 patches: positions come from the grid, not from buffers.
  cfg = dict(RELEASED_MAETOK["maetok-b-128-512"], image_size=64, num_latent_tokens=8,
             codebook_embed_dim=8, encoder_kwargs=dict(embed_dim=32, depth=1, num_heads=2),
             decoder_kwargs=dict(embed_dim=32, depth=1, num_heads=2))
  tok = Tokenizer.random(cfg, seed=0)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  assert tok.decode(tok.encode(images)).shape == images.shape


def test_a_training_checkpoint_with_the_auxiliary_decoders(tmp_path):
  """MAETok training checkpoints also hold the HOG target's filter buffers and the auxiliary
  decoders: converted, and listed as ignored."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  tensors = load_file(str(HF / "model.safetensors"))
  aux = {"hog_generator.weight_x": np.zeros((3, 1, 3, 3), np.float32),
         "hog_generator.gaussian_kernel": np.zeros((16, 16), np.float32),
         "decoder_hog.mask_token": np.zeros((1, 1, 8), np.float32),
         "to_pixel_hog.weight": np.zeros((108, 8), np.float32),
         "clip_model.pos_embed": np.zeros((1, 4, 8), np.float32)}
  save_file(dict(tensors, **aux), str(tmp_path / "train.safetensors"))
  out = tmp_path / "converted"
  assert convert_main(["--checkpoint", str(tmp_path / "train.safetensors"), "--config",
                       str(HF / "config.json"), "--out", str(out)]) == 0
  report = json.load(open(out / "conversion.json"))
  assert set(aux) <= set(report["ignored_tensors"])
