"""The entry point for every job: ``python -m softvq_jax.main --config=FILE.py[:ARG] --workdir=DIR``.

``config.trainer`` picks the job. ``--config.key=value`` overrides any field.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Job configuration file (FILE.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs, checkpoints and logs.")

# Jobs that later versions add (training, sampling, evaluation) register here.
_JOBS = {
    "reconstruct": "softvq_jax.eval.reconstruct",
    "sit": "softvq_jax.train.sit_trainer",
    "dit": "softvq_jax.train.dit_trainer",
    "tokenizer": "softvq_jax.train.tokenizer_trainer",
    "quickstart": "softvq_jax.quickstart",
    "sample": "softvq_jax.sample",
    "extract": "softvq_jax.extract",
    "eval_recon": "softvq_jax.eval.eval_recon",
    "eval_gen": "softvq_jax.eval.eval_gen",
    "fid_stats": "softvq_jax.eval.fid_stats",
}


def _maybe_initialize_distributed() -> None:
  """Joins a multi-process run when the launcher set the coordinator up."""
  from softvq_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.maybe_initialize()


class _QuietLibraries:
  """Drops the INFO chatter of Orbax (every file rename of every save) from the terminal."""

  def filter(self, record) -> bool:
    return record.levelno > 20 or "/orbax/" not in record.pathname


def main(argv) -> None:
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  for handler in py_logging.getLogger().handlers + py_logging.getLogger("absl").handlers:
    handler.addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  trainer = config.get("trainer")
  if trainer not in _JOBS:
    raise app.UsageError(f"config.trainer={trainer!r} is not available in this version; "
                         f"available: {sorted(_JOBS)}")
  _maybe_initialize_distributed()
  import importlib  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  logging.info("JAX %s: %d process(es), %d device(s): %s", jax.__version__, jax.process_count(),
               jax.device_count(), jax.devices()[0].device_kind)
  logging.info("Config:\n%s", config)
  workdir = _WORKDIR.value
  if "://" not in workdir:
    # Orbax (and every path a job hands on) wants absolute paths; users type relative ones.
    workdir = os.path.abspath(workdir)
  importlib.import_module(_JOBS[trainer]).run(config, workdir)


if __name__ == "__main__":
  # Progress and results belong in the terminal: log INFO to stderr by default.
  if not any(a.startswith(("--verbosity", "-v", "--logtostderr", "--alsologtostderr"))
             for a in sys.argv[1:]):
    sys.argv.append("--alsologtostderr")
  app.run(main)
