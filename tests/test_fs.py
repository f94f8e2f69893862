"""Workdirs on a bucket (``gs://``): what the trainers write goes through ``utils.fs``.

No bucket is reachable offline, so ``gs://bucket/...`` is mapped onto a local
folder through ``etils.epath`` (the library the real URLs go through); the code
under test takes its URL branch: single uploads, rewrite instead of append,
upload with ``config.json`` last.
"""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from softvq_jax import checkpoint
from softvq_jax.train import common
from softvq_jax.train.loop import JsonlWriter
from softvq_jax.utils import fs
from softvq_jax.utils.images import save_png


def test_urls_are_not_turned_into_local_folders():
  assert fs.abspath("gs://bucket/run") == "gs://bucket/run"
  assert fs.abspath("run") == os.path.abspath("run")
  assert fs.is_remote("gs://b/x") and not fs.is_remote("/tmp/x")


def test_metrics_lines_accumulate_on_a_bucket(bucket):
  (bucket / "run").mkdir(parents=True)
  (bucket / "run" / "metrics.jsonl").write_text('{"step": 1}\n')  # from before a restart
  writer = JsonlWriter("gs://bucket/run/metrics.jsonl")
  writer.write(2, {"loss": 0.5})
  writer.write(3, {"loss": 0.25})
  lines = [json.loads(l) for l in (bucket / "run" / "metrics.jsonl").read_text().splitlines()]
  assert lines == [{"step": 1}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.25}]


def test_png_is_one_upload(bucket):
  image = np.random.default_rng(0).integers(0, 255, (8, 12, 3), dtype=np.uint8)
  assert save_png("gs://bucket/run/grids/step_10.png", image) == "gs://bucket/run/grids/step_10.png"
  np.testing.assert_array_equal(np.asarray(Image.open(bucket / "run/grids/step_10.png")), image)
  assert os.listdir(bucket / "run/grids") == ["step_10.png"]  # no temporary file left
  assert bucket.writes == ["run/grids/step_10.png"]


def test_parameter_directory_uploads_config_last_and_refuses_to_overwrite(bucket, monkeypatch):
  flat = {("a", "kernel"): np.ones((2, 3), np.float32), ("b",): np.arange(4, dtype=np.float32)}
  out = checkpoint.write_param_dir("gs://bucket/run/tokenizer", flat, {"name": "x"},
                                   extra_json={"conversion.json": {"k": 1}})
  assert out == "gs://bucket/run/tokenizer"
  assert bucket.writes[-1] == "run/tokenizer/config.json"
  assert "run/tokenizer/conversion.json" in bucket.writes
  assert any(w.startswith("run/tokenizer/params/") for w in bucket.writes)
  assert checkpoint.read_config("gs://bucket/run/tokenizer") == {"name": "x"}
  # The uploaded folder is the same as a local write of the same parameters.
  local = checkpoint.write_param_dir(str(bucket.parent / "local"), flat, {"name": "x"},
                                     extra_json={"conversion.json": {"k": 1}})
  listing = lambda root: sorted(os.path.relpath(os.path.join(r, n), root)
                                for r, _, names in os.walk(root) for n in names)
  assert listing(bucket / "run/tokenizer") == listing(local)
  with pytest.raises(FileExistsError, match="already exists"):
    checkpoint.write_param_dir("gs://bucket/run/tokenizer", flat, {"name": "y"})
  config_when_deleting = []
  rmtree = fs.rmtree
  def recording_rmtree(path):
    if path == "gs://bucket/run/tokenizer":
      config_when_deleting.append((bucket / "run/tokenizer/config.json").exists())
    rmtree(path)
  monkeypatch.setattr(fs, "rmtree", recording_rmtree)
  checkpoint.write_param_dir("gs://bucket/run/tokenizer", flat, {"name": "y"}, overwrite=True)
  # No reader could take the old folder for complete while its params were being deleted.
  assert config_when_deleting == [False]
  assert checkpoint.read_config("gs://bucket/run/tokenizer") == {"name": "y"}
  assert not (bucket / "run/tokenizer/conversion.json").exists()  # the old folder was replaced
  assert sorted(os.listdir(bucket / "run")) == ["tokenizer"]  # the staging copy is gone


@pytest.mark.parametrize("dies_in", ["upload", "copy"])
def test_a_replace_on_a_bucket_that_dies_leaves_a_whole_copy(bucket, monkeypatch, dies_in):
  """No rename on a bucket: wherever the process dies, the old or the new folder is whole."""
  old = {("w",): np.zeros((2, 3), np.float32)}
  new = {("w",): np.ones((2, 3), np.float32)}
  out = "gs://bucket/run/tokenizer"
  checkpoint.write_param_dir(out, old, {"name": "old"})

  class Died(Exception):
    pass

  def dies_halfway(real):
    calls = []
    def wrapped(*args, **kwargs):
      calls.append(args)
      if len(calls) == 1:
        raise Died  # before its first file lands
      return real(*args, **kwargs)
    return wrapped

  if dies_in == "upload":
    monkeypatch.setattr(fs, "_stream_up", dies_halfway(fs._stream_up))  # pylint: disable=protected-access
  else:
    monkeypatch.setattr(fs, "copy_tree", lambda *a, **k: (_ for _ in ()).throw(Died()))
  with pytest.raises(Died):
    checkpoint.write_param_dir(out, new, {"name": "new"}, overwrite=True)
  whole = [f"run/{name}" for name in sorted(os.listdir(bucket / "run"))
           if (bucket / "run" / name / "config.json").exists()]
  target = {("w",): jax.ShapeDtypeStruct((2, 3), np.float32)}
  assert len(whole) == 1
  want = {"upload": ("old", 0.0), "copy": ("new", 1.0)}[dies_in]
  assert checkpoint.read_config(f"gs://bucket/{whole[0]}") == {"name": want[0]}
  # (Orbax reads a URL itself, so the parameters are read from the local folder behind it.)
  np.testing.assert_array_equal(checkpoint.read_param_dir(str(bucket / whole[0]), target)[("w",)],
                                np.full((2, 3), want[1], np.float32))


def test_trainers_give_orbax_the_url_itself(monkeypatch):
  seen = []

  class Stop(Exception):
    pass

  def fake_checkpointer(directory, keep):
    seen.append(directory)
    raise Stop

  monkeypatch.setattr(common, "TrainCheckpointer", fake_checkpointer)
  with pytest.raises(Stop):
    common.init_or_restore(None, None, None, seed=0, strategy="dp", workdir="gs://bucket/run",
                           keep=1)
  assert seen == ["gs://bucket/run/checkpoints"]


def test_staged_files_appear_whole_or_not_at_all(bucket, tmp_path):
  for target in ("gs://bucket/run/a.npz", str(tmp_path / "local" / "a.npz")):
    with pytest.raises(RuntimeError):
      with fs.staged_file(target, ".npz") as tmp:
        np.savez(tmp, x=np.ones(3))
        raise RuntimeError("interrupted")
    assert not fs.exists(target)
    with fs.staged_file(target, ".npz") as tmp:
      np.savez(tmp, x=np.arange(3))
    with fs.open(target, "rb") as f, np.load(f) as data:
      np.testing.assert_array_equal(data["x"], np.arange(3))
  assert os.listdir(tmp_path / "local") == ["a.npz"]


def test_writers_killed_earlier_leave_no_temporaries_behind(tmp_path):
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  dead_pid, host = int(dead.stdout), socket.gethostname()
  target = tmp_path / "a.npz"
  leftovers = {f".a.npz.tmp-{host}-{dead_pid}.npz": False,  # a killed savez's
               f".a.npz.tmp-{host}-{dead_pid}-k2j4": False,  # a killed converter's folder
               f".a.npz.tmp-{host}-{os.getppid()}.npz": True,  # a live writer's
               f".a.npz.tmp-otherhost-{dead_pid}.npz": True,  # another host's
               ".b.npz.tmp-x": True}
  for name in leftovers:
    if name.endswith("k2j4"):
      (tmp_path / name).mkdir()
    else:
      (tmp_path / name).write_bytes(b"torn")
  seen = []
  with fs.staged_file(str(target), ".npz") as tmp:
    seen.append(os.path.basename(tmp))
    np.savez(tmp, x=np.arange(3))
  assert seen[0].startswith(".a.npz.tmp-")  # hidden: no *.npz pattern takes it for a result
  assert {name: (tmp_path / name).exists() for name in leftovers} == leftovers


def test_eval_outputs_and_inputs_on_a_bucket(bucket):
  from softvq_jax.eval import job_utils, npz
  from softvq_jax.eval.fid import FeatureStats
  import jax
  assert jax.process_index() == 0
  job_utils.write_metrics("gs://bucket/eval", {"fid": 2.5})
  assert json.loads((bucket / "eval/metrics.json").read_text()) == {"fid": 2.5}
  images = np.random.default_rng(1).integers(0, 255, (5, 4, 4, 3), dtype=np.uint8)
  stats = FeatureStats.from_features(np.random.default_rng(2).normal(size=(6, 3)))
  with fs.staged_file("gs://bucket/ref/ref.npz", ".npz") as tmp:
    npz.write_reference_batch(tmp, images=images, pool=stats)
  assert npz.array_shape("gs://bucket/ref/ref.npz") == (5, 4, 4, 3)
  streamed = np.concatenate(list(npz.iter_images("gs://bucket/ref/ref.npz", 2)))
  np.testing.assert_array_equal(streamed, images)
  np.testing.assert_allclose(npz.read_reference_stats("gs://bucket/ref/ref.npz")["mu"],
                             stats.mean)


def test_upload_tree_streams_each_file_in_pieces(bucket, tmp_path, monkeypatch):
  local = tmp_path / "staged"
  (local / "params").mkdir(parents=True)
  payload = np.random.default_rng(1).bytes(10_000)
  (local / "params" / "weights.bin").write_bytes(payload)
  (local / "config.json").write_text("{}")
  monkeypatch.setattr(fs, "_CHUNK_BYTES", 1024)
  reads = []
  real_open = open

  class CountingReader:
    def __init__(self, f):
      self._f = f

    def read(self, size=-1):
      reads.append(size)
      return self._f.read(size)

    def __getattr__(self, name):
      return getattr(self._f, name)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self._f.close()

  def spying_open(path, mode="r", *args, **kwargs):
    f = real_open(path, mode, *args, **kwargs)
    return CountingReader(f) if "r" in mode and str(path).startswith(str(local)) else f

  monkeypatch.setattr(fs.builtins, "open", spying_open)
  fs.upload_tree(str(local), "gs://bucket/run/export")
  monkeypatch.undo()
  assert (bucket / "run/export/params/weights.bin").read_bytes() == payload
  assert bucket.writes == ["run/export/params/weights.bin", "run/export/config.json"]
  assert reads and all(0 < size <= 1024 for size in reads), reads


def test_uploads_put_sub_folders_before_top_level_files(tmp_path):
  """A cut-short upload leaves part of params/ (which an overwrite takes for its own),
  never a lone conversion.json (which it would refuse as the user's)."""
  for rel in ("config.json", "conversion.json", "params/_METADATA", "params/w/0", "zz.json"):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text("x")
  assert fs.tree_files(str(tmp_path)) == [
      os.path.join("params", "_METADATA"), os.path.join("params", "w", "0"), "conversion.json",
      "zz.json", "config.json"]
  # What such an upload leaves behind is replaced by --overwrite.
  (tmp_path / "config.json").unlink()
  (tmp_path / "zz.json").unlink()
  flat = {("w",): np.zeros((2,), np.float32)}
  checkpoint.write_param_dir(str(tmp_path), flat, {"name": "new"}, overwrite=True)
  assert checkpoint.read_config(str(tmp_path)) == {"name": "new"}
