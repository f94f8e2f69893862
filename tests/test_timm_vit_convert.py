"""timm ViT checkpoints (DINOv2 REPA teacher, DINO v1 backbone) into NNX ViTs.

Resampling is checked against PyTorch's own ``F.interpolate`` (what timm calls)
and against a pseudo-inverse built here from it; loaded parameters against the
source tensors transposed by hand.
"""

import numpy as np
import pytest
from conftest import FIXTURES
from flax import nnx
from safetensors.numpy import save_file

from softvq_jax.convert import timm_vit
from softvq_jax.convert.core import ConversionError
from softvq_jax.models.config import ConfigError, ViTConfig
from softvq_jax.models.vit import VisionTransformer

torch = pytest.importorskip("torch", reason="torch writes the .pt files and is the resize reference")
F = torch.nn.functional

TINY_TEACHER = dict(embed_dim=96, depth=1, num_heads=2)  # the fixture's repa_teacher overrides


@pytest.fixture(scope="module")
def teacher_state():
  """``repa_model.*`` of the softvq_tiny fixture: a DINOv2-style ViT, patch 16, 64 px."""
  d = np.load(FIXTURES / "softvq_tiny.npz")
  return {k[len("param/repa_model."):]: d[k] for k in d.files if k.startswith("param/repa_model.")}


def _torch_resize(x, size, mode="bicubic", antialias=True):
  return F.interpolate(torch.from_numpy(x), size=size, mode=mode, antialias=antialias,
                       align_corners=False).numpy()


def _torch_pinv_resize(kernel, new, mode, antialias):
  """FlexiViT PI-resize built independently: the resize matrix from interpolated basis patches."""
  old = kernel.shape[-1]
  basis = np.eye(old * old).reshape(old * old, 1, old, old)
  resize = _torch_resize(basis, (new, new), mode, antialias).reshape(old * old, new * new).T
  pinv = np.linalg.pinv(resize.T)
  flat = kernel.reshape(*kernel.shape[:2], -1).astype(np.float64)
  return np.einsum("no,abo->abn", pinv, flat).reshape(*kernel.shape[:2], new, new), resize


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("sizes", [(37, 16), (14, 16), (16, 14), (5, 13)])
def test_resize_matrix_is_torch_interpolate(mode, antialias, sizes):
  old, new = sizes
  x = np.random.default_rng(old * new).standard_normal((2, 3, old, old + 1))
  expected = _torch_resize(x, (new, new + 2), mode, antialias)  # float64 torch
  rows = timm_vit.resize_matrix(old, new, mode, antialias)
  cols = timm_vit.resize_matrix(old + 1, new + 2, mode, antialias)
  np.testing.assert_allclose(np.einsum("ph,bchw,qw->bcpq", rows, x, cols), expected,
                             rtol=0, atol=1e-12)


def test_pos_embed_resample_matches_torch_bicubic_antialias():
  # DINOv2's 518-px table (37x37 + cls) to the 256-px, patch-16 grid, as timm does it (float32).
  rng = np.random.default_rng(0)
  table = rng.standard_normal((1, 1 + 37 * 37, 8)).astype(np.float32)
  out = timm_vit.resample_abs_pos_embed(table, (16, 16), num_prefix_tokens=1)
  grid = table[:, 1:].reshape(1, 37, 37, 8).transpose(0, 3, 1, 2)
  expected = _torch_resize(grid, (16, 16)).transpose(0, 2, 3, 1).reshape(1, 256, 8)
  assert out.shape == (1, 257, 8) and out.dtype == np.float32
  np.testing.assert_array_equal(out[:, :1], table[:, :1])  # class row kept as is
  np.testing.assert_allclose(out[:, 1:], expected, rtol=0, atol=2e-6 * np.abs(expected).max())
  # Same length and square: timm returns the table untouched.
  assert timm_vit.resample_abs_pos_embed(table, (37, 37)) is table


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_patch_kernel_pi_resize(mode):
  rng = np.random.default_rng(1)
  kernel = rng.standard_normal((4, 3, 14, 14))
  out = timm_vit.resample_patch_embed(kernel, (16, 16), interpolation=mode, antialias=True)
  expected, resize = _torch_pinv_resize(kernel, 16, mode, True)
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-10 * np.abs(expected).max())
  # The defining property: the new kernel on the resized patch = the old kernel on the old patch.
  patch = rng.standard_normal((3, 14, 14))
  resized = _torch_resize(patch[None], (16, 16), mode, True)[0]
  assert np.allclose(resize @ patch[0].reshape(-1), resized[0].reshape(-1), atol=1e-12)
  before = np.einsum("ochw,chw->o", kernel, patch)
  after = np.einsum("ochw,chw->o", out, resized)
  np.testing.assert_allclose(after, before, rtol=1e-9, atol=1e-9)


def _check_loaded(model, state):
  """Every NNX parameter equals its PyTorch tensor in the NNX layout."""
  get = lambda v: np.asarray(v.get_value())
  np.testing.assert_array_equal(get(model.cls_token), state["cls_token"])
  np.testing.assert_array_equal(get(model.pos_embed), state["pos_embed"])
  np.testing.assert_array_equal(get(model.patch_embed.proj.kernel),
                                state["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(get(model.norm.scale), state["norm.weight"])
  for i, block in enumerate(model.blocks):
    for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
      layer = block
      for part in name.split("."):
        layer = getattr(layer, part)
      np.testing.assert_array_equal(get(layer.kernel), state[f"blocks.{i}.{name}.weight"].T)
      np.testing.assert_array_equal(get(layer.bias), state[f"blocks.{i}.{name}.bias"])
    np.testing.assert_array_equal(get(block.norm2.bias), state[f"blocks.{i}.norm2.bias"])
    if block.ls1 is not None:
      np.testing.assert_array_equal(get(block.ls1.gamma), state[f"blocks.{i}.ls1.gamma"])
      np.testing.assert_array_equal(get(block.ls2.gamma), state[f"blocks.{i}.ls2.gamma"])


def test_teacher_from_torch_pt_and_safetensors(tmp_path, teacher_state):
  # A reference training checkpoint holds the teacher under repa_model.* next to other modules.
  pt = tmp_path / "train.pt"
  torch.save({"model": {**{f"repa_model.{k}": torch.from_numpy(v) for k, v in teacher_state.items()},
                        "quant_conv.weight": torch.zeros(8, 192)}}, pt)
  st = tmp_path / "teacher.safetensors"
  save_file(dict(teacher_state), str(st))
  from_pt = timm_vit.repa_teacher("large", pt, image_size=64, overrides=TINY_TEACHER,
                                  prefix="repa_model.")
  from_st = timm_vit.repa_teacher("vit_large_patch14_dinov2.lvd142m", st, image_size=64,
                                  overrides=TINY_TEACHER)
  _check_loaded(from_pt, teacher_state)
  _check_loaded(from_st, teacher_state)


def test_dinov2_checkpoint_rebuilt_at_patch16(tmp_path):
  # Meta/timm DINOv2 layout: patch 14, 518 px (37x37 + cls), LayerScale, and a mask_token.
  rng = np.random.default_rng(2)
  dim, cfg = 16, ViTConfig(embed_dim=16, depth=1, num_heads=2, patch_size=14)
  source = nnx.eval_shape(lambda: VisionTransformer(cfg, 518, rngs=nnx.Rngs(0)))
  state = {"mask_token": rng.standard_normal((1, dim)).astype(np.float32)}
  for path, var in nnx.to_flat_state(nnx.state(source, nnx.Param)):
    value = rng.standard_normal(var.get_value().shape).astype(np.float32)
    name = ".".join(map(str, path)).replace(".scale", ".weight").replace(".kernel", ".weight")
    if name == "patch_embed.proj.weight":
      value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif value.ndim == 2:
      value = value.T
    state[name] = value
  assert state["pos_embed"].shape == (1, 1370, dim)
  pth = tmp_path / "dinov2_vits14_pretrain.pth"
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, pth)

  teacher = nnx.eval_shape(lambda: VisionTransformer(
      ViTConfig(embed_dim=16, depth=1, num_heads=2, patch_size=16), 256, rngs=nnx.Rngs(0)))
  ignored = timm_vit.load_timm_vit(teacher, pth)
  assert ignored == ["mask_token"]

  grid = state["pos_embed"][:, 1:].reshape(1, 37, 37, dim).transpose(0, 3, 1, 2)
  expected_pos = _torch_resize(grid, (16, 16)).transpose(0, 2, 3, 1).reshape(1, 256, dim)
  pos = np.asarray(teacher.pos_embed.get_value())
  assert pos.shape == (1, 257, dim)
  np.testing.assert_array_equal(pos[:, :1], state["pos_embed"][:, :1])
  np.testing.assert_allclose(pos[:, 1:], expected_pos, atol=2e-6 * np.abs(expected_pos).max())

  expected_kernel, _ = _torch_pinv_resize(state["patch_embed.proj.weight"], 16, "bicubic", True)
  kernel = np.asarray(teacher.patch_embed.proj.kernel.get_value())
  np.testing.assert_allclose(kernel, expected_kernel.transpose(2, 3, 1, 0), rtol=0,
                             atol=1e-5 * np.abs(expected_kernel).max())
  np.testing.assert_array_equal(np.asarray(teacher.blocks[0].ls1.gamma.get_value()),
                                state["blocks.0.ls1.gamma"])


def _dino_v1_state(seed=3, dim=24, depth=2):
  """A ViT-S/16-layout DINO v1 state dict (no LayerScale), 32 px."""
  model = nnx.eval_shape(lambda: VisionTransformer(
      ViTConfig(embed_dim=dim, depth=depth, num_heads=2, layerscale_init=None), 32, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  state = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = ".".join(map(str, path)).replace(".scale", ".weight").replace(".kernel", ".weight")
    value = rng.standard_normal(var.get_value().shape).astype(np.float32)
    state[name] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else (value.T if value.ndim == 2 else value)
  return model, state


def test_dino_v1_zero_k_bias(tmp_path):
  model, state = _dino_v1_state()
  pth = tmp_path / "dino_deitsmall16_pretrain.pth"
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, pth)
  assert timm_vit.load_timm_vit(model, pth, zero_k_bias=True) == []
  expected = dict(state)
  for i in range(2):
    bias = expected[f"blocks.{i}.attn.qkv.bias"].copy()  # rows q | k | v of width 24
    assert np.all(bias[24:48] != 0)
    bias[24:48] = 0
    expected[f"blocks.{i}.attn.qkv.bias"] = bias
  _check_loaded(model, expected)


def test_all_problems_in_one_error(teacher_state):
  state = dict(teacher_state)
  del state["blocks.0.mlp.fc2.bias"]
  state["blocks.0.attn.q_norm.weight"] = np.ones(48, np.float32)
  state["norm.weight"] = np.ones(95, np.float32)
  teacher = nnx.eval_shape(lambda: VisionTransformer(
      timm_vit.dinov2_config("large", overrides=TINY_TEACHER), 64, rngs=nnx.Rngs(0)))
  with pytest.raises(ConversionError) as err:
    timm_vit.load_timm_vit(teacher, state)
  msg = str(err.value)
  assert "3 problem(s)" in msg
  assert "missing tensor for blocks.0.mlp.fc2.bias" in msg
  assert "unexpected tensor blocks.0.attn.q_norm.weight" in msg
  assert "mis-shaped tensor norm.weight" in msg


def test_layerscale_mismatch_and_ignore(teacher_state):
  # DINOv2 weights (with LayerScale) into a ViT without it, and the reverse.
  _, dino = _dino_v1_state(dim=96, depth=1)
  with_ls = nnx.eval_shape(lambda: VisionTransformer(
      timm_vit.dinov2_config("large", overrides=TINY_TEACHER), 64, rngs=nnx.Rngs(0)))
  with pytest.raises(ConversionError, match="missing tensor for blocks.0.ls1.gamma"):
    timm_vit.load_timm_vit(with_ls, dino)
  without_ls = nnx.eval_shape(lambda: VisionTransformer(
      ViTConfig(embed_dim=96, depth=1, num_heads=2, layerscale_init=None), 64, rngs=nnx.Rngs(0)))
  with pytest.raises(ConversionError, match="unexpected tensor blocks.0.ls2.gamma"):
    timm_vit.load_timm_vit(without_ls, teacher_state)
  ignored = timm_vit.load_timm_vit(without_ls, teacher_state, ignore=[r"blocks\.\d+\.ls[12]\.gamma"])
  assert sorted(ignored) == ["blocks.0.ls1.gamma", "blocks.0.ls2.gamma"]


def test_refusals(teacher_state):
  teacher = nnx.eval_shape(lambda: VisionTransformer(
      timm_vit.dinov2_config("large", overrides=TINY_TEACHER), 64, rngs=nnx.Rngs(0)))
  with pytest.raises(ConversionError, match="register tokens"):
    timm_vit.load_timm_vit(teacher, {**teacher_state, "register_tokens": np.zeros((1, 4, 96))})
  with pytest.raises(ConversionError, match="'repa_model.'"):
    timm_vit.load_timm_vit(teacher, teacher_state, prefix="repa_model.")
  with pytest.raises(NotImplementedError, match="SwiGLU"):
    timm_vit.dinov2_config("vit_giant_patch14_dinov2.lvd142m")
  with pytest.raises(ConfigError, match="unknown repa_model"):
    timm_vit.dinov2_config("vit_huge_patch14_clip_224")


@pytest.mark.parametrize("layout", ["meta", "timm"])
def test_register_token_dinov2_at_patch16(tmp_path, layout):
  # DINOv2 reg4 at its native 518 px / patch 14. Meta's file has register_tokens and a
  # class row in pos_embed; timm's has reg_token and a patches-only table.
  rng = np.random.default_rng(5)
  dim, overrides = 24, dict(embed_dim=24, depth=1, num_heads=2)
  name = "vit_small_patch14_reg4_dinov2.lvd142m"
  source = nnx.eval_shape(lambda: VisionTransformer(timm_vit.dinov2_config(
      name, patch_size=14, overrides=overrides), 518, rngs=nnx.Rngs(0)))
  state = {}
  for path, var in nnx.to_flat_state(nnx.state(source, nnx.Param)):
    value = rng.standard_normal(var.get_value().shape).astype(np.float32)
    key = ".".join(map(str, path)).replace(".scale", ".weight").replace(".kernel", ".weight")
    state[key] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else (value.T if value.ndim == 2 else value)
  assert state["pos_embed"].shape == (1, 37 * 37, dim) and state["reg_token"].shape == (1, 4, dim)
  cls_row = rng.standard_normal((1, 1, dim)).astype(np.float32)
  if layout == "meta":
    file_state = {k: v for k, v in state.items() if k not in ("reg_token", "pos_embed")}
    file_state.update(register_tokens=state["reg_token"], mask_token=np.zeros((1, dim), np.float32),
                      pos_embed=np.concatenate([cls_row, state["pos_embed"]], axis=1),
                      cls_token=state["cls_token"] - cls_row)
  else:
    file_state = state
  path = tmp_path / "dinov2_reg4.safetensors"
  save_file(file_state, str(path))

  teacher = timm_vit.repa_teacher(name, str(path), image_size=64, patch_size=16, overrides=overrides)
  assert teacher.num_prefix_tokens == 5 and teacher.pos_embed.get_value().shape == (1, 16, dim)
  np.testing.assert_array_equal(teacher.reg_token.get_value(), state["reg_token"])
  # Meta's class position row is folded into the class token, which then gets no position.
  np.testing.assert_allclose(teacher.cls_token.get_value(), state["cls_token"], atol=1e-6)
  grid = state["pos_embed"].reshape(1, 37, 37, dim).transpose(0, 3, 1, 2)
  expected = _torch_resize(grid, (4, 4)).transpose(0, 2, 3, 1).reshape(1, 16, dim)
  np.testing.assert_allclose(teacher.pos_embed.get_value(), expected,
                             atol=2e-6 * np.abs(expected).max())

  plain = nnx.eval_shape(lambda: VisionTransformer(timm_vit.dinov2_config(
      "vit_small_patch14_dinov2.lvd142m", overrides=overrides), 64, rngs=nnx.Rngs(0)))
  with pytest.raises(ConversionError, match="checkpoint has register tokens"):
    timm_vit.load_timm_vit(plain, str(path))


def test_register_model_needs_register_checkpoint(teacher_state):
  reg = nnx.eval_shape(lambda: VisionTransformer(timm_vit.dinov2_config(
      "vit_large_patch14_reg4_dinov2.lvd142m", overrides=TINY_TEACHER), 64, rngs=nnx.Rngs(0)))
  with pytest.raises(ConversionError, match="the model has register tokens"):
    timm_vit.load_timm_vit(reg, teacher_state)


def test_random_teacher_warns_loudly(monkeypatch):
  messages = []
  monkeypatch.setattr(timm_vit.logging, "warning", lambda msg, *args: messages.append(msg % args))
  teacher = timm_vit.repa_teacher("small", None, image_size=32,
                                  overrides=dict(embed_dim=32, depth=1, num_heads=2))
  assert teacher.pos_embed.get_value().shape == (1, 5, 32)
  assert len(messages) == 1
  assert "RANDOMLY INITIALISED" in messages[0] and "vit_small_patch14_dinov2" in messages[0]
  assert "REPA" in messages[0]
