"""The launch scripts: shellcheck-clean strict bash whose ``--dry-run`` shows exactly what runs.

Cloud and cluster tools (gcloud, xpk, kubectl, sbatch, srun, tar) are replaced by stubs that
record their arguments, so the tests check both that a dry run calls nothing and that a real
run calls exactly the commands the script printed.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.relative_to(REPO).as_posix()
                 for d in ("launch", "benchmarks") for p in (REPO / d).rglob("*.sh"))
TOOLS = ("gcloud", "xpk", "kubectl", "sbatch", "srun", "scontrol", "tar")
TPU_ENV = dict(TPU_NAME="softvq-v4-32", ZONE="us-central2-b", ACCELERATOR_TYPE="v4-32",
               RUNTIME_VERSION="tpu-ubuntu2204-base")
CONFIG, GCS = "configs/softvq_b64.py", "gs://bucket/runs/softvq_b64"


@pytest.fixture
def stubs(tmp_path):
  """A PATH whose cloud/cluster tools append their argv (one JSON list per line) to calls.txt."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "calls.txt"
  for tool in TOOLS:
    stub = bin_dir / tool
    stub.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(calls)!r}, 'a').write(json.dumps(['{tool}'] + sys.argv[1:]) + '\\n')\n")
    stub.chmod(0o755)
  return bin_dir, calls


def _run(script, *args, stubs, env=None, unset=(), check=True):
  bin_dir, _ = stubs
  full_env = {k: v for k, v in os.environ.items()
              if k not in unset and not k.startswith(("SLURM_", "TPU_"))}
  full_env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(bin_dir.parent),
                  PYTHON=sys.executable)
  full_env.update(env or {})
  for name in unset:
    full_env.pop(name, None)
  proc = subprocess.run(["bash", str(REPO / script), *args], cwd=REPO, env=full_env,
                        capture_output=True, text=True, timeout=60)
  if check:
    assert proc.returncode == 0, proc.stderr
  return proc


def _commands(stdout: str) -> list[list[str]]:
  """The commands a script printed ("+ cmd ..."), split as a shell would."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _calls(stubs) -> list[list[str]]:
  import json
  calls = stubs[1]
  return [json.loads(l) for l in calls.read_text().splitlines()] if calls.exists() else []


def _remote(cmd: list[str]) -> str:
  (arg,) = [a for a in cmd if a.startswith("--command=")]
  return arg[len("--command="):]


# ------------------------------------------------------------------ every script
def test_launch_scripts_found():
  assert {"launch/tpu/pod.sh", "launch/tpu/worker.sh", "launch/tpu/xpk.sh",
          "launch/gpu/single_node.sh", "launch/gpu/slurm.sh",
          "launch/local_multiprocess.sh", "benchmarks/gpu_checks.sh"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
  shellcheck = shutil.which("shellcheck")
  assert shellcheck, "shellcheck is not installed (pip install -r requirements-dev.txt)"
  proc = subprocess.run([shellcheck, "--shell=bash", "--severity=style", script], cwd=REPO,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_strict_bash(script):
  lines = (REPO / script).read_text().splitlines()
  assert lines[0] == "#!/usr/bin/env bash"
  assert "set -euo pipefail" in lines


# ------------------------------------------------------------------ TPU VM / pod slice
def test_tpu_dry_run_calls_nothing_and_shows_every_step(stubs):
  env = dict(TPU_ENV)
  out = {a: _commands(_run("launch/tpu/pod.sh", "--dry-run", *a.split(), stubs=stubs,
                           env=env).stdout)
         for a in ("create", "setup", f"run {CONFIG} {GCS} --config.total_steps=100", "logs",
                   "stop", "delete")}
  assert _calls(stubs) == []

  (create,) = out["create"]
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert {"softvq-v4-32", "--zone=us-central2-b", "--accelerator-type=v4-32",
          "--version=tpu-ubuntu2204-base"} <= set(create)

  tar, scp, ssh = out["setup"]
  assert tar[0] == "tar" and "--exclude=./.git" in tar
  assert scp[4] == "scp" and "--worker=all" in scp and "softvq-v4-32:softvq-jax.tar.gz" in scp
  assert ssh[4] == "ssh" and "--worker=all" in ssh
  assert _remote(ssh).endswith("bash softvq-jax/launch/tpu/worker.sh setup")

  start, logs = out[f"run {CONFIG} {GCS} --config.total_steps=100"]
  assert "--worker=all" in start
  assert shlex.split(_remote(start)) == ["bash", "softvq-jax/launch/tpu/worker.sh", "start",
                                         CONFIG, GCS, "--config.total_steps=100"]
  assert "--worker=0" in logs and _remote(logs).endswith("worker.sh logs")
  assert out["logs"] == [logs]
  (stop,) = out["stop"]
  assert "--worker=all" in stop and _remote(stop).endswith("worker.sh stop")
  (delete,) = out["delete"]
  assert delete[4:6] == ["delete", "softvq-v4-32"] and "--quiet" in delete


def test_tpu_real_run_executes_exactly_what_it_printed(stubs):
  env = dict(TPU_ENV, PROJECT="my-project", WORKER="3")
  for action in ("setup", f"run {CONFIG} {GCS}"):
    printed = _commands(_run("launch/tpu/pod.sh", *action.split(), stubs=stubs, env=env).stdout)
    called = _calls(stubs)[-len(printed):]
    assert called == printed
  assert all("--project=my-project" in c for c in called if c[0] == "gcloud")
  assert "--worker=3" in called[-1]


def test_tpu_queued_resource_and_spot(stubs):
  env = dict(TPU_ENV, QUEUED="1", SPOT="1", QUEUED_RESOURCE="qr-1")
  cmds = _commands(_run("launch/tpu/pod.sh", "--dry-run", "up", CONFIG, GCS, stubs=stubs,
                        env=env).stdout)
  create = cmds[0]
  assert create[3:6] == ["queued-resources", "create", "qr-1"]
  assert {"--node-id=softvq-v4-32", "--runtime-version=tpu-ubuntu2204-base", "--spot"} <= set(create)
  assert cmds[1][3:5] == ["queued-resources", "describe"]  # waits for ACTIVE
  assert any("worker.sh setup" in _remote(c) for c in cmds if c[4] == "ssh")
  assert any("worker.sh start" in _remote(c) for c in cmds if c[4] == "ssh")
  delete = _commands(_run("launch/tpu/pod.sh", "--dry-run", "delete", stubs=stubs,
                          env=env).stdout)
  assert delete == [["gcloud", "compute", "tpus", "queued-resources", "delete", "qr-1",
                     "--zone=us-central2-b", "--force", "--quiet"]]


@pytest.mark.parametrize("action,missing", [
    ("setup", "TPU_NAME"), ("run", "ZONE"), ("create", "ACCELERATOR_TYPE"),
    ("create", "RUNTIME_VERSION")])
def test_tpu_missing_variable_is_named(stubs, action, missing):
  args = ["--dry-run", action] + ([CONFIG, GCS] if action == "run" else [])
  proc = _run("launch/tpu/pod.sh", *args, stubs=stubs, env=TPU_ENV, unset=(missing,), check=False)
  assert proc.returncode != 0
  assert f"{missing} is not set" in proc.stderr
  assert _calls(stubs) == []


def test_tpu_refuses_local_workdir_and_missing_arguments(stubs):
  proc = _run("launch/tpu/pod.sh", "--dry-run", "up", CONFIG, "/tmp/run", stubs=stubs,
              env=TPU_ENV, check=False)
  assert proc.returncode != 0 and "gs://" in proc.stderr and proc.stdout == ""
  proc = _run("launch/tpu/pod.sh", "run", CONFIG, stubs=stubs, env=TPU_ENV, check=False)
  assert proc.returncode != 0 and "CONFIG WORKDIR" in proc.stderr
  assert _calls(stubs) == []


def test_tpu_worker_start_stop(tmp_path, stubs):
  """The worker side: the job starts in the background with jax.distributed asked for, a
  second start is refused while it runs, stop sends SIGTERM and waits."""
  bin_dir, _ = stubs
  fake_python = bin_dir / "python"
  fake_python.write_text("#!/usr/bin/env bash\ntrap 'echo terminated; exit 0' TERM\n"
                         "echo \"SOFTVQ_JAX_DISTRIBUTED=$SOFTVQ_JAX_DISTRIBUTED args: $*\"\n"
                         "while true; do sleep 0.1; done\n")
  fake_python.chmod(0o755)
  env = dict(VENV=str(tmp_path / "no-venv"), LOG_DIR=str(tmp_path / "logs"))
  out = _run("launch/tpu/worker.sh", "start", CONFIG, GCS, "--config.seed=1", stubs=stubs,
             env=env).stdout
  assert f"+ SOFTVQ_JAX_DISTRIBUTED=1 python -m softvq_jax.main --config={CONFIG} " \
         f"--workdir={GCS} --config.seed=1" in out
  log = tmp_path / "logs" / "job.log"
  deadline = time.time() + 10
  while "args:" not in log.read_text() and time.time() < deadline:
    time.sleep(0.05)
  assert (f"SOFTVQ_JAX_DISTRIBUTED=1 args: -m softvq_jax.main --config={CONFIG} --workdir={GCS}"
          in log.read_text())
  again = _run("launch/tpu/worker.sh", "start", CONFIG, GCS, stubs=stubs, env=env, check=False)
  assert again.returncode != 0 and "already running" in again.stderr
  assert "stopped" in _run("launch/tpu/worker.sh", "stop", stubs=stubs, env=env).stdout
  assert "terminated" in log.read_text()
  assert "no job running" in _run("launch/tpu/worker.sh", "stop", stubs=stubs, env=env).stdout


def test_tpu_worker_setup_installs_the_pinned_tpu_jax():
  text = (REPO / "launch/tpu/worker.sh").read_text()
  assert 'bash launch/setup.sh' in text
  assert '"jax[tpu]==$jax_version"' in text and "sed -n 's/^jax==//p' requirements.txt" in text


def test_distributed_initialises_when_the_tpu_launcher_asks(monkeypatch):
  import jax
  from softvq_jax import distributed
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(distributed, "_already_initialized", lambda: False)
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
               "JAX_INITIALIZATION_TIMEOUT", "SLURM_NTASKS", "SOFTVQ_JAX_DISTRIBUTED"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("SOFTVQ_JAX_DISTRIBUTED", "0")
  assert not distributed.maybe_initialize() and not calls
  monkeypatch.setenv("SOFTVQ_JAX_DISTRIBUTED", "1")
  assert distributed.maybe_initialize()
  assert calls == [{}]  # JAX's own detection of the TPU slice


# ------------------------------------------------------------------ GKE (xpk)
def test_xpk_dry_run(stubs):
  env = dict(CLUSTER="softvq-v5e", WORKLOAD="softvq-b64", TPU_TYPE="v5litepod-16",
             PROJECT="my-project", ZONE="us-west4-a", NUM_SLICES="2")
  (create,) = _commands(_run("launch/tpu/xpk.sh", "--dry-run", "run", CONFIG, GCS, stubs=stubs,
                             env=env).stdout)
  assert create[:3] == ["xpk", "workload", "create"]
  assert {"--cluster=softvq-v5e", "--workload=softvq-b64", "--tpu-type=v5litepod-16",
          "--num-slices=2", "--max-restarts=3", "--project=my-project",
          "--zone=us-west4-a"} <= set(create)
  assert f"--script-dir={REPO}" in create
  assert _remote(create) == (f"bash launch/tpu/worker.sh setup && "
                             f"bash launch/tpu/worker.sh exec {CONFIG} {GCS}")
  (create,) = _commands(_run("launch/tpu/xpk.sh", "--dry-run", "run", CONFIG, GCS, stubs=stubs,
                             env=dict(env, DOCKER_IMAGE="gcr.io/p/softvq:1")).stdout)
  assert "--docker-image=gcr.io/p/softvq:1" in create
  assert _remote(create) == f"bash launch/tpu/worker.sh exec {CONFIG} {GCS}"
  (delete,) = _commands(_run("launch/tpu/xpk.sh", "--dry-run", "delete", stubs=stubs,
                             env=env).stdout)
  assert delete[:3] == ["xpk", "workload", "delete"] and "--workload=softvq-b64" in delete
  assert _calls(stubs) == []
  proc = _run("launch/tpu/xpk.sh", "--dry-run", "run", CONFIG, GCS, stubs=stubs,
              env=dict(env, TPU_TYPE=""), check=False)
  assert proc.returncode != 0 and "TPU_TYPE is not set" in proc.stderr


# ------------------------------------------------------------------ GPU
def test_gpu_single_node_dry_run(stubs):
  out = _run("launch/gpu/single_node.sh", "--dry-run", "--setup", CONFIG, "/data/run",
             "--config.total_steps=10", stubs=stubs, env=dict(JAX_CUDA="cuda13")).stdout
  setup, pip, job = _commands(out)
  assert setup == ["bash", "launch/setup.sh"]
  assert pip[-1] == "jax[cuda13]==" + next(
      l.split("==")[1] for l in (REPO / "requirements.txt").read_text().splitlines()
      if l.startswith("jax=="))
  assert job == [sys.executable, "-m", "softvq_jax.main", f"--config={CONFIG}",
                 "--workdir=/data/run", "--config.total_steps=10"]
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90" in out

  out = _run("launch/gpu/single_node.sh", "--dry-run", CONFIG, "/data/run", stubs=stubs,
             env=dict(NUM_PROCESSES="4", COORDINATOR_PORT="4321")).stdout
  procs = [c for c in _commands(out) if c[0] == "env"]
  assert len(procs) == 4
  for i, cmd in enumerate(procs):
    assert {"JAX_COORDINATOR_ADDRESS=localhost:4321", "JAX_NUM_PROCESSES=4",
            f"JAX_PROCESS_ID={i}", f"CUDA_VISIBLE_DEVICES={i}"} <= set(cmd)
    assert [a for a in cmd if a.startswith("--")] == [f"--config={CONFIG}", "--workdir=/data/run"]
  assert _calls(stubs) == []


def test_slurm_submits_itself_then_runs_srun(stubs):
  env = dict(NODES="4", GPUS_PER_NODE="8", PARTITION="a100", ACCOUNT="proj")
  (sbatch,) = _commands(_run("launch/gpu/slurm.sh", "--dry-run", CONFIG, "/shared/run",
                             "--config.seed=3", stubs=stubs, env=env).stdout)
  assert sbatch[0] == "sbatch"
  assert {"--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--requeue",
          "--signal=TERM@300", "--partition=a100", "--account=proj"} <= set(sbatch)
  assert sbatch[-4:] == [str(REPO / "launch/gpu/slurm.sh"), CONFIG, "/shared/run",
                         "--config.seed=3"]

  inside = dict(SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="4", SLURM_JOB_NODELIST="gpu[01-04]")
  printed = _commands(_run("launch/gpu/slurm.sh", CONFIG, "/shared/run", stubs=stubs,
                           env=inside).stdout)
  (srun,) = printed
  assert srun[:4] == ["srun", "--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
  assert srun[4:] == [sys.executable, "-m", "softvq_jax.main", f"--config={CONFIG}",
                      "--workdir=/shared/run"]
  assert _calls(stubs)[-1] == srun  # ran exactly what it printed

  proc = _run("launch/gpu/slurm.sh", "--dry-run", CONFIG, "/shared/run", stubs=stubs,
              env=dict(SLURM_JOB_ID="77"), check=False)
  assert proc.returncode != 0 and "SLURM_JOB_NUM_NODES is not set" in proc.stderr


def test_slurm_job_requeues_itself_when_training_stopped_at_its_time_limit(stubs):
  """SIGTERM before the time limit: the trainer checkpoints and exits 75, and the batch
  script requeues its job; any other status is passed on without a requeue."""
  bin_dir, calls = stubs
  inside = dict(SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu[01-02]")
  for status, requeued in ((75, True), (1, False), (0, False)):
    calls.unlink(missing_ok=True)
    (bin_dir / "srun").write_text(f"#!/usr/bin/env bash\nexit {status}\n")
    proc = _run("launch/gpu/slurm.sh", CONFIG, "/shared/run", stubs=stubs, env=inside,
                check=False)
    assert proc.returncode == status, proc.stderr
    assert (["scontrol", "requeue", "77"] in _calls(stubs)) == requeued


def test_slurm_variables_reach_jax_cluster_detection(monkeypatch):
  """What srun sets for a 4-node job makes softvq_jax.distributed start jax.distributed, and
  JAX's SLURM detection derives the coordinator, process count and id from it."""
  import jax
  from jax._src.clusters import slurm_cluster
  from softvq_jax import distributed
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
               "SOFTVQ_JAX_DISTRIBUTED"):
    monkeypatch.delenv(name, raising=False)
  srun_env = dict(SLURM_JOB_ID="77", SLURM_NTASKS="4", SLURM_PROCID="2", SLURM_LOCALID="0",
                  SLURM_STEP_NODELIST="gpu[01-04]")
  for k, v in srun_env.items():
    monkeypatch.setenv(k, v)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(distributed, "_already_initialized", lambda: False)
  assert distributed.maybe_initialize() and calls == [{}]
  cluster = slurm_cluster.SlurmCluster
  assert cluster.is_env_present()
  assert cluster.get_coordinator_address(None, None).startswith("gpu01:")
  assert (cluster.get_process_count(), cluster.get_process_id()) == (4, 2)


# ------------------------------------------------------------------ local processes
def test_local_multiprocess_dry_run(stubs, tmp_path):
  out = _run("launch/local_multiprocess.sh", "--dry-run", "3", CONFIG, str(tmp_path / "w"),
             "--config.total_steps=5", stubs=stubs,
             env=dict(COORDINATOR_PORT="5555", DEVICES_PER_PROCESS="2",
                      XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_dump_to=/x")).stdout
  cmds = _commands(out)
  assert len(cmds) == 3
  for i, cmd in enumerate(cmds):
    assert cmd[:6] == ["env", "JAX_COORDINATOR_ADDRESS=localhost:5555", "JAX_NUM_PROCESSES=3",
                       f"JAX_PROCESS_ID={i}", "JAX_PLATFORMS=cpu",
                       "XLA_FLAGS=--xla_dump_to=/x --xla_force_host_platform_device_count=2"]
    job = [sys.executable, "-m", "softvq_jax.main", f"--config={CONFIG}",
           f"--workdir={tmp_path / 'w'}", "--config.total_steps=5"]
    if i == 0:  # to the terminal
      assert cmd[6:] == job
    else:
      assert cmd[6:] == job + [">", str(tmp_path / "w" / "logs" / f"process_{i}.log"), "2>&1"]
  assert not (tmp_path / "w").exists()
  proc = _run("launch/local_multiprocess.sh", "--dry-run", "two", CONFIG, "w", stubs=stubs,
              check=False)
  assert proc.returncode != 0 and "positive integer" in proc.stderr


def test_local_multiprocess_stops_the_others_when_one_fails(stubs, tmp_path):
  bin_dir, _ = stubs
  fake_python = bin_dir / "python"
  # Process 1 fails after a second; process 0 would run for a minute unless stopped.
  fake_python.write_text("#!/usr/bin/env bash\nif [[ $JAX_PROCESS_ID == 1 ]]; then sleep 1; exit 3; fi\n"
                         "trap 'echo process 0 stopped; exit 0' TERM\n"
                         "for _ in $(seq 600); do sleep 0.1; done\n")
  fake_python.chmod(0o755)
  start = time.time()
  proc = _run("launch/local_multiprocess.sh", "2", CONFIG, str(tmp_path / "w"), stubs=stubs,
              env=dict(PYTHON="python", COORDINATOR_PORT="5555"), check=False)
  assert proc.returncode == 3, (proc.stdout, proc.stderr)
  assert "process 0 stopped" in proc.stdout and time.time() - start < 30


def test_gpu_checks_skip_what_the_budget_cannot_hold(tmp_path):
  """The GPU check list runs on any machine: with under a minute of budget it starts no
  step, names each as skipped, and succeeds."""
  proc = subprocess.run(["bash", "benchmarks/gpu_checks.sh", str(tmp_path / "out")], cwd=REPO,
                        env=dict(os.environ, DEADLINE="30"), capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  log = (tmp_path / "out" / "log.txt").read_text()
  skipped = [line.split()[1].rstrip(":") for line in log.splitlines() if "skipped" in line]
  assert skipped[:3] == ["gpu-tests", "sit-train", "tokenizer-b64"] and len(skipped) == 13
  assert "kernel-sweep" in skipped and "tokenizer-b64-tanh-profiled" in skipped
  assert "rc " not in log and not (tmp_path / "out" / "gpu.jsonl").exists()
