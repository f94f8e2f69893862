"""TensorBoard event files of a resumed run.

A run that stops between checkpoints (preemption, a crash, a kill) has already
logged the steps after its last checkpoint; resumed, it trains and logs them
again, and TensorBoard would draw both copies of each curve segment. Before the
resumed run opens its writer, :func:`drop_events_after` rewrites the event files
of the earlier runs without the events of steps after the restored one, as
``metrics.jsonl`` drops its rows.

An event file is a sequence of TFRecords (length, CRC of the length, payload, CRC
of the payload). Kept records are copied byte for byte, CRCs included, so nothing
needs recomputing. A record cut short by the kill (the last one) is dropped.
"""

from __future__ import annotations

import os
import struct
from typing import Iterator

from absl import logging

from softvq_jax.utils import fs

_HEADER = struct.Struct("<QI")  # payload length, masked CRC32C of the length
_FOOTER_BYTES = 4  # masked CRC32C of the payload


def _records(data: bytes) -> Iterator[tuple[int, int]]:
  """``(start, end)`` of each complete record; stops at a torn one."""
  pos = 0
  while pos + _HEADER.size <= len(data):
    (length, _) = _HEADER.unpack_from(data, pos)
    end = pos + _HEADER.size + length + _FOOTER_BYTES
    if end > len(data):
      return
    yield pos, end
    pos = end


def _event_step(payload: bytes) -> int | None:
  """The step of a serialised ``Event``; None for bytes that do not parse as one."""
  # Imported on use: inference never needs TensorBoard's protos.
  from google.protobuf.message import DecodeError  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  try:
    return int(event_pb2.Event.FromString(payload).step)
  except DecodeError:
    return None


def is_event_file(name: str) -> bool:
  return name.startswith("events.out.tfevents.")


def drop_events_after(logdir: str, step: int) -> list[str]:
  """Rewrites each event file in ``logdir`` that holds events of steps after ``step`` (or
  a torn last record) without them, atomically; returns the paths rewritten.

  Call it before the resumed run's writer exists: that writer's own file is new and
  holds nothing to drop.
  """
  if not fs.isdir(logdir):
    return []
  rewritten = []
  for name in fs.listdir(logdir):
    if not is_event_file(name):
      continue
    path = os.path.join(logdir, name)
    with fs.open(path, "rb") as f:
      data = f.read()
    kept, dropped, complete = [], 0, 0
    for start, end in _records(data):
      complete = end
      event_step = _event_step(data[start + _HEADER.size:end - _FOOTER_BYTES])
      if event_step is not None and event_step <= step:
        kept.append(data[start:end])
      else:
        dropped += 1
    kept_bytes = b"".join(kept)
    if len(kept_bytes) == len(data):
      continue
    torn = len(data) - complete
    fs.write_bytes_atomic(path, kept_bytes)
    rewritten.append(path)
    logging.info("%s: removed %d event(s) after step %d%s (logged before the run stopped, "
                 "logged again as it resumes)", path, dropped, step,
                 f" and a torn record of {torn} bytes" if torn else "")
  return rewritten
