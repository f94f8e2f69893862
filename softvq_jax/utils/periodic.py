"""Training-loop hooks that act every ``every`` steps and at the last one."""

from __future__ import annotations


class PeriodicHook:
  """Base of the hooks that act every ``every`` steps and at step ``total``.

  The training loop asks :meth:`due` first: on those steps it checks the metrics for
  non-finite values before the hook runs, so no grid or score of a diverged state is
  written.
  """

  every: int
  total: int

  def due(self, step: int) -> bool:
    return step % self.every == 0 or step == self.total
