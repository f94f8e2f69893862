"""The sample job: class-balanced samples as PNGs and an ADM npz, settings recorded, resumable."""

import json
import pathlib
import subprocess
import sys

import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from softvq_jax import sample
from softvq_jax.sample import balanced_labels

ROOT = pathlib.Path(__file__).parent.parent


def run_job(config, workdir, *overrides):
  cmd = [sys.executable, "-m", "softvq_jax.main", f"--config={config}", f"--workdir={workdir}",
         *overrides]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("config, method", [
    ("configs/sample_sit_xl_softvq_b64.py:runlocal,num_samples=12", "euler_maruyama"),
    # The same job with the other generator kind (about 35 s): outside CI's time budget.
    pytest.param("configs/sample_dit_xl_softvq_l64.py:runlocal,num_samples=12", "ddpm",
                 marks=pytest.mark.extended),
])
def test_sample_job_writes_adm_npz_and_pngs(tmp_path, config, method):
  workdir = tmp_path / "out"
  proc = run_job(config, workdir, "--config.sampler.num_steps=3", "--config.batch_size=5")
  assert proc.returncode == 0, proc.stderr[-3000:]
  samples = np.load(workdir / "samples.npz")
  images, labels = samples["arr_0"], samples["arr_1"]
  assert images.dtype == np.uint8 and images.shape == (12, 64, 64, 3)
  np.testing.assert_array_equal(labels, balanced_labels(12, 10))
  pngs = sorted((workdir / "images").glob("*.png"))
  assert len(pngs) == 12
  np.testing.assert_array_equal(np.asarray(Image.open(pngs[3])), images[3])
  settings = json.loads((workdir / "sampling.json").read_text())
  assert settings["method"] == method and settings["num_steps"] == 3 and settings["seed"] == 0
  Image.open(workdir / "samples.png").verify()
  # A rerun finds every batch done and rebuilds the same npz.
  again = run_job(config, workdir, "--config.sampler.num_steps=3", "--config.batch_size=5")
  assert again.returncode == 0, again.stderr[-3000:]
  np.testing.assert_array_equal(np.load(workdir / "samples.npz")["arr_0"], images)
  if method == "euler_maruyama":  # the check is the same for both; one run shows it
    # Other settings in the same workdir are refused rather than mixed in.
    other = run_job(config, workdir, "--config.sampler.num_steps=4", "--config.batch_size=5")
    assert other.returncode != 0 and "other settings" in other.stderr


def test_balanced_labels():
  labels = balanced_labels(50_000, 1000)
  assert np.all(np.bincount(labels, minlength=1000) == 50)
  assert np.all(np.diff(balanced_labels(7, 3)) >= 0)
  assert set(balanced_labels(7, 3)) == {0, 1, 2}


class _FakeGenerator:
  """Returns its noise as latents and logs each batch's first label in ``events``."""
  config = types.SimpleNamespace(num_classes=3)
  kind = "sit"
  latent_shape = (2, 2)

  def __init__(self, events):
    self.events = events

  def check_sample_options(self, **kwargs):
    del kwargs

  def sample(self, noise, y, **kwargs):
    del kwargs
    self.events.append(f"sample {int(y[0])}")
    return noise


class _FakeTokenizer:
  config = types.SimpleNamespace(vq_mean=0.0, vq_std=1.0)

  def denormalize(self, z):
    return z

  def decode(self, z):
    return jnp.zeros((z.shape[0], 8, 8, 3))


def _fake_job(monkeypatch, events, **settings):
  """The sample job's config on the fake models above."""
  monkeypatch.setattr(sample, "_load_models", lambda config, mesh: (_FakeGenerator(events),
                                                                    _FakeTokenizer()))
  return ml_collections.ConfigDict(dict(
      seed=0, sampler=dict(method="euler", num_steps=2, cfg_scale=1.0,
                           guidance_interval=(0.0, 1.0)), **settings))


def test_next_batch_is_dispatched_before_the_previous_is_written(tmp_path, monkeypatch):
  """The device samples batch b while the host fetches and writes batch b-1."""
  events = []
  real_to_uint8 = sample.samples_to_uint8

  def to_uint8(x):
    events.append("write")
    return real_to_uint8(x)

  config = _fake_job(monkeypatch, events, num_samples=3, batch_size=1, save_pngs=False)
  monkeypatch.setattr(sample, "samples_to_uint8", to_uint8)
  out = sample.run(config, str(tmp_path))
  assert out["num_samples"] == 3
  assert events == ["sample 0", "sample 1", "write", "sample 2", "write", "write"]


def test_a_batch_stopped_while_its_pngs_are_written_is_redone(tmp_path, monkeypatch):
  config = _fake_job(monkeypatch, [], num_samples=6, batch_size=2, save_pngs=True)
  real_save_png = sample.save_png
  written = []

  def save_png_then_die(path, image):
    if len(written) == 3:  # the second PNG of the second batch: as if killed there
      raise KeyboardInterrupt
    written.append(path)
    return real_save_png(path, image)

  monkeypatch.setattr(sample, "save_png", save_png_then_die)
  with pytest.raises(KeyboardInterrupt):
    sample.run(config, str(tmp_path))
  monkeypatch.setattr(sample, "save_png", real_save_png)
  out = sample.run(config, str(tmp_path))  # the rerun
  assert out["num_samples"] == 6
  assert len(list((tmp_path / "images").glob("*.png"))) == 6


def test_samples_are_quantised_as_the_reference_sampling_scripts_do():
  """clamp(255 (x + 1) / 2) truncated: 0.0 -> 127.5 -> 127 (real images and reconstructions
  use 127.5 x + 128 -> 128 instead); out-of-range values clamp."""
  from softvq_jax.utils.images import samples_to_uint8, to_uint8  # pylint: disable=g-import-not-at-top
  x = np.array([-3.0, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 2.0], np.float32)
  np.testing.assert_array_equal(samples_to_uint8(x), [0, 0, 0, 127, 191, 254, 255, 255])
  assert to_uint8(np.float32(0.0)) == 128
  levels = np.arange(256, dtype=np.float32)
  np.testing.assert_array_equal(samples_to_uint8((levels + 0.5) / 127.5 - 1.0), levels)


def _job_config(name, arg, **sampler):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("sample_config", ROOT / "configs" / name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.lock()  # as the command line's --config.sampler.X=... flags meet it
  config.sampler.update(sampler)
  return config


@pytest.mark.parametrize("name,sampler,match", [
    # A DiT guides every step: the interval had been recorded in sampling.json but not used.
    ("sample_dit_xl_softvq_l64.py", dict(guidance_interval=(0.0, 0.5)),
     "guidance_interval: not an option of a DiT"),
    ("sample_sit_xl_softvq_b64.py", dict(method="ddpm"), "method must be one of"),
    ("sample_dit_xl_softvq_l64.py", dict(timestep_respacing="ddimx"), "expected 'ddimN'"),
    # The other family's options exist in both configs, so that they are refused by name.
    ("sample_sit_xl_softvq_b64.py", dict(timestep_respacing="ddim25"),
     "timestep_respacing: not an option of a SiT's samplers"),
    ("sample_sit_xl_softvq_b64.py", dict(eta=0.5), "eta: not an option of a SiT's samplers"),
    ("sample_dit_xl_softvq_l64.py", dict(path="cosine"), "path: not an option of a DiT's"),
    ("sample_dit_xl_softvq_l64.py", dict(rtol=1e-5), "rtol: not an option of a DiT's"),
    ("sample_sit_xl_softvq_b64.py", dict(rtol=1e-5), "rtol is a dopri5 option; method "
                                                     "'euler_maruyama' does not take it")])
def test_settings_are_checked_before_anything_is_written(tmp_path, name, sampler, match):
  from softvq_jax import sample  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=match):
    sample.run(_job_config(name, "runlocal,num_samples=2", **sampler), str(tmp_path))
  assert list(tmp_path.iterdir()) == []  # no sampling.json to block the corrected rerun


@pytest.mark.parametrize("name", ["samples.npz", "samples.png", "images"])
def test_outputs_without_sampling_settings_are_not_overwritten(tmp_path, name):
  """A workdir with a samples.npz (or grid, or PNG folder) but no sampling.json is no run
  of this job to resume: the user's file is kept and the job refuses by name."""
  from softvq_jax import sample  # pylint: disable=g-import-not-at-top
  mine = tmp_path / name
  if name == "images":
    mine.mkdir()
    (mine / "keep.png").write_bytes(b"mine")
  else:
    mine.write_bytes(b"mine")
  with pytest.raises(FileExistsError, match=f"holds {name} but no sampling.json"):
    sample.run(_job_config("sample_sit_xl_softvq_b64.py", "runlocal,num_samples=2"),
               str(tmp_path))
  assert (mine / "keep.png" if name == "images" else mine).read_bytes() == b"mine"
  assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_damaged_sampling_json_is_named(tmp_path):
  from softvq_jax import sample  # pylint: disable=g-import-not-at-top
  (tmp_path / "sampling.json").write_text('{"method": "eul')
  with pytest.raises(ValueError, match="sampling.json is not valid JSON"):
    sample.run(_job_config("sample_sit_xl_softvq_b64.py", "runlocal,num_samples=2"),
               str(tmp_path))


def test_zero_samples_is_a_named_error(tmp_path):
  from softvq_jax import sample  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="num_samples=0 must be an integer >= 1"):
    sample.run(_job_config("sample_sit_xl_softvq_b64.py", "runlocal,num_samples=0"),
               str(tmp_path))


def test_dit_job_takes_the_reference_respacing_and_the_models_schedule(tmp_path):
  from softvq_jax import sample  # pylint: disable=g-import-not-at-top
  config = _job_config("sample_dit_xl_softvq_l64.py", "runlocal,num_samples=2",
                       timestep_respacing="ddim2", method="ddim")
  config.save_pngs = False
  out = sample.run(config, str(tmp_path))
  settings = json.loads((tmp_path / "sampling.json").read_text())
  assert settings["timestep_respacing"] == "ddim2" and out["num_samples"] == 2
  # The steps that ran (ddim2 keeps 2 of 1000), not runlocal's unused num_steps=10.
  assert config.sampler.num_steps == 10 and settings["num_steps"] == 2
  # The schedule is the model's own (random DiT: the reference's cosine), not a config guess.
  assert settings["noise_schedule"] == "cosine" and settings["diffusion_steps"] == 1000
  assert "guidance_interval" not in settings and "path" not in settings
  # A run recorded by an earlier version, with the unused num_steps beside the respacing,
  # resumes (and is recorded anew); another respacing is still named.
  (tmp_path / "sampling.json").write_text(json.dumps(dict(settings, num_steps=10)))
  assert sample.run(config, str(tmp_path))["num_samples"] == 2
  config.sampler.timestep_respacing = "ddim4"
  with pytest.raises(ValueError, match="num_steps: 2 there, 4 now; timestep_respacing"):
    sample.run(config, str(tmp_path))


def test_a_workdir_of_the_earlier_settings_format_resumes(tmp_path):
  """sampling.json written before the settings were recorded per family (every sampler
  field, no ``kind``): a rerun with the same settings resumes, other settings are named."""
  from softvq_jax import sample  # pylint: disable=g-import-not-at-top

  def config(steps):
    c = _job_config("sample_sit_xl_softvq_b64.py", "runlocal,num_samples=2", num_steps=steps)
    c.save_pngs = False
    return c

  sample.run(config(2), str(tmp_path / "new"))
  settings = json.loads((tmp_path / "new" / "sampling.json").read_text())
  legacy = {k: v for k, v in settings.items() if k != "kind"}
  legacy.update(noise_schedule="cosine", eta=0.0)  # recorded for SiT runs too, unused
  old = tmp_path / "old"
  old.mkdir()
  (old / "sampling.json").write_text(json.dumps(legacy))
  with pytest.raises(ValueError, match=r"num_steps: 2 there, 3 now"):
    sample.run(config(3), str(old))
  assert sample.run(config(2), str(old))["num_samples"] == 2
  assert json.loads((old / "sampling.json").read_text()) == settings


def test_sit_job_takes_the_dopri5_tolerance(tmp_path):
  from softvq_jax import sample  # pylint: disable=g-import-not-at-top
  config = _job_config("sample_sit_xl_softvq_b64.py", "runlocal,num_samples=2", method="dopri5",
                       rtol=1e-2)
  config.save_pngs = False
  sample.run(config, str(tmp_path))
  settings = json.loads((tmp_path / "sampling.json").read_text())
  assert (settings["method"], settings["rtol"]) == ("dopri5", 1e-2)
  config.sampler.rtol = 1e-4  # other samples: not mixed into this workdir
  with pytest.raises(ValueError, match="rtol: 0.01 there, 0.0001 now"):
    sample.run(config, str(tmp_path))
