"""Joining a multi-process JAX run from environment variables.

``jax.distributed.initialize()`` reads only ``JAX_COORDINATOR_ADDRESS`` from
the environment; the process count and index must come from a detected
cluster (SLURM, Open MPI, Cloud TPU, Kubernetes) or be passed explicitly. To
start several processes by hand (one machine, a test, a bare VM cluster) set

  JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=n JAX_PROCESS_ID=i

on each; without ``JAX_NUM_PROCESSES`` JAX's own cluster detection decides.
Where that detection needs no variables at all (Cloud TPU pod slices, GKE), set
``SOFTVQ_JAX_DISTRIBUTED=1`` to ask for it (``launch/tpu/`` does).
"""

from __future__ import annotations

import os

from absl import logging


def _already_initialized() -> bool:
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.client is not None


def maybe_initialize() -> bool:
  """Calls ``jax.distributed.initialize`` when a launcher asked for it. Returns whether it did."""
  import jax  # pylint: disable=g-import-not-at-top
  env = os.environ
  if not (env.get("JAX_COORDINATOR_ADDRESS") or env.get("SLURM_NTASKS", "1") != "1"
          or env.get("SOFTVQ_JAX_DISTRIBUTED") == "1"):
    return False
  if _already_initialized():
    return False
  kwargs = {}
  if env.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if "JAX_PROCESS_ID" not in env:
      raise ValueError("JAX_NUM_PROCESSES is set but JAX_PROCESS_ID is not")
    kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    kwargs["coordinator_address"] = env.get("JAX_COORDINATOR_ADDRESS")
  if env.get("JAX_INITIALIZATION_TIMEOUT"):
    kwargs["initialization_timeout"] = int(env["JAX_INITIALIZATION_TIMEOUT"])
  jax.distributed.initialize(**kwargs)
  logging.info("Joined a run of %d processes as process %d", jax.process_count(),
               jax.process_index())
  return True
