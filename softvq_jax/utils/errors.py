"""Wording of errors raised on behalf of a library, and the noise a failed one leaves behind."""

from __future__ import annotations

import logging
import os
import sys
import warnings


class JobError(ValueError):
  """A job that cannot run as asked: its config, its workdir or its inputs say why.

  ``python -m softvq_jax.main`` prints the message alone (exit status 2), without the
  traceback of an error that is the program's own.
  """


class UnreadableDataError(JobError, RuntimeError):
  """Too much of a dataset cannot be decoded (a RuntimeError, as it was before JobError)."""


def first_line(error: BaseException, limit: int = 300) -> str:
  """The first line of ``error``'s message (its type's name when the message is empty)."""
  return (str(error).splitlines() or [type(error).__name__])[0][:limit]


def root_line(error: BaseException, limit: int = 600) -> str:
  """The first line of the innermost cause of ``error``: where a library wraps the error
  that says what went wrong (TensorStore's "Requested byte range ... is not valid") in one
  that says where (an array index and a page of specification)."""
  seen = {id(error)}
  while error.__cause__ is not None and id(error.__cause__) not in seen:
    error = error.__cause__
    seen.add(id(error))
  return first_line(error, limit)


_CLOSED_LOOP = "Event loop is closed"


def _from_orbax(code) -> bool:
  return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


class _OrphanFilter(logging.Filter):
  """After a failed restore: drops asyncio's "exception was never retrieved" records (the
  restore's reads, abandoned when it failed)."""

  failed = False

  def filter(self, record: logging.LogRecord) -> bool:
    return not (self.failed and "never retrieved" in str(record.msg))


_orphan_filter = _OrphanFilter()


def drop_orphans_of_failed_restores() -> None:
  """Keeps the late errors of the reads that a failed Orbax restore leaves behind quiet.

  When one read fails, Orbax stops waiting and closes the restore's event loop with the
  other reads in flight. Each then fails on its own: TensorStore's completion callback
  with ``RuntimeError('Event loop is closed')`` (unraisable), asyncio's "exception was never
  retrieved" for its task or future, or, at interpreter exit, the abandoned coroutine
  itself. A hundred such tracebacks bury the one error that explains.

  Call it before a restore (idempotent): from then on those unraisable errors are dropped
  (the first can come before the failure reaches the caller); :func:`restore_failed` drops
  the rest. Every other unraisable error and asyncio record still gets through.
  """
  previous = sys.unraisablehook
  if getattr(previous, "drops_orphans_of_failed_restores", False):
    return

  def hook(unraisable) -> None:
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == _CLOSED_LOOP:
      return
    if _from_orbax(getattr(unraisable.object, "cr_code", None)):
      return
    previous(unraisable)

  hook.drops_orphans_of_failed_restores = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_orphan_filter)


def restore_failed() -> None:
  """Marks that a restore failed: its abandoned tasks' records and warnings are dropped."""
  _orphan_filter.failed = True
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                          category=RuntimeWarning)
