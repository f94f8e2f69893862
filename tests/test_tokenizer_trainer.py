"""Stage-1 training runs: a short run that learns and exports, fine-tuning a converted checkpoint.

The objective itself (every term, both optimizers, sharding, resume) is in test_stage1.py.
"""

import json

import ml_collections
import numpy as np
import pytest
from conftest import FIXTURES

from softvq_jax import Tokenizer
from softvq_jax.config_lib import tokenizer_recipe
from softvq_jax.train import tokenizer_trainer

TINY = dict(image_size=32, enc_patch_size=8, dec_patch_size=8, num_latent_tokens=8,
            codebook_embed_dim=4, codebook_size=32,
            encoder_kwargs=dict(embed_dim=32, depth=1, num_heads=2, init_values=1.0),
            decoder_kwargs=dict(embed_dim=32, depth=1, num_heads=2, init_values=1.0))


def tiny_config(steps, **loss):
  c = tokenizer_recipe("softvq-b-64", "runlocal")
  c.model.update(TINY)
  c.data = ml_collections.ConfigDict(dict(
      source="synthetic", kwargs=dict(num_examples=64, image_shape=(32, 32), num_classes=4),
      min_resize=32, max_resize=36, horizontal_flip=True))
  c.global_batch_size = 8
  c.total_steps = steps
  c.optim.lr = 2e-3 * 256 / 8
  c.optim.warmup_epochs = 0
  c.optim.schedule = "constant"
  c.loss.perceptual_weight = 0.0
  c.loss.disc_weight = 0.0
  c.loss.repa = False
  c.loss.update(loss)
  c.ema_decay = 0.9
  c.log_every, c.vis_every, c.ckpt_every = 5, 10, 10
  return c


def test_short_run_learns_and_exports(tmp_path):
  workdir = tmp_path / "tok"
  config = tiny_config(80)
  # Real images: Fashion-MNIST (installed by launch/setup.sh), else the bundled photos.
  config.data = ml_collections.ConfigDict(dict(source="offline", min_resize=32, max_resize=36))
  config.eval_every, config.eval_num_images = 80, 16     # the held-out rFID hook, at the end
  last = tokenizer_trainer.run(config, str(workdir))
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  logs = [row for row in rows if "mse" in row]
  assert logs[0]["step"] == 5 and logs[-1]["step"] == 80
  # The held-out metrics reach metrics.jsonl too, not only TensorBoard.
  (heldout,) = [row for row in rows if "heldout_rfid" in row]
  assert heldout["step"] == 80 and heldout["heldout_rfid"] == last["heldout_rfid"]
  first = np.mean([l["mse"] for l in logs[:2]])
  final = np.mean([l["mse"] for l in logs[-2:]])
  assert final < 0.8 * first, (first, final)
  assert 0 < last["code_usage"] <= 1 and np.isfinite(last["heldout_psnr"])
  # rFID/PSNR/SSIM of 16 held-out images through the same code as the eval_recon job
  assert last["heldout_num_images"] == 16 and last["heldout_rfid"] > 0
  assert 5 < last["heldout_psnr"] < 60 and 0 < last["heldout_ssim"] <= 1
  assert (workdir / "reconstructions" / "step_00000040.png").exists()
  tok = Tokenizer.load(str(workdir / "tokenizer"))
  assert tok.latent_shape == (8, 4)
  # The job config is kept with the checkpoints, so that a resumed run is compared with it.
  from softvq_jax.checkpoint import TrainCheckpointer  # pylint: disable=g-import-not-at-top
  from softvq_jax.train import common  # pylint: disable=g-import-not-at-top
  ckpt = TrainCheckpointer(str(workdir / "checkpoints"))
  assert common.warn_of_other_run_settings(ckpt, config) == []
  config.data.max_resize = 40
  assert common.warn_of_other_run_settings(ckpt, config) == [
      "data.max_resize: checkpoint 36, this run 40"]
  ckpt.close()


def test_fine_tune_from_a_converted_checkpoint(tmp_path):
  from softvq_jax.convert.__main__ import main as convert_main
  hf = FIXTURES / "softvq_tiny_hf"
  converted = tmp_path / "converted"
  assert convert_main(["--checkpoint", str(hf / "model.safetensors"), "--config",
                       str(hf / "config.json"), "--out", str(converted)]) == 0
  cfg = json.load(open(converted / "config.json"))
  c = tiny_config(2)
  c.model = ml_collections.ConfigDict(cfg)
  c.data.min_resize, c.data.max_resize = 64, 72
  c.init_from = str(converted)
  c.optim.lr = c.optim.warmup_lr = c.optim.min_lr = 0.0  # no update: EMA = converted weights
  c.ema_decay = 0.5
  tokenizer_trainer.run(c, str(tmp_path / "ft"))
  ref = dict(np.load(FIXTURES / "softvq_tiny.npz"))
  tuned = Tokenizer.load(str(tmp_path / "ft" / "tokenizer"))
  z = tuned.encode(ref["in/images"].transpose(0, 2, 3, 1))
  np.testing.assert_allclose(z, ref["out/quant"], rtol=1e-5, atol=1e-6)


def test_init_from_refuses_same_shaped_other_settings(tmp_path, caplog):
  """Twice the heads at one width keeps every shape: only the saved config tells them apart
  (a 2-head run had trained from 3-head weights without a word)."""
  import logging  # pylint: disable=g-import-not-at-top
  from softvq_jax.convert.__main__ import main as convert_main  # pylint: disable=g-import-not-at-top
  from softvq_jax.models.config import TokenizerConfig  # pylint: disable=g-import-not-at-top
  hf = FIXTURES / "softvq_tiny_hf"
  converted = tmp_path / "converted"
  assert convert_main(["--checkpoint", str(hf / "model.safetensors"), "--config",
                       str(hf / "config.json"), "--out", str(converted)]) == 0
  cfg = json.load(open(converted / "config.json"))
  tokenizer_trainer.check_init_from(str(converted), TokenizerConfig.from_json_dict(cfg))
  heads = cfg["encoder_kwargs"]["num_heads"]
  other = dict(cfg, encoder_kwargs=dict(cfg["encoder_kwargs"], num_heads=1), tau=0.5)
  with pytest.raises(ValueError, match=rf"encoder.num_heads: {heads} there, 1 here; tau: "):
    tokenizer_trainer.check_init_from(str(converted), TokenizerConfig.from_json_dict(other))
  with caplog.at_level(logging.WARNING):
    tokenizer_trainer.check_init_from(
        str(converted), TokenizerConfig.from_json_dict(dict(cfg, vq_mean=0.0, vq_std=1.0)))
  assert f"--config.model.vq_mean={cfg['vq_mean']}" in caplog.text


def test_discriminator_optimizer_takes_its_overrides(monkeypatch):
  seen = []
  real = tokenizer_trainer.make_stage1_optimizer
  monkeypatch.setattr(tokenizer_trainer, "make_stage1_optimizer",
                      lambda optim, steps: seen.append(optim) or real(optim, steps))
  c = tiny_config(4)
  c.disc_optim.lr, c.disc_optim.b2 = 2e-4, 0.99
  tokenizer_trainer.build_stage1(c, total_steps=4, steps_per_epoch=10)
  gen, disc = seen
  scale = c.global_batch_size / 256
  assert gen.lr == pytest.approx(c.optim.lr * scale) and gen.b2 == c.optim.b2
  assert disc.lr == pytest.approx(2e-4 * scale) and disc.b2 == 0.99 and disc.b1 == gen.b1


def test_warm_up_fits_the_run():
  """``:runlocal`` warms up over a few steps, not over an epoch of the real data (7,500 steps
  of Fashion-MNIST at batch 8, longer than its 60-step run); ``optim.warmup_steps``
  overrides ``warmup_epochs`` in any config."""
  c = tiny_config(60)
  c.optim.schedule = "cosine"
  c.optim.lr = tokenizer_recipe("softvq-b-64", "runlocal").optim.lr
  setup = tokenizer_trainer.build_stage1(c, total_steps=60, steps_per_epoch=7500)
  peak = c.optim.lr * c.global_batch_size / 256
  assert float(setup.lr_fn(5)) > 0.95 * peak  # the cosine has begun (timm: no warm-up offset)
  assert float(setup.lr_fn(30)) > 0.5 * peak
  c.optim.warmup_steps, c.optim.warmup_epochs = None, 1  # the recipe's epoch: never warm
  setup = tokenizer_trainer.build_stage1(c, total_steps=60, steps_per_epoch=7500)
  assert float(setup.lr_fn(59)) < 0.01 * peak + c.optim.warmup_lr


def test_the_recipes_switch_data_source_by_flags(tmp_path):
  """--config.data.source=folder --config.data.kwargs.root=DIR on an ImageNet recipe: the
  kwargs every source takes are declared, and each source reads its own."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from softvq_jax.data import sources  # pylint: disable=g-import-not-at-top
  for label in ("a", "b"):
    (tmp_path / label).mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / label / "x.png")
  c = tokenizer_recipe("softvq-b-64", None)
  c.data.source, c.data.kwargs.root = "folder", str(tmp_path)
  source = tokenizer_trainer.resolve_source(c.data, "train")
  assert isinstance(source, sources.ImageFolderSource) and len(source) == 2
  c.data.source = "fashion_mnist"  # "validation" (ImageNet's) is its "test"
  try:
    held_out = tokenizer_trainer.resolve_source(c.data, "eval")
    assert held_out.name.startswith("Fashion-MNIST test")
  except FileNotFoundError as e:  # the Debian package is absent: the named error, not the split's
    assert "dataset-fashion-mnist" in str(e)
  assert sources.split_kwargs("fashion_mnist", {"split": "x", "root": "r", "dataset": "d"}) == (
      {"split": "x", "root": "r"}, {"dataset": "d"})
  with pytest.raises(ValueError, match="unknown data source 'imagefolder'"):
    sources.split_kwargs("imagefolder", {})
  c.data.source = "imagefolder"  # the trainer's own list includes its offline source
  with pytest.raises(ValueError, match="unknown data.source 'imagefolder'; choose one of offline, "):
    tokenizer_trainer.resolve_source(c.data, "train")


def test_an_image_folder_takes_its_held_out_images_from_eval_data(tmp_path, caplog):
  """A folder has no held-out split: without eval_data the trainer says that it measures
  training images; with it, the held-out images are the named folder's."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for folder, count in (("train", 3), ("heldout", 2)):
    (tmp_path / folder / "c").mkdir(parents=True)
    for i in range(count):
      Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / folder / "c" / f"{i}.png")
  c = tokenizer_recipe("softvq-b-64", None)
  c.data.source, c.data.kwargs.root = "folder", str(tmp_path / "train")
  with caplog.at_level("WARNING"):
    fallback = tokenizer_trainer.held_out_source(c, "the reconstruction grid")
  assert len(fallback) == 3
  assert ("data.source=folder has no held-out split: the images of the reconstruction grid "
          "are TRAINING images" in caplog.text)
  assert "--config.eval_data.source=folder --config.eval_data.kwargs.root=DIR" in caplog.text
  caplog.clear()
  c.eval_data.source, c.eval_data.kwargs.root = "folder", str(tmp_path / "heldout")
  with caplog.at_level("WARNING"):
    held_out = tokenizer_trainer.held_out_source(c, "the reconstruction grid")
  assert len(held_out) == 2 and "TRAINING" not in caplog.text
  # ImageNet's validation split is held out: no warning.
  c.eval_data.source = ""
  c.data.source = "fashion_mnist"
  try:
    tokenizer_trainer.held_out_source(c, "the reconstruction grid")
  except FileNotFoundError:
    pass
  assert "TRAINING" not in caplog.text
