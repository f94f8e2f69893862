"""The entry point for every job: ``python -m softvq_jax.main --config=FILE.py[:ARG] --workdir=DIR``.

``config.trainer`` picks the job. ``--config.key=value`` overrides any field.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from absl import app, flags, logging
import ml_collections
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


def _load_config_file(spec: str) -> ml_collections.ConfigDict | None:
  """``get_config(arg)`` of ``--config=FILE.py[:ARG]``, or None where it cannot be had."""
  path, _, arg = spec.partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("_config_for_error_message", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None


def _unknown_field_message(argv: list[str]) -> str:
  """Names each ``--config.PATH=...`` override whose PATH is no field of the config, with
  the fields that its parent has, so that a typo reads as one rather than as a traceback."""
  spec = next((a.split("=", 1)[1] if "=" in a else next(iter(argv[i + 1:]), None)
               for i, a in enumerate(argv) if a.split("=", 1)[0] == "--config"), None)
  config = _load_config_file(spec) if spec else None
  problems = []
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    if config is None:
      problems.append(f"--config.{path}")
      continue
    node, walked = config, []
    for key in path.split("."):
      if isinstance(node, ml_collections.ConfigDict) and key in node:
        node, walked = node[key], walked + [key]
        continue
      where = ".".join(walked) or "the config"
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      detail = (f"{where} has no field {key!r}; its fields: {', '.join(known)}" if known
                else f"{where} is a value, not a section")
      problems.append(f"--config.{path}: {detail}")
      break
  return ("unknown config field" + ("s" if len(problems) > 1 else "") + ": "
          + "; ".join(problems or ["an override names no field of the config"]))


def _config_file_refusal(error: BaseException) -> str | None:
  """The message of a JobError that ``get_config(arg)`` raised (a bad ``FILE.py:ARG``), which
  config_flags re-raises with the traceback written into its message."""
  from softvq_jax.utils.errors import JobError  # pylint: disable=g-import-not-at-top
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, JobError):
      lines = [line for line in str(error).splitlines() if line.strip()]
      return lines[-1].split(f"{JobError.__name__}: ", 1)[-1] if lines else None
    error = error.__cause__ or error.__context__
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, but an override naming no config field is a usage error, not a traceback.

  ml_collections raises AttributeError/KeyError for such a field, which absl does not
  catch as a flags error.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    refusal = _config_file_refusal(e)
    if refusal:
      sys.stderr.write(f"FATAL Flags parsing error: --config: {refusal}\n")
      sys.exit(EXIT_STATUS_REFUSED)
    sys.stderr.write(f"FATAL Flags parsing error: {e}\n"
                     "Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)
  except (AttributeError, KeyError):
    sys.stderr.write(f"FATAL Flags parsing error: {_unknown_field_message(argv)}\n")
    sys.exit(1)


EXIT_STATUS_REFUSED = 2  # as for a usage error: rerun unchanged, the job would refuse again


def _refusals() -> tuple[type[Exception], ...]:
  """The errors a job raises on purpose for what the user asked or gave it."""
  from softvq_jax.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from softvq_jax.convert.core import ConversionError  # pylint: disable=g-import-not-at-top
  from softvq_jax.convert.readers import CheckpointFormatError  # pylint: disable=g-import-not-at-top
  from softvq_jax.convert.torch_pickle import TorchCheckpointError  # pylint: disable=g-import-not-at-top
  from softvq_jax.models.config import ConfigError  # pylint: disable=g-import-not-at-top
  from softvq_jax.utils.errors import JobError  # pylint: disable=g-import-not-at-top
  # FileExistsError: the jobs refuse to write over outputs they did not make; the others name
  # a path the user gave (a data folder, a checkpoint, a reference batch). Those the system
  # raises carry an errno and keep their traceback.
  return (JobError, ConfigError, CheckpointError, CheckpointFormatError, ConversionError,
          TorchCheckpointError, FileExistsError, FileNotFoundError, NotADirectoryError,
          IsADirectoryError)


def is_refusal(error: BaseException) -> bool:
  """Whether a job raised ``error`` on purpose, for what the user asked or gave it."""
  if isinstance(error, OSError) and error.errno is not None:
    return False  # from the system (a disk, a bucket), not a refusal written by a job
  return isinstance(error, _refusals())


class _QuietLibraries:
  """Drops the INFO chatter of Orbax (every file rename of every save) from the terminal."""

  def filter(self, record) -> bool:
    return record.levelno > 20 or "/orbax/" not in record.pathname


def main(argv) -> int | None:
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  for handler in py_logging.getLogger().handlers + py_logging.getLogger("absl").handlers:
    handler.addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required")
  try:
    trainer = config.get("trainer")
  except OSError as e:
    # config_flags stands in an object for a FILE.py that failed to load, which raises
    # the failure on its first use.
    raise app.UsageError(f"--config: {e}") from None
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  if "://" not in _WORKDIR.value and os.path.exists(_WORKDIR.value) \
      and not os.path.isdir(_WORKDIR.value):
    raise app.UsageError(f"--workdir={_WORKDIR.value} is a file; name a folder (it is created "
                         "if it does not exist)")
  if trainer not in _JOBS:
    raise app.UsageError(f"config.trainer={trainer!r} is not available in this version; "
                         f"available: {sorted(_JOBS)}")
  _maybe_initialize_distributed()

  import jax  # pylint: disable=g-import-not-at-top
  logging.info("JAX %s: %d process(es), %d device(s): %s", jax.__version__, jax.process_count(),
               jax.device_count(), jax.devices()[0].device_kind)
  logging.info("Config:\n%s", config)
  workdir = _WORKDIR.value
  if "://" not in workdir:
    # Orbax (and every path a job hands on) wants absolute paths; users type relative ones.
    workdir = os.path.abspath(workdir)
  try:
    importlib.import_module(_JOBS[trainer]).run(config, workdir)
  except Exception as e:  # pylint: disable=broad-except
    if not is_refusal(e):
      raise
    # Refused on purpose, by a message that names the problem: the traceback would bury it.
    logging.debug("Traceback of the refusal below", exc_info=True)
    sys.stderr.write(f"FATAL {type(e).__name__}: {e}\n(--verbosity=1 also prints its "
                     "traceback)\n")
    return EXIT_STATUS_REFUSED
  from softvq_jax.train import loop  # pylint: disable=g-import-not-at-top
  if loop.stopped_unfinished():
    if jax.process_count() > 1:
      # Leave together, each process's checkpoint writes done: a launcher that stops the
      # others at the first nonzero exit (srun --kill-on-bad-exit) must cut none short.
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("softvq_jax: stopped at a preemption signal")
    logging.warning("Training stopped at a preemption signal before its last step; exit "
                    "status %d, so that a restart policy reruns the job to resume it",
                    loop.EXIT_STATUS_PREEMPTED)
    return loop.EXIT_STATUS_PREEMPTED


if __name__ == "__main__":
  # Progress and results belong in the terminal: log INFO to stderr by default.
  if not any(a.startswith(("--verbosity", "-v", "--logtostderr", "--alsologtostderr"))
             for a in sys.argv[1:]):
    sys.argv.append("--alsologtostderr")
  app.run(main, flags_parser=_parse_flags)
