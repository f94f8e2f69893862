"""The training loop shared by every trainer: steps, logging, checkpoints, hooks, preemption."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging

from softvq_jax import parallel
from softvq_jax.checkpoint import TrainCheckpointer
from softvq_jax.train import state as state_lib
from softvq_jax.utils import fs

Hook = Callable[[int, Any], None]


class PreemptionFlag:
  """Set by SIGTERM (what TPU/SLURM preemption sends); the loop checkpoints and stops.

  Single-process runs only. In a multi-process job ``jax.distributed`` handles SIGTERM
  itself and agrees with the other processes on the step to stop at
  (``checkpointer.reached_preemption``); a Python handler would replace its handler, and
  each process would stop on its own signal, at its own step, leaving the others waiting
  in a collective.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    if (jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving a checkpoint and stopping")
    self.requested = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# Whether a train_loop of this process stopped at a preemption signal short of total_steps;
# the entry point then exits with EXIT_STATUS_PREEMPTED instead of 0.
_stopped_unfinished = False

# EX_TEMPFAIL ("try again later"): nonzero, so that a Kubernetes/JobSet restart policy or a
# shell's `until ...; do ...; done` reruns the job, which resumes from the checkpoint just
# written; distinct from the 1 of an error and the 128+N of a process killed by a signal.
EXIT_STATUS_PREEMPTED = 75


def stopped_unfinished() -> bool:
  """True once a training loop of this process has stopped at a preemption signal before its
  last step (the checkpoint is written: a rerun resumes it)."""
  return _stopped_unfinished


def metrics_path(workdir: str) -> str:
  """The run's plain-text metrics file, which the loop and the evaluation hooks append to."""
  return os.path.join(workdir, "metrics.jsonl")


class JsonlWriter:
  """A plain-text copy of every logged scalar, one JSON object per line."""

  def __init__(self, path: str):
    self.path = path
    self.enabled = jax.process_index() == 0

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if self.enabled:
      fs.append_text(self.path, json.dumps({"step": step, **scalars}, sort_keys=True) + "\n")

  def drop_after(self, step: int) -> None:
    """Removes the rows of steps after ``step``: a run that died after logging them resumes
    from an earlier checkpoint and logs those steps again."""
    if not (self.enabled and fs.exists(self.path)):
      return
    with fs.open(self.path) as f:
      lines = f.read().splitlines(keepends=True)
    kept = [line for line in lines if (row_step := _row_step(line)) is None or row_step <= step]
    if kept and not kept[-1].endswith("\n"):
      # The next row would join an unterminated last line. A row of ours cut short by a
      # kill mid-write goes; anything else is ended with a newline.
      if kept[-1].lstrip().startswith("{") and _row_step(kept[-1]) is None:
        kept.pop()
      else:
        kept[-1] += "\n"
    if kept != lines:
      fs.write_bytes_atomic(self.path, "".join(kept).encode())


def _row_step(line: str) -> float | None:
  """The step of a logged row; -1 for a JSON object without one, None for any other line
  (neither is a row of ours, and both are kept)."""
  try:
    row = json.loads(line)
  except json.JSONDecodeError:
    return None
  if not isinstance(row, dict):
    return None
  try:
    return float(row.get("step", -1))
  except (TypeError, ValueError):
    return None


def _to_scalars(metrics) -> dict[str, float]:
  out = {}
  for k, v in jax.device_get(metrics).items():
    v = np.asarray(v)
    out[k] = float(v.mean()) if v.size > 1 else float(v)
  return out


def train_loop(*, state, train_step, data: Iterator, mesh, workdir: str, total_steps: int,
               checkpointer: TrainCheckpointer, log_every: int, ckpt_every: int,
               hooks: tuple[Hook, ...] = (), writer=None, meta: dict | None = None,
               step_args: tuple = (), profile_steps: int = 0, profile_first_step: int = 10,
               profile_dir: str | None = None):
  """Runs ``train_step`` until ``total_steps`` (or preemption). Returns ``(state, last metrics)``.

  Metrics are fetched from the devices only every ``log_every`` steps and at
  checkpoints, so the loop never waits on the host otherwise. A non-finite
  loss at one of those points stops the run before anything is saved: the
  last good checkpoint stays the latest.

  ``profile_steps > 0`` records a profiler trace of that many steps, starting
  after step ``profile_first_step`` (clu ``periodic_actions.Profile``, process 0
  only), under ``profile_dir`` (default ``workdir``): ``plugins/profile/<run>/``,
  which TensorBoard's profile plugin (or XProf) reads.

  A step with ``takes_leaf_state`` (:class:`~softvq_jax.train.state.LeafStep`) gets
  the state as a :class:`~softvq_jax.train.state.LeafState` between steps, and so do
  hooks (attribute access reads the train state); checkpoints and the returned state
  are the pytree.
  """
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top

  step = int(jax.device_get(state.step))
  if step > total_steps:
    logging.warning("The restored state is at step %d, past total_steps=%d: nothing is trained "
                    "(the state of step %d is kept)", step, total_steps, step)
  if getattr(train_step, "takes_leaf_state", False):
    state = state_lib.LeafState.of(state)
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=log_every, every_secs=None)
  profile = None
  if profile_steps > 0 and jax.process_index() == 0:
    profile = periodic_actions.Profile(logdir=profile_dir or workdir,
                                       num_profile_steps=profile_steps, profile_duration_ms=None,
                                       first_profile=profile_first_step, every_steps=None,
                                       every_secs=None)
  jsonl = JsonlWriter(metrics_path(workdir))
  jsonl.drop_after(step)
  preempt = PreemptionFlag()
  last = {}
  try:
    while step < total_steps:
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = parallel.global_batch(next(data), mesh)
        state, metrics = train_step(state, batch, *step_args)
      step += 1
      report(step)
      if profile is not None:
        profile(step)
      log_now = step % log_every == 0 or step == total_steps
      scheduled_save = step % ckpt_every == 0 or step == total_steps
      checked = None
      # Before the hooks that act now: a diverged state must not reach their grids and
      # scores. (Hooks without ``due`` are not waited for: that would sync every step.)
      if log_now or scheduled_save or any(getattr(h, "due", lambda s: False)(step) for h in hooks):
        checked = _checked_scalars(metrics, state, step, checkpointer)
      for hook in hooks:
        hook(step, state)
      stopping = preempt.requested or checkpointer.reached_preemption(step)
      save_now = scheduled_save or stopping
      if save_now and checked is None:
        checked = _checked_scalars(metrics, state, step, checkpointer)
      if checked is not None:
        last = checked
      if log_now:
        if writer is not None:
          writer.write_scalars(step, last)
        jsonl.write(step, last)
        logging.info("step %d: %s", step, ", ".join(f"{k}={v:.5g}" for k, v in sorted(last.items())))
      if save_now:
        data_state = data.get_state() if hasattr(data, "get_state") else {}
        checkpointer.save(step, _tree(state), data_state=data_state,
                          meta=dict(meta or {}, step=step), force=True)
      if stopping:
        logging.warning("Stopped at step %d after a preemption signal; rerun to resume.", step)
        if step < total_steps:
          global _stopped_unfinished  # pylint: disable=global-statement
          _stopped_unfinished = True
        break
  finally:
    if profile is not None and getattr(profile, "_session_running", False):
      # The run ended inside the profiled window: close the trace so it is written.
      jax.profiler.stop_trace()
      profile._session_running = False  # pylint: disable=protected-access
    checkpointer.wait()
    preempt.restore()
    if writer is not None:
      writer.flush()
  return _tree(state), last


def _checked_scalars(metrics, state, step: int, checkpointer: TrainCheckpointer) -> dict:
  """The step's metrics (and the parameter norm) as floats; raises if any loss or norm is
  not finite, before anything of this step is written."""
  scalars = _to_scalars(metrics)
  params = getattr(_tree(state), "params", None)
  if params is not None:
    scalars["param_norm"] = float(state_lib.param_norm(params))
  # The loss comes from the parameters before the update; the norms see the update
  # itself (a finite loss with infinite gradients leaves NaN weights behind).
  bad = {k: v for k, v in scalars.items()
         if (k in ("grad_norm", "param_norm") or k.endswith("loss")) and not math.isfinite(v)}
  if bad:
    checkpointer.wait()
    named = ", ".join(f"{k} is {v}" for k, v in sorted(bad.items()))
    raise FloatingPointError(
        f"{named} at step {step}; stopping without saving. The last good "
        f"checkpoint is step {checkpointer.latest_step()} in {checkpointer.directory}")
  return scalars


def _tree(state):
  return state.tree() if isinstance(state, state_lib.LeafState) else state
