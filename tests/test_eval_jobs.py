"""The evaluation jobs (eval_recon, fid_stats, eval_gen) through the main entry point, and the
held-out rFID hook, checked against numbers computed here from the same images."""

from __future__ import annotations

import importlib
import importlib.util
import json
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

from softvq_jax.config_lib import TINY_VIT
from softvq_jax.data.pipeline import image_pipeline
from softvq_jax.data.sources import SkimagePhotosSource
from softvq_jax.eval import adm, fid, image_metrics
from softvq_jax.models.released import RELEASED_TOKENIZERS
from softvq_jax.tokenizer import Tokenizer
from softvq_jax.utils.images import from_uint8, to_uint8

ROOT = pathlib.Path(__file__).parent.parent
NUM = 6     # images per test: the Inception at 299x299 costs ~0.25 s each on a CPU core
SIZE = 32


def run_job(config: str, workdir, *overrides: str) -> subprocess.CompletedProcess:
  cmd = [sys.executable, "-m", "softvq_jax.main", f"--config={config}", f"--workdir={workdir}",
         *overrides]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def skimage_images(num: int = NUM, size: int = SIZE) -> np.ndarray:
  """What the jobs read for source=skimage: the first ``num`` photos, ADM centre crop, uint8."""
  source = SkimagePhotosSource(num_examples=64)
  batches = image_pipeline(source, batch_size=num, image_size=size, train=False)
  return to_uint8(next(iter(batches))["image"])


@pytest.fixture(scope="module")
def features() -> adm.InceptionFeatures:
  return adm.InceptionFeatures(batch_size=8)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> pathlib.Path:
  config = dict(RELEASED_TOKENIZERS["softvq-b-64"], image_size=SIZE, enc_patch_size=8,
                dec_patch_size=8, num_latent_tokens=8, codebook_size=64,
                encoder_kwargs=dict(TINY_VIT), decoder_kwargs=dict(TINY_VIT))
  path = tmp_path_factory.mktemp("tok") / "tokenizer"
  Tokenizer.random(config, seed=3).save(str(path))
  return path


def test_eval_recon_job_matches_metrics_computed_here(tmp_path, tokenizer_dir, features):
  workdir = tmp_path / "recon"
  # batch_size=4 over 6 images: a short last batch goes through the padding path.
  proc = run_job(f"configs/eval_recon.py:tokenizer_dir={tokenizer_dir},source=skimage,"
                 f"max_images={NUM},batch_size=4", workdir, "--config.inception_batch_size=8")
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads((workdir / "metrics.json").read_text())
  assert (workdir / "reconstructions.png").exists()

  originals = skimage_images()
  tok = Tokenizer.load(str(tokenizer_dir))
  recons = to_uint8(np.asarray(tok.reconstruct(from_uint8(originals))))
  want = image_metrics.reconstruction_metrics(originals, recons)
  assert got["num_images"] == NUM
  for key in ("psnr", "ssim", "ssim_reference_dr2"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
  assert got["ssim_reference_dr2"] > got["ssim"]  # the reference's quirk inflates SSIM
  from softvq_jax.eval.lpips import load_lpips
  lpips = float(np.mean(load_lpips()(from_uint8(originals), from_uint8(recons))))
  np.testing.assert_allclose(got["lpips"], lpips, rtol=1e-4)
  # The in-training hook makes new metrics at every evaluation: LPIPS loads and compiles once.
  from softvq_jax.eval.eval_recon import ReconstructionMetrics  # pylint: disable=g-import-not-at-top
  first, second = (ReconstructionMetrics(None, lpips=True) for _ in range(2))
  assert first._lpips is second._lpips  # pylint: disable=protected-access
  a, b = features(originals), features(recons)
  rfid = fid.frechet_distance(a["pool"].mean(0), np.cov(a["pool"], rowvar=False),
                              b["pool"].mean(0), np.cov(b["pool"], rowvar=False))
  assert rfid > 1.0  # a random tokenizer's reconstructions are far from the photos
  np.testing.assert_allclose(got["rfid"], rfid, rtol=1e-3)
  rsfid = fid.frechet_distance(a["spatial"].mean(0), np.cov(a["spatial"], rowvar=False),
                               b["spatial"].mean(0), np.cov(b["spatial"], rowvar=False))
  np.testing.assert_allclose(got["rsfid"], rsfid, rtol=1e-3)


def test_fid_stats_then_eval_gen_of_a_set_against_itself(tmp_path, features):
  refdir = tmp_path / "ref"
  refdir.mkdir()
  (refdir / "ref.json").write_text("the user's own")  # not where sub/ref.npz's JSON goes
  proc = run_job(f"configs/fid_stats.py:source=skimage,image_size={SIZE},max_images={NUM},"
                 "images,batch_size=4,output=sub/ref.npz", refdir,
                 "--config.inception_batch_size=8")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (refdir / "ref.json").read_text() == "the user's own"
  refdir = refdir / "sub"
  ref_path = refdir / "ref.npz"
  images = skimage_images()
  feats = features(images)
  with np.load(ref_path) as ref:
    assert sorted(ref.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    np.testing.assert_array_equal(ref["arr_0"], images)
    np.testing.assert_allclose(ref["mu"], np.mean(feats["pool"], axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ref["sigma"], np.cov(feats["pool"], rowvar=False), rtol=1e-3,
                               atol=1e-5)
    np.testing.assert_allclose(ref["mu_s"], np.mean(feats["spatial"], axis=0), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(ref["sigma_s"], np.cov(feats["spatial"], rowvar=False), rtol=1e-3,
                               atol=1e-5)
  # Described in the JSON of its name: other outputs in the workdir keep their own.
  assert json.loads((refdir / "ref.json").read_text())["num_images"] == NUM
  assert not (refdir / "fid_stats.json").exists()
  # An existing file (here the one just written, or any file output= names) is not replaced.
  written = ref_path.read_bytes()
  again = run_job(f"configs/fid_stats.py:source=skimage,image_size={SIZE},max_images=2,"
                  f"output={ref_path}", tmp_path / "elsewhere")
  assert again.returncode != 0 and f"{ref_path} and {refdir / 'ref.json'} exist" in again.stderr
  assert ref_path.read_bytes() == written

  samples = tmp_path / "samples.npz"
  np.savez(samples, arr_0=images, arr_1=np.arange(NUM))
  weight = np.random.default_rng(0).normal(0, 0.05, (2048, 1008)).astype(np.float32)
  np.savez(tmp_path / "logits.npz", weight)
  gendir = tmp_path / "gen"
  proc = run_job(f"configs/eval_gen.py:samples={samples},ref={ref_path},"
                 f"logits_weight={tmp_path / 'logits.npz'}", gendir,
                 "--config.inception_batch_size=8", "--config.split_size=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads((gendir / "metrics.json").read_text())
  assert got["num_samples"] == NUM and got["num_ref"] == NUM
  assert got["fid"] < 1e-3 and got["sfid"] < 1e-3
  assert got["precision"] == 1.0 and got["recall"] == 1.0
  want_is = fid.inception_score(feats["pool"].astype(np.float64) @ weight, split_size=3)
  np.testing.assert_allclose(got["inception_score"], want_is, rtol=1e-3)
  assert got["warnings"] == [f"{NUM} samples: FID is biased upwards on fewer than 2048; the "
                             "reference protocol uses 50,000"]
  # Samples at another size than the reference's: the Inception resizes both, so it runs,
  # and the metrics say what they compare.
  from softvq_jax.eval import eval_gen  # pylint: disable=g-import-not-at-top
  small = tmp_path / "small.npz"
  np.savez(small, arr_0=skimage_images(size=SIZE // 2))
  config = load_config("eval_gen").get_config(f"samples={small},ref={ref_path}")
  config.inception_batch_size = 8
  result = eval_gen.run(config, str(tmp_path / "gen_small"))
  assert result["warnings"][0] == (f"the samples are {SIZE // 2}x{SIZE // 2}, the reference "
                                   f"images {SIZE}x{SIZE}: make the reference at the samples' "
                                   "size (fid_stats image_size=...)")


def test_heldout_rfid_hook(tokenizer_dir, features):
  from softvq_jax.eval.hooks import HeldoutRFID
  from softvq_jax.train.state import split_model

  tok = Tokenizer.load(str(tokenizer_dir))
  graphdef, params, rest = split_model(tok.model())
  state = types.SimpleNamespace(ema=params, rest=rest)
  originals = skimage_images(4)

  class Writer:
    def __init__(self):
      self.scalars = {}

    def write_scalars(self, step, scalars):
      self.scalars[step] = scalars

  writer = Writer()
  hook = HeldoutRFID(graphdef, from_uint8(originals), every=10, total_steps=25, writer=writer,
                     features=features, batch_size=3)
  hook(5, state)
  assert hook.last is None  # not an evaluation step
  hook(10, state)
  recons = to_uint8(np.asarray(tok.reconstruct(from_uint8(originals))))
  want = image_metrics.reconstruction_metrics(originals, recons)
  np.testing.assert_allclose(hook.last["psnr"], want["psnr"], rtol=1e-5)
  np.testing.assert_allclose(hook.last["ssim"], want["ssim"], rtol=1e-5)
  a, b = features(originals)["pool"], features(recons)["pool"]
  want_rfid = fid.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0),
                                   np.cov(b, rowvar=False))
  np.testing.assert_allclose(hook.last["rfid"], want_rfid, rtol=1e-4)
  assert writer.scalars[10]["heldout_rfid"] == hook.last["rfid"]
  hook(25, state)  # the last step always evaluates; same weights, same numbers
  assert [s for s, _ in hook.history] == [10, 25]
  assert hook.history[1][1]["rfid"] == pytest.approx(hook.last["rfid"])


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_jobs_name_what_is_missing(tmp_path):
  from softvq_jax.eval import eval_gen, eval_recon, job_utils
  eval_gen_config, eval_recon_config = load_config("eval_gen"), load_config("eval_recon")
  with pytest.raises(ValueError, match="tokenizer_dir is required"):
    eval_recon.run(eval_recon_config.get_config("source=skimage"), str(tmp_path))
  with pytest.raises(ValueError, match="config.samples is required"):
    eval_gen.run(eval_gen_config.get_config(""), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="nothere.npz"):
    eval_gen.run(eval_gen_config.get_config(f"samples={tmp_path}/nothere.npz,ref=x"),
                 str(tmp_path))
  stats_only = tmp_path / "stats.npz"
  np.savez(stats_only, mu=np.zeros(3))
  with pytest.raises(ValueError, match="holds no images"):
    eval_gen.run(eval_gen_config.get_config(f"samples={stats_only},ref={stats_only}"),
                 str(tmp_path))
  # Each bad batch is named with its role before any Inception work.
  good = tmp_path / "good.npz"
  np.savez(good, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
  nchw, single, corrupt = tmp_path / "nchw.npz", tmp_path / "one.npz", tmp_path / "corrupt.npz"
  np.savez(nchw, arr_0=np.zeros((4, 3, 8, 8), np.uint8))
  np.savez(single, arr_0=np.zeros((1, 8, 8, 3), np.uint8))
  corrupt.write_bytes(np.random.default_rng(0).bytes(300))
  for samples, ref, error, message in (
      (tmp_path, good, IsADirectoryError, "config.samples .* is a folder"),
      (corrupt, good, ValueError, "config.samples .*corrupt.npz is not an .npz archive"),
      (good, nchw, ValueError, r"config.ref .*nchw.npz: arr_0 must be uint8 NHWC RGB images, "
                               r"got uint8 \(4, 3, 8, 8\)"),
      (single, good, ValueError, "config.samples .*one.npz: arr_0 holds 1 image"),
  ):
    with pytest.raises(error, match=message):
      eval_gen.run(eval_gen_config.get_config(f"samples={samples},ref={ref}"), str(tmp_path))
    with pytest.raises(error):
      adm.evaluate(str(ref), str(samples))
  config = eval_gen_config.get_config(f"samples={good},ref={good}")
  config.distance_dtype = "fp16"
  with pytest.raises(ValueError, match="distance_dtype='fp16' must be"):
    eval_gen.run(config, str(tmp_path))
  with pytest.raises(ValueError, match="max_images"):
    job_utils.eval_source(eval_recon_config.get_config("source=skimage,max_images=-1"))
  with pytest.raises(ValueError, match="at least 2"):
    job_utils.eval_source(eval_recon_config.get_config("source=skimage,max_images=1"))
  # Without rFID one image is enough (PSNR/SSIM of a single reconstruction).
  one = job_utils.eval_source(eval_recon_config.get_config("source=skimage,max_images=1"),
                              frechet=False)
  assert len(one) == 1


def test_eval_recon_of_one_image_without_rfid(tmp_path, tokenizer_dir):
  from softvq_jax.eval import eval_recon  # pylint: disable=g-import-not-at-top
  config = load_config("eval_recon").get_config(
      f"tokenizer_dir={tokenizer_dir},source=skimage,max_images=1,rfid=false,lpips=false")
  result = eval_recon.run(config, str(tmp_path))
  assert result["num_images"] == 1 and "rfid" not in result
  images = skimage_images(1)
  recon = to_uint8(Tokenizer.load(str(tokenizer_dir)).reconstruct(from_uint8(images)))
  mse = np.mean((images.astype(np.float64) - recon.astype(np.float64)) ** 2)
  np.testing.assert_allclose(result["psnr"], 10 * np.log10(255.0 ** 2 / mse), rtol=1e-5)


def test_adm_evaluator_takes_a_statistics_only_reference(tmp_path, features):
  """A fid_stats output without images (mu, sigma, mu_s, sigma_s): FID and sFID as with the
  images, precision/recall left out (they need the reference's features)."""
  images = skimage_images()
  ref_images, sample = tmp_path / "ref.npz", tmp_path / "sample.npz"
  np.savez(ref_images, arr_0=images)
  np.savez(sample, arr_0=images[::-1][:4])
  full = adm.evaluate(str(ref_images), str(sample), features)
  pool, spatial = features.npz_activations(str(ref_images)).stats()
  stats_only = tmp_path / "stats.npz"
  np.savez(stats_only, mu=pool.mean, sigma=pool.covariance, mu_s=spatial.mean,
           sigma_s=spatial.covariance)
  got = adm.evaluate(str(stats_only), str(sample), features)
  assert got["fid"] == pytest.approx(full["fid"], rel=1e-6)
  assert got["sfid"] == pytest.approx(full["sfid"], rel=1e-6)
  assert "precision" in full and "precision" not in got and "num_ref" not in got
  np.savez(tmp_path / "bad.npz", mu=pool.mean)
  with pytest.raises(ValueError, match="neither images"):
    adm.evaluate(str(tmp_path / "bad.npz"), str(sample), features)


def test_fid_stats_of_a_folder_of_undecodable_images_says_so(tmp_path):
  from softvq_jax.eval import fid_stats  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "images"
  (folder / "all").mkdir(parents=True)
  for i in range(3):
    (folder / "all" / f"broken{i}.png").write_bytes(b"not a png")
  config = load_config("fid_stats").get_config("source=folder,image_size=16,batch_size=2")
  config.data.kwargs.root = str(folder)
  with pytest.raises(ValueError, match="0 image.s. could be read, the statistics need at least 2"):
    fid_stats.run(config, str(tmp_path / "out"))
  config.image_size = 0
  with pytest.raises(ValueError, match="image_size=0 must be an integer >= 1"):
    fid_stats.run(config, str(tmp_path / "out"))


def test_fid_stats_never_replaces_the_json_of_its_output_unasked(tmp_path):
  from softvq_jax.eval import fid_stats  # pylint: disable=g-import-not-at-top
  (tmp_path / "fid_stats.json").write_text("the user's notes")
  config = load_config("fid_stats").get_config("source=skimage,image_size=16,batch_size=2")
  with pytest.raises(FileExistsError, match=r"fid_stats.json exists; choose another output="):
    fid_stats.run(config, str(tmp_path))
  assert (tmp_path / "fid_stats.json").read_text() == "the user's notes"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["fid_stats.json"]


@pytest.mark.parametrize("job, arg, outputs", [
    ("eval_recon", "tokenizer_dir=unused", ("metrics.json", "reconstructions.png")),
    ("reconstruct", None, ("reconstructions.png", "latents.npz", "metrics.json")),
    ("eval_gen", "samples=none.npz,ref=none.npz", ("metrics.json",)),
])
def test_eval_jobs_never_replace_an_earlier_result_unasked(tmp_path, job, arg, outputs):
  module = importlib.import_module(f"softvq_jax.eval.{job}")
  for name in outputs:  # a finished run's, or what an interrupted one left
    workdir = tmp_path / name
    workdir.mkdir()
    (workdir / name).write_text("earlier")
    config = load_config(job).get_config(arg)
    with pytest.raises(FileExistsError, match=f"holds {name} from an earlier run.*"
                                              "overwrite=True"):
      module.run(config, str(workdir))
    assert (workdir / name).read_text() == "earlier"
  if job == "eval_gen":  # asked: it goes on (to the missing sample batch here)
    config.overwrite = True
    with pytest.raises(FileNotFoundError, match="config.samples none.npz does not exist"):
      module.run(config, str(workdir))


@pytest.mark.parametrize("job", ["eval_recon", "reconstruct"])
def test_an_overwriting_run_stopped_while_writing_leaves_no_older_file_beside_its_own(
    tmp_path, tokenizer_dir, job, monkeypatch):
  """overwrite=True replaces the whole set: stopped after its first file, the run leaves that
  file alone, not beside the earlier run's others (a metrics.json of another run)."""
  module = importlib.import_module(f"softvq_jax.eval.{job}")
  arg = (f"tokenizer_dir={tokenizer_dir},source=skimage,max_images=2,rfid=false,lpips=false"
         if job == "eval_recon" else None)
  config = load_config(job).get_config(arg)
  config.tokenizer_dir, config.overwrite = str(tokenizer_dir), True
  for name in module.OUTPUTS:
    (tmp_path / name).write_text("earlier")
  written = []
  save_png = module.save_png

  def save_then_stop(path, image):
    save_png(path, image)
    written.append(pathlib.Path(path).name)
    raise KeyboardInterrupt  # stopped right after the first file of the new set

  monkeypatch.setattr(module, "save_png", save_then_stop)
  with pytest.raises(KeyboardInterrupt):
    module.run(config, str(tmp_path))
  left = sorted(p.name for p in tmp_path.iterdir())
  assert left == written == ["reconstructions.png"]
  assert (tmp_path / "reconstructions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  monkeypatch.setattr(module, "save_png", save_png)
  metrics = module.run(config, str(tmp_path))  # the rerun writes the whole set
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(module.OUTPUTS)
  assert json.loads((tmp_path / "metrics.json").read_text())["num_images"] == metrics["num_images"]
