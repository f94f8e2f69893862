"""Stage 2's FID hook: the reference against itself is ~0 through the hook's own path, and the
SiT/DiT trainers log a finite FID of their EMA samples."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from softvq_jax.eval import adm, fid, npz
from softvq_jax.eval.hooks import SampleFID
from softvq_jax.utils.images import from_uint8, to_uint8

sys.path.insert(0, os.path.dirname(__file__))
from test_train_engine import tiny_config  # noqa: E402  pylint: disable=g-import-not-at-top

NUM = 6


@pytest.fixture(scope="module")
def features() -> adm.InceptionFeatures:
  return adm.InceptionFeatures(batch_size=8)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
  rng = np.random.default_rng(0)
  yy, xx = np.meshgrid(np.linspace(-1, 1, 32), np.linspace(-1, 1, 32), indexing="ij")
  base = np.stack([np.sin(3 * xx), np.cos(3 * yy), xx * yy], -1)
  images = [np.clip(base * (i + 1) / NUM + 0.2 * rng.normal(size=base.shape), -1, 1)
            for i in range(NUM)]
  return to_uint8(np.stack(images))


class Writer:
  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars[step] = scalars


def _identity_hook(reference, features, tmp_path, ref, **kw):
  """Latents carry the label; 'decoding' returns that reference image: samples == reference."""

  def sample(state, noise, labels, batch):
    del state, batch
    return np.broadcast_to(np.asarray(labels, np.float32)[:, None, None], noise.shape)

  def decode(z):
    # The middle of each level's bin: sample quantisation truncates (x + 1) / 2 * 255.
    levels = reference[np.asarray(z)[:, 0, 0].astype(int)].astype(np.float32)
    return (levels + 0.5) / 127.5 - 1.0

  return SampleFID(sample, decode, latent_shape=(2, 3), num_classes=NUM, reference=ref,
                   every=10, total_steps=25, num_samples=NUM, batch_size=4, features=features,
                   inception_batch_size=8, jsonl_path=str(tmp_path / "metrics.jsonl"), **kw)


def test_reference_against_itself_is_zero(reference, features, tmp_path):
  writer = Writer()
  hook = _identity_hook(reference, features, tmp_path, reference, writer=writer)
  np.testing.assert_array_equal(hook.generate(None), reference)  # padded batches, trimmed
  hook(5, None)
  assert hook.last is None and not writer.scalars  # not an evaluation step
  hook(10, None)
  assert hook.last is not None and 0.0 <= hook.last < 1e-3
  hook(25, None)  # the last step always evaluates
  assert [s for s, _ in hook.history] == [10, 25]
  assert writer.scalars[10] == {"fid": hook.last}
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [10, 25] and rows[0]["fid"] == hook.history[0][1]

  # Against an ADM reference batch: its images (arr_0) or its stored statistics.
  path = str(tmp_path / "ref.npz")
  npz.write_sample_batch(path, reference)
  by_images = _identity_hook(reference, features, tmp_path, path)
  assert by_images.evaluate(None) < 1e-3
  feats = features(reference)["pool"]
  other = to_uint8(np.clip(from_uint8(reference)[::-1] * 0.5, -1, 1))
  stats_path = str(tmp_path / "stats.npz")
  npz.write_reference_batch(stats_path, pool=fid.FeatureStats.from_features(features(other)["pool"]),
                            spatial=fid.FeatureStats.from_features(
                                features(other)["spatial"]))
  by_stats = _identity_hook(reference, features, tmp_path, stats_path)
  other_feats = features(other)["pool"]
  want = fid.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), other_feats.mean(0),
                              np.cov(other_feats, rowvar=False))
  assert want > 1.0
  np.testing.assert_allclose(by_stats.evaluate(None), want, rtol=1e-4)


def test_arguments_are_checked(reference, features, tmp_path):
  with pytest.raises(ValueError, match="at least 2 samples"):
    _identity_hook(reference, features, tmp_path, reference).__class__(
        None, None, latent_shape=(2, 3), num_classes=2, reference=reference, every=1,
        total_steps=1, num_samples=1)
  with pytest.raises(FileNotFoundError, match="nothere.npz"):
    _identity_hook(reference, features, tmp_path, str(tmp_path / "nothere.npz"))
  with pytest.raises(ValueError, match="reference images"):
    _identity_hook(reference, features, tmp_path, reference[:1])


def _jsonl(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_sit_trainer_logs_fid(tmp_path, monkeypatch, features):
  from softvq_jax.train import sit_trainer  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(adm, "InceptionFeatures", lambda *a, **k: features)  # loaded once here
  config = tiny_config(2, log_every=2, ckpt_every=2, eval_every=2, eval_num_samples=4,
                       eval_batch_size=4, eval_inception_batch_size=8)
  config.sample.num_steps = 2
  sit_trainer.run(config, str(tmp_path))
  rows = [r for r in _jsonl(str(tmp_path)) if "fid" in r]
  assert [r["step"] for r in rows] == [2]
  assert np.isfinite(rows[0]["fid"]) and rows[0]["fid"] > 0
  from softvq_jax.config_lib import sit_recipe  # pylint: disable=g-import-not-at-top
  assert sit_recipe("softvq-b-64", "runlocal").eval_every == 0  # off unless asked


@pytest.mark.slow
def test_dit_trainer_logs_fid(tmp_path, monkeypatch, features):
  from softvq_jax.train import dit_trainer  # pylint: disable=g-import-not-at-top
  from test_dit_trainer import tiny_config as dit_tiny_config  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(adm, "InceptionFeatures", lambda *a, **k: features)
  config = dit_tiny_config(2, sample_every=0, eval_every=2, eval_num_samples=4,
                           eval_batch_size=4, eval_inception_batch_size=8)
  config.sample.num_steps = 2
  dit_trainer.run(config, str(tmp_path))
  rows = [r for r in _jsonl(str(tmp_path)) if "fid" in r]
  assert [r["step"] for r in rows] == [2] and np.isfinite(rows[0]["fid"])


def test_guided_training_samples_need_the_null_class_row():
  """A model without the null-class row (class_dropout_prob = 0) cannot be guided: an
  out-of-range label would be clamped to the last class by the gather, silently."""
  from softvq_jax.models.sit import GeneratorConfig  # pylint: disable=g-import-not-at-top
  from softvq_jax.train import sit_trainer  # pylint: disable=g-import-not-at-top
  config = GeneratorConfig(kind="sit", input_size=4, in_channels=2, hidden_size=8, depth=1,
                           num_heads=2, num_classes=3, class_dropout_prob=0.0)
  with pytest.raises(ValueError, match="cfg_scale=1.5: classifier-free guidance needs"):
    sit_trainer.ema_sampler(None, config, num_steps=2, cfg_scale=1.5)
  assert sit_trainer.ema_sampler(None, config, num_steps=2, cfg_scale=1.0) is not None
  # The DiT trainer's sampler likewise (it had sampled unguided without a word).
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from softvq_jax.train import dit_trainer  # pylint: disable=g-import-not-at-top
  dit = dataclasses.replace(config, kind="dit", learn_sigma=True)
  with pytest.raises(ValueError, match="cfg_scale=1.5: classifier-free guidance needs"):
    dit_trainer.ema_sampler(None, dit, num_steps=2, cfg_scale=1.5, key=jax.random.key(0))
  assert dit_trainer.ema_sampler(None, dit, num_steps=2, cfg_scale=1.0,
                                 key=jax.random.key(0)) is not None
