"""DINO discriminator: spectral norm, BatchNorm, circular conv and the heads against torch and NumPy;
the backbone against NumPy; preprocessing against torch's interpolate; SyncBN semantics on 8 devices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from softvq_jax import parallel
from softvq_jax.losses import discriminator as D

try:
  import torch
  nn, F = torch.nn, torch.nn.functional
except ImportError:  # only the PyTorch parity tests need it
  torch = nn = F = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed: no PyTorch parity")

# Tiny sizes: 32 px, patch 8 -> 16 tokens, width 16, taps after the position
# embedding and after blocks 0 and 2.
IMG, PATCH, DIM, HEADS, DEPTH, TAPS, KS = 32, 8, 16, 2, 3, (0, 2), 9
TOKENS = (IMG // PATCH) ** 2


pytestmark = pytest.mark.usefixtures("few_xla_optimisations")


# Eager module construction compiles one small program per random op, which
# dominates on busy CPUs: each tiny module is built once per file and copied.

@pytest.fixture(scope="module")
def backbone_parts():
  return nnx.split(D.DinoBackbone(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH,
                                  num_heads=HEADS, key_depths=TAPS, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def heads_parts():
  return nnx.split(D.DiscriminatorHeads(DIM, len(TAPS) + 1, kernel_size=KS, rngs=nnx.Rngs(1)))


def fresh(parts):
  return nnx.merge(*parts, copy=True)


def flat(module, *filters):
  return {".".join(map(str, p)): np.asarray(v[...]) for p, v in
          nnx.to_flat_state(nnx.state(module, *filters) if filters else nnx.state(module))}


# ----------------------------------------------------------------------------
# Spectral norm.

def np_power_iteration(w_mat, u, steps):
  """torch.nn.utils.spectral_norm in training mode, one iteration per forward, float64."""
  w_mat, u = w_mat.astype(np.float64), u.astype(np.float64)
  out = []
  for _ in range(steps):
    v = w_mat.T @ u
    v /= max(np.linalg.norm(v), 1e-12)
    u = w_mat @ v
    u /= max(np.linalg.norm(u), 1e-12)
    out.append((u.copy(), v.copy(), u @ w_mat @ v))
  return out


@pytest.fixture(scope="module")
def sn_weight():
  return nnx.jit(lambda conv, train: conv.normalized_weight(train=train), static_argnums=1)


def _conv_and_init(heads_parts):
  conv = fresh(heads_parts).heads[0][1].fn[0]  # (16, 16, 9): a 16 x 144 matrix
  w = np.array(conv.weight_orig[...])
  return conv, w, np.array(conv.weight_u[...]), np.array(conv.weight_v[...])


def test_spectral_norm_matches_numpy_power_iteration(heads_parts, sn_weight):
  conv, w, u0, _ = _conv_and_init(heads_parts)
  np.testing.assert_allclose(np.linalg.norm(u0), 1.0, rtol=1e-6)
  expected = np_power_iteration(w.reshape(DIM, -1), u0, 4)
  for u_np, v_np, sigma_np in expected:
    w_sn = np.asarray(sn_weight(conv, True))
    np.testing.assert_allclose(np.asarray(conv.weight_u[...]), u_np, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(conv.weight_v[...]), v_np, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w / w_sn, sigma_np, rtol=1e-5)
  # Converging towards the largest singular value from below.
  assert expected[-1][2] <= np.linalg.svd(w.reshape(DIM, -1), compute_uv=False)[0] + 1e-9


@needs_torch
def test_spectral_norm_matches_torch_over_steps(heads_parts, sn_weight):
  conv, w, u0, v0 = _conv_and_init(heads_parts)
  ref = nn.utils.spectral_norm(nn.Conv1d(DIM, DIM, KS))
  with torch.no_grad():
    ref.weight_orig.copy_(torch.from_numpy(w))
    ref.weight_u.copy_(torch.from_numpy(u0))
    ref.weight_v.copy_(torch.from_numpy(v0))
  ref.train()
  x = torch.zeros(1, DIM, KS)
  for _ in range(4):
    w_sn = np.asarray(sn_weight(conv, True))
    ref(x)  # the pre-forward hook runs the power iteration
    np.testing.assert_allclose(np.asarray(conv.weight_u[...]), ref.weight_u.numpy(), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(conv.weight_v[...]), ref.weight_v.numpy(), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(w_sn, ref.weight.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_spectral_norm_eval_uses_stored_vectors(heads_parts, sn_weight):
  conv = fresh(heads_parts).heads[1][1].fn[0]
  sn_weight(conv, True)
  u, v = np.asarray(conv.weight_u[...]), np.asarray(conv.weight_v[...])
  w = np.asarray(conv.weight_orig[...])
  w_sn = np.asarray(sn_weight(conv, False))
  np.testing.assert_array_equal(np.asarray(conv.weight_u[...]), u)
  np.testing.assert_array_equal(np.asarray(conv.weight_v[...]), v)
  np.testing.assert_allclose(w_sn, w / (u @ w.reshape(DIM, -1) @ v), rtol=1e-5)


@pytest.fixture(scope="module")
def conv_eval():
  return nnx.jit(lambda conv, x: conv(x, train=False))


def test_spectral_vectors_are_not_params_and_get_no_gradient(heads_parts):
  conv = fresh(heads_parts).heads[0][1].fn[0]
  assert set(flat(conv, nnx.Param)) == {"weight_orig", "bias"}
  assert set(flat(conv, D.SpectralState)) == {"weight_u", "weight_v"}
  x = jnp.ones((2, 11, DIM))
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, train=True))))(conv)
  assert set(flat(grads)) == {"weight_orig", "bias"}


@needs_torch
def test_circular_conv_k9_matches_torch(heads_parts, conv_eval, sn_weight):
  conv = fresh(heads_parts).heads[0][1].fn[0]
  x = np.random.default_rng(0).normal(size=(2, 11, DIM)).astype(np.float32)
  y = np.asarray(conv_eval(conv, jnp.asarray(x)))
  w_sn = torch.from_numpy(np.array(sn_weight(conv, False)))
  xt = F.pad(torch.from_numpy(x).transpose(1, 2), (KS // 2, KS // 2), mode="circular")
  ref = F.conv1d(xt, w_sn, torch.from_numpy(np.array(conv.bias[...]))).transpose(1, 2)
  np.testing.assert_allclose(y, ref.numpy(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# BatchNorm.

@needs_torch
def test_batchnorm_matches_torch_train_and_eval():
  bn = D.BatchNorm1d(3, eps=1e-6)
  bn.weight[...] = jnp.asarray([1.5, 0.5, -1.0])
  bn.bias[...] = jnp.asarray([0.1, 0.0, -0.2])
  apply = nnx.jit(lambda m, x, train: m(x, train=train), static_argnums=2)
  ref = nn.BatchNorm1d(3, eps=1e-6, momentum=0.1)
  with torch.no_grad():
    ref.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
    ref.bias.copy_(torch.tensor([0.1, 0.0, -0.2]))
  rng = np.random.default_rng(1)
  ref.train()
  for _ in range(3):
    x = (rng.normal(size=(4, 7, 3)) * [1, 3, 0.1] + [0, 2, -1]).astype(np.float32)
    y = apply(bn, jnp.asarray(x), True)
    y_ref = ref(torch.from_numpy(x).transpose(1, 2)).transpose(1, 2)
    np.testing.assert_allclose(np.asarray(y), y_ref.detach().numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(bn.running_mean[...]), ref.running_mean.numpy(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(bn.running_var[...]), ref.running_var.numpy(), rtol=1e-5)
  assert int(bn.num_batches_tracked[...]) == int(ref.num_batches_tracked) == 3
  ref.eval()
  x = rng.normal(size=(2, 5, 3)).astype(np.float32)
  y = apply(bn, jnp.asarray(x), False)
  y_ref = ref(torch.from_numpy(x).transpose(1, 2)).transpose(1, 2)
  np.testing.assert_allclose(np.asarray(y), y_ref.detach().numpy(), rtol=1e-5, atol=1e-5)
  assert int(bn.num_batches_tracked[...]) == 3


# ----------------------------------------------------------------------------
# Heads against a torch re-build with the reference's module structure.

def torch_heads(channels, n, ks):
  class Residual(nn.Module):

    def __init__(self, fn):
      super().__init__()
      self.fn = fn

    def forward(self, x):
      return (self.fn(x) + x) / math.sqrt(2)

  def block(k):
    return nn.Sequential(
        nn.utils.spectral_norm(nn.Conv1d(channels, channels, k, padding=k // 2,
                                         padding_mode="circular")),
        nn.BatchNorm1d(channels, eps=1e-6), nn.LeakyReLU(0.2))

  return nn.ModuleDict({"heads": nn.ModuleList([
      nn.Sequential(block(1), Residual(block(ks)),
                    nn.utils.spectral_norm(nn.Conv1d(channels, 1, 1)))
      for _ in range(n)])})


def torch_heads_forward(ref, feats):
  b = feats[0].shape[0]
  return torch.cat([h(torch.from_numpy(np.asarray(f)).transpose(1, 2)).reshape(b, -1)
                    for h, f in zip(ref["heads"], feats)], dim=1)


@pytest.fixture(scope="module")
def heads_step():
  """Jitted heads forward that returns the updated state (train) or leaves it (eval)."""

  def step(graphdef, state, feats, train):
    heads = nnx.merge(graphdef, state)
    return heads(feats, train=train), nnx.state(heads)

  return jax.jit(step, static_argnums=3)


@needs_torch
def test_heads_match_torch_rebuild_with_copied_weights(heads_parts, heads_step):
  heads = fresh(heads_parts)
  graphdef, state = nnx.split(heads)
  ref = torch_heads(DIM, len(TAPS) + 1, KS)
  ours = flat(heads)
  # Same names as the reference state dict, so the copy is a plain load.
  assert set(ours) == set(ref.state_dict())
  ref.load_state_dict({k: torch.from_numpy(np.array(v)).to(ref.state_dict()[k].dtype)
                       for k, v in ours.items()})
  assert ours["heads.0.1.fn.0.weight_orig"].shape == (DIM, DIM, KS)

  rng = np.random.default_rng(2)
  ref.train()
  for _ in range(2):
    feats = [rng.normal(size=(3, TOKENS, DIM)).astype(np.float32) for _ in range(len(TAPS) + 1)]
    logits, state = heads_step(graphdef, state, feats, True)
    assert logits.shape == (3, (len(TAPS) + 1) * TOKENS) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), torch_heads_forward(ref, feats).detach().numpy(),
                               rtol=1e-4, atol=1e-4)
  updated = flat(nnx.merge(graphdef, state))
  for k, v in ref.state_dict().items():
    np.testing.assert_allclose(updated[k], v.numpy(), rtol=1e-4, atol=1e-5, err_msg=k)

  ref.eval()
  feats = [rng.normal(size=(2, TOKENS, DIM)).astype(np.float32) for _ in range(len(TAPS) + 1)]
  logits, state_after = heads_step(graphdef, state, feats, False)
  np.testing.assert_allclose(np.asarray(logits), torch_heads_forward(ref, feats).detach().numpy(),
                             rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state_after)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_full_size_shapes_and_parameter_counts():
  backbone = nnx.eval_shape(lambda: D.DinoBackbone(rngs=nnx.Rngs(0)))
  heads = nnx.eval_shape(lambda: D.DiscriminatorHeads(rngs=nnx.Rngs(0)))
  count = lambda m: sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
  # timm vit_small_patch16_224 without classifier; the reference prints 7.39M heads.
  assert count(backbone) == 21_665_664
  assert count(heads) == 7_386_245
  keys = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(backbone))}
  for k in ("patch_embed.proj.kernel", "cls_token", "pos_embed", "blocks.11.norm1.scale",
            "blocks.11.attn.qkv.kernel", "blocks.11.attn.proj.bias", "blocks.11.norm2.bias",
            "blocks.11.mlp.fc1.kernel", "blocks.11.mlp.fc2.bias", "norm.scale"):
    assert k in keys, k
  out = jax.eval_shape(
      lambda x: D.discriminator(D.DiscriminatorHeads(rngs=nnx.Rngs(0)),
                                D.DinoBackbone(rngs=nnx.Rngs(0)), x, jax.random.key(0), train=True),
      jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32))
  assert out.shape == (2, 5 * 196) and out.dtype == jnp.float32
  out = jax.eval_shape(
      lambda x: D.discriminator(D.DiscriminatorHeads(rngs=nnx.Rngs(0), dtype=jnp.bfloat16),
                                D.DinoBackbone(rngs=nnx.Rngs(0), dtype=jnp.bfloat16), x, None,
                                train=True),
      jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.bfloat16))
  assert out.shape == (2, 5 * 196) and out.dtype == jnp.float32  # logits stay float32


# ----------------------------------------------------------------------------
# Backbone against NumPy.

def _ln(x, scale, bias, eps=1e-6):
  m = x.mean(-1, keepdims=True)
  v = ((x - m) ** 2).mean(-1, keepdims=True)
  return (x - m) / np.sqrt(v + eps) * scale + bias


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_backbone_features(p, x):
  b = x.shape[0]
  g = IMG // PATCH
  patches = x.reshape(b, g, PATCH, g, PATCH, 3)
  tok = np.einsum("bgihjc,ijcd->bghd", patches, p["patch_embed.proj.kernel"]).reshape(b, g * g, DIM)
  tok = tok + p["patch_embed.proj.bias"]
  h = np.concatenate([np.broadcast_to(p["cls_token"], (b, 1, DIM)), tok], 1) + p["pos_embed"]
  feats = [h[:, 1:] + h[:, :1]]
  hd = DIM // HEADS
  for i in range(max(TAPS) + 1):
    q = lambda n: p[f"blocks.{i}.{n}"]
    y = _ln(h, q("norm1.scale"), q("norm1.bias"))
    qkv = (y @ q("attn.qkv.kernel") + q("attn.qkv.bias")).reshape(b, -1, 3, HEADS, hd)
    qq, kk, vv = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))
    a = qq @ kk.transpose(0, 1, 3, 2) / np.sqrt(hd)
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = (a @ vv).transpose(0, 2, 1, 3).reshape(b, -1, DIM)
    h = h + o @ q("attn.proj.kernel") + q("attn.proj.bias")
    y = _ln(h, q("norm2.scale"), q("norm2.bias"))
    y = _gelu_tanh(y @ q("mlp.fc1.kernel") + q("mlp.fc1.bias")) @ q("mlp.fc2.kernel") + q("mlp.fc2.bias")
    h = h + y
    if i in TAPS:
      feats.append(h[:, 1:] + h[:, :1])
  return feats


def test_backbone_features_match_numpy(backbone_parts):
  bb = fresh(backbone_parts)
  # Non-trivial class token and qkv biases (fresh ones are zero).
  bb.cls_token[...] = jax.random.normal(jax.random.key(5), bb.cls_token.shape)
  for blk in bb.blocks:
    blk.attn.qkv.bias[...] = 0.1 * jax.random.normal(jax.random.key(6), blk.attn.qkv.bias.shape)
  p = {k: v.astype(np.float64) for k, v in flat(bb).items()}
  x = np.random.default_rng(3).normal(size=(2, IMG, IMG, 3)).astype(np.float32)
  feats = jax.jit(lambda m, x: m.features(x))(bb, x)
  expected = np_backbone_features(p, x.astype(np.float64))
  assert len(feats) == len(expected) == bb.num_features == 3
  for f, e in zip(feats, expected):
    assert f.shape == (2, TOKENS, DIM) and f.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(f), e, rtol=1e-4, atol=1e-4)
  # Zeroing the key bias, as the reference does on load, leaves the features alone.
  bb.zero_key_bias()
  assert not np.asarray(bb.blocks[0].attn.qkv.bias[DIM:2 * DIM]).any()
  for f, g in zip(feats, jax.jit(lambda m, x: m.features(x))(bb, x)):
    np.testing.assert_allclose(np.asarray(f), np.asarray(g), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------
# Preprocessing.

def _torch_resize(x, size, mode):
  out = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(size, size), mode=mode)
  return out.permute(0, 2, 3, 1).numpy()


@needs_torch
@pytest.mark.parametrize("in_size, mode", [(20, "bicubic"), (IMG, "bicubic"), (40, "area"),
                                           (64, "area")])
def test_resize_matches_torch_interpolate(in_size, mode):
  x = np.random.default_rng(in_size).normal(size=(2, in_size, in_size, 3)).astype(np.float32)
  got = np.asarray(D.resize_like_reference(jnp.asarray(x), IMG))
  np.testing.assert_allclose(got, _torch_resize(x, IMG, mode), rtol=1e-5, atol=1e-5)


def test_resize_matrices_rows_sum_to_one_and_same_size_is_identity():
  for make, n_in in ((D.bicubic_matrix, 20), (D.area_matrix, 40), (D.area_matrix, 64)):
    np.testing.assert_allclose(make(n_in, IMG).sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(D.bicubic_matrix(IMG, IMG), np.eye(IMG), atol=1e-7)
  # 64 -> 32 area is a 2x2 box average.
  np.testing.assert_array_equal(D.area_matrix(64, IMG), np.kron(np.eye(IMG), [[0.5, 0.5]]))


@needs_torch
def test_preprocess_normalises_then_crops_or_resizes():
  x = np.random.default_rng(4).uniform(-1, 1, (3, 40, 40, 3)).astype(np.float32)
  mean, std = np.array(D.IMAGENET_MEAN), np.array(D.IMAGENET_STD)
  normed = ((x + 1) / 2 - mean) / std
  np.testing.assert_allclose(np.asarray(D.imagenet_normalize(x)), normed, rtol=1e-5, atol=1e-5)
  resized = _torch_resize(normed.astype(np.float32), IMG, "area")
  np.testing.assert_allclose(np.asarray(D.preprocess(x, None, IMG)), resized, rtol=1e-5, atol=1e-5)
  fn = jax.jit(lambda x, k: D.preprocess(x, k, IMG))
  kinds = set()
  for seed in range(10):
    out = np.asarray(fn(x, jax.random.key(seed)))
    if np.allclose(out, resized, rtol=1e-5, atol=1e-5):
      kinds.add("resize")
      continue
    found = [(t, l) for t in range(40 - IMG + 1) for l in range(40 - IMG + 1)
             if np.allclose(out[0], normed[0, t:t + IMG, l:l + IMG], atol=1e-5)]
    assert len(found) == 1, seed
    t, l = found[0]
    np.testing.assert_allclose(out, normed[:, t:t + IMG, l:l + IMG], atol=1e-5)  # one crop per batch
    kinds.add("crop")
  assert kinds == {"crop", "resize"}
  # Not larger than the ViT's size on both sides: always the deterministic resize.
  small = x[:, :IMG, :]
  np.testing.assert_allclose(np.asarray(fn(small, jax.random.key(0))),
                             np.asarray(D.preprocess(small, None, IMG)), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Whole discriminator and the SyncBN semantics on a batch-sharded array.

def test_discriminator_gradients_reach_images_and_heads_only(backbone_parts, heads_parts):
  bb, heads = fresh(backbone_parts), fresh(heads_parts)
  x = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (2, 40, 40, 3)), jnp.float32)

  def loss(heads, x):
    return jnp.mean(D.discriminator(heads, bb, x, jax.random.key(0), train=True))

  g_heads, g_x = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(heads, x)
  assert set(flat(g_heads)) == set(flat(heads, nnx.Param))
  assert np.abs(np.asarray(g_x)).sum() > 0


def test_heads_on_batch_sharded_array_equal_single_device(heads_parts, heads_step):
  assert jax.device_count() == 8
  graphdef, state = nnx.split(fresh(heads_parts))
  rng = np.random.default_rng(6)
  feats = [rng.normal(size=(8, TOKENS, DIM)).astype(np.float32) * (i + 1)
           for i in range(len(TAPS) + 1)]
  logits, new_state = heads_step(graphdef, state, feats, True)

  mesh = parallel.create_mesh([("data", 8)])
  sharded = [jax.device_put(f, NamedSharding(mesh, P("data"))) for f in feats]
  replicated = jax.device_put(state, NamedSharding(mesh, P()))
  logits_s, new_state_s = heads_step(graphdef, replicated, sharded, True)
  assert len(sharded[0].sharding.device_set) == 8 and not sharded[0].sharding.is_fully_replicated
  np.testing.assert_allclose(np.asarray(logits_s), np.asarray(logits), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(new_state_s), jax.tree.leaves(new_state)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

  # Per-device statistics (what a pmap without a psum would compute) differ:
  # the equality above is a real check of global-batch statistics.
  local = [heads_step(graphdef, state, [f[i:i + 1] for f in feats], True)[0] for i in range(8)]
  assert not np.allclose(np.concatenate([np.asarray(l) for l in local]), np.asarray(logits),
                         atol=1e-3)
