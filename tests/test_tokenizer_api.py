"""The Tokenizer API: input checks, compilation, sharding, dtypes and the other bottlenecks."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from softvq_jax import Tokenizer
from softvq_jax.models.config import TokenizerConfig
from softvq_jax.models.quantizers import DiagonalGaussian, code_usage, entropy_loss

SMALL = dict(enc_type="vit", dec_type="vit", encoder_model="vit_small_patch14_dinov2.lvd142m",
             decoder_model="vit_small_patch14_dinov2.lvd142m",
             encoder_kwargs=dict(embed_dim=64, depth=1, num_heads=2),
             decoder_kwargs=dict(embed_dim=32, depth=1, num_heads=2), image_size=32,
             enc_patch_size=8, dec_patch_size=8, num_latent_tokens=8, codebook_embed_dim=4,
             codebook_size=16, num_codebooks=2, tau=0.07, vq_mean=0.5, vq_std=2.0)


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.random(SMALL, seed=1)


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)


def test_shapes_and_dtypes(tok, images):
  z = tok.encode(images)
  assert z.shape == (4, 8, 4) and z.dtype == jnp.float32
  x = tok.decode(z)
  assert x.shape == images.shape and x.dtype == jnp.float32
  assert tok.latent_shape == (8, 4)


def test_compiled_once_per_shape(images):
  tok = Tokenizer.random(SMALL, seed=2)
  for _ in range(3):
    tok.decode(tok.encode(images))
  tok.encode(images[:2])
  assert tok._encode._cache_size() == 2  # pylint: disable=protected-access
  assert tok._decode._cache_size() == 1  # pylint: disable=protected-access


def test_batch_items_are_independent(tok, images):
  # Encoding a sub-batch gives the same latents: nothing mixes across the batch.
  np.testing.assert_allclose(tok.encode(images)[1:3], tok.encode(images[1:3]), atol=1e-6)


@pytest.mark.parametrize("bad, error, needle", [
    (np.zeros((2, 32, 32, 3), np.uint8), TypeError, "uint8"),
    (np.zeros((2, 3, 32, 32), np.float32), ValueError, "NCHW"),
    (np.zeros((2, 36, 36, 3), np.float32), ValueError, "not a multiple of the patch size 8"),
    (np.zeros((2, 48, 48, 3), np.float32), ValueError, "takes 32x32 images"),
    (np.zeros((32, 32, 3), np.float32), ValueError, "4-D batch"),
    (np.zeros((0, 32, 32, 3), np.float32), ValueError, "empty batch"),
    (np.full((2, 32, 32, 3), 200.0, np.float32), ValueError,
     r"floats in \[-1, 1\], got values in \[200, 200\] \(from \[0, 255\] use x / 127.5 - 1\)"),
    (np.full((2, 32, 32, 3), np.nan, np.float32), ValueError, "floats in .-1, 1., got values in .nan"),
])
def test_bad_images_are_named(tok, bad, error, needle):
  with pytest.raises(error, match=needle):
    tok.encode(bad)


def test_images_in_0_1_are_mentioned(tok, images):
  with pytest.warns(UserWarning, match=r"no negative value .*from \[0, 1\] use x \* 2 - 1"):
    tok.encode((images + 1) / 2)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tok.encode(images)
    tok.encode(np.zeros_like(images))  # mid-grey is a [-1, 1] image


@pytest.mark.parametrize("bad, error, needle", [
    (np.zeros((2, 4, 8), np.float32), ValueError, r"\(B, 8, 4\)"),
    (np.zeros((2, 8, 4), np.int32), TypeError, "floating"),
])
def test_bad_latents_are_named(tok, bad, error, needle):
  with pytest.raises(error, match=needle):
    tok.decode(bad)


def test_sharded_batch_matches_single_device(tok, images):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",))
  sharded = Tokenizer(tok.model(), mesh=mesh)
  batch = np.concatenate([images, images[:1] * 0.5, images[:3] * -1])  # 8 items
  z = sharded.encode(batch)
  assert len(z.sharding.device_set) == 8
  np.testing.assert_allclose(z, tok.encode(batch), atol=2e-6)
  # A batch that does not divide over the mesh is padded and trimmed.
  z5 = sharded.encode(batch[:5])
  assert z5.shape == (5, 8, 4)
  np.testing.assert_allclose(z5, tok.encode(batch[:5]), atol=2e-6)
  np.testing.assert_allclose(sharded.decode(z5), tok.decode(z5), atol=1e-5)


def test_bfloat16_compute_keeps_float32_where_it_matters(tok, images):
  bf16 = Tokenizer(tok.model(), dtype="bfloat16")
  z = bf16.encode(images)
  assert z.dtype == jnp.float32
  assert rel_err(z, tok.encode(images)) < 0.05
  x = bf16.decode(tok.encode(images))
  assert x.dtype == jnp.float32
  assert rel_err(x, tok.decode(tok.encode(images))) < 0.05
  # float16 too, on the CPU as well (whose dot has no float16 -> float32 form).
  f16 = Tokenizer(tok.model(), dtype="float16")
  assert rel_err(f16.encode(images), tok.encode(images)) < 0.01
  assert rel_err(f16.decode(tok.encode(images)), tok.decode(tok.encode(images))) < 0.01
  # Latents as nested lists, as encode takes images.
  z = tok.encode(images)
  np.testing.assert_allclose(tok.decode(np.asarray(z).tolist()), tok.decode(z), rtol=1e-5,
                             atol=1e-6)
  # Parameters stay float32 whatever the compute dtype.
  leaves = jax.tree.leaves(bf16.state)
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)
  with pytest.raises(ValueError, match="dtype must be one of"):
    Tokenizer(tok.model(), dtype="int8")


def test_bfloat16_residual_stream_is_float32_as_under_autocast(images):
  """PyTorch's cat/add promote 16-bit patch embeddings and projected latents with the float32
  tokens and position tables, so under autocast the blocks' residual stream is float32;
  a 16-bit stream would round small LayerScaled updates away."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from softvq_jax.models.tokenizer import TokenizerModel  # pylint: disable=g-import-not-at-top
  for extra in ({}, dict(use_rope=True, rope_mixed=True, use_ape=False, dec_cls_token=False)):
    cfg = TokenizerConfig.from_json_dict(dict(SMALL, **extra))
    model = TokenizerModel(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    assert model.encoder.embed(jnp.asarray(images)).dtype == jnp.float32
    latents = jnp.zeros((2, 8, 32), jnp.bfloat16)  # post_quant_conv's 16-bit output
    assert model.decoder.embed(latents).dtype == jnp.float32
  # A LayerScale of 1e-5 on O(1) activations: its updates survive in the stream.
  cfg = TokenizerConfig.from_json_dict(dict(SMALL, decoder_kwargs=dict(
      SMALL["decoder_kwargs"], init_values=1e-5)))
  model = TokenizerModel(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  x = model.decoder.embed(jnp.ones((2, 8, 32), jnp.bfloat16))
  moved = model.decoder.model.blocks[0](x) != x
  assert float(jnp.mean(moved)) > 0.5


def test_normalize_roundtrip(tok, images):
  z = tok.encode(images)
  np.testing.assert_allclose(tok.normalize(z), (np.asarray(z) - 0.5) / 2.0, rtol=1e-6)
  np.testing.assert_allclose(tok.denormalize(tok.normalize(z)), z, atol=1e-6)
  # Nested lists, as encode and decode take them.
  as_list = np.asarray(z).tolist()
  np.testing.assert_allclose(tok.normalize(as_list), tok.normalize(z), rtol=1e-6)
  np.testing.assert_allclose(tok.denormalize(as_list), tok.denormalize(z), rtol=1e-6)
  # One latent (L, d) works too; images, other token counts and integers are named.
  np.testing.assert_allclose(tok.normalize(z[0]), tok.normalize(z)[0], rtol=1e-6)
  with pytest.raises(ValueError, match=r"normalize's latents must have shape \(\.\.\., 8, 4\), "
                                       r"got \(4, 32, 32, 3\)"):
    tok.normalize(images)
  with pytest.raises(ValueError, match="denormalize's latents must have shape"):
    tok.denormalize(np.zeros((2, 7, 4), np.float32))
  with pytest.raises(TypeError, match="normalize's latents must be floating point, got dtype "
                                      "uint8"):
    tok.normalize(np.zeros((2, 8, 4), np.uint8))


def test_a_mesh_without_the_batch_axis_is_refused_when_built(tok):
  mesh = jax.make_mesh((8,), ("batch",))
  with pytest.raises(ValueError, match="the mesh has no axis 'data' .*its axes: batch.*data_axis="):
    Tokenizer(tok.model(), mesh=mesh)
  assert Tokenizer(tok.model(), mesh=mesh, data_axis="batch").data_axis == "batch"


def test_save_and_load_roundtrip(tok, images, tmp_path):
  tok.save(str(tmp_path / "tok"))
  again = Tokenizer.load(str(tmp_path / "tok"))
  np.testing.assert_array_equal(again.encode(images), tok.encode(images))
  with pytest.raises(FileExistsError):
    tok.save(str(tmp_path / "tok"))
  # A trainer's workdir, whose export sits one level down, is named with where it is.
  tok.save(str(tmp_path / "run" / "tokenizer"))
  with pytest.raises(Exception, match=r"run has no config.json: not a converted checkpoint "
                                      r"directory; it holds a trained model in .*run/tokenizer"):
    Tokenizer.load(str(tmp_path / "run"))


def test_softvq_is_a_convex_combination_of_normalised_codes(tok, images):
  z, info = tok.encode(images, return_info=True)
  np.testing.assert_allclose(np.sum(info["probs"], -1), 1.0, rtol=1e-5)
  # ||z|| <= 1 for every token because codes are unit vectors and weights sum to one.
  assert np.all(np.linalg.norm(z, axis=-1) <= 1 + 1e-5)


def _numpy_softvq(h, emb, groups, tau):
  b, l, d = h.shape
  s = l // groups
  hn = h / np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
  en = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
  probs = np.zeros((b, l, emb.shape[1]))
  out = np.zeros((b, l, d))
  for t in range(l):
    g = t // s
    logits = hn[:, t] @ en[g].T / tau
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    probs[:, t] = p
    out[:, t] = p @ en[g]
  return out, probs


def test_softvq_equals_numpy(tok):
  model = tok.model()
  h = np.random.default_rng(3).normal(size=(3, 8, 4)).astype(np.float32)
  out = model.quantize(jnp.asarray(h))
  emb = np.asarray(model.quantize.embedding[...])
  ref_out, ref_probs = _numpy_softvq(h.astype(np.float64), emb.astype(np.float64), 2, 0.07)
  assert rel_err(out.quant, ref_out) < 1e-5
  assert rel_err(out.probs, ref_probs) < 1e-5


def _numpy_entropy_loss(logits: np.ndarray) -> float:
  flat = logits.reshape(-1, logits.shape[-1]).astype(np.float64) / 0.01
  p = np.exp(flat - flat.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  sample = -np.mean(np.sum(p * np.log(p + 1e-300), -1))
  avg = p.mean(0)
  return sample - (-np.sum(avg * np.log(avg + 1e-6)))


def test_entropy_loss_equals_numpy():
  logits = np.random.default_rng(4).uniform(-1, 1, (2, 6, 10)).astype(np.float32)
  np.testing.assert_allclose(entropy_loss(jnp.asarray(logits)), _numpy_entropy_loss(logits),
                             rtol=1e-4, atol=1e-5)
  # Uniform logits: every row has the full entropy, and so does the mean: loss is ~0.
  assert abs(float(entropy_loss(jnp.zeros((4, 10))))) < 1e-5


def test_entropy_loss_per_group_is_the_mean_of_each_groups_loss():
  """As data-parallel PyTorch computes it: on each rank's examples, averaged; the pooled
  batch gives a different number (the batch-mean entropy is not linear)."""
  logits = np.random.default_rng(5).uniform(-1, 1, (6, 4, 10)).astype(np.float32)
  logits[3:] += np.linspace(0, 3, 10, dtype=np.float32)  # the groups favour other codes
  per_rank = np.mean([_numpy_entropy_loss(logits[i:i + 3]) for i in (0, 3)])
  grouped = float(entropy_loss(jnp.asarray(logits), group_size=3))
  np.testing.assert_allclose(grouped, per_rank, rtol=1e-4, atol=1e-5)
  assert abs(float(entropy_loss(jnp.asarray(logits))) - per_rank) > 1e-2
  np.testing.assert_allclose(entropy_loss(jnp.asarray(logits), group_size=6),
                             _numpy_entropy_loss(logits), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="group size 4 does not divide the batch of 6"):
    entropy_loss(jnp.asarray(logits), group_size=4)


def test_code_usage_statistics(tok, images):
  model = tok.model()
  out = model.quantize(model.quant_conv(model.encoder(jnp.asarray(images))))
  stats = code_usage(out, 2)
  probs = np.asarray(out.probs).reshape(4, 2, 4, 16)
  for g in range(2):
    used = np.unique(np.argmax(probs[:, g], -1)).size / 16
    assert stats["usage"][g] == pytest.approx(used)
    mean = probs[:, g].mean((0, 1))
    assert stats["perplexity"][g] == pytest.approx(np.exp(-np.sum(mean * np.log(mean))), rel=1e-4)


def test_kl_bottleneck():
  cfg = dict(SMALL, bottleneck="kl")
  tok = Tokenizer.random(cfg, seed=5)
  model = tok.model()
  assert model.quantize is None and model.quant_conv.kernel.shape == (64, 8)
  images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  z, info = tok.encode(images, return_info=True)
  np.testing.assert_array_equal(z, info["mean"])  # posterior mode by default
  moments = np.asarray(info["h"], np.float64)
  mean, logvar = moments[..., :4], np.clip(moments[..., 4:], -30, 20)
  posterior = DiagonalGaussian.from_moments(jnp.asarray(info["h"]))
  kl = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1 - logvar, axis=(1, 2))
  np.testing.assert_allclose(posterior.kl(), kl, rtol=1e-5)
  sample = posterior.sample(jax.random.key(0))
  eps = np.asarray(jax.random.normal(jax.random.key(0), mean.shape))
  np.testing.assert_allclose(sample, mean + np.exp(0.5 * logvar) * eps, rtol=1e-5, atol=1e-6)
  assert tok.decode(z).shape == images.shape


def test_plain_autoencoder_bottleneck():
  tok = Tokenizer.random(dict(SMALL, bottleneck="ae"), seed=6)
  images = np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  z, info = tok.encode(images, return_info=True)
  np.testing.assert_array_equal(z, info["h"])
  assert tok.model().quantize is None


def test_config_roundtrip():
  cfg = TokenizerConfig.from_json_dict(SMALL)
  assert TokenizerConfig.from_json_dict(cfg.to_json_dict()) == cfg


def test_code_usage_counts_only_the_valid_examples():
  from softvq_jax.models.quantizers import SoftVQOutput  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(7)
  logits = rng.normal(0, 3, (5, 8, 16)).astype(np.float32)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  tokens, quant = rng.normal(size=(2, 5, 8, 4)).astype(np.float32)
  full = SoftVQOutput(quant=jnp.asarray(quant), probs=jnp.asarray(probs), logits=jnp.asarray(logits),
                      tokens_normed=jnp.asarray(tokens))
  first3 = SoftVQOutput(*(jnp.asarray(a)[:3] for a in full))
  masked = code_usage(full, 2, valid=jnp.arange(5) < 3)
  expected, unmasked = code_usage(first3, 2), code_usage(full, 2)
  for name in expected:
    np.testing.assert_allclose(masked[name], expected[name], rtol=1e-6, err_msg=name)
  assert not np.allclose(unmasked["perplexity"], expected["perplexity"], rtol=1e-3)


def test_sharded_info_statistics_ignore_the_padding(tok, images):
  sharded = Tokenizer(tok.model(), mesh=jax.make_mesh((8,), ("data",)))
  batch = images[:3]  # padded to 8 by repeating the last image
  _, info = sharded.encode(batch, return_info=True)
  _, single = tok.encode(batch, return_info=True)
  for name in ("usage", "perplexity", "avg_probs", "max_probs", "zq_z_cos"):
    np.testing.assert_allclose(info[name], single[name], rtol=1e-5, err_msg=name)
  assert info["probs"].shape[0] == 3
  # One image padded to a batch of 2, as long as the per-codebook statistics (2 codebooks):
  # those keep their length.
  pair = Tokenizer(tok.model(), mesh=jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",)))
  _, info = pair.encode(images[:1], return_info=True)
  assert info["usage"].shape == info["perplexity"].shape == (SMALL["num_codebooks"],)
  assert info["probs"].shape[0] == info["h"].shape[0] == 1
