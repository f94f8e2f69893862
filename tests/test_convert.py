"""The user path: released checkpoint files -> convert -> Tokenizer.load, and its failure modes."""

import hashlib
import io
import json
import os
import pickle
import shutil
import sys
import zipfile

import numpy as np
import pytest
from conftest import FIXTURES, rel_err
from safetensors.numpy import load_file, save_file

from softvq_jax import Tokenizer
from softvq_jax.convert.__main__ import main as convert_main
from softvq_jax.convert.core import ConversionError
from softvq_jax.convert.readers import CheckpointFormatError, read_checkpoint
from softvq_jax.models.config import ConfigError

HF = FIXTURES / "softvq_tiny_hf"
TOL = 1e-5


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(FIXTURES / "softvq_tiny.npz"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  out = tmp_path_factory.mktemp("conv") / "softvq_tiny"
  rc = convert_main(["--checkpoint", str(HF / "model.safetensors"), "--config",
                     str(HF / "config.json"), "--out", str(out)])
  assert rc == 0
  return out


@pytest.fixture(scope="module")
def loaded(converted):
  return Tokenizer.load(str(converted))


def _tree_digest(directory):
  digests = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        digests[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return digests


def test_user_path_parity(loaded, ref):
  images = ref["in/images"].transpose(0, 2, 3, 1)
  z = loaded.encode(images)
  assert rel_err(z, ref["out/quant"]) < TOL
  assert rel_err(loaded.decode(z), ref["out/recon"].transpose(0, 2, 3, 1)) < TOL
  assert rel_err(loaded.decode(ref["in/random_latents"]),
                 ref["out/decode_random"].transpose(0, 2, 3, 1)) < TOL


def test_normalize_uses_config_statistics(loaded):
  cfg = json.load(open(HF / "config.json"))
  z = np.linspace(-1, 1, 2 * 16 * 8, dtype=np.float32).reshape(2, 16, 8)
  np.testing.assert_allclose(loaded.normalize(z), (z - cfg["vq_mean"]) / cfg["vq_std"], rtol=1e-6)
  np.testing.assert_allclose(loaded.denormalize(loaded.normalize(z)), z, rtol=1e-5, atol=1e-6)


def test_from_pytorch_equals_load(loaded, ref):
  direct = Tokenizer.from_pytorch(str(HF / "model.safetensors"), str(HF / "config.json"))
  images = ref["in/images"].transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(np.asarray(direct.encode(images)), np.asarray(loaded.encode(images)))


def test_conversion_is_reproducible(converted, tmp_path):
  again = tmp_path / "again"
  assert convert_main(["--checkpoint", str(HF / "model.safetensors"), "--config",
                       str(HF / "config.json"), "--out", str(again)]) == 0
  assert _tree_digest(converted) == _tree_digest(again)
  report = json.load(open(again / "conversion.json"))
  assert report["ignored_tensors"] == ["quantize.codebook_used"]
  assert report["source_sha256"] == hashlib.sha256(
      (HF / "model.safetensors").read_bytes()).hexdigest()


def test_existing_output_is_never_overwritten(tmp_path, capsys):
  out = tmp_path / "mine"
  out.mkdir()
  (out / "notes.txt").write_text("user data")
  args = ["--checkpoint", str(HF / "model.safetensors"), "--config", str(HF / "config.json"),
          "--out", str(out)]
  assert convert_main(args) == 2
  assert "already exists" in capsys.readouterr().err
  assert (out / "notes.txt").read_text() == "user data"
  # --overwrite replaces an earlier output only, never a folder holding other files (such
  # as the checkpoint being converted).
  assert convert_main(args + ["--overwrite"]) == 2
  assert "refusing to overwrite" in capsys.readouterr().err
  assert (out / "notes.txt").read_text() == "user data"
  (out / "notes.txt").unlink()
  # Nor a folder holding a config.json alone: the writer's outputs always have params/.
  (out / "config.json").write_text('{"mine": true}')
  assert convert_main(args + ["--overwrite"]) == 2
  assert "did not make (config.json)" in capsys.readouterr().err
  assert (out / "config.json").read_text() == '{"mine": true}'
  (out / "config.json").unlink()
  out.rmdir()
  # Nor a file of that name (it had been replaced, and left behind as a hidden backup).
  out.write_text("user file")
  assert convert_main(args + ["--overwrite"]) == 2
  assert "it is a file" in capsys.readouterr().err
  assert out.read_text() == "user file" and sorted(os.listdir(tmp_path)) == ["mine"]
  out.unlink()
  assert convert_main(args) == 0
  assert convert_main(args + ["--overwrite"]) == 0
  assert (out / "config.json").exists() and (out / "conversion.json").exists()
  # A JSON of the user's in an earlier output is theirs too, not the writer's.
  (out / "my_eval_results.json").write_text("{}")
  assert convert_main(args + ["--overwrite"]) == 2
  assert "my_eval_results.json" in capsys.readouterr().err
  assert (out / "my_eval_results.json").read_text() == "{}"
  (out / "my_eval_results.json").unlink()
  # No temporary directories are left next to the output.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def _write_variant(tmp_path, mutate):
  state = load_file(str(HF / "model.safetensors"))
  mutate(state)
  path = tmp_path / "model.safetensors"
  save_file(state, str(path))
  return path


def _convert_error(tmp_path, mutate):
  path = _write_variant(tmp_path, mutate)
  with pytest.raises(ConversionError) as info:
    Tokenizer.from_pytorch(str(path), str(HF / "config.json"))
  return str(info.value)


def test_missing_tensor_is_named(tmp_path):
  msg = _convert_error(tmp_path, lambda s: s.pop("decoder.model.blocks.1.mlp.fc2.weight"))
  assert "missing tensor for decoder.model.blocks.1.mlp.fc2.kernel" in msg


def test_extra_tensor_is_named(tmp_path):
  def add(s):
    s["encoder.model.blocks.7.attn.qkv.weight"] = np.zeros((576, 192), np.float32)
    s["something.else"] = np.zeros((3,), np.float32)
  msg = _convert_error(tmp_path, add)
  assert "encoder.model.blocks.7.attn.qkv.weight" in msg and "something.else" in msg
  assert "2 problem(s)" in msg


def test_misshaped_tensor_is_named(tmp_path):
  def shrink(s):
    s["quant_conv.weight"] = s["quant_conv.weight"][:, :10]
  msg = _convert_error(tmp_path, shrink)
  assert "mis-shaped tensor quant_conv.weight" in msg


def test_non_finite_weights_are_named(tmp_path):
  def damage(s):
    s["quant_conv.weight"] = s["quant_conv.weight"].copy()
    s["quant_conv.weight"][0, :3] = [np.nan, np.inf, -np.inf]
  msg = _convert_error(tmp_path, damage)
  assert "quant_conv.weight holds 3 non-finite value(s) (NaN or inf)" in msg


def test_all_problems_reported_together(tmp_path):
  def break_many(s):
    s.pop("encoder.model.norm.bias")
    s["extra.weight"] = np.zeros((2,), np.float32)
    s["post_quant_conv.bias"] = np.zeros((5,), np.float32)
  msg = _convert_error(tmp_path, break_many)
  assert "3 problem(s)" in msg
  for needle in ("encoder.model.norm.bias", "extra.weight", "post_quant_conv.bias"):
    assert needle in msg


def test_prefixed_and_wrapped_torch_checkpoint(tmp_path, ref):
  torch = pytest.importorskip("torch", reason="torch is needed to write a .pt file to read")
  import argparse
  state = load_file(str(HF / "model.safetensors"))
  ema = {f"module._orig_mod.{k}": torch.from_numpy(v.copy()) for k, v in state.items()}
  model = {f"module.{k}": torch.zeros_like(torch.from_numpy(v)) for k, v in state.items()}
  path = tmp_path / "ckpt.pt"
  torch.save({"model": model, "ema": ema, "steps": 10, "args": argparse.Namespace(lr=1e-4)}, path)
  read = read_checkpoint(str(path))
  assert set(read) == set(state)
  for k in state:
    np.testing.assert_array_equal(read[k], state[k])
  images = ref["in/images"].transpose(0, 2, 3, 1)
  tok = Tokenizer.from_pytorch(str(path), str(HF / "config.json"))
  assert rel_err(tok.encode(images), ref["out/quant"]) < TOL
  # Asking for the non-EMA weights gives the (zero) model entry.
  assert not np.any(read_checkpoint(str(path), weights="model")["quant_conv.weight"])
  # A plain state dict has nothing to choose between: the choice is refused, not ignored.
  for weights in ("ema", "model"):
    with pytest.raises(CheckpointFormatError, match="one set of weights"):
      read_checkpoint(str(HF / "model.safetensors"), weights=weights)


def test_torch_bfloat16_and_strided_tensors(tmp_path):
  torch = pytest.importorskip("torch", reason="torch is needed to write a .pt file to read")
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  tensors = {"t": base.t(), "bf16": base.to(torch.bfloat16), "view": base[1:3, ::2],
             "half": base.half(), "scalar": torch.tensor(3.5)}
  path = tmp_path / "x.bin"
  torch.save(tensors, path)
  read = read_checkpoint(str(path))
  for k, v in tensors.items():
    np.testing.assert_array_equal(read[k].astype(np.float32), v.float().numpy())


def test_pickled_code_is_never_executed(tmp_path):
  marker = tmp_path / "pwned"

  class Exploit:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({"model": Exploit()}))
  path = tmp_path / "evil.pt"
  path.write_bytes(buf.getvalue())
  with pytest.raises(CheckpointFormatError):
    read_checkpoint(str(path))
  assert not marker.exists()


def _crafted_torch_zip(path, *, size=(4,), stride=(1,), offset=0, storage_bytes=None,
                      pid_arity=5, pickle_bytes=None):
  """A torch.save-shaped zip whose one tensor "w" is built from the given view arguments,
  written without torch (the reader must judge what any file says, not what torch writes)."""
  import collections  # pylint: disable=g-import-not-at-top

  class Storage:
    pass

  def rebuild(*args):
    del args
  rebuild.__module__, rebuild.__qualname__ = "torch._utils", "_rebuild_tensor_v2"

  class FloatStorage:
    pass
  FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"

  class Tensor:
    def __reduce_ex__(self, protocol):
      return (rebuild, (Storage(), offset, size, stride, False, collections.OrderedDict()))

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, Storage):
        return ("storage", FloatStorage, "0", "cpu", 4)[:pid_arity]
      return None

  import types  # pylint: disable=g-import-not-at-top
  fakes = {"torch": types.ModuleType("torch"), "torch._utils": types.ModuleType("torch._utils")}
  fakes["torch"].FloatStorage = FloatStorage
  fakes["torch._utils"]._rebuild_tensor_v2 = rebuild  # pylint: disable=protected-access
  saved = {name: sys.modules.get(name) for name in fakes}
  sys.modules.update(fakes)
  try:
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"w": Tensor()})
  finally:
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name)
      else:
        sys.modules[name] = module
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", buf.getvalue() if pickle_bytes is None else pickle_bytes)
    zf.writestr("archive/data/0", np.arange(4, dtype=np.float32).tobytes()
                if storage_bytes is None else storage_bytes)
  return str(path)


@pytest.mark.parametrize("view,expected", [
    (dict(), None),  # the well-formed file: read as written
    (dict(size=(2,), stride=(2,), offset=1), None),
    (dict(size=(64,), stride=(-1,)), r"stride \(-1,\) is negative"),
    (dict(size=(4,), stride=(-100000000,)), "is negative"),
    (dict(offset=-5), r"storage offset -5 is not an integer >= 0"),
    (dict(size=(100000, 100000), stride=(0, 0)), "more elements than its storage"),
    (dict(size=(2, 2), stride=(1,)), "differ in length"),
    (dict(size="abc", stride=(1,)), "is not a sequence of integers"),
    (dict(size=(5,)), "runs past its storage"),
    (dict(storage_bytes=b"\0" * 15), "15 bytes, not a whole number of float32 elements"),
    (dict(pid_arity=2), "unsupported persistent id"),
    (dict(pickle_bytes=b"\x80\x02}q\x00X\x01"), "truncated or corrupt checkpoint"),
])
def test_a_crafted_torch_file_is_refused_by_name_not_read_past(tmp_path, view, expected):
  """The view a file names must lie inside the bytes it holds: negative strides or offsets
  would read memory outside them, and overlapping views could ask for any amount."""
  path = _crafted_torch_zip(tmp_path / "w.pt", **view)
  if expected is None:
    size, stride, offset = view.get("size", (4,)), view.get("stride", (1,)), view.get("offset", 0)
    np.testing.assert_array_equal(
        read_checkpoint(path)["w"],
        np.lib.stride_tricks.as_strided(np.arange(4, dtype=np.float32)[offset:], size,
                                        tuple(4 * st for st in stride)))
    return
  with pytest.raises(CheckpointFormatError, match=expected):
    read_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
  bad = tmp_path / "model.safetensors"
  bad.write_bytes(b"not a safetensors file")
  with pytest.raises(CheckpointFormatError):
    read_checkpoint(str(bad))
  garbage = tmp_path / "model.pt"
  garbage.write_bytes(b"\x80\x02}q\x00.")
  with pytest.raises(CheckpointFormatError, match="not a PyTorch checkpoint"):
    read_checkpoint(str(garbage))
  with pytest.raises(FileNotFoundError):
    read_checkpoint(str(tmp_path / "absent.safetensors"))


def test_load_rejects_a_directory_that_does_not_match(converted, tmp_path):
  import shutil
  bad = tmp_path / "bad"
  shutil.copytree(converted, bad)
  cfg = json.load(open(bad / "config.json"))
  cfg["decoder_kwargs"]["depth"] = 3
  json.dump(cfg, open(bad / "config.json", "w"))
  with pytest.raises(ValueError, match="missing parameter decoder.model.blocks.2"):
    Tokenizer.load(str(bad))
  hollow = tmp_path / "hollow"  # a params/ folder with no Orbax checkpoint in it
  shutil.copytree(converted, hollow)
  shutil.rmtree(hollow / "params")
  (hollow / "params").mkdir()
  with pytest.raises(ValueError, match="params holds no Orbax checkpoint metadata"):
    Tokenizer.load(str(hollow))


@pytest.mark.parametrize("change, needle", [
    ({"encoder_model": "vit_huge_patch14_clip"}, "unknown encoder_model 'vit_huge_patch14_clip'"),
    ({"encoder_model": "vit_base_patch14_dinov2_movqv2"}, "MoVQ blocks exist only in decoders"),
    ({"use_rope": True}, "use_rope=True"),
    ({"enc_type": "cnn"}, "enc_type='cnn'"),
    ({"to_pixel": "identity"}, "to_pixel='identity' decodes to tokens"),
    ({"to_pixel": "convtranspose"}, "to_pixel must be one of"),
    ({"num_latent_tokens": 18}, "not divisible by num_codebooks"),
    ({"image_size": 72}, "not a multiple of the encoder patch size"),
    ({"encoder_kwargs": {"width": 3}}, "unsupported keys ['width']"),
])
def test_bad_config_is_named(change, needle):
  cfg = json.load(open(HF / "config.json"))
  cfg.update(change)
  with pytest.raises(ConfigError) as info:
    Tokenizer.from_pytorch(str(HF / "model.safetensors"), cfg)
  assert needle in str(info.value)


def test_config_without_enc_type_is_rejected():
  cfg = json.load(open(HF / "config.json"))
  del cfg["enc_type"]
  with pytest.raises(ConfigError, match="enc_type is missing"):
    Tokenizer.from_pytorch(str(HF / "model.safetensors"), cfg)


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
  cfg = json.load(open(HF / "config.json"))
  cfg["encoder_model"] = "resnet50"
  cfg_path = tmp_path / "config.json"
  cfg_path.write_text(json.dumps(cfg))
  rc = convert_main(["--checkpoint", str(HF / "model.safetensors"), "--config", str(cfg_path),
                     "--out", str(tmp_path / "out")])
  assert rc == 2
  assert "unknown encoder_model 'resnet50'" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["sit", "dit"])
def test_generator_cli_user_path(kind, tmp_path):
  from softvq_jax import Generator
  hf = FIXTURES / f"{kind}_tiny_hf"
  ref = np.load(FIXTURES / f"{kind}_tiny.npz")
  out = tmp_path / kind
  assert convert_main(["--kind", kind, "--checkpoint", str(hf / "model.safetensors"), "--config",
                       str(hf / "config.json"), "--out", str(out)]) == 0
  gen = Generator.load(str(out))
  assert gen.kind == kind
  x, t, y = ref["in/x"], ref["in/t"], ref["in/y"]
  expected = ref["out/forward"]
  assert rel_err(gen(x, t, y), expected) < TOL
  assert json.load(open(out / "conversion.json"))["kind"] == kind


def _write_legacy_torch_file(path, state: dict, monkeypatch) -> None:
  """torch.save's pre-1.6 format, written here without torch: magic, protocol and system
  pickles, the object graph (storages as persistent ids, tensors rebuilt by
  torch._utils._rebuild_tensor_v2), the storage keys, then each storage as an int64 element
  count and its bytes. Stand-in ``torch`` modules give pickle the globals to name."""
  import collections
  import pickle
  import types
  torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")
  kinds = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
           np.dtype(np.int64): "LongStorage"}
  for kind in kinds.values():
    setattr(torch_mod, kind, type(kind, (), {"__module__": "torch", "__qualname__": kind}))
  def _rebuild_tensor_v2(*args):
    del args
  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
  torch_mod._utils = utils_mod
  monkeypatch.setitem(sys.modules, "torch", torch_mod)
  monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)

  class Storage:
    def __init__(self, key, data, view=None):
      self.key, self.data, self.view = key, data, view

  class Tensor:
    def __init__(self, storage, offset, shape, strides):
      self.args = (storage, offset, shape, strides)

    def __reduce_ex__(self, protocol):
      return (_rebuild_tensor_v2, self.args + (False, collections.OrderedDict()))

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, Storage):
        kind = getattr(torch_mod, kinds[obj.data.dtype])
        return ("storage", kind, obj.key, "cpu", obj.data.size, obj.view)
      return None

  graph, storages = collections.OrderedDict(), {}
  for i, (name, value) in enumerate(state.items()):
    if name == "view":  # elements 3..8 of the first storage, as a storage view
      root = storages["0"]
      graph[name] = Tensor(Storage("0", root.data, view=("v", 3, 6)), 0, (2, 3), (3, 1))
      continue
    value = np.ascontiguousarray(value)
    storages[str(i)] = Storage(str(i), value.reshape(-1))
    strides = tuple(st // value.itemsize for st in value.strides)
    graph[name] = Tensor(storages[str(i)], 0, value.shape, strides)
  with open(path, "wb") as f:
    for header in (0x1950A86A20F9469CFC6C, 1001,
                   {"protocol_version": 1001, "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 4}}):
      pickle.dump(header, f, protocol=2)
    Pickler(f, protocol=2).dump({"model": graph, "steps": 3})
    pickle.dump(sorted(storages), f, protocol=2)
    for key in sorted(storages):
      data = storages[key].data
      f.write(np.int64(data.size).tobytes())
      f.write(data.tobytes())


def test_legacy_torch_files_are_read_without_running_code(tmp_path, monkeypatch):
  """The pre-1.6 torch.save format (e.g. pytorch-fid's 2019 Inception weights)."""
  rng = np.random.default_rng(0)
  state = {"fc.weight": rng.normal(size=(6, 12)).astype(np.float32),
           "fc.bias": rng.normal(size=6).astype(np.float16),
           "steps": np.arange(4, dtype=np.int64), "view": None}
  path = str(tmp_path / "legacy.pth")
  with monkeypatch.context() as patch:
    _write_legacy_torch_file(path, state, patch)
  got = read_checkpoint(path, weights="model")
  for name in ("fc.weight", "fc.bias", "steps"):
    np.testing.assert_array_equal(got[name], state[name])
    assert got[name].dtype == state[name].dtype
  np.testing.assert_array_equal(got["view"], state["fc.weight"].reshape(-1)[3:9].reshape(2, 3))
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(open(path, "rb").read()[:-10])
  with pytest.raises(CheckpointFormatError, match="truncated"):
    read_checkpoint(str(truncated), weights="model")


@pytest.mark.parametrize("field,value,match", [
    # bool("false") is True: read as a boolean, the string would flip the setting.
    ("codebook_l2_norm", "false", "codebook_l2_norm must be true or false, got 'false'"),
    ("dec_cls_token", "false", "dec_cls_token must be true or false"),
    ("use_ape", 1, "use_ape must be true or false, got 1"),
    ("tau", "abc", "tau must be a finite number, got 'abc'"),
    ("vq_mean", None, "vq_mean must be a finite number, got None"),
    ("vq_std", float("inf"), "vq_std must be a finite number, got inf"),
    ("rope_theta", [10], r"rope_theta must be a finite number, got \[10\]"),
])
def test_tokenizer_config_values_of_the_wrong_type_are_named(field, value, match):
  from softvq_jax.models.config import TokenizerConfig  # pylint: disable=g-import-not-at-top
  config = json.loads((HF / "config.json").read_text())
  with pytest.raises(ConfigError, match=match):
    TokenizerConfig.from_json_dict(dict(config, **{field: value}))


def test_the_near_miss_list_is_what_the_config_reader_reads():
  """The typo warning compares keys with a hand-written list of the fields read: it must be
  the set of keys from_json_dict looks up, recorded here over every release's config."""
  from collections.abc import Mapping  # pylint: disable=g-import-not-at-top
  from softvq_jax.models import config as config_lib  # pylint: disable=g-import-not-at-top
  from softvq_jax.models.released import RELEASED_MAETOK, RELEASED_TOKENIZERS  # pylint: disable=g-import-not-at-top

  class Recording(Mapping):
    def __init__(self, fields):
      self.fields, self.read = fields, set()
    def __getitem__(self, key):
      self.read.add(key)
      return self.fields[key]
    def __contains__(self, key):
      self.read.add(key)
      return key in self.fields
    def get(self, key, default=None):
      self.read.add(key)
      return self.fields.get(key, default)
    def __iter__(self):  # the warning's own walk over every key is no read
      return iter(self.fields)
    def __len__(self):
      return len(self.fields)

  read = set()
  for fields in [*RELEASED_TOKENIZERS.values(), *RELEASED_MAETOK.values()]:
    recording = Recording(fields)
    config_lib.TokenizerConfig.from_json_dict(recording)
    read |= recording.read
  assert read == set(config_lib._READ_FIELDS)  # pylint: disable=protected-access


def test_a_misspelt_tokenizer_config_field_is_warned_of(caplog):
  """Released configs carry many keys that are not read, so only a near miss of a field that
  is read, and absent, is worth a warning: its default is used in its place."""
  from softvq_jax.models.config import TokenizerConfig  # pylint: disable=g-import-not-at-top
  config = json.loads((HF / "config.json").read_text())
  config["vq_men"] = config.pop("vq_mean", 0.5)
  with caplog.at_level("WARNING"):
    parsed = TokenizerConfig.from_json_dict(config)
  assert parsed.vq_mean == 0.0
  assert "field 'vq_men' is not read (did you mean 'vq_mean'?" in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING"):
    TokenizerConfig.from_json_dict(json.loads((HF / "config.json").read_text()))
  assert "is not read" not in caplog.text  # the released config's own keys: no warning


def test_a_directory_of_the_other_family_or_a_binary_config_is_named(tmp_path):
  from softvq_jax import Generator, GeneratorConfig  # pylint: disable=g-import-not-at-top
  from softvq_jax.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from softvq_jax.config_lib import TINY_VIT  # pylint: disable=g-import-not-at-top
  from softvq_jax.models.released import RELEASED_TOKENIZERS  # pylint: disable=g-import-not-at-top
  tok_dir, gen_dir = tmp_path / "tok", tmp_path / "gen"
  Tokenizer.random(dict(RELEASED_TOKENIZERS["softvq-b-64"], image_size=32, num_latent_tokens=8,
                        encoder_kwargs=TINY_VIT, decoder_kwargs=TINY_VIT)).save(str(tok_dir))
  Generator.random(GeneratorConfig(kind="sit", input_size=8, in_channels=4, hidden_size=32,
                                   depth=1, num_heads=2, num_classes=4)).save(str(gen_dir))
  with pytest.raises(CheckpointError, match="holds a generator, not a tokenizer: load it with "
                                            "Generator.load"):
    Tokenizer.load(str(gen_dir))
  with pytest.raises(CheckpointError, match="holds a tokenizer, not a generator: load it with "
                                            "Tokenizer.load"):
    Generator.load(str(tok_dir))
  # A tokenizer config that lost its encoder_model is still a tokenizer's: the missing field
  # is named, not the other family.
  config = json.loads((tok_dir / "config.json").read_text())
  (tok_dir / "config.json").write_text(json.dumps(
      {k: v for k, v in config.items() if k != "encoder_model"}))
  with pytest.raises(ConfigError, match=r"tokenizer config is missing required fields "
                                        r"\['encoder_model'\]"):
    Tokenizer.load(str(tok_dir))
  (tok_dir / "config.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
  with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
    Tokenizer.load(str(tok_dir))
  assert convert_main(["--checkpoint", str(HF / "model.safetensors"), "--config",
                       str(tok_dir / "config.json"), "--out", str(tmp_path / "out")]) == 2
  # A folder where a file is expected is said to be one (not "does not exist").
  from softvq_jax.convert.readers import read_checkpoint  # pylint: disable=g-import-not-at-top
  with pytest.raises(FileNotFoundError, match="is a folder; name the checkpoint file in it"):
    read_checkpoint(str(tmp_path))


def test_a_damaged_parameter_folder_is_named(tmp_path):
  from softvq_jax.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from softvq_jax.config_lib import TINY_VIT  # pylint: disable=g-import-not-at-top
  from softvq_jax.models.released import RELEASED_TOKENIZERS  # pylint: disable=g-import-not-at-top
  good = tmp_path / "tok"
  Tokenizer.random(dict(RELEASED_TOKENIZERS["softvq-b-64"], image_size=32, num_latent_tokens=8,
                        encoder_kwargs=TINY_VIT, decoder_kwargs=TINY_VIT)).save(str(good))
  missing, garbled = tmp_path / "missing", tmp_path / "garbled"
  shutil.copytree(good, missing)
  shutil.rmtree(missing / "params" / "decoder.mask_token")
  with pytest.raises(CheckpointError, match="is incomplete: the folders of decoder.mask_token "
                                            "are missing"):
    Tokenizer.load(str(missing))
  shutil.copytree(good, garbled)
  chunks = [p for p in (garbled / "params" / "decoder.latent_pos_embed").rglob("*")
            if p.is_file() and p.name[0].isdigit()]
  assert chunks
  for chunk in chunks:
    chunk.write_bytes(b"garbage" * 10)
  with pytest.raises(CheckpointError, match="reading the parameters failed, its files are damaged"):
    Tokenizer.load(str(garbled))
