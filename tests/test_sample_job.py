"""The sample job: class-balanced samples as PNGs and an ADM npz, settings recorded, resumable."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from softvq_jax.sample import balanced_labels

ROOT = pathlib.Path(__file__).parent.parent


def run_job(config, workdir, *overrides):
  cmd = [sys.executable, "-m", "softvq_jax.main", f"--config={config}", f"--workdir={workdir}",
         *overrides]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("config, method", [
    ("configs/sample_sit_xl_softvq_b64.py:runlocal,num_samples=12", "euler_maruyama"),
    ("configs/sample_dit_xl_softvq_l64.py:runlocal,num_samples=12", "ddpm"),
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
  # Other settings in the same workdir are refused rather than mixed in.
  other = run_job(config, workdir, "--config.sampler.num_steps=4", "--config.batch_size=5")
  assert other.returncode != 0 and "other settings" in other.stderr


def test_balanced_labels():
  labels = balanced_labels(50_000, 1000)
  assert np.all(np.bincount(labels, minlength=1000) == 50)
  assert np.all(np.diff(balanced_labels(7, 3)) >= 0)
  assert set(balanced_labels(7, 3)) == {0, 1, 2}
