"""Grain pipeline: determinism, mid-epoch resume, per-host shards, robust folders, sources."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from softvq_jax.data import pipeline, sources


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture(scope="module")
def synthetic():
  # Varying sizes exercise the resize; num_classes > n makes label == index.
  return sources.SyntheticSource(20, image_shape=None, num_classes=1000, seed=3)


def train_pipeline(source, seed=0, **kw):
  kw.setdefault("shard_index", 0)
  kw.setdefault("shard_count", 1)
  return pipeline.image_pipeline(source, batch_size=8, image_size=32, seed=seed, num_threads=2,
                                 **kw)


def test_batch_format(synthetic):
  batch = next(iter(train_pipeline(synthetic)))
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_uint8_batches_are_the_float_batches_before_conversion(synthetic):
  from softvq_jax.data import transforms  # pylint: disable=g-import-not-at-top
  as_float = take(iter(train_pipeline(synthetic, seed=2)), 3)
  as_uint8 = take(iter(train_pipeline(synthetic, seed=2, image_dtype="uint8")), 3)
  for f, u in zip(as_float, as_uint8):
    assert u["image"].dtype == np.uint8 and u["label"].dtype == np.int32
    np.testing.assert_array_equal(transforms.to_float(u["image"]), f["image"])
    np.testing.assert_array_equal(u["label"], f["label"])
  with pytest.raises(ValueError, match="image_dtype must be 'float32' or 'uint8', got 'float16'"):
    train_pipeline(synthetic, image_dtype="float16")


def test_device_conversion_equals_the_host_conversion_for_every_uint8_value():
  import jax  # pylint: disable=g-import-not-at-top
  from softvq_jax.data import transforms  # pylint: disable=g-import-not-at-top
  values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  on_device = np.asarray(jax.jit(transforms.to_float_on_device)(values))
  assert on_device.dtype == np.float32
  np.testing.assert_array_equal(on_device, transforms.to_float(values))
  assert on_device.min() == -1.0 and on_device.max() == 1.0


def test_deterministic_for_a_seed(synthetic):
  a = take(iter(train_pipeline(synthetic, seed=5)), 4)  # 4 batches of 8 > one epoch of 20
  b = take(iter(train_pipeline(synthetic, seed=5)), 4)
  assert_batches_equal(a, b)
  c = take(iter(train_pipeline(synthetic, seed=6)), 1)
  assert not np.array_equal(a[0]["label"], c[0]["label"])
  # Epochs are reshuffled and re-augmented: epoch 2 differs from epoch 1.
  labels = np.concatenate([x["label"] for x in a])
  assert sorted(labels[:20]) == list(range(20))  # epoch 1: each example once
  assert not np.array_equal(labels[:12], labels[20:32])


@pytest.mark.parametrize("consumed", [1, 2, 3])
def test_resume_mid_epoch_gives_same_next_batches(synthetic, consumed):
  ds = train_pipeline(synthetic, seed=1)
  it = iter(ds)
  take(it, consumed)
  state = json.loads(json.dumps(it.get_state()))  # the checkpoint is JSON-able
  expected = take(it, 3)  # crosses the epoch boundary at 20 examples
  resumed = iter(train_pipeline(synthetic, seed=1))
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), expected)


# Shard sizes are multiples of the batch (4), so one epoch covers the whole shard.
@pytest.mark.parametrize("count, n", [(2, 48), (3, 50), (4, 50)])
def test_simulated_processes_get_disjoint_covering_shards(count, n):
  source = sources.SyntheticSource(n, image_shape=(16, 16), num_classes=1000)
  # Training: remainder dropped so every host runs the same number of steps.
  seen = []
  for index in range(count):
    ds = pipeline.image_pipeline(source, batch_size=4, image_size=16, seed=0, num_epochs=1,
                                 shard_index=index, shard_count=count, num_threads=1)
    seen.append(np.concatenate([b["label"] for b in ds]))
  usable = n - n % count
  assert len({len(s) for s in seen}) == 1
  for i in range(count):
    for j in range(i + 1, count):
      assert not set(seen[i]) & set(seen[j])
  assert sorted(np.concatenate(seen)) == list(range(usable))
  # Evaluation: every example exactly once over all hosts, none dropped.
  seen = []
  for index in range(count):
    ds = pipeline.image_pipeline(source, batch_size=4, image_size=16, train=False,
                                 shard_index=index, shard_count=count, num_threads=1)
    seen.append(np.concatenate([b["label"] for b in ds]))
  assert sorted(np.concatenate(seen)) == list(range(n))


def test_shard_defaults_to_jax_process():
  assert pipeline.host_shard() == (0, 1)
  assert pipeline.host_shard(2, 4) == (2, 4)
  with pytest.raises(ValueError, match="shard_index 4"):
    pipeline.host_shard(4, 4)


def test_eval_is_center_crop_in_order(synthetic):
  from softvq_jax.data import decode, transforms  # pylint: disable=g-import-not-at-top
  batches = list(pipeline.image_pipeline(synthetic, batch_size=8, image_size=32, train=False,
                                         shard_index=0, shard_count=1))
  assert [len(b["label"]) for b in batches] == [8, 8, 4]
  images = np.concatenate([b["image"] for b in batches])
  want = np.stack([transforms.center_crop_arr(decode.to_pil_rgb(synthetic[i]["image"]), 32)
                   for i in range(20)])
  np.testing.assert_array_equal(images, want.astype(np.float32) / np.float32(127.5) - 1)


# ----------------------------------------------------------------- folders
def write_odd_folder(root) -> dict[str, np.ndarray]:
  """Two classes: good JPEG/PNGs, a corrupt JPEG, a CMYK JPEG, a 16-bit PNG, an RGBA PNG."""
  rng = np.random.default_rng(0)
  expected = {}
  os.makedirs(root / "cat")
  os.makedirs(root / "dog")
  for i in range(3):
    a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(a).save(root / "cat" / f"good{i}.png")
    expected[f"cat/good{i}.png"] = a
  jpeg = root / "cat" / "broken.jpg"
  Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
  data = jpeg.read_bytes()
  jpeg.write_bytes(data[:len(data) // 3])  # truncated mid-scan
  Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(root / "dog" / "cmyk.jpg", quality=95)
  expected["dog/cmyk.jpg"] = np.broadcast_to(np.array([255, 0, 0], np.uint8), (32, 32, 3))
  g16 = rng.integers(0, 65536, (32, 32), dtype=np.uint16)
  Image.fromarray(g16).save(root / "dog" / "gray16.png")
  expected["dog/gray16.png"] = np.repeat(((g16.astype(np.int64) + 128) // 257)[..., None], 3, -1)
  rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
  Image.fromarray(rgba, "RGBA").save(root / "dog" / "rgba.PNG")
  expected["dog/rgba.PNG"] = rgba[..., :3]
  (root / "dog" / "notes.txt").write_text("not an image, not listed")
  return expected


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("odd")
  return root, write_odd_folder(root)


def test_folder_listing(odd_folder):
  root, _ = odd_folder
  src = sources.ImageFolderSource(str(root))
  assert src.classes == ["cat", "dog"] and len(src) == 7
  names = [src[i]["name"] for i in range(len(src))]
  assert names == ["cat/broken.jpg", "cat/good0.png", "cat/good1.png", "cat/good2.png",
                   "dog/cmyk.jpg", "dog/gray16.png", "dog/rgba.PNG"]
  assert [src[i]["label"] for i in range(len(src))] == [0, 0, 0, 0, 1, 1, 1]


def test_odd_folder_loads_with_corrupt_file_skipped(odd_folder):
  root, expected = odd_folder
  src = sources.ImageFolderSource(str(root))
  ds = pipeline.image_pipeline(src, batch_size=3, image_size=32, train=False, shard_index=0,
                               shard_count=1, num_threads=2, max_skipped=5)
  it = iter(ds)
  batches = list(it)
  assert it.num_skipped == 1
  assert it.get_state()["num_skipped"] == 1
  assert [len(b["label"]) for b in batches] == [3, 3]
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert list(labels) == [0, 0, 0, 1, 1, 1]
  names = [n for n in sorted(expected)]  # listing order without the broken file
  for image, name in zip(images, names):
    u8 = np.round((image + 1) * 127.5).astype(int)
    tol = 12 if name.endswith(".jpg") else 0  # JPEG is lossy; PNG must be exact
    assert np.abs(u8 - expected[name]).max() <= tol, name


def test_too_many_corrupt_files_stop_with_named_error(odd_folder):
  root, _ = odd_folder
  src = sources.ImageFolderSource(str(root))
  ds = pipeline.image_pipeline(src, batch_size=2, image_size=32, train=False, shard_index=0,
                               shard_count=1, num_threads=1, max_skipped=0)
  with pytest.raises(RuntimeError, match=r"max_skipped=0.*broken\.jpg"):
    list(ds)


def test_folder_errors_name_the_problem(tmp_path, synthetic):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    sources.ImageFolderSource(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"empty has no class sub-folders"):
    sources.ImageFolderSource(str(tmp_path / "empty"))
  (tmp_path / "empty" / "a").mkdir()
  with pytest.raises(ValueError, match="no images"):
    sources.ImageFolderSource(str(tmp_path / "empty"))
  loose = tmp_path / "loose"
  loose.mkdir()
  Image.new("RGB", (4, 4)).save(loose / "x.png")
  with pytest.raises(ValueError, match="lie directly in it"):
    sources.ImageFolderSource(str(loose))
  with pytest.raises(ValueError, match=r"synthetic.*fewer than one batch of 64"):
    pipeline.image_pipeline(synthetic, batch_size=64, image_size=32, shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match=r"shard \(1 of 4\).*fewer than one batch of 8"):
    pipeline.image_pipeline(synthetic, batch_size=8, image_size=32, shard_index=1, shard_count=4)


# ----------------------------------------------------------------- sources
def test_array_record_source_matches_folder(odd_folder, tmp_path):
  root, _ = odd_folder
  folder = sources.ImageFolderSource(str(root))
  path = str(tmp_path / "odd.array_record")
  assert sources.write_image_records(path, folder) == 7
  rec = sources.ArrayRecordSource(path)
  assert len(rec) == 7 and rec[4]["name"] == "dog/cmyk.jpg" and rec[4]["label"] == 1
  kw = dict(batch_size=3, image_size=32, train=False, shard_index=0, shard_count=1)
  a, b = iter(pipeline.image_pipeline(folder, **kw)), iter(pipeline.image_pipeline(rec, **kw))
  assert_batches_equal(list(a), list(b))
  assert a.num_skipped == b.num_skipped == 1
  with pytest.raises(FileNotFoundError, match="no ArrayRecord files match"):
    sources.ArrayRecordSource(str(tmp_path / "missing-*.array_record"))
  # Records without the label field read as class 0, with one warning that says so.
  unlabelled = sources.ArrayRecordSource(path, label_key="class_id")
  with mock.patch.object(sources.logging, "warning") as warning:
    assert [unlabelled[i]["label"] for i in range(3)] == [0, 0, 0]
  assert warning.call_count == 1 and "no 'class_id' field" in warning.call_args[0][0] % (
      warning.call_args[0][1:])


def test_synthetic_source_is_deterministic():
  a, b = sources.SyntheticSource(5, seed=1), sources.SyntheticSource(5, seed=1)
  np.testing.assert_array_equal(a[3]["image"], b[3]["image"])
  assert not np.array_equal(a[3]["image"], sources.SyntheticSource(5, seed=2)[3]["image"])
  with pytest.raises(IndexError):
    a[5]  # pylint: disable=pointless-statement


@pytest.mark.skipif(not os.path.isdir(sources.FASHION_MNIST_DIR),
                    reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist():
  src = sources.FashionMnistSource("test")
  assert len(src) == 10000 and src[0]["image"].shape == (28, 28)
  assert sorted(set(int(src[i]["label"]) for i in range(200))) == list(range(10))
  batch = next(iter(pipeline.image_pipeline(src, batch_size=16, image_size=64, shard_index=0,
                                            shard_count=1, num_threads=1)))
  img = batch["image"]
  assert img.shape == (16, 64, 64, 3)
  np.testing.assert_array_equal(img[..., 0], img[..., 2])  # grey made RGB
  with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
    sources.FashionMnistSource("test", root="/nonexistent")


def test_skimage_photo_crops():
  src = sources.SkimagePhotosSource(num_examples=12, seed=0)
  assert len(src) == 12
  assert [src[i]["label"] for i in range(len(src.classes) + 1)][-1] == 0
  again = sources.SkimagePhotosSource(12, seed=0)
  np.testing.assert_array_equal(src[5]["image"], again[5]["image"])
  batch = next(iter(pipeline.image_pipeline(src, batch_size=4, image_size=32, shard_index=0,
                                            shard_count=1, num_threads=1)))
  assert batch["image"].shape == (4, 32, 32, 3)


def test_the_photo_classes_are_eight_different_photos():
  """Each label of the photo source, and each image of the photo jobs, is its own photo."""
  from softvq_jax.data.photos import skimage_photos  # pylint: disable=g-import-not-at-top
  src = sources.SkimagePhotosSource(num_examples=8)
  assert len(src.photos) == len(set(src.classes)) == 8
  shapes = [p.shape for p in src.photos]
  for i in range(8):
    for j in range(i):
      assert shapes[i] != shapes[j] or not np.array_equal(src.photos[i], src.photos[j]), \
          (src.classes[i], src.classes[j])
  images, names = skimage_photos(16)
  assert names == list(src.classes)
  distance = np.mean((images[:, None] - images[None]) ** 2, axis=(2, 3, 4))
  assert np.min(distance + np.eye(8)) > 0.01


def test_tfds_source_reads_undecoded_images(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  import io  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(buf, format="PNG")
  calls = {}

  def fake_data_source(name, **kw):
    calls.update(kw, name=name)
    return [{"image": buf.getvalue(), "label": 7, "file_name": b"n01_1.JPEG"}] * 4

  monkeypatch.setattr(tfds, "data_source", fake_data_source)
  src = sources.TfdsSource("imagenet2012", split="validation")
  assert calls["download"] is False and calls["split"] == "validation"
  assert isinstance(calls["decoders"]["image"], tfds.decode.SkipDecoding)
  assert src[0]["name"] == "n01_1.JPEG" and src[0]["label"] == 7
  batch = next(iter(pipeline.image_pipeline(src, batch_size=2, image_size=8, train=False,
                                            shard_index=0, shard_count=1)))
  np.testing.assert_allclose(batch["image"], 200 / 127.5 - 1, atol=1e-6)


def test_tfds_missing_dataset_is_named(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(FileNotFoundError, match=r"(?s)TFDS imagenet2012/train.*tfds build"):
    sources.TfdsSource("imagenet2012", data_dir=str(tmp_path))


def test_make_source_unknown_kind():
  with pytest.raises(ValueError, match="unknown data source 'imagenet'"):
    sources.make_source("imagenet")


@pytest.mark.parametrize("config_file,arg,missing", [
    ("configs/fid_stats.py", "source=folder", "root"),
    ("configs/eval_recon.py", "source=array_record", "paths")])
def test_a_source_without_its_required_argument_names_the_flag(config_file, arg, missing):
  """A job config naming a source whose location is unset: the error names the flag
  (it had been a TypeError about a constructor argument)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from softvq_jax.train.tokenizer_trainer import resolve_source  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), os.pardir, config_file)
  spec = importlib.util.spec_from_file_location("job_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  with pytest.raises(ValueError, match=rf"needs data.kwargs {missing} .*--config.data.kwargs.{missing}="):
    resolve_source(config.data, "eval")
  assert sources.required_arguments("skimage") == set()
  with pytest.raises(ValueError, match="no root directory given"):
    sources.make_source("folder", root="")


def test_no_tensorflow_import():
  code = ("import sys, softvq_jax, softvq_jax.data.photos\n"
          "from softvq_jax.data import pipeline, sources, cache_latents\n"
          "ds = pipeline.image_pipeline(sources.SyntheticSource(8), batch_size=4, image_size=16,\n"
          "                             shard_index=0, shard_count=1)\n"
          "next(iter(ds))\n"
          "tf = ('tensorflow', 'tensorflow_datasets')\n"
          "bad = [m for m in sys.modules if m.split('.')[0] in tf]\n"
          "assert not bad, bad\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_one_corrupt_file_skipped_every_epoch_counts_once_against_max_skipped(odd_folder):
  """A long run sees the training set's one unreadable file once per epoch: max_skipped
  bounds the different images, so 12 epochs pass under max_skipped=1, and the count of
  different images survives a resume."""
  root, _ = odd_folder
  src = sources.ImageFolderSource(str(root))
  kw = dict(batch_size=3, image_size=32, seed=1, num_epochs=12, shard_index=0, shard_count=1,
            num_threads=1, max_skipped=1)
  it = iter(pipeline.image_pipeline(src, **kw))
  first = take(it, 6)  # three epochs of 6 readable images
  state = it.get_state()
  assert state["distinct_skipped"] == ["cat/broken.jpg"] and state["num_skipped"] == 3
  rest = list(it)
  assert len(first) + len(rest) == 24 and it.num_skipped == 12
  resumed = iter(pipeline.image_pipeline(src, **kw))
  resumed.set_state(state)
  assert resumed.distinct_skipped == {"cat/broken.jpg"}
  assert_batches_equal(list(resumed), rest)
  with pytest.raises(RuntimeError, match=r"1 different images .* more than max_skipped=0"):
    list(pipeline.image_pipeline(src, **dict(kw, max_skipped=0)))


def test_worker_processes_match_threads_and_count_skips(odd_folder):
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags
  root, _ = odd_folder
  src = sources.ImageFolderSource(str(root))
  kw = dict(batch_size=2, image_size=32, seed=4, num_epochs=2, shard_index=0, shard_count=1)
  threads = iter(pipeline.image_pipeline(src, **kw))
  workers = iter(pipeline.image_pipeline(src, worker_count=2, **kw))
  first = take(workers, 2)
  state = workers.get_state()
  rest = list(workers)
  assert_batches_equal(first + rest, list(threads))
  assert workers.num_skipped == threads.num_skipped == 2  # once per epoch, seen by the main process
  resumed = iter(pipeline.image_pipeline(src, worker_count=2, **kw))
  resumed.set_state(state)
  assert_batches_equal(list(resumed), rest)
  for it in (threads, workers, resumed):
    it.close()


def test_hosts_split_one_global_stream():
  # 3 hosts x batch 4 consume exactly the examples 1 host x batch 12 does, epoch after epoch,
  # with the same augmentations.
  source = sources.SyntheticSource(48, image_shape=(24, 20), num_classes=1000)
  kw = dict(image_size=16, seed=9, num_threads=1)
  one = take(iter(pipeline.image_pipeline(source, batch_size=12, shard_index=0, shard_count=1,
                                          **kw)), 8)  # two epochs
  hosts = [take(iter(pipeline.image_pipeline(source, batch_size=4, shard_index=i, shard_count=3,
                                             **kw)), 8) for i in range(3)]
  single = np.concatenate([b["label"] for b in one])
  per_host = [np.concatenate([b["label"] for b in h]) for h in hosts]
  np.testing.assert_array_equal(np.stack(per_host, axis=1).reshape(-1), single)
  images = np.stack([np.concatenate([b["image"] for b in h]) for h in hosts], axis=1)
  np.testing.assert_array_equal(images.reshape(-1, 16, 16, 3),
                                np.concatenate([b["image"] for b in one]))
  # Each epoch is a new global permutation, so a host's examples change between epochs.
  assert set(per_host[0][:16]) != set(per_host[0][16:32])


def test_unreadable_dataset_does_not_spin(tmp_path, monkeypatch):
  (tmp_path / "a").mkdir()
  for i in range(4):
    (tmp_path / "a" / f"{i}.jpg").write_bytes(b"garbage")
  monkeypatch.setattr(pipeline, "MAX_SKIPPED_IN_A_ROW", 20)
  ds = pipeline.image_pipeline(sources.ImageFolderSource(str(tmp_path)), batch_size=2,
                               image_size=8, shard_index=0, shard_count=1, max_skipped=None)
  with pytest.raises(RuntimeError, match="20 images in a row"):
    next(iter(ds))


def test_orbax_checkpoint_of_the_iterator(synthetic, tmp_path):
  grain = pytest.importorskip("grain")
  ocp = pytest.importorskip("orbax.checkpoint")
  it = iter(train_pipeline(synthetic, seed=2))
  take(it, 2)
  with ocp.CheckpointManager(str(tmp_path)) as mngr:
    mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = take(it, 2)
  restored = iter(train_pipeline(synthetic, seed=2))
  with ocp.CheckpointManager(str(tmp_path)) as mngr:
    mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert_batches_equal(take(restored, 2), expected)


def test_damaged_array_record_files_are_named(tmp_path):
  good = tmp_path / "good.array_record"
  sources.write_image_records(str(good), sources.SyntheticSource(num_examples=4,
                                                                 image_shape=(8, 8)))
  data = good.read_bytes()
  truncated, noise = tmp_path / "truncated.array_record", tmp_path / "noise.array_record"
  truncated.write_bytes(data[:len(data) // 2])
  noise.write_bytes(np.random.default_rng(0).bytes(len(data)))
  for bad in (truncated, noise):
    with pytest.raises(ValueError, match=f"ArrayRecord file {bad} cannot be read as ArrayRecord"):
      sources.ArrayRecordSource([str(good), str(bad)])


@pytest.mark.parametrize("train", [False, True])
def test_an_extremely_elongated_image_is_skipped_not_resized(tmp_path, train):
  """A 1 x 60,000 strip (a 254-byte PNG) would be resized to 32 x 1,920,000 pixels (and to
  256 x 15,360,000 at 256²): skipped by name; a 63:1 panorama is still used."""
  strip, panorama = tmp_path / "strip.png", tmp_path / "panorama.png"
  Image.fromarray(np.zeros((1, 60000, 3), np.uint8)).save(strip)
  Image.fromarray(np.full((8, 504, 3), 200, np.uint8)).save(panorama)
  preprocess = pipeline.ImagePreprocess(32, train=train)
  rng = np.random.default_rng(0)
  skipped = preprocess.random_map({"image": str(strip), "name": "strip.png"}, rng)
  assert isinstance(skipped, pipeline.Skipped) and skipped.name == "strip.png"
  assert "60000x1 is more than 64:1" in skipped.reason
  kept = preprocess.random_map({"image": str(panorama), "name": "panorama.png"}, rng)
  assert kept["image"].shape == (32, 32, 3) and kept["image"].max() == 200
