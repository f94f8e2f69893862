"""Each process's data iterator state is saved and restored as its own, not process 0's for all."""

from __future__ import annotations

import json

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from softvq_jax import checkpoint
from softvq_jax.checkpoint import TrainCheckpointer


def _as_process(monkeypatch, index: int, count: int) -> None:
  monkeypatch.setattr(checkpoint, "_process_file", lambda: f"process_{index}-of-{count}.json")


def test_two_hosts_with_different_skip_counts_get_their_own_states(tmp_path, monkeypatch):
  handler_cls, save_args, restore_args = checkpoint._per_process_json()  # pylint: disable=protected-access
  handler = handler_cls()
  directory = epath.Path(tmp_path / "data_per_process")
  # Host 1 met two unreadable records, so its parent iterator is two elements further on.
  states = [{"parent": {"next_index": 40}, "num_skipped": 0},
            {"parent": {"next_index": 42}, "num_skipped": 2}]
  for index, state in enumerate(states):
    _as_process(monkeypatch, index, 2)
    handler.save(directory, save_args(state))
  for index, state in enumerate(states):
    _as_process(monkeypatch, index, 2)
    assert handler.restore(directory, restore_args()) == state

  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
  _as_process(monkeypatch, 0, 4)
  assert handler.restore(directory, restore_args()) is None
  assert len(warnings) == 1 and "process_0-of-4.json" in warnings[0]
  assert "process_0-of-2.json, process_1-of-2.json" in warnings[0]


def test_restore_with_another_process_count_starts_the_data_afresh(tmp_path, monkeypatch):
  ckpt = TrainCheckpointer(str(tmp_path), asynchronous=False)
  ckpt.save(3, {"w": np.arange(4.0)}, data_state={"parent": {"next_index": 9}},
            meta={"note": "two hosts"}, force=True)
  ckpt.close()
  _as_process(monkeypatch, 0, 2)
  ckpt = TrainCheckpointer(str(tmp_path))
  state, data_state, meta = ckpt.restore({"w": jax.ShapeDtypeStruct((4,), np.float64)})
  ckpt.close()
  np.testing.assert_array_equal(state["w"], np.arange(4.0))
  assert data_state == {} and meta == {"note": "two hosts"}


def test_checkpoints_with_one_shared_data_state_still_restore(tmp_path):
  # The layout written before data states were per process: one JSON item named `data`.
  manager = ocp.CheckpointManager(
      str(tmp_path), options=ocp.CheckpointManagerOptions(create=True),
      item_handlers=dict(state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler(),
                         meta=ocp.JsonCheckpointHandler()))
  manager.save(7, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"w": np.ones(2)}),
      data=ocp.args.JsonSave({"parent": {"next_index": 11}, "num_skipped": 1}),
      meta=ocp.args.JsonSave({"step": 7})))
  manager.wait_until_finished()
  manager.close()
  assert not (tmp_path / "7" / checkpoint._DATA_ITEM).exists()  # pylint: disable=protected-access

  ckpt = TrainCheckpointer(str(tmp_path))
  state, data_state, meta = ckpt.restore({"w": jax.ShapeDtypeStruct((2,), np.float64)})
  ckpt.close()
  np.testing.assert_array_equal(state["w"], np.ones(2))
  assert data_state == {"parent": {"next_index": 11}, "num_skipped": 1}
  assert meta == {"step": 7}


def test_a_new_checkpoint_writes_this_process_file(tmp_path):
  ckpt = TrainCheckpointer(str(tmp_path), asynchronous=False)
  ckpt.save(1, {"w": np.zeros(1)}, data_state={"parent": {"next_index": 3}}, force=True)
  ckpt.close()
  written = tmp_path / "1" / checkpoint._DATA_ITEM / "process_0-of-1.json"  # pylint: disable=protected-access
  assert json.loads(written.read_text()) == {"parent": {"next_index": 3}}
