"""Wording of errors raised on behalf of a library."""

from __future__ import annotations


def first_line(error: BaseException, limit: int = 300) -> str:
  """The first line of ``error``'s message (its type's name when the message is empty)."""
  return (str(error).splitlines() or [type(error).__name__])[0][:limit]
