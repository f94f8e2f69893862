"""Configs build the architectures they name; the main job runs end to end."""

import importlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from softvq_jax.config_lib import parse_arg
from softvq_jax.models.config import TokenizerConfig
from softvq_jax.models.released import RELEASED_TOKENIZERS

ROOT = pathlib.Path(__file__).parent.parent
TOKENIZER_CONFIGS = {
    "softvq_b64": "softvq-b-64", "softvq_bl64": "softvq-bl-64", "softvq_l64": "softvq-l-64",
    "softvq_b32": "softvq-b-32", "softvq_bl32": "softvq-bl-32", "softvq_l32": "softvq-l-32",
    "softvq_bl64_512": "softvq-bl-64-512", "softvq_l32_512": "softvq-l-32-512",
}


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert f"configs/{name}.py" in module.__doc__  # the docstring holds the command
  return module.get_config(arg)


@pytest.mark.parametrize("name", sorted(TOKENIZER_CONFIGS))
def test_tokenizer_configs_match_the_releases(name):
  config = load_config(name)
  release = RELEASED_TOKENIZERS[TOKENIZER_CONFIGS[name]]
  built = TokenizerConfig.from_json_dict(config.model.to_dict())
  assert built == TokenizerConfig.from_json_dict(dict(release, entropy_loss_ratio=0.01))
  # The reference recipe, including its quirk of Adam without weight decay.
  assert (config.optim.name, config.optim.lr, config.optim.b2) == ("adam", 1e-4, 0.95)
  assert config.optim.weight_decay == 0.0 and config.global_batch_size == 256
  assert config.loss.disc_start == 20_000 and config.loss.disc_weight == 0.2
  assert config.dtype == "bfloat16"  # the reference trains under bf16 autocast
  local = load_config(name, "runlocal")
  assert local.dtype == "float32"
  tiny = TokenizerConfig.from_json_dict(local.model.to_dict())
  assert tiny.image_size == 64 and tiny.encoder.embed_dim == 64
  assert local.data.dataset == "offline"


def test_parse_arg():
  args = parse_arg("runlocal,steps=5,name=x", runlocal=False, steps=1, name="")
  assert (args.runlocal, args.steps, args.name) == (True, 5, "x")
  with pytest.raises(ValueError, match="unknown config argument 'stpes'"):
    parse_arg("stpes=3", steps=1)
  with pytest.raises(ValueError, match="not a boolean"):
    parse_arg("runlocal=maybe", runlocal=False)
  with pytest.raises(ValueError, match="num_samples='5k' is not an integer"):
    parse_arg("num_samples=5k", num_samples=1)


def test_reconstruct_job(tmp_path):
  workdir = tmp_path / "qs"
  proc = subprocess.run(
      [sys.executable, "-m", "softvq_jax.main", "--config=configs/reconstruct.py",
       f"--workdir={workdir}", "--config.batch_size=3"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "RANDOMLY INITIALISED" in proc.stderr
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics["num_images"] == 8 and metrics["random_weights"]
  grid = np.asarray(Image.open(workdir / "reconstructions.png"))
  assert grid.shape == (2 * 66 + 2, 8 * 66 + 2, 3)
  latents = np.load(workdir / "latents.npz")
  assert latents["latents"].shape == (8, 16, 32)


def test_reconstruct_perplexity_covers_the_whole_set(tmp_path):
  """The codebook perplexity of the job is that of all its images' mean assignment, as the
  model's own statistic over one batch of all of them, whatever the job's batch size."""
  from softvq_jax.convert.__main__ import main as convert_main  # pylint: disable=g-import-not-at-top
  from softvq_jax.eval import reconstruct  # pylint: disable=g-import-not-at-top
  hf = ROOT / "tests" / "fixtures" / "softvq_tiny_hf"  # trained-like: peaked assignments
  assert convert_main(["--checkpoint", str(hf / "model.safetensors"), "--config",
                       str(hf / "config.json"), "--out", str(tmp_path / "tok")]) == 0
  config = load_config("reconstruct", None)
  config.tokenizer_dir = str(tmp_path / "tok")
  got = {}
  for batch in (1, 3):
    config.batch_size = batch
    got[batch] = reconstruct.run(config, str(tmp_path / str(batch)))["codebook_perplexity"]
  tok = reconstruct.load_tokenizer(config)
  images, _ = reconstruct.load_images(config, tok.image_size)
  _, info = tok.encode(images, return_info=True)
  np.testing.assert_allclose(got[1], np.asarray(info["perplexity"]), rtol=1e-4)
  np.testing.assert_allclose(got[3], got[1], rtol=1e-6)


def test_reconstruct_checks_what_its_arguments_say_of_the_tokenizer_dir(tmp_path):
  from softvq_jax.eval import reconstruct  # pylint: disable=g-import-not-at-top
  from softvq_jax import Tokenizer  # pylint: disable=g-import-not-at-top
  tok = Tokenizer.random(load_config("reconstruct", None).model.to_dict(), seed=0)
  tok.save(str(tmp_path / "tok"))  # 64x64, 16 tokens
  for arg, message in (("released=softvq-b-64", "is not softvq-b-64: its image_size, encoder, "
                                                "decoder, num_latent_tokens, codebook_size differ"),
                       ("image_size=128", "image_size=128, but .* holds a 64x64 tokenizer")):
    config = load_config("reconstruct", arg)
    config.tokenizer_dir = str(tmp_path / "tok")
    with pytest.raises(ValueError, match=message):
      reconstruct.run(config, str(tmp_path / "out"))
  config = load_config("reconstruct", "image_size=64")
  config.tokenizer_dir = str(tmp_path / "tok")
  config.batch_size = 0
  with pytest.raises(ValueError, match="batch_size=0 must be an integer >= 1"):
    reconstruct.run(config, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def _run_main(*flags: str, timeout: int = 120) -> subprocess.CompletedProcess:
  """``python -m softvq_jax.main FLAGS`` from the repository root, its output captured."""
  return subprocess.run([sys.executable, "-m", "softvq_jax.main", *flags], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def test_main_rejects_unknown_trainer(tmp_path):
  proc = _run_main("--config=configs/reconstruct.py", f"--workdir={tmp_path}",
                   "--config.trainer=nope")
  assert proc.returncode != 0
  assert "config.trainer='nope' is not available" in proc.stderr


@pytest.mark.parametrize("config,override,expected", [
    ("configs/softvq_b64.py:runlocal", "--config.optim.learning_rate=1",
     "--config.optim.learning_rate: optim has no field 'learning_rate'; its fields: b1, b2"),
    ("configs/sit_xl_softvq_b64.py:runlocal", "--config.dat.source=folder",
     "--config.dat.source: the config has no field 'dat'; its fields:"),
    ("configs/softvq_b64.py", "--config.optim.lr.value=1", "optim.lr is a value, not a section"),
])
def test_an_override_of_no_config_field_is_named_without_a_traceback(
    tmp_path, config, override, expected):
  proc = _run_main(f"--config={config}", f"--workdir={tmp_path}", override)
  assert proc.returncode != 0
  assert expected in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_a_workdir_that_is_a_file_is_named_and_kept(tmp_path):
  mine = tmp_path / "notes.txt"
  mine.write_text("mine")
  proc = _run_main("--config=configs/reconstruct.py", f"--workdir={mine}")
  assert proc.returncode != 0 and f"--workdir={mine} is a file; name a folder" in proc.stderr
  assert "Traceback" not in proc.stderr and mine.read_text() == "mine"


def test_a_config_file_that_does_not_exist_is_named_without_a_traceback(tmp_path):
  proc = _run_main("--config=configs/no_such_config.py", f"--workdir={tmp_path}")
  assert proc.returncode != 0
  assert "No such file or directory: 'configs/no_such_config.py'" in proc.stderr
  assert "Traceback" not in proc.stderr


SAMPLE_SIT_RUNLOCAL = "configs/sample_sit_xl_softvq_b64.py:runlocal"


@pytest.mark.parametrize("override,expected", [
    # A job's own check of its config, and a check of the API it calls, named by section.
    ("--config.num_samples=0", "FATAL JobError: invalid config: num_samples=0 must be an integer"),
    ("--config.sampler.cfg_scale=0.5",
     "FATAL JobError: config.sampler: cfg_scale must be a finite number >= 1"),
])
def test_a_job_that_refuses_its_settings_says_why_without_a_traceback(tmp_path, override,
                                                                      expected):
  proc = _run_main(f"--config={SAMPLE_SIT_RUNLOCAL}", f"--workdir={tmp_path / 'run'}", override,
                   timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert expected in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "run" / "sampling.json").exists()


def test_a_refusal_on_the_workdirs_contents_is_named_without_a_traceback(tmp_path):
  """Outputs the job did not make (FileExistsError) are refused alike; the user's file stays."""
  (tmp_path / "samples.npz").write_bytes(b"mine")
  proc = _run_main(f"--config={SAMPLE_SIT_RUNLOCAL}", f"--workdir={tmp_path}", timeout=300)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "FATAL FileExistsError: " in proc.stderr and "but no sampling.json" in proc.stderr
  assert (tmp_path / "samples.npz").read_bytes() == b"mine"


def test_a_bad_config_file_argument_is_named_without_a_traceback(tmp_path):
  proc = _run_main("--config=configs/eval_gen.py:bogus=1", f"--workdir={tmp_path}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "--config: unknown config argument 'bogus'; known: ['logits_weight'" in proc.stderr


def test_only_errors_written_by_a_job_count_as_refusals():
  from softvq_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  from softvq_jax.utils.errors import JobError, UnreadableDataError  # pylint: disable=g-import-not-at-top
  assert main_lib.is_refusal(JobError("config.x must be ..."))
  assert main_lib.is_refusal(UnreadableDataError("12 images could not be decoded"))
  assert main_lib.is_refusal(FileNotFoundError("image folder /x does not exist"))
  assert main_lib.is_refusal(IsADirectoryError("reference /x is a folder"))
  # The system's own errors (they carry an errno) and everything else keep their traceback.
  assert not main_lib.is_refusal(FileNotFoundError(2, "No such file or directory", "/x"))
  assert not main_lib.is_refusal(OSError(5, "Input/output error"))
  assert not main_lib.is_refusal(ValueError("a bug's message"))
  assert not main_lib.is_refusal(RuntimeError("a bug's message"))


def test_a_missing_data_folder_is_named_without_a_traceback(tmp_path):
  missing = tmp_path / "no_such_images"
  proc = _run_main("--config=configs/softvq_b64.py:runlocal", f"--workdir={tmp_path / 'run'}",
                   "--config.data.source=folder", f"--config.data.kwargs.root={missing}",
                   timeout=300)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert f"FATAL FileNotFoundError: image folder {missing} does not exist" in proc.stderr


@pytest.mark.parametrize("config,overrides", [
    ("configs/sit_xl_softvq_b64.py:runlocal",
     ['--config.mesh=(("data",2),("fsdp",4))', "--config.data.source=synthetic",
      "--config.data.num_examples=16", "--config.eval_data.source=skimage",
      "--config.eval_data.kwargs.num_examples=8"]),
    ("configs/softvq_b64.py:runlocal",
     ["--config.data.source=folder", "--config.data.kwargs.root=/images",
      "--config.disc_optim.lr=1e-4"]),
    ("configs/softvq_b64.py", ['--config.mesh=(("data",-1),("fsdp",8))']),
])
def test_documented_settings_can_be_set_by_flag(tmp_path, config, overrides):
  """Fields the README and error messages tell users to set exist in the (shrunk) configs:
  ml_collections refuses flags for undeclared fields and for list-valued ones."""
  proc = subprocess.run(
      [sys.executable, "-m", "softvq_jax.main", f"--config={config}", f"--workdir={tmp_path}",
       *overrides, "--config.trainer=nope"],  # stops right after the flags are read
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert "config.trainer='nope' is not available" in proc.stderr, proc.stderr[-2000:]


def test_package_import_does_not_load_tensorflow():
  code = ("import sys, numpy as np, softvq_jax; from softvq_jax import Tokenizer;"
          "import softvq_jax.convert.__main__;"
          "print('tensorflow' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
  assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("name, release", [("maetok_b128", "maetok-b-128"),
                                           ("maetok_b128_512", "maetok-b-128-512")])
def test_maetok_configs(name, release):
  from softvq_jax.models.released import RELEASED_MAETOK
  config = load_config(name)
  built = TokenizerConfig.from_json_dict(config.model.to_dict())
  assert built == TokenizerConfig.from_json_dict(RELEASED_MAETOK[release])
  assert built.use_rope and built.decoder.movq and built.bottleneck == "ae"
  assert config.global_batch_size == 512 and config.loss.disc_start == 30_000
  size = built.image_size  # the data pipeline's crop follows the model (512 for -512)
  assert (config.data.image_size, config.data.min_resize, config.data.max_resize) == (
      size, size, size * 5 // 4)
  local = TokenizerConfig.from_json_dict(load_config(name, "runlocal").model.to_dict())
  assert local.image_size == 64 and local.use_rope
  # MAETok's mask modeling is not implemented: its settings are refused, by name, rather
  # than silently trained without.
  from softvq_jax.train.tokenizer_trainer import check_recipe_config  # pylint: disable=g-import-not-at-top
  check_recipe_config(config)
  for key, value in (("mask_ratio_max", 0.6), ("decoder_drop_path", 0.05),
                     ("aux_targets", ("hog",))):
    upstream = load_config(name)
    setattr(upstream, key, value)
    with pytest.raises(ValueError, match=f"{key}=.*mask modeling .* not implemented"):
      check_recipe_config(upstream)


STAGES = ("1_tokenizer", "2_reconstruct", "3_latents", "4_sit", "5_samples")


def test_quickstart_pipeline_end_to_end(tmp_path):
  """README command one, shrunk: every stage runs and leaves its files; a rerun resumes."""
  workdir = tmp_path / "quickstart"
  # A relative workdir, as in the README's command.
  cmd = [sys.executable, "-m", "softvq_jax.main",
         f"--config={ROOT}/configs/quickstart.py:tokenizer_steps=4,sit_steps=4", "--workdir=quickstart",
         "--config.cache_examples=128", "--config.heldout_images=32",
         "--config.sample.per_class=1", "--config.sample.num_steps=2",
         "--config.tokenizer.vis_every=2", "--config.tokenizer.log_every=2",
         "--config.tokenizer.ckpt_every=2", "--config.sit.log_every=2", "--config.sit.ckpt_every=2",
         "--config.sit.sample_every=2", "--config.sit.global_batch_size=16"]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert set(summary) >= set(STAGES)
  assert summary["3_latents"]["num_examples"] == 128
  assert np.isfinite(summary["2_reconstruct"]["psnr"])
  samples = np.load(workdir / "5_samples" / "samples.npz")
  assert samples["arr_0"].dtype == np.uint8 and samples["arr_0"].shape == (10, 32, 32, 3)
  np.testing.assert_array_equal(samples["arr_1"], np.arange(10))
  for png in ("2_reconstruct/reconstructions.png", "5_samples/samples.png",
              "1_tokenizer/reconstructions/step_00000004.png", "4_sit/samples/step_00000004.png"):
    Image.open(workdir / png).verify()
  assert len(list((workdir / "5_samples" / "images").glob("*.png"))) == 10
  assert list((workdir / "1_tokenizer").glob("events.out.tfevents.*"))
  from softvq_jax import Tokenizer
  assert Tokenizer.load(str(workdir / "1_tokenizer" / "tokenizer")).latent_shape == (16, 8)
  again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-4000:]
  assert again.stderr.count("already done") == 5
  # The stages' times, not the rerun's second, are the run's total.
  assert json.loads((workdir / "summary.json").read_text())["total_seconds"] == pytest.approx(
      summary["total_seconds"]) == pytest.approx(sum(summary[s]["seconds"] for s in STAGES), 0.01)
  # Other settings on the same workdir would skip the finished stages: refused by name.
  other = [arg.replace("sit_steps=4", "sit_steps=5") for arg in cmd]
  refused = subprocess.run(other, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
  assert refused.returncode != 0
  assert "holds a quickstart run with other settings (sit.total_steps)" in refused.stderr


def test_quickstart_stage_stopped_by_a_signal_is_resumed_not_skipped(tmp_path, monkeypatch):
  from softvq_jax import quickstart
  from softvq_jax.train import tokenizer_trainer
  calls = []
  # A preempted trainer checkpoints and returns without exporting its tokenizer.
  monkeypatch.setattr(tokenizer_trainer, "run", lambda config, workdir: calls.append(workdir) or {})
  config = load_config("quickstart", "tokenizer_steps=4,sit_steps=4")
  for _ in range(2):
    summary = quickstart.run(config, str(tmp_path))
    assert "1_tokenizer" not in summary
  assert len(calls) == 2  # the rerun ran the stage again
  assert not (tmp_path / "1_tokenizer" / "DONE.json").exists()
  assert not (tmp_path / "2_reconstruct").exists()


def test_a_resumed_quickstart_stage_reports_the_time_of_every_attempt(tmp_path, monkeypatch):
  """summary.json's stage seconds: the stopped attempts' wall time plus the finishing one's."""
  from softvq_jax import quickstart
  clock = [1000.0]
  monkeypatch.setattr(quickstart.time, "time", lambda: clock[0])
  produces = tmp_path / "1_x" / "model"

  def preempted(workdir):  # checkpoints and returns without its model
    clock[0] += 5.0
    return {}

  def failing(workdir):
    clock[0] += 2.0
    raise RuntimeError("an error half way")

  def finishing(workdir):
    clock[0] += 3.0
    produces.write_text("model")
    return {"loss": 1.0}

  summary = {}
  assert quickstart._stage(summary, "1_x", str(tmp_path), preempted, str(produces)) is None
  with pytest.raises(RuntimeError, match="half way"):
    quickstart._stage(summary, "1_x", str(tmp_path), failing, str(produces))
  result = quickstart._stage(summary, "1_x", str(tmp_path), finishing, str(produces))
  assert result == {"loss": 1.0, "seconds": 10.0} == summary["1_x"]
  clock[0] += 100.0  # a later rerun reads the done stage, as it was
  assert quickstart._stage({}, "1_x", str(tmp_path), finishing, str(produces))["seconds"] == 10.0


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("sample_*.py")))
def test_sample_configs_name_their_tokenizer(name):
  from softvq_jax.models.sit import GeneratorConfig
  config = load_config(name)
  from softvq_jax.models.released import RELEASED_MAETOK
  assert config.trainer == "sample"
  # Half precision as the reference's sampling scripts; float32 on CPUs.
  assert config.dtype == "bfloat16" and load_config(name, "runlocal").dtype == "float32"
  assert config.released_tokenizer in {**RELEASED_TOKENIZERS, **RELEASED_MAETOK}
  # The file name carries the tokenizer's: sample_sit_xl_softvq_bl64_512 <-> softvq-bl-64-512.
  family, rest = config.released_tokenizer.split("-", 1)
  assert name.endswith(f"{family}_" + rest.replace("-", "", 1).replace("-", "_"))
  tok = TokenizerConfig.from_json_dict(config.tokenizer.to_dict())
  gen = GeneratorConfig.from_json_dict(dict(config.generator.to_dict(), vae_1d=True,
                                            input_size=tok.num_latent_tokens,
                                            in_channels=tok.codebook_embed_dim))
  assert (gen.hidden_size, gen.depth, gen.num_heads) == (1152, 28, 16)
  assert config.num_samples == 50_000 and config.sampler.cfg_scale == 1.75
  if gen.kind == "sit":
    assert config.sampler.method == "euler_maruyama"
    assert tuple(config.sampler.guidance_interval) == (0.0, 0.7)
  else:
    assert config.sampler.method == "ddpm" and gen.learn_sigma


def test_extract_job_writes_a_cache_equal_to_encode(tmp_path):
  from softvq_jax import Tokenizer
  from softvq_jax.data.cache_latents import LatentCacheSource
  from softvq_jax.data.sources import SyntheticSource
  from softvq_jax.data.decode import to_pil_rgb
  from softvq_jax.data.transforms import center_crop_arr
  tok = Tokenizer.random(dict(
      enc_type="vit", dec_type="vit", encoder_model="vit_small_patch14_dinov2.lvd142m",
      decoder_model="vit_small_patch14_dinov2.lvd142m", image_size=32, enc_patch_size=8,
      dec_patch_size=8, num_latent_tokens=4, codebook_embed_dim=4, codebook_size=8,
      num_codebooks=2, encoder_kwargs=dict(embed_dim=32, depth=1, num_heads=2, init_values=1.0),
      decoder_kwargs=dict(embed_dim=32, depth=1, num_heads=2)), seed=0)
  tok.save(str(tmp_path / "tok"))
  out = tmp_path / "cache"
  proc = subprocess.run(
      [sys.executable, "-m", "softvq_jax.main",
       f"--config=configs/extract_latents.py:tokenizer_dir={tmp_path / 'tok'},source=synthetic",
       f"--workdir={out}", "--config.examples_per_shard=8", "--config.batch_size=8",
       "--config.data.kwargs.num_examples=20"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  cache = LatentCacheSource(str(out))
  assert len(cache) == 20 and cache.info["num_shards"] == 3
  source = SyntheticSource(num_examples=20)
  images = np.stack([center_crop_arr(to_pil_rgb(source[i]["image"]), 32) for i in (0, 7, 19)])
  z = np.asarray(tok.encode(images.astype(np.float32) / 127.5 - 1))
  for row, i in enumerate((0, 7, 19)):
    np.testing.assert_allclose(cache[i]["latent"], z[row], atol=1e-5)


def test_extract_reads_the_named_split(monkeypatch, tmp_path):
  """``split=`` names the dataset's own split (TFDS "train[:1%]", Fashion-MNIST "test"), not a
  train/held-out switch; sources with only a training and a held-out part (offline,
  synthetic, scikit-image) take "train" or "test", which had been ignored."""
  from softvq_jax import extract
  from softvq_jax.train import tokenizer_trainer
  seen, sources = [], []
  monkeypatch.setattr(extract.Tokenizer, "load", staticmethod(lambda *a, **k: None))
  monkeypatch.setattr("softvq_jax.data.cache_latents.write_latent_cache",
                      lambda tok, source, *a, **k: sources.append(source.name) or {})
  real = tokenizer_trainer.resolve_source

  def resolve(data, role):
    seen.append((data.source, data.train_split, role))
    return real(data, role) if data.source == "synthetic" else types.SimpleNamespace(name="x")

  monkeypatch.setattr(tokenizer_trainer, "resolve_source", resolve)
  for source, split in (("tfds", "train[:1%]"), ("fashion_mnist", "test"), ("synthetic", "test"),
                        ("synthetic", "train"), ("offline", "test")):
    config = load_config("extract_latents", f"tokenizer_dir=x,source={source},split={split}")
    extract.run(config, str(tmp_path))
  assert seen == [("tfds", "train[:1%]", "train"), ("fashion_mnist", "test", "train"),
                  ("synthetic", "train", "eval"), ("synthetic", "train", "train"),
                  ("offline", "train", "eval")]
  assert sources[2] != sources[3]  # the held-out synthetic images are others
  with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
    extract.run(load_config("extract_latents", "tokenizer_dir=x,source=skimage,split=train[:1%]"),
                str(tmp_path))


def test_reconstruct_config_names_an_unknown_released_tokenizer():
  assert load_config("reconstruct", "released=softvq-b-64").model.num_latent_tokens == 64
  with pytest.raises(ValueError, match="released='softvq_b65'.*softvq-b-64"):
    load_config("reconstruct", "released=softvq_b65")


@pytest.mark.parametrize("job", ["eval_recon", "fid_stats", "extract_latents"])
def test_job_configs_name_an_unknown_source_and_declare_the_known_ones(job):
  extra = "tokenizer_dir=x," if job == "extract_latents" else ""
  with pytest.raises(ValueError, match="unknown data source 'imagefolder'.*folder"):
    load_config(job, extra + "source=imagefolder")
  # Every source's arguments can be set by flag on the locked config.
  skimage = load_config(job, extra + "source=skimage")
  skimage.lock()  # as the command line's config flag holds it
  skimage.data.kwargs.num_examples = 3
  folder = load_config(job, extra + "source=folder")
  folder.lock()
  folder.data.kwargs.root = "images"
  assert (skimage.data.kwargs.num_examples, folder.data.kwargs.root) == (3, "images")


@pytest.mark.parametrize("trainer,config_name", [("tokenizer", "softvq_b64"),
                                                 ("sit", "sit_xl_softvq_b64"),
                                                 ("dit", "dit_xl_softvq_l64")])
@pytest.mark.parametrize("field,value,message", [
    ("dtype", "bf16", "dtype='bf16' must be one of"),
    ("log_every", 0, "log_every=0 must be an integer >= 1"),
    ("ckpt_every", -1, "ckpt_every=-1 must be"),
    ("global_batch_size", 0, "global_batch_size=0 must be"),
    ("total_steps", -5, "total_steps=-5 must be"),
    ("ema_decay", 1.5, r"ema_decay=1.5 must lie in \[0, 1\]"),
    ("mesh", (("dta", -1),), r"mesh axes \['dta'\] include no batch axis"),
    ("mesh", (("data", 0),), "mesh entry"),
])
def test_trainers_refuse_unusable_settings_before_building_anything(
    trainer, config_name, field, value, message, tmp_path):
  config = load_config(config_name, "runlocal")
  with config.unlocked():
    config[field] = value
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    _trainer(trainer)(config, str(workdir))
  assert not workdir.exists()


@pytest.mark.parametrize("trainer,config_name,field,value,message", [
    ("sit", "sit_xl_softvq_b64", "transport.path", "lin",
     r"transport.path='lin' must be one of \('linear', 'cosine'\)"),
    ("sit", "sit_xl_softvq_b64", "transport.weighting", "logn", "transport.weighting='logn'"),
    ("sit", "sit_xl_softvq_b64", "sample.num", 0, "sample.num=0 must be an integer >= 1"),
    ("dit", "dit_xl_softvq_l64", "sample.num_steps", 0, "sample.num_steps=0 must be"),
    ("dit", "dit_xl_softvq_l64", "diffusion.noise_schedule", "cos",
     "diffusion.noise_schedule='cos' must be one of"),
    ("dit", "dit_xl_softvq_l64", "diffusion.num_steps", -1, "diffusion.num_steps=-1 must be"),
])
def test_generator_trainers_refuse_unusable_sections_before_building_anything(
    trainer, config_name, field, value, message, tmp_path):
  # Each was refused before, but only once the tokenizer and the latents were ready, after
  # the workdir had been made; named by its dotted flag now, as --config.<field> sets it.
  config = load_config(config_name, "runlocal")
  section, name = field.split(".")
  config[section][name] = value
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    _trainer(trainer)(config, str(workdir))
  assert not workdir.exists()


def _trainer(name):
  from softvq_jax.main import _JOBS  # pylint: disable=g-import-not-at-top
  return importlib.import_module(_JOBS[name]).run


def test_step_counts_follow_each_trainer(tmp_path):
  sit = load_config("sit_xl_softvq_b64", "runlocal")
  sit.total_steps = 0  # a generator run needs a step; a tokenizer's 0 means "from epochs"
  with pytest.raises(ValueError, match="total_steps=0 must be an integer >= 1"):
    _trainer("sit")(sit, str(tmp_path / "sit"))
  tok = load_config("softvq_b64", "runlocal")
  tok.encoder_init = "dinov"
  with pytest.raises(ValueError, match=r"encoder_init='dinov' must be one of \('dinov2'"):
    _trainer("tokenizer")(tok, str(tmp_path / "tok"))
  sit = load_config("sit_xl_softvq_b64", "runlocal")
  sit.data.num_classes = 0
  with pytest.raises(ValueError, match="data.num_classes=0 must be an integer >= 1"):
    _trainer("sit")(sit, str(tmp_path / "sit"))


TRAINING_CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py")
                          if p.stem.startswith(("softvq_", "maetok_", "sit_", "dit_")))


@pytest.mark.parametrize("name", TRAINING_CONFIGS)
def test_every_training_config_takes_a_step_count_by_flag(name):
  """``--config.total_steps=N`` shortens any training run: the field exists in the locked
  config the flag writes into (the tokenizer recipes count epochs, 0 = from them)."""
  config = load_config(name)
  config.lock()
  assert config.total_steps >= 0
  config.total_steps = 100
  assert config.total_steps == 100
  if name.startswith(("softvq_", "maetok_")):  # image trainers: undecodable images tolerated
    config.max_skipped = 1000
    assert config.max_skipped == 1000


def test_short_runs_are_warned_when_their_exported_ema_is_mostly_the_initial_weights(caplog):
  from softvq_jax.train import common
  with caplog.at_level("WARNING"):
    share = common.warn_if_the_ema_stays_near_init(0.9999, 60)
  assert share == pytest.approx(0.9999 ** 60)
  assert "99% of the EMA weights" in caplog.text and "--config.ema_decay=0.926" in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING"):
    assert common.warn_if_the_ema_stays_near_init(0.9999, 400_000) < 1e-17
  assert not caplog.records


@pytest.mark.parametrize("name", TRAINING_CONFIGS)
def test_runlocal_runs_export_trained_weights(name):
  """The shrunk runs are short: their EMA must move off the random init within them."""
  config = load_config(name, "runlocal")
  assert config.ema_decay ** config.total_steps < 0.05


def test_pinned_requirements_satisfy_the_packages_declared_ranges():
  """pyproject.toml's ranges (for `pip install .`) admit requirements.txt's exact pins, and
  every range names a pinned package, so the two lists cannot drift apart unnoticed."""
  import tomllib  # pylint: disable=g-import-not-at-top
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  from packaging.version import Version  # pylint: disable=g-import-not-at-top
  normal = lambda name: name.lower().replace("_", "-")
  pins = {}
  for line in (ROOT / "requirements.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      name, version = line.split("==")
      pins[normal(name)] = Version(version)
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  declared = project["dependencies"] + [
      r for extra in project["optional-dependencies"].values() for r in extra]
  checked = 0
  for requirement in map(Requirement, declared):
    if requirement.marker is not None and not requirement.marker.evaluate():
      continue  # another platform's name for the same package
    name = normal(requirement.name)
    assert name in pins, f"{name} is declared in pyproject.toml but not pinned"
    assert requirement.specifier.contains(pins[name]), (name, str(requirement.specifier))
    checked += 1
  assert checked >= 20 and "flax" in pins and "jax" in pins
