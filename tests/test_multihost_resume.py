"""A two-process run through the launcher a cluster uses, killed and resumed, equals an unbroken one.

``launch/local_multiprocess.sh 2 CONFIG WORKDIR`` starts two ``python -m
softvq_jax.main`` processes (one CPU device each) joined by ``jax.distributed``
over a localhost coordinator: the entry point, initialisation, data sharding
and checkpointing of a pod, on one machine. The tiny SiT of
``configs/sit_xl_softvq_b64.py:runlocal``, reading a latent cache as a real run
does, trains once without interruption;
a second run is SIGKILLed (launcher and both processes, as a lost machine would
be) once a checkpoint exists, then the same command runs again and finishes.
Its final train state must be bit-equal to the unbroken run's.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch" / "local_multiprocess.sh"
TOTAL, EVERY = 24, 4
FLAGS = [f"--config.total_steps={TOTAL}", f"--config.ckpt_every={EVERY}",
         f"--config.log_every={EVERY}", "--config.sample_every=0", "--config.keep_checkpoints=2"]

# The runlocal SiT recipe, trained from a latent cache (the stage-2 input of a real run).
CONFIG_FILE = """
import ml_collections
from softvq_jax.config_lib import sit_recipe


def get_config(arg=None):
  c = sit_recipe("softvq-b-64", "runlocal")
  c.data = ml_collections.ConfigDict(dict(source="latent_cache", cache_dir={cache!r},
                                          num_classes=8))
  return c
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> str:
  """A config file and the latent cache it reads (24 synthetic images, the trainer's tokenizer)."""
  import importlib.util
  from softvq_jax.data import cache_latents, sources
  from softvq_jax.tokenizer import Tokenizer
  root = tmp_path_factory.mktemp("multihost")
  path = root / "config.py"
  path.write_text(CONFIG_FILE.format(cache=str(root / "cache")))
  spec = importlib.util.spec_from_file_location("multihost_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  tok = Tokenizer.random(c.tokenizer.to_dict(), seed=c.seed)  # what the trainer builds
  cache_latents.write_latent_cache(
      tok, sources.SyntheticSource(24, image_shape=(c.tokenizer.image_size,) * 2, num_classes=8,
                                   seed=1), str(root / "cache"), batch_size=8, progress=False)
  return str(path)


def _env(cache_dir: pathlib.Path) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  # The three runs share compiled programs and skip most XLA optimisations (the same
  # executables for all, so the comparison is unaffected).
  env.update(PYTHON=sys.executable, COORDINATOR_PORT=str(portpicker.pick_unused_port()),
             PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             JAX_INITIALIZATION_TIMEOUT="60")
  return env


@pytest.fixture
def launched():
  """Every launcher started by a test; whatever still runs at its end is killed."""
  procs = []
  yield procs
  for proc in procs:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()


def _launch(config: str, workdir: pathlib.Path, log: pathlib.Path, cache_dir: pathlib.Path):
  # A session of its own, so that killing its process group kills exactly this run.
  return subprocess.Popen(["bash", str(LAUNCHER), "2", config, str(workdir), *FLAGS], cwd=REPO,
                          env=_env(cache_dir), stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                          start_new_session=True)


def _finish(proc, workdir: pathlib.Path, log: pathlib.Path, timeout: float = 300) -> str:
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    pytest.fail(f"run did not finish in {timeout} s:\n{log.read_text()[-3000:]}")
  text = log.read_text()
  other = workdir / "logs" / "process_1.log"
  assert proc.returncode == 0, (text[-3000:], other.read_text()[-3000:] if other.exists() else "")
  return text


def _steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _state(workdir: pathlib.Path, step: int):
  import orbax.checkpoint as ocp
  path = workdir / "checkpoints" / str(step) / "state"
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def _printed(script: str, *args: str, env: dict[str, str]) -> list[str]:
  out = subprocess.run(["bash", script, "--dry-run", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, check=True).stdout
  return [l[2:] for l in out.splitlines() if l.startswith("+ ")]


def test_gpu_node_runs_the_command_this_test_runs_on_cpu(tmp_path):
  """The dry runs of the local CPU launcher (what this test runs) and of the single-node GPU
  script with two processes: the same two commands but for the device selection."""
  config = "configs/sit_xl_softvq_b64.py:runlocal"
  env = _env(tmp_path / "cache")
  cpu = _printed(str(LAUNCHER), "2", config, str(tmp_path), *FLAGS, env=env)
  gpu = _printed("launch/gpu/single_node.sh", config, str(tmp_path), *FLAGS,
                 env=dict(env, NUM_PROCESSES="2"))
  assert gpu[0].startswith("bash launch/local_multiprocess.sh --platform=gpu --dry-run 2 ")
  gpu = gpu[1:]
  assert len(cpu) == len(gpu) == 2
  for i, (c, g) in enumerate(zip(cpu, gpu)):
    assert f"JAX_PROCESS_ID={i} " in c and "JAX_NUM_PROCESSES=2 " in c
    assert f"-m softvq_jax.main --config={config} --workdir={tmp_path} " + " ".join(FLAGS) in c
    assert c.replace("JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=1",
                     f"CUDA_VISIBLE_DEVICES={i}") == g
  print("\n".join(["local CPU:"] + cpu + ["single-node GPU:"] + gpu))
  assert not (tmp_path / "logs").exists()  # nothing ran


# Three runs of two processes: 120-140 s (plus 16-20 s for the cache) measured on 2 CPU cores
# shared with other jobs (load average 5-9; about 95 s of CPU time in all). Running the
# first two side by side saved nothing. Outside CI's time budget (`-m extended`, with
# test_multiprocess.py's two-process kill/resume); CI covers the single-process SIGKILL
# resume (test_train_engine.py) and each process's data state (test_data_state_per_process.py).
@pytest.mark.slow
@pytest.mark.extended
def test_kill_and_resume_through_the_launcher_equals_unbroken_run(config, tmp_path, launched):
  cache = tmp_path / "jax_cache"
  ref_dir, run_dir = tmp_path / "unbroken", tmp_path / "broken"
  ref_log, run_log = tmp_path / "unbroken.log", tmp_path / "broken.log"

  launched.append(_launch(config, ref_dir, ref_log, cache))
  _finish(launched[-1], ref_dir, ref_log)
  assert _steps(ref_dir)[-1] == TOTAL

  proc = _launch(config, run_dir, run_log, cache)
  launched.append(proc)
  deadline = time.time() + 240
  while not ((run_dir / "checkpoints").is_dir() and _steps(run_dir)):
    assert proc.poll() is None, run_log.read_text()[-3000:]
    assert time.time() < deadline, "no checkpoint within 240 s"
    time.sleep(0.02)
  os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both processes at once
  proc.wait()
  at_kill = _steps(run_dir)
  assert at_kill and at_kill[-1] < TOTAL, at_kill

  launched.append(_launch(config, run_dir, run_log, cache))
  text = _finish(launched[-1], run_dir, run_log)
  resumed = [int(l.split("Resumed from step ")[1].split()[0]) for l in text.splitlines()
             if "Resumed from step " in l]
  assert resumed and resumed[-1] in at_kill, (resumed, at_kill)
  assert _steps(run_dir)[-1] == TOTAL

  state, ref_state = _state(run_dir, TOTAL), _state(ref_dir, TOTAL)
  leaves, ref_leaves = jax.tree.leaves(state), jax.tree.leaves(ref_state)
  assert len(leaves) == len(ref_leaves) > 0
  for a, b in zip(leaves, ref_leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
