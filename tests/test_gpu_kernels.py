"""The deviceless GPU kernel table: HLO reading (against hand counts), the GPU compile target,
and `bench --what kernels` compiling for an H200 on this CPU machine."""

import json
import pathlib

import jax.numpy as jnp
import pytest
from conftest import run_bench, run_python

from softvq_jax import hlo_kernels
from softvq_jax.models import layers

# A GPU-style optimised module: two cuBLASLt GEMMs (bias epilogue; accumulate into C), a
# cuDNN convolution, a fusion that only slices one of its operands, and a loop of known
# trip count.
_GEMM_CONFIG = ('{"gemm_backend_config":{"alpha_real":1,"beta":%s,"dot_dimension_numbers":'
                '{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],'
                '"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"epilogue":"%s"}}')
HLO = """HloModule jit_probe, is_scheduled=true

%fused_slice (param_0.1: bf16[8,1024], param_1.2: f32[8,128]) -> f32[8,128] {
  %param_0.1 = bf16[8,1024]{1,0} parameter(0)
  %slice.1 = bf16[8,128]{1,0} slice(%param_0.1), slice={[0:8], [256:384]}
  %convert.1 = f32[8,128]{1,0} convert(%slice.1)
  %param_1.2 = f32[8,128]{1,0} parameter(1)
  ROOT %add.1 = f32[8,128]{1,0} add(%convert.1, %param_1.2)
}

%fused_exp (param_0.3: f32[8,128]) -> f32[8,128] {
  %param_0.3 = f32[8,128]{1,0} parameter(0)
  ROOT %exponential.1 = f32[8,128]{1,0} exponential(%param_0.3)
}

%body (p.1: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %p.1 = (s32[], f32[8,128]{1,0}) parameter(0)
  %gte.1 = s32[] get-tuple-element(%p.1), index=0
  %gte.2 = f32[8,128]{1,0} get-tuple-element(%p.1), index=1
  %fusion.2 = f32[8,128]{1,0} fusion(%gte.2), kind=kLoop, calls=%fused_exp
  ROOT %tuple.1 = (s32[], f32[8,128]{1,0}) tuple(%gte.1, %fusion.2)
}

%cond (p.2: (s32[], f32[8,128])) -> pred[] {
  %p.2 = (s32[], f32[8,128]{1,0}) parameter(0)
  %gte.3 = s32[] get-tuple-element(%p.2), index=0
  %constant.1 = s32[] constant(5)
  ROOT %compare.1 = pred[] compare(%gte.3, %constant.1), direction=LT
}

ENTRY %main (a.1: bf16[128,64], b.1: bf16[64,256], bias.1: bf16[256], big.1: bf16[8,1024], acc.1: f32[8,128], c.1: f32[128,256], a.2: f32[128,64], b.2: f32[64,256], img.1: bf16[2,16,16,8], filt.1: bf16[32,3,3,8]) -> f32[8,128] {
  %a.1 = bf16[128,64]{1,0} parameter(0)
  %b.1 = bf16[64,256]{1,0} parameter(1)
  %bias.1 = bf16[256]{0} parameter(2)
  %big.1 = bf16[8,1024]{1,0} parameter(3)
  %acc.1 = f32[8,128]{1,0} parameter(4)
  %c.1 = f32[128,256]{1,0} parameter(5)
  %a.2 = f32[128,64]{1,0} parameter(6)
  %b.2 = f32[64,256]{1,0} parameter(7)
  %img.1 = bf16[2,16,16,8]{3,2,1,0} parameter(8)
  %filt.1 = bf16[32,3,3,8]{3,2,1,0} parameter(9)
  %conv.1 = (bf16[2,16,16,32]{3,2,1,0}, u8[0]{0}) custom-call(%img.1, %filt.1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward"
  %gemm.1 = (bf16[128,256]{1,0}, s8[4194304]{0}) custom-call(%a.1, %b.1, %bias.1), custom_call_target="__cublas$lt$matmul", backend_config=GEMM_BIAS
  %gemm.2 = (f32[128,256]{1,0}, s8[4194304]{0}) custom-call(%a.2, %b.2, %c.1), custom_call_target="__cublas$lt$matmul", backend_config=GEMM_ACC
  %fusion.1 = f32[8,128]{1,0} fusion(%big.1, %acc.1), kind=kLoop, calls=%fused_slice
  %constant.2 = s32[] constant(0)
  %tuple.2 = (s32[], f32[8,128]{1,0}) tuple(%constant.2, %fusion.1)
  %while.1 = (s32[], f32[8,128]{1,0}) while(%tuple.2), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %gte.4 = f32[8,128]{1,0} get-tuple-element(%while.1), index=1
}
""".replace("GEMM_BIAS", _GEMM_CONFIG % (0, "BIAS")).replace("GEMM_ACC", _GEMM_CONFIG % (1, "DEFAULT"))


def test_kernel_table_counts_bytes_flops_and_loop_trips():
  table = {k.name: k for k in hlo_kernels.kernels(HLO)}
  assert set(table) == {"gemm.1", "gemm.2", "conv.1", "fusion.1", "fusion.2"}
  conv = table["conv.1"]
  assert conv.kind == "conv" and conv.flops == 2 * (2 * 16 * 16 * 32) * (3 * 3 * 8)
  assert (conv.bytes_read, conv.bytes_written) == (2 * (2 * 16 * 16 * 8 + 32 * 3 * 3 * 8),
                                                   2 * 2 * 16 * 16 * 32)
  bias = table["gemm.1"]
  assert (bias.kind, bias.epilogue, bias.accumulates) == ("gemm", "BIAS", False)
  assert bias.flops == 2 * 128 * 256 * 64
  assert bias.bytes_read == 2 * (128 * 64 + 64 * 256 + 256)
  assert bias.bytes_written == 2 * 128 * 256  # the cuBLAS workspace is not traffic
  assert table["gemm.2"].accumulates and table["gemm.2"].flops == 2 * 128 * 256 * 64
  sliced = table["fusion.1"]
  assert sliced.bytes_read == 2 * 8 * 128 + 4 * 8 * 128  # 1/8 of `big` is read
  assert (sliced.bytes_written, sliced.count) == (4 * 8 * 128, 1)
  looped = table["fusion.2"]
  assert (looped.count, looped.kind, looped.bytes_moved) == (5, "kLoop", 2 * 4 * 8 * 128)
  assert "exponential" in looped.ops


# What a scanned layer stack compiles to: a loop that writes each layer's residual into a
# stacked buffer in place (dynamic-update-slice, through a bitcast) and reads one layer's
# slice back (dynamic-slice), plus an unfused in-place update.
SCAN_HLO = """HloModule jit_scan, is_scheduled=true

%fused_store (param_0.1: f32[28,8,128], param_1.1: f32[8,128], param_2.1: s32[]) -> f32[28,8,128] {
  %param_0.1 = f32[28,8,128]{2,1,0} parameter(0)
  %bitcast.1 = f32[28,1,8,128]{3,2,1,0} bitcast(%param_0.1)
  %param_1.1 = f32[8,128]{1,0} parameter(1)
  %exponential.1 = f32[8,128]{1,0} exponential(%param_1.1)
  %bitcast.2 = f32[1,1,8,128]{3,2,1,0} bitcast(%exponential.1)
  %param_2.1 = s32[] parameter(2)
  %constant.1 = s32[] constant(0)
  %dynamic-update-slice.1 = f32[28,1,8,128]{3,2,1,0} dynamic-update-slice(%bitcast.1, %bitcast.2, %param_2.1, %constant.1, %constant.1, %constant.1)
  ROOT %bitcast.3 = f32[28,8,128]{2,1,0} bitcast(%dynamic-update-slice.1)
}

%fused_load (param_0.2: f32[28,8,128], param_1.2: s32[]) -> bf16[1,8,128] {
  %param_0.2 = f32[28,8,128]{2,1,0} parameter(0)
  %param_1.2 = s32[] parameter(1)
  %constant.2 = s32[] constant(0)
  %dynamic-slice.1 = f32[1,8,128]{2,1,0} dynamic-slice(%param_0.2, %param_1.2, %constant.2, %constant.2), dynamic_slice_sizes={1,8,128}
  ROOT %convert.1 = bf16[1,8,128]{2,1,0} convert(%dynamic-slice.1)
}

ENTRY %main (stack.1: f32[28,8,128], x.1: f32[8,128], i.1: s32[], u.1: f32[1,8,128]) -> (f32[28,8,128], bf16[1,8,128], f32[28,8,128]) {
  %stack.1 = f32[28,8,128]{2,1,0} parameter(0)
  %x.1 = f32[8,128]{1,0} parameter(1)
  %i.1 = s32[] parameter(2)
  %u.1 = f32[1,8,128]{2,1,0} parameter(3)
  %store.1 = f32[28,8,128]{2,1,0} fusion(%stack.1, %x.1, %i.1), kind=kLoop, calls=%fused_store
  %load.1 = bf16[1,8,128]{2,1,0} fusion(%store.1, %i.1), kind=kLoop, calls=%fused_load
  %constant.3 = s32[] constant(0)
  %dus.1 = f32[28,8,128]{2,1,0} dynamic-update-slice(%store.1, %u.1, %i.1, %constant.3, %constant.3)
  ROOT %tuple.1 = (f32[28,8,128]{2,1,0}, bf16[1,8,128]{2,1,0}, f32[28,8,128]{2,1,0}) tuple(%store.1, %load.1, %dus.1)
}
"""


def test_in_place_updates_and_dynamic_slices_move_only_their_slices():
  table = {k.name: k for k in hlo_kernels.kernels(SCAN_HLO)}
  layer = 8 * 128
  store = table["store.1"]  # reads x and the index, writes one layer; the stack is not read
  assert (store.bytes_read, store.bytes_written) == (4 * layer + 4, 4 * layer)
  load = table["load.1"]    # reads one f32 layer of the stack, writes it in bf16
  assert (load.bytes_read, load.bytes_written) == (4 * layer + 4, 2 * layer)
  dus = table["dus.1"]
  assert (dus.bytes_read, dus.bytes_written) == (4 * layer, 4 * layer)


# cuDNN's backward-filter call as XLA writes it (compiled for an H200): the forward
# convolution's labels, operands (input, output gradient), the filter as the result.
CONV_GRAD_HLO = """HloModule jit_conv_grad, is_scheduled=true

ENTRY %main (x.1: bf16[16,204,384], dy.1: bf16[16,196,256]) -> f32[256,9,384] {
  %x.1 = bf16[16,204,384]{2,1,0} parameter(0)
  %dy.1 = bf16[16,196,256]{2,1,0} parameter(1)
  %bw.1 = (f32[256,9,384]{2,1,0}, u8[0]{0}) custom-call(%x.1, %dy.1), window={size=9}, dim_labels=b0f_o0i->b0f, custom_call_target="__cudnn$convBackwardFilter"
  ROOT %gte.1 = f32[256,9,384]{2,1,0} get-tuple-element(%bw.1), index=0
}
"""


def test_backward_filter_convolution_counts_the_forward_multiply_adds():
  (conv,) = [k for k in hlo_kernels.kernels(CONV_GRAD_HLO) if k.kind == "conv"]
  # Output gradient elements x (window x input features): the forward convolution's count.
  assert conv.flops == 2 * (16 * 196 * 256) * (9 * 384)


def test_estimate_is_the_roofline_of_the_table():
  table = hlo_kernels.kernels(HLO)
  bandwidth, rate = 1e9, 1e12
  out = hlo_kernels.estimate(table, bandwidth=bandwidth, gemm_flops_per_s=rate)
  flops = 2 * 128 * 256 * 64
  gemm_bias = max(flops / rate, (2 * (128 * 64 + 64 * 256 + 256) + 2 * 128 * 256) / bandwidth)
  gemm_acc = max(flops / rate, (4 * (128 * 64 + 64 * 256 + 128 * 256) + 4 * 128 * 256) / bandwidth)
  conv = max(2 * 16384 * 72 / rate, (2 * (4096 + 2304) + 2 * 16384) / bandwidth)
  fusions = (2 * 8 * 128 + 2 * 4 * 8 * 128) / bandwidth + 5 * (2 * 4 * 8 * 128) / bandwidth
  assert out["estimated_s"] == pytest.approx(gemm_bias + gemm_acc + conv + fusions, rel=1e-12)
  assert out["kernels"] == 9
  assert out["launches_by_kind"] == {"kLoop": 6, "gemm": 2, "conv": 1}
  assert out["conv_flops"] == 2 * 16384 * 72
  assert out["gemm_epilogues"] == {"BIAS": 1, "DEFAULT": 1} and out["gemms_accumulating"] == 1
  assert out["gemm_flops"] == 2 * flops
  assert out["top"][0]["estimated_s"] == pytest.approx(gemm_acc)
  with pytest.raises(ValueError, match="positive"):
    hlo_kernels.estimate(table, bandwidth=0, gemm_flops_per_s=rate)
  with pytest.raises(ValueError, match="ENTRY"):
    hlo_kernels.kernels("HloModule empty\n")


def test_compiling_for_gpu_makes_the_gpu_choices_on_this_host():
  q = jnp.zeros((4, 16, 2, 8), jnp.bfloat16)
  assert layers.compile_target() == "cpu"
  assert not layers.inference_forms_apply(jnp.bfloat16)
  assert layers.inference_compiler_options() is None
  with layers.compiling_for("gpu"):
    assert layers.compile_target() == "gpu"
    assert layers.inference_forms_apply(jnp.bfloat16)
    assert not layers.inference_forms_apply(None)  # float32 keeps the checkpoint's form
    assert layers.inference_compiler_options() == {"xla_disable_hlo_passes": "dot-merger"}
    assert layers.gelu(jnp.ones((2,), jnp.bfloat16), approximate=True).dtype == jnp.bfloat16
    assert layers._use_gelu_epilogue(q, True, "auto")  # pylint: disable=protected-access
    # No CPU loop over examples, whatever this host's device count.
    assert layers.cpu_attention_group(jnp.zeros((64, 321, 12, 64), jnp.bfloat16)) == 64
  assert layers.compile_target() == "cpu"
  with pytest.raises(ValueError, match="platform"):
    with layers.compiling_for("cuda"):
      pass


_CUDA = pathlib.Path(__file__).resolve().parents[1] / ".deps" / "cuda"


def _kernels(*flags, with_plugin=True):
  return run_bench(["--what", "kernels", "--dtype", "bfloat16", "--tiny", *flags],
                   site=_CUDA if with_plugin else None)


def _line(result):
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cuda_plugin():
  assert (_CUDA / "jax_plugins").is_dir(), ("run bash launch/setup.sh --dev (it installs jax's "
                                            "CUDA plugin into .deps/cuda)")


def test_tokenizer_encode_compiled_for_an_h200_shows_the_inference_forms(cuda_plugin):
  """Without a GPU: 2 encoder blocks of the tiny tokenizer (25 tokens). Its checkpoint form
  runs attention in the packed short-attention kernels; the inference forms split q/k/v
  (+2 GEMMs per block) for the library attention (+2 per block: its two products) and fold
  LayerScale. The residual stream is float32 (as under PyTorch autocast), so the 16-bit
  proj and fc2 GEMMs cannot accumulate into it (no C operand); by default the ViT norms
  run as the adaLN kernels, which take those residual adds."""
  never = _line(_kernels("--program", "encode", "--batch", "4", "--inference_forms", "never",
                         "--adaln", "xla"))
  forms = _line(_kernels("--program", "encode", "--batch", "4", "--adaln", "xla"))
  auto = _line(_kernels("--program", "encode", "--batch", "4"))
  for line in (never, forms, auto):
    assert line["device_kind"] == "NVIDIA H200 141GB HBM3e" and line["timed"] is False
    assert line["compiler_options"] == {"xla_disable_hlo_passes": "dot-merger"}
    assert line["estimated_s"] > 0 and line["kernels"] == sum(line["launches_by_kind"].values())
  # XLA's GEMMs against the FLOPs counted from the layer shapes (attention included).
  for line in (forms, auto):
    assert 0.95 < line["gemm_flops"] / (line["batch"] * line["flops_per_item"]) < 1.15
  depth = 2
  assert never["launches_by_kind"].get("custom-call") == depth  # the packed attention
  assert forms["launches_by_kind"]["gemm"] - never["launches_by_kind"]["gemm"] == 4 * depth
  assert (never["gemms_accumulating"], forms["gemms_accumulating"]) == (0, 0)
  # Two norms per block and the final one; the residual adds are theirs.
  assert auto["launches_by_kind"].get("custom-call") == 2 * depth + 1
  assert auto["launches_by_kind"]["gemm"] == forms["launches_by_kind"]["gemm"]
  assert auto["gemms_accumulating"] == 0
  # No device, so cuDNN refused every attention shape; the line says which ran on XLA.
  refused = forms["cudnn_attention_refused"]
  assert refused and all(len(shape) == 4 and shape[0] == 4 for shape in refused)


# Two GPU compilations of the tokenizer (about 25 s of CPU): outside CI's time budget.
@pytest.mark.extended
def test_tokenizer_encode_for_an_h200_folds_the_chosen_tanh_gelu_into_the_matmul(cuda_plugin):
  """Opt-in ``--inference_gelu tanh``: each of the tiny encoder's 2 blocks loses its GELU
  kernel to fc1's bias+GELU epilogue; the exact GELU (the default) has no epilogue. (XLA
  takes the epilogue only for a row count that is a multiple of 8: 8 x 25 tokens here.)"""
  tanh = _line(_kernels("--program", "encode", "--batch", "8", "--inference_gelu", "tanh"))
  exact = _line(_kernels("--program", "encode", "--batch", "8"))
  assert (tanh["inference_gelu"], exact["inference_gelu"]) == ("tanh", "exact")
  assert tanh["gemm_epilogues"].get("BIAS_GELU") == 2
  assert "BIAS_GELU" not in exact["gemm_epilogues"]
  assert exact["launches_by_kind"]["kLoop"] - tanh["launches_by_kind"]["kLoop"] == 2


def test_sit_forward_for_an_h200_folds_gelu_into_the_matmul(cuda_plugin):
  common = ["--program", "sit", "--model", "SiT-S", "--tokens", "8", "--channels", "4",
            "--batch", "4"]
  epilogue = _line(_kernels(*common))
  formula = _line(_kernels(*common, "--gelu", "float32"))
  depth = 2  # the tiny SiT's blocks
  assert epilogue["gemm_epilogues"].get("BIAS_GELU") == depth
  assert "BIAS_GELU" not in formula["gemm_epilogues"]
  assert formula["launches_by_kind"]["kLoop"] - epilogue["launches_by_kind"]["kLoop"] == depth


# Several GPU compilations (about 40 s of CPU): outside CI's time budget.
@pytest.mark.extended
def test_sampling_loop_counts_every_step(cuda_plugin):
  """The 2- and 3-step pipelines differ by one sampler step inside the compiled loop: exactly
  the GEMMs of one generator forward, compiled on its own."""
  lines = [_line(_kernels("--program", "pipeline", "--model", "tiny", "--batch", "2",
                          "--steps", str(steps))) for steps in (2, 3)]
  forward = _line(_kernels("--program", "sit", "--model", "SiT-XL", "--tokens", "8",
                           "--channels", "8", "--batch", "2"))
  assert lines[0]["latent_shape"] == [8, 8]  # the tiny tokenizer's, as the forward's above
  assert lines[1]["gemm_flops"] - lines[0]["gemm_flops"] == forward["gemm_flops"] > 0
  per_step = lines[1]["launches_by_kind"]["gemm"] - lines[0]["launches_by_kind"]["gemm"]
  assert per_step == forward["launches_by_kind"]["gemm"]


def test_train_step_for_an_h200_and_a_missing_plugin(cuda_plugin):
  line = _line(_kernels("--program", "train", "--model", "SiT-S", "--tokens", "8",
                        "--channels", "4", "--batch", "4"))
  assert line["mesh"] == {"data": 1} and line["compiler_options"] is None
  assert (line["scan"], line["remat"], line["residual_dtype"]) == (False, "none", "float32")
  # Training keeps the GELU in the fc1 matmul: cuBLASLt also writes the pre-activation that
  # the backward pass reads (one per block of the tiny SiT).
  epilogues = line["gemm_epilogues"]
  assert epilogues.get("BIAS_GELU_AUX") == 2 and "BIAS_GELU" not in epilogues
  # Forward and backward matmuls: about 3x the forward FLOPs, which flops_per_item counts.
  assert 0.95 < line["gemm_flops"] / (line["batch"] * line["flops_per_item"]) < 1.15
  missing = _kernels("--program", "encode", with_plugin=False)
  assert missing.returncode != 0 and "jax-cuda12-plugin" in missing.stderr
  bad = _kernels("--program", "encode", "--gpu_target", "no-such-gpu")
  assert bad.returncode != 0 and "neither a file nor a bundled target" in bad.stderr


def test_kernel_flags_belong_to_what_kernels():
  from softvq_jax import bench  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit):
    bench._parse_args(["--what", "tokenizer", "--program", "sit"])  # pylint: disable=protected-access
  with pytest.raises(SystemExit):
    bench._parse_args(["--what", "kernels", "--program", "backward"])  # pylint: disable=protected-access
  args = bench._parse_args(["--what", "kernels", "--program", "sit"])  # pylint: disable=protected-access
  assert (args.program, args.gpu_target, args.model) == ("sit", "h200", "SiT-XL")
  assert bench._nominal_peak("NVIDIA H200 141GB HBM3e", "bfloat16") == 989e12  # pylint: disable=protected-access
  assert bench._nominal_peak("Some Future GPU", "bfloat16") is None  # pylint: disable=protected-access


def test_bundled_gpu_targets_are_complete():
  """Every bundled target gives the estimator what it needs: a memory bandwidth and a device
  name whose published peak is known (else --what kernels asks for --assume_* flags)."""
  import re  # pylint: disable=g-import-not-at-top
  from softvq_jax import bench  # pylint: disable=g-import-not-at-top
  names = bench._bundled_targets()  # pylint: disable=protected-access
  assert {"h100", "h200"} <= set(names)
  for name in names:
    text = (pathlib.Path(bench.GPU_TARGETS_DIR) / f"{name}.txtpb").read_text()
    bandwidth = float(re.search(r"memory_bandwidth:\s*(\d+)", text).group(1))
    kind = re.search(r'device_description_str:\s*"([^"]*)"', text).group(1)
    assert 1e12 < bandwidth < 2e13, name
    assert bench._nominal_peak(kind, "bfloat16"), (name, kind)  # pylint: disable=protected-access
    assert re.search(r"cuda_compute_capability\s*{\s*major:\s*\d", text), name


# Compiles the tokenizer train step of `bench --what kernels` at SoftVQ-B-64's width (768,
# 12 heads, 321 tokens, batch 32) with 2 blocks each side, and counts the (B, T, D) arrays
# XLA laid out batch-minor. "autodiff" swaps in the plain broadcast.
_LAYOUT_SCRIPT = r"""
import re, sys
import jax.numpy as jnp
from softvq_jax import bench, hlo_kernels
from softvq_jax.models import vit
from softvq_jax.models.config import TokenizerConfig
from softvq_jax.models.released import RELEASED_TOKENIZERS

def two_blocks(name, size=0, tiny=False):
  width = dict(embed_dim=768, depth=2, num_heads=12)
  return TokenizerConfig.from_json_dict(dict(RELEASED_TOKENIZERS["softvq-b-64"],
                                             encoder_kwargs=width, decoder_kwargs=dict(width)))

bench._tokenizer_config = two_blocks
if sys.argv[1] == "autodiff":
  vit.broadcast_over_batch = lambda t, b: jnp.broadcast_to(t, (b,) + t.shape[1:])
read = hlo_kernels.kernels
def count_layouts(hlo):
  # Layout normalisation has rewritten batch-minor arrays as (T, D, B) with the default layout.
  print("LAYOUTS", len(re.findall(r"\[321,768,32\]", hlo)), len(re.findall(r"\[32,321,768\]", hlo)))
  return read(hlo)
hlo_kernels.kernels = count_layouts
bench.main("--what kernels --program train --model softvq_b64 --batch 32 --dtype bfloat16".split())
"""


# Several GPU compilations (about 40 s of CPU): outside CI's time budget.
@pytest.mark.extended
def test_learned_position_tables_keep_the_backward_pass_batch_major(cuda_plugin):
  """XLA's GPU layout assignment lays a batch-only reduction's operand out batch-minor, and
  the layout spreads through the residual stream of the backward pass (a transpose after
  each matmul). The position tables' gradients are such reductions under autodiff;
  `broadcast_over_batch` sums pairs of examples first and keeps every (B, T, D) array
  batch-major."""
  counts = {}
  for variant in ("autodiff", "ours"):
    result = run_python(["-c", _LAYOUT_SCRIPT, variant], site=_CUDA)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("LAYOUTS"))
    counts[variant] = tuple(int(n) for n in line.split()[1:])
  batch_minor, batch_major = counts["ours"]
  assert batch_minor == 0 and batch_major > 100
  assert counts["autodiff"][0] > 100  # the compiler behaviour this guards against
