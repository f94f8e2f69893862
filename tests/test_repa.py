"""REPA: projector vs the reference's output, teacher features and losses vs NumPy/PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, rel_err
from flax import nnx
from scipy.special import erf

from softvq_jax.convert import timm_vit
from softvq_jax.convert.core import ConversionError
from softvq_jax.losses import repa

TINY_TEACHER = dict(embed_dim=96, depth=1, num_heads=2)  # the fixture's repa_teacher overrides


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(FIXTURES / "softvq_tiny.npz"))


@pytest.fixture(scope="module")
def params(ref):
  return {k[len("param/"):]: v for k, v in ref.items() if k.startswith("param/")}


@pytest.fixture(scope="module")
def projector(params):
  proj = nnx.eval_shape(lambda: repa.RepaProjector(8, 32, 96, rngs=nnx.Rngs(0)))
  repa.load_projector(proj, params)
  return proj


@pytest.fixture(scope="module")
def teacher(params):
  return timm_vit.repa_teacher("large", params, image_size=64, overrides=TINY_TEACHER,
                               prefix="repa_model.")


@pytest.fixture(scope="module")
def features_fn():
  return nnx.jit(repa.teacher_features)


def test_projector_matches_reference(projector, ref):
  out = projector(jnp.asarray(ref["out/quant"]))
  assert out.shape == (2, 16, 96)
  assert rel_err(out, ref["out/repa_proj"]) < 1e-5
  assert rel_err(out, ref["out_f64/repa_proj"]) < 1e-5


def test_projector_names_and_errors(params):
  proj = nnx.eval_shape(lambda: repa.RepaProjector(8, 32, 96, rngs=nnx.Rngs(0)))
  paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(proj, nnx.Param))}
  assert paths == {f"layers.{i}.{n}" for i in (0, 2, 4) for n in ("kernel", "bias")}
  broken = {k: v for k, v in params.items() if k != "projection.2.bias"}
  broken["projection.4.weight"] = params["projection.4.weight"][:, :31]
  with pytest.raises(ConversionError) as err:
    repa.load_projector(proj, broken)
  assert "missing tensor for layers.2.bias" in str(err.value)
  assert "mis-shaped tensor 4.weight" in str(err.value)


def _layer_norm(x, w, b):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu)**2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * w + b


def _numpy_forward_features(p, images_nchw, num_heads, patch=16):
  """timm DINOv2 ``forward_features`` written out in float64, without the class token."""
  p = {k: v.astype(np.float64) for k, v in p.items()}
  mean = np.array([0.485, 0.456, 0.406])[:, None, None]
  std = np.array([0.229, 0.224, 0.225])[:, None, None]
  x = (images_nchw.astype(np.float64) * 0.5 + 0.5 - mean) / std
  b, c, h, w = x.shape
  gh, gw = h // patch, w // patch
  patches = x.reshape(b, c, gh, patch, gw, patch)
  tokens = np.einsum("bcyixj,dcij->byxd", patches, p["patch_embed.proj.weight"])
  tokens = tokens.reshape(b, gh * gw, -1) + p["patch_embed.proj.bias"]
  cls = np.broadcast_to(p["cls_token"], (b, 1, tokens.shape[-1]))
  x = np.concatenate([cls, tokens], axis=1) + p["pos_embed"]
  n, d = x.shape[1], x.shape[2]
  hd = d // num_heads
  i = 0
  while f"blocks.{i}.norm1.weight" in p:
    blk = lambda name: p[f"blocks.{i}.{name}"]
    y = _layer_norm(x, blk("norm1.weight"), blk("norm1.bias"))
    qkv = (y @ blk("attn.qkv.weight").T + blk("attn.qkv.bias")).reshape(b, n, 3, num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = np.einsum("bqhd,bkhd->bhqk", q * hd**-0.5, k)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, d)
    x = x + blk("ls1.gamma") * (o @ blk("attn.proj.weight").T + blk("attn.proj.bias"))
    y = _layer_norm(x, blk("norm2.weight"), blk("norm2.bias"))
    hid = y @ blk("mlp.fc1.weight").T + blk("mlp.fc1.bias")
    hid = 0.5 * hid * (1 + erf(hid / np.sqrt(2)))
    x = x + blk("ls2.gamma") * (hid @ blk("mlp.fc2.weight").T + blk("mlp.fc2.bias"))
    i += 1
  return _layer_norm(x, p["norm.weight"], p["norm.bias"])[:, 1:]


def test_teacher_features_match_numpy(teacher, features_fn, ref, params):
  images = ref["in/images"]  # NCHW in [-1, 1]
  feats = features_fn(teacher, jnp.asarray(images.transpose(0, 2, 3, 1)))
  assert feats.shape == (2, 16, 96) and feats.dtype == jnp.float32
  teacher_params = {k[len("repa_model."):]: v for k, v in params.items()
                    if k.startswith("repa_model.")}
  expected = _numpy_forward_features(teacher_params, images, num_heads=2)
  assert rel_err(feats, expected) < 1e-5


def test_teacher_features_carry_no_gradient(teacher, ref):
  images = jnp.asarray(ref["in/images"].transpose(0, 2, 3, 1))
  grad = jax.jit(jax.grad(lambda x: jnp.sum(repa.teacher_features(teacher, x))))(images)
  assert not np.any(np.asarray(grad))
  with pytest.raises(ValueError, match="64x64"):
    repa.teacher_features(teacher, images[:, :32, :32])


def _np_neg_cos(a, b):
  a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
  b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
  return -np.mean(np.sum(a * b, axis=-1))


@pytest.fixture(scope="module")
def feats_and_latents():
  rng = np.random.default_rng(0)
  target = rng.standard_normal((3, 16, 6)).astype(np.float32)
  projected = rng.standard_normal((3, 4, 6)).astype(np.float32)
  return target, projected


def test_repeat_matches_numpy(feats_and_latents):
  target, projected = feats_and_latents
  # Latent l stands for raster patches 4l .. 4l+3.
  expected = np.mean([[_np_neg_cos(target[b, n], projected[b, n // 4]) for n in range(16)]
                      for b in range(3)])
  assert abs(float(repa.repa_loss(projected, target, "repeat")) - expected) < 1e-6


def test_global_matches_numpy(feats_and_latents, projector, params):
  target, projected = feats_and_latents
  expected = np.mean([_np_neg_cos(target[b].mean(0), projected[b, 0]) for b in range(3)])
  assert abs(float(repa.repa_loss(projected[:, 0], target, "global")) - expected) < 1e-6
  # repa_alignment_loss projects the token-mean latent (not the mean of projections).
  rng = np.random.default_rng(1)
  quant = rng.standard_normal((2, 16, 8)).astype(np.float32)
  teacher = rng.standard_normal((2, 16, 96)).astype(np.float32)
  w = {i: (params[f"projection.{i}.weight"].astype(np.float64),
           params[f"projection.{i}.bias"].astype(np.float64)) for i in (0, 2, 4)}
  silu = lambda x: x / (1 + np.exp(-x))
  h = quant.astype(np.float64).mean(1)
  h = silu(h @ w[0][0].T + w[0][1])
  h = silu(h @ w[2][0].T + w[2][1])
  h = h @ w[4][0].T + w[4][1]
  expected = np.mean([_np_neg_cos(teacher[b].mean(0), h[b]) for b in range(2)])
  got = repa.repa_alignment_loss(projector, jnp.asarray(quant), jnp.asarray(teacher), "global")
  assert abs(float(got) - expected) < 1e-6


@pytest.mark.parametrize("n,l", [(16, 4), (10, 4), (16, 16)])
def test_avg_1d_matches_torch_adaptive_pool(n, l):
  torch = pytest.importorskip("torch", reason="torch's adaptive_avg_pool1d is the reference")
  rng = np.random.default_rng(n * l)
  target = rng.standard_normal((2, n, 5)).astype(np.float32)
  projected = rng.standard_normal((2, l, 5)).astype(np.float32)
  pooled = torch.nn.functional.adaptive_avg_pool1d(
      torch.from_numpy(target).permute(0, 2, 1), l).permute(0, 2, 1).numpy()
  expected = _np_neg_cos(pooled.astype(np.float64), projected.astype(np.float64))
  assert abs(float(repa.repa_loss(projected, target, "avg_1d")) - expected) < 1e-6


def test_avg_1d_shuffle(feats_and_latents):
  target, projected = feats_and_latents
  key = jax.random.key(7)
  # One permutation of the 16 teacher tokens, shared by the batch, then 4-token windows.
  perm = np.asarray(jax.random.permutation(key, 16))
  pooled = target[:, perm].reshape(3, 4, 4, 6).mean(2)
  expected = _np_neg_cos(pooled.astype(np.float64), projected.astype(np.float64))
  got = repa.repa_loss(projected, target, "avg_1d_shuffle", rng=key)
  assert abs(float(got) - expected) < 1e-6
  assert float(got) != float(repa.repa_loss(projected, target, "avg_1d"))
  with pytest.raises(ValueError, match="needs rng"):
    repa.repa_loss(projected, target, "avg_1d_shuffle")


@pytest.mark.parametrize("align", ["repeat", "avg_1d", "avg_1d_shuffle"])
def test_identical_and_orthogonal(align):
  rng = np.random.default_rng(3)
  latents = rng.standard_normal((2, 4, 8)).astype(np.float32)
  # Teacher tokens equal to their latent (repeat) / window mean equal to it (avg).
  same = np.repeat(latents, 4, axis=1)
  key = jax.random.key(0)
  if align == "avg_1d_shuffle":
    same = np.broadcast_to(latents[:, :1], (2, 16, 8)).copy()  # any permutation pools to itself
    latents = latents[:, :1].repeat(4, axis=1)
  assert float(repa.repa_loss(latents, same, align, rng=key)) == pytest.approx(-1.0, abs=1e-6)
  # Latents in channels 0..3, teacher in channels 4..7: cosine 0 everywhere.
  left = np.concatenate([np.abs(latents[..., :4]) + 0.1, np.zeros((2, 4, 4), np.float32)], -1)
  right = np.concatenate([np.zeros((2, 16, 4), np.float32), np.abs(same[..., 4:]) + 0.1], -1)
  assert float(repa.repa_loss(left, right, align, rng=key)) == pytest.approx(0.0, abs=1e-7)


def test_global_identical_is_minus_one():
  x = np.random.default_rng(4).standard_normal((2, 16, 8)).astype(np.float32)
  assert float(repa.repa_loss(x.mean(1), x, "global")) == pytest.approx(-1.0, abs=1e-6)


def test_errors(feats_and_latents):
  target, projected = feats_and_latents
  with pytest.raises(ValueError, match="split evenly"):
    repa.repa_loss(projected[:, :3], target, "repeat")
  with pytest.raises(ValueError, match="must be one of"):
    repa.repa_loss(projected, target, "mean")
  with pytest.raises(ValueError, match="repa_alignment_loss"):
    repa.repa_loss(projected, target, "global")
  with pytest.raises(ValueError, match="feature width"):
    repa.repa_loss(projected[..., :5], target, "repeat")
  with pytest.raises(ValueError, match="batch size"):
    repa.repa_loss(projected[:2], target, "repeat")
