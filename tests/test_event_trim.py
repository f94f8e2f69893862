"""A resumed run's TensorBoard files: the events an earlier run logged after the restored
checkpoint are removed, so curves are not drawn twice. Files are read back with
TensorFlow's own record reader, which checks every CRC."""

import os

import numpy as np
import pytest

from softvq_jax.train import common
from softvq_jax.train.events import drop_events_after

tf = pytest.importorskip("tensorflow")


def _write_run(logdir, steps, image_steps=()):
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(str(logdir))
  for step in steps:
    writer.write_scalars(step, {"loss": 1.0 / step, "lr": 0.1 * step})
    if step in image_steps:
      writer.write_images(step, {"grid": np.full((1, 4, 4, 3), step / 10, np.float32)})
  writer.flush()
  writer.close()


def _read(logdir):
  """{(tag, step): value} of every scalar and image event, over all event files; each
  (tag, step) at most once."""
  seen = {}
  for name in sorted(os.listdir(logdir)):
    if not name.startswith("events.out.tfevents."):
      continue
    for event in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
      for value in event.summary.value:
        key = (value.tag, event.step)
        assert key not in seen, f"{key} logged twice"
        tensor = tf.make_ndarray(value.tensor)
        seen[key] = float(tensor) if tensor.ndim == 0 else tensor.shape
  return seen


def test_events_after_the_checkpoint_are_dropped(tmp_path):
  _write_run(tmp_path, range(1, 9), image_steps=(4, 8))
  before = _read(tmp_path)
  assert ("loss", 8) in before and ("grid", 8) in before
  (path,) = drop_events_after(str(tmp_path), 5)
  after = _read(tmp_path)
  assert after == {k: v for k, v in before.items() if k[1] <= 5}
  assert ("grid", 4) in after and ("loss", 5) in after
  assert os.path.basename(path).startswith("events.out.tfevents.")
  assert drop_events_after(str(tmp_path), 5) == []  # nothing left to drop: not rewritten


def test_torn_last_record_is_dropped(tmp_path):
  _write_run(tmp_path, range(1, 4))
  (name,) = os.listdir(tmp_path)
  with open(tmp_path / name, "ab") as f:
    f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00\x01\x02\x03\x04partial")  # a killed write
  with pytest.raises(Exception):
    _read(tmp_path)
  assert drop_events_after(str(tmp_path), 10) == [str(tmp_path / name)]
  assert sorted(step for _, step in _read(tmp_path)) == [1, 1, 2, 2, 3, 3]


def test_resumed_writer_continues_without_duplicates(tmp_path):
  _write_run(tmp_path, range(1, 8))  # checkpoint at 4, killed after logging 7
  writer = common.make_writer(str(tmp_path), resumed_step=4)
  for step in range(5, 10):
    writer.write_scalars(step, {"loss": 1.0 / step, "lr": 0.1 * step})
  writer.flush()
  writer.close()
  logged = _read(tmp_path)  # asserts each (tag, step) once
  assert sorted(step for tag, step in logged if tag == "loss") == list(range(1, 10))
  assert len([n for n in os.listdir(tmp_path) if n.startswith("events.")]) == 2


def test_fresh_run_and_other_files_are_untouched(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 9}\n')
  (tmp_path / "events.txt").write_text("not an event file")
  _write_run(tmp_path, range(1, 4))
  names = sorted(os.listdir(tmp_path))
  stamps = {n: os.stat(tmp_path / n).st_mtime_ns for n in names}
  assert drop_events_after(str(tmp_path), 3) == []
  assert drop_events_after(str(tmp_path / "missing"), 3) == []
  assert {n: os.stat(tmp_path / n).st_mtime_ns for n in names} == stamps


def test_on_a_bucket_the_file_is_one_upload(tmp_path, bucket):
  (bucket / "run").mkdir(parents=True)
  _write_run(bucket / "run", range(1, 7))
  (name,) = os.listdir(bucket / "run")
  assert drop_events_after("gs://bucket/run", 2) == [f"gs://bucket/run/{name}"]
  assert bucket.writes == [f"run/{name}"]
  assert sorted(step for _, step in _read(bucket / "run")) == [1, 1, 2, 2]
