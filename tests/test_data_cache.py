"""Latent cache: exact round trip against Tokenizer.encode, resume, multi-process, reader."""

from __future__ import annotations

import os

import numpy as np
import pytest

from softvq_jax import Tokenizer
from softvq_jax.data import cache_latents, decode, records, sources, transforms

TINY = dict(enc_type="vit", dec_type="vit", encoder_model="vit_small_patch14_dinov2.lvd142m",
            decoder_model="vit_small_patch14_dinov2.lvd142m",
            encoder_kwargs=dict(embed_dim=64, depth=1, num_heads=2),
            decoder_kwargs=dict(embed_dim=32, depth=1, num_heads=2), image_size=32,
            enc_patch_size=8, dec_patch_size=8, num_latent_tokens=8, codebook_embed_dim=4,
            codebook_size=16, num_codebooks=2, tau=0.07, vq_mean=0.5, vq_std=2.0)
N, PER_SHARD, BATCH = 20, 8, 4  # shards of 8, 8, 4: every encode call is a full batch


def sensitive_tokenizer(seed: int) -> Tokenizer:
  """A random tokenizer whose latents depend on the image.

  At init LayerScale (1e-5) mutes every block, so the latents are nearly the
  same for any input; with the gains at 1 a wrong or mirrored image shows.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  model = Tokenizer.random(TINY, seed=seed).model()
  state = nnx.state(model, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    if path[-1] == "gamma":
      var.set_value(jnp.ones_like(var.get_value()))
  nnx.update(model, state)
  return Tokenizer(model)


@pytest.fixture(scope="module")
def tok():
  return sensitive_tokenizer(seed=1)


@pytest.fixture(scope="module")
def source():
  return sources.SyntheticSource(N, image_shape=None, num_classes=7, seed=4)


@pytest.fixture(scope="module")
def images(source):
  """The ADM centre crops the cache must have encoded, computed here from the source."""
  u8 = np.stack([transforms.center_crop_arr(decode.to_pil_rgb(source[i]["image"]), 32)
                 for i in range(N)])
  return u8.astype(np.float32) / np.float32(127.5) - np.float32(1)


@pytest.fixture(scope="module")
def cache(tok, source, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("cache"))
  info = cache_latents.write_latent_cache(tok, source, out, batch_size=BATCH,
                                          examples_per_shard=PER_SHARD, process_index=0,
                                          process_count=1, progress=False)
  return out, info


def read_all(cache_dir):
  src = cache_latents.LatentCacheSource(cache_dir)
  return [src[i] for i in range(len(src))]


def test_round_trip_is_exact(tok, images, cache):
  out, info = cache
  assert info["num_shards"] == 3 and info["written_shards"] == [0, 1, 2]
  assert info["latent_shape"] == [8, 4] and info["skipped_images"] == 0
  recs = read_all(out)
  assert [r["index"] for r in recs] == list(range(N))
  assert [int(r["label"]) for r in recs] == [i % 7 for i in range(N)]
  latents = np.stack([r["latent"] for r in recs])
  flipped = np.stack([r["latent_flip"] for r in recs])
  assert latents.dtype == np.float32 and latents.shape == (N, 8, 4)
  # Bit-exact against Tokenizer.encode of the same calls ([x; mirror(x)], BATCH images each).
  for i in range(0, N, BATCH):
    x = images[i:i + BATCH]
    z = np.asarray(tok.encode(np.concatenate([x, x[:, :, ::-1]])))
    np.testing.assert_array_equal(latents[i:i + BATCH], z[:BATCH])
    np.testing.assert_array_equal(flipped[i:i + BATCH], z[BATCH:])
  # And equal up to float reassociation to one call over everything.
  np.testing.assert_allclose(latents, tok.encode(images), atol=1e-5)
  np.testing.assert_allclose(flipped, tok.encode(images[:, :, ::-1]), atol=1e-5)
  # The latents see the image: a mirror or another image gives other latents.
  assert np.abs(latents - flipped).max() > 1e-2
  assert np.abs(latents[1:] - latents[:-1]).max(axis=(1, 2)).min() > 1e-2


def test_rerun_skips_complete_shards_and_redoes_interrupted(tok, source, cache, tmp_path):
  out, _ = cache
  before = read_all(out)
  # Simulate a crash while writing shard 1: its final file missing, a temp file left behind.
  partial = str(tmp_path / "partial")
  os.makedirs(partial)
  for name in os.listdir(out):
    os.link(os.path.join(out, name), os.path.join(partial, name))
  shard1 = os.path.join(partial, cache_latents.shard_name(1, 3))
  os.remove(shard1)
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                capture_output=True, text=True, check=True).stdout)
  torn = os.path.join(partial, f".{os.path.basename(shard1)}.tmp-{socket.gethostname()}-{dead_pid}")
  with open(torn, "wb") as f:
    f.write(b"half a shard")
  with pytest.raises(FileNotFoundError, match=r"incomplete: 1 of 3 shards missing"):
    cache_latents.LatentCacheSource(partial)
  info = cache_latents.write_latent_cache(tok, source, partial, batch_size=BATCH,
                                          examples_per_shard=PER_SHARD, process_index=0,
                                          process_count=1, progress=False)
  assert info["written_shards"] == [1] and info["existing_shards"] == 2
  assert not [n for n in os.listdir(partial) if ".tmp-" in n]
  after = read_all(partial)
  for a, b in zip(before, after):
    for k in ("latent", "latent_flip", "label", "index"):
      np.testing.assert_array_equal(a[k], b[k])


def test_processes_split_the_shards(tok, source, cache, tmp_path):
  out, _ = cache
  shared = str(tmp_path / "multi")
  written = []
  for p in range(2):
    info = cache_latents.write_latent_cache(tok, source, shared, batch_size=BATCH,
                                            examples_per_shard=PER_SHARD, process_index=p,
                                            process_count=2, progress=False)
    written.append(info["written_shards"])
  assert written == [[0, 2], [1]]
  for a, b in zip(read_all(out), read_all(shared)):
    np.testing.assert_array_equal(a["latent"], b["latent"])


def test_other_tokenizer_cannot_resume(source, cache):
  out, _ = cache
  other = sensitive_tokenizer(seed=2)
  with pytest.raises(ValueError, match=r"different settings \(tokenizer"):
    cache_latents.write_latent_cache(other, source, out, batch_size=BATCH,
                                     examples_per_shard=PER_SHARD, process_index=0,
                                     process_count=1, progress=False)


def test_another_kind_of_source_cannot_resume(tok, cache):
  # As many images, other data: resuming would fill the remaining shards from it.
  out, _ = cache
  photos = sources.SkimagePhotosSource(num_examples=N)
  with pytest.raises(ValueError, match=r"different settings \(source_kind: cache has "
                                       r"'SyntheticSource', this run 'SkimagePhotosSource'"):
    cache_latents.write_latent_cache(tok, photos, out, batch_size=BATCH,
                                     examples_per_shard=PER_SHARD, process_index=0,
                                     process_count=1, progress=False)


def test_another_folder_of_as_many_images_cannot_resume(tok, tmp_path, caplog):
  """Same kind, same count, other images: refused by the names of its examples; the same
  images in a folder that moved resume, with a warning."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def folder(name, stems):
    (tmp_path / name / "c").mkdir(parents=True)
    for i, stem in enumerate(stems):
      image = Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8))
      image.save(tmp_path / name / "c" / f"{stem}.png")
    return sources.ImageFolderSource(str(tmp_path / name))

  kw = dict(batch_size=BATCH, examples_per_shard=2, process_index=0, process_count=2,
            progress=False)
  out = str(tmp_path / "cache")
  cache_latents.write_latent_cache(tok, folder("a", "pqr"), out, **kw)  # shard 1 left to do
  with pytest.raises(ValueError, match=r"example_names: cache has \['c/p.png', 'c/q.png', "
                                       r"'c/r.png'\], this run \['c/x.png', 'c/y.png', "
                                       r"'c/z.png'\]"):
    cache_latents.write_latent_cache(tok, folder("b", "xyz"), out, **kw)
  with caplog.at_level("WARNING"):
    info = cache_latents.write_latent_cache(tok, folder("moved", "pqr"), out,
                                            **dict(kw, process_index=1))
  assert info["cached_examples"] == 3 and "was started from image folder" in caplog.text


def test_a_cache_is_for_one_tokenizer_at_one_precision(tok, source, cache):
  """Another compute dtype cannot resume it; a SiT run with another tokenizer (same latent
  shape and statistics) cannot train on it; fingerprints allow summation-order rounding."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from softvq_jax.train import sit_trainer  # pylint: disable=g-import-not-at-top
  out, _ = cache
  bf16 = Tokenizer(tok.model(), dtype="bfloat16")
  with pytest.raises(ValueError, match=r"different settings \(compute_dtype"):
    cache_latents.write_latent_cache(bf16, source, out, batch_size=BATCH,
                                     examples_per_shard=PER_SHARD, process_index=0,
                                     process_count=1, progress=False)
  config = ml_collections.ConfigDict(dict(data=dict(cache_dir=out), global_batch_size=4, seed=0))
  assert sit_trainer._cache_iterator(config, tok, 7) is not None  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="written by another tokenizer"):
    sit_trainer._cache_iterator(config, sensitive_tokenizer(seed=2), 7)  # pylint: disable=protected-access
  same = cache_latents.same_tokenizer
  assert same("abc-10-1.234567e+03", "abc-10-1.234568e+03")
  assert not same("abc-10-1.234567e+03", "abc-10-1.235567e+03")
  assert not same("abc-10-1.234567e+03", "abd-10-1.234567e+03")


def test_runlocal_recipe_trains_on_a_cache_given_by_flag(tok, cache):
  """``configs/sit_*.py:runlocal --config.data.cache_dir=DIR``: the shrunk recipe's data
  (offline images) had no ``cache_dir`` field, so the flag was refused."""
  from softvq_jax.config_lib import sit_recipe  # pylint: disable=g-import-not-at-top
  from softvq_jax.train import sit_trainer  # pylint: disable=g-import-not-at-top
  out, _ = cache
  config = sit_recipe("softvq-b-64", "runlocal")
  config.data.cache_dir = out
  config.global_batch_size = 4
  batch = next(iter(sit_trainer.latent_data(config, tok, 7)))
  assert batch["latent"].shape == (4,) + tok.latent_shape
  cached = {tuple(np.round(r[key].ravel()[:4], 4)) for r in read_all(out)
            for key in ("latent", "latent_flip")}
  assert len(cached) == 2 * N
  first = np.asarray(batch["latent"][0])
  # Normalised latents of the cache, not of the offline images the recipe would encode.
  raw = first * tok.config.vq_std + tok.config.vq_mean
  assert tuple(np.round(raw.ravel()[:4], 4)) in cached


def test_the_generator_trainers_check_their_classes_against_the_cache(tok, cache, caplog):
  """The cache records its source's class count (7 here): a generator with fewer classes is
  refused before it trains, one with more is warned of the classes no example teaches."""
  from softvq_jax.config_lib import sit_recipe  # pylint: disable=g-import-not-at-top
  from softvq_jax.train import sit_trainer  # pylint: disable=g-import-not-at-top
  out, info = cache
  assert info["num_classes"] == 7
  config = sit_recipe("softvq-b-64", "runlocal")
  config.data.cache_dir = out
  config.global_batch_size = 4
  with pytest.raises(ValueError, match="holds 7 classes, the generator has num_classes=5: set "
                                       "--config.model.num_classes=7"):
    sit_trainer.latent_data(config, tok, 5)
  with caplog.at_level("WARNING"):
    sit_trainer.latent_data(config, tok, 10)
  assert any("holds 7 classes" in r.getMessage() and "classes 7 to 9 are never trained"
             in r.getMessage() for r in caplog.records)


def test_labels_beyond_the_generator_classes_are_refused(cache):
  """The cache holds labels 0..6; a 5-class generator would silently train label 5 as its
  unconditional row. Reading such a record names it and the class count."""
  out, _ = cache
  labels = [int(r["label"]) for r in read_all(out)]
  assert max(labels) == 6
  ok = cache_latents.latent_pipeline(out, batch_size=4, train=False, num_classes=7,
                                     shard_index=0, shard_count=1)
  assert sorted(np.concatenate([b["label"] for b in ok]).tolist()) == sorted(labels)
  first_bad = next(i for i, label in enumerate(labels) if label >= 5)
  bad = cache_latents.latent_pipeline(out, batch_size=4, train=False, num_classes=5,
                                      shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match=rf"record {first_bad} .* has label \d, outside \[0, 5\)"):
    list(bad)


def test_reader_pipeline(cache):
  out, _ = cache
  recs = read_all(out)
  z = np.stack([r["latent"] for r in recs])
  zf = np.stack([r["latent_flip"] for r in recs])
  ev = list(cache_latents.latent_pipeline(out, batch_size=8, train=False, shard_index=0,
                                          shard_count=1))
  assert [len(b["label"]) for b in ev] == [8, 8, 4]
  np.testing.assert_array_equal(np.concatenate([b["latent"] for b in ev]), z)
  norm = next(iter(cache_latents.latent_pipeline(out, batch_size=8, train=False, normalize=True,
                                                 shard_index=0, shard_count=1)))
  np.testing.assert_allclose(norm["latent"], (z[:8] - 0.5) / 2.0, rtol=1e-6)

  def epoch(seed):
    it = iter(cache_latents.latent_pipeline(out, batch_size=4, seed=seed, num_epochs=1,
                                            shard_index=0, shard_count=1, num_threads=1))
    return [b for b in it]

  batches = epoch(3)
  assert_same = epoch(3)
  flips = []
  for b, c in zip(batches, assert_same):
    np.testing.assert_array_equal(b["latent"], c["latent"])
    for latent, label in zip(b["latent"], b["label"]):
      hit = [i for i in range(N) if np.array_equal(latent, z[i]) or np.array_equal(latent, zf[i])]
      assert len(hit) == 1 and recs[hit[0]]["label"] == label
      flips.append(np.array_equal(latent, zf[hit[0]]))
  assert len(flips) == N and 0 < sum(flips) < N  # both copies are used


def test_reader_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    cache_latents.LatentCacheSource(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="not a latent cache"):
    cache_latents.LatentCacheSource(str(tmp_path))


def test_records_write_is_atomic(tmp_path):
  path = str(tmp_path / "r.array_record")

  def bad():
    yield {"a": np.ones(3, np.float32)}
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    records.write_records(path, bad())
  assert os.listdir(tmp_path) == []
  assert records.write_records(path, ({"a": np.full(2, i)} for i in range(3))) == 3
  assert records.num_records(path) == 3


def test_undecodable_images_are_left_out_and_counted(tok, tmp_path):
  from test_data_pipeline import write_odd_folder  # pylint: disable=g-import-not-at-top
  root = tmp_path / "odd"
  write_odd_folder(root)
  src = sources.ImageFolderSource(str(root))
  kw = dict(batch_size=BATCH, examples_per_shard=PER_SHARD, process_index=0, process_count=1,
            progress=False)
  info = cache_latents.write_latent_cache(tok, src, str(tmp_path / "c"), max_skipped=5, **kw)
  assert info["skipped_images"] == 1
  assert info["num_examples"] == 7 and info["cached_examples"] == 6
  recs = read_all(str(tmp_path / "c"))
  assert [r["name"] for r in recs] == [src[i]["name"] for i in range(1, 7)]
  with pytest.raises(RuntimeError, match=r"max_skipped=0.*broken\.jpg"):
    cache_latents.write_latent_cache(tok, src, str(tmp_path / "d"), max_skipped=0, **kw)
  assert not [n for n in os.listdir(tmp_path / "d") if n.endswith(".array_record")]


def test_cache_on_a_bucket_is_written_there_and_mirrored_for_reading(tok, source, cache, bucket,
                                                                     tmp_path, monkeypatch):
  """``gs://`` caches: shards and info land in the bucket, not in a local folder named
  ``gs:``; the reader copies them once to a local mirror and reads the same records."""
  monkeypatch.chdir(tmp_path)
  url = "gs://bucket/latents"
  info = cache_latents.write_latent_cache(tok, source, url, batch_size=BATCH,
                                          examples_per_shard=PER_SHARD, process_index=0,
                                          process_count=1, progress=False)
  assert info["written_shards"] == [0, 1, 2]
  assert not os.path.exists(tmp_path / "gs:")
  stored = sorted(os.listdir(bucket / "latents"))
  assert stored == sorted([cache_latents.CACHE_INFO] +
                          [cache_latents.shard_name(s, 3) for s in range(3)])
  # A rerun finds the bucket's shards complete.
  again = cache_latents.write_latent_cache(tok, source, url, batch_size=BATCH,
                                           examples_per_shard=PER_SHARD, process_index=0,
                                           process_count=1, progress=False)
  assert again["written_shards"] == [] and again["existing_shards"] == 3

  mirror = str(tmp_path / "mirror")
  src = cache_latents.LatentCacheSource(url, mirror_dir=mirror, progress=False)
  assert all(p.startswith(mirror) for p in src.paths)
  local = read_all(cache[0])
  got = [src[i] for i in range(len(src))]
  assert [r["index"] for r in got] == [r["index"] for r in local]
  for a, b in zip(got, local):
    np.testing.assert_array_equal(a["latent"], b["latent"])
    np.testing.assert_array_equal(a["latent_flip"], b["latent_flip"])
  # The default mirror is keyed by URL and cache info: another tokenizer's cache gets another.
  other = dict(src.info, tokenizer="something else")
  assert (cache_latents.default_mirror_dir(url, src.info)
          != cache_latents.default_mirror_dir(url, other))
  # Shards already mirrored are not copied again.
  (bucket / "latents" / cache_latents.shard_name(0, 3)).write_bytes(b"corrupt")
  again_src = cache_latents.LatentCacheSource(url, mirror_dir=mirror, progress=False)
  assert again_src[0]["index"] == 0


def test_in_memory_labels_beyond_the_generator_classes_are_refused(tok):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from softvq_jax.train import sit_trainer  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(
      data=dict(source="synthetic", num_examples=6, num_classes=6), global_batch_size=2, seed=0))
  with pytest.raises(ValueError, match=r"labels in \[0, 5\], the generator has num_classes=4"):
    sit_trainer.latent_data(config, tok, 4)
  batch = next(sit_trainer.latent_data(config, tok, 6))
  assert batch["latent"].shape == (2, *tok.latent_shape)
