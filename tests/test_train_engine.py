"""The training engine: sharded steps equal single-device steps, exact resume, NaN guard."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections
import numpy as np
import optax
import pytest

from softvq_jax import parallel
from softvq_jax.config_lib import sit_recipe
from softvq_jax.models.sit import GeneratorConfig, SiT
from softvq_jax.train import sit_trainer
from softvq_jax.train import state as state_lib
from softvq_jax.train.inputs import ArrayIterator
from softvq_jax.transport.loss import sit_loss

# The resume tests rerun the same training programs in this process.
pytestmark = pytest.mark.usefixtures("persistent_compile_cache")

GEN = GeneratorConfig(kind="sit", input_size=8, in_channels=4, hidden_size=32, depth=2,
                      num_heads=2, num_classes=4)


def model_fn(rngs):
  return SiT(GEN, rngs=rngs)


def loss_fn(model, batch, key, step):
  del step
  out = sit_loss(lambda x, t, y, k: model(x, t, y, drop_key=k), batch["latent"], batch["label"],
                 key, weighting="lognormal")
  return jnp.mean(out["loss"]), {}


def _run_steps(mesh, strategy, batches, steps=2):
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, b2=0.999))
  graphdef, state, shardings = state_lib.create_train_state(model_fn, tx, mesh, seed=3,
                                                            strategy=strategy)
  step = state_lib.make_train_step(graphdef, tx, loss_fn, ema_decay=0.9, state_shardings=shardings,
                                   batch_sharding=parallel.batch_sharding(mesh))
  losses = []
  for batch in batches[:steps]:
    state, metrics = step(state, parallel.global_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  return state, losses


@pytest.fixture(scope="module")
def batches():
  rng = np.random.default_rng(0)
  return [{"latent": rng.normal(size=(8, 8, 4)).astype(np.float32),
           "label": rng.integers(0, 4, 8).astype(np.int32)} for _ in range(2)]


@pytest.fixture(scope="module")
def single(batches):
  mesh = parallel.create_mesh([("data", 1)], devices=jax.devices()[:1])
  return _run_steps(mesh, "dp", batches)


@pytest.mark.parametrize("axes, strategy", [([("data", 8)], "dp"),
                                            ([("data", 2), ("fsdp", 4)], "fsdp")])
def test_sharded_step_equals_single_device(single, batches, axes, strategy):
  mesh = parallel.create_mesh(axes)
  state, losses = _run_steps(mesh, strategy, batches)
  ref_state, ref_losses = single
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(state.ema), jax.tree.leaves(ref_state.ema)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  qkv = state.params["blocks"][0]["attn"]["qkv"]["kernel"]
  if strategy == "fsdp":
    # (32, 96): the larger dimension is split over the 4-way fsdp axis; Adam's
    # moments follow their parameter.
    assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    mu = state.opt_state[1][0].mu["blocks"][0]["attn"]["qkv"]["kernel"]
    assert mu.sharding.spec == qkv.sharding.spec
    assert qkv.addressable_shards[0].data.shape == (32, 24)
  else:
    assert qkv.sharding.is_fully_replicated


def test_param_spec_rules():
  mesh = parallel.create_mesh([("data", 2), ("fsdp", 4)])
  assert parallel.param_spec((1152, 4608), mesh, "fsdp") == jax.sharding.PartitionSpec(None, "fsdp")
  assert parallel.param_spec((6,), mesh, "fsdp") == jax.sharding.PartitionSpec()
  assert parallel.param_spec((), mesh, "fsdp") == jax.sharding.PartitionSpec()
  assert parallel.param_spec((1152, 4608), mesh, "dp") == jax.sharding.PartitionSpec()
  with pytest.raises(ValueError, match="strategy"):
    parallel.param_spec((4,), mesh, "zero3")
  with pytest.raises(ValueError, match="needs 16 devices"):
    parallel.create_mesh([("data", 16)])


def test_array_iterator_state_and_shards():
  data = {"x": np.arange(20)}
  it = ArrayIterator(data, 4, seed=1)
  first = [next(it)["x"] for _ in range(7)]
  state = it.get_state()
  after = next(it)["x"]
  again = ArrayIterator(data, 4, seed=1)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["x"], after)
  # Two processes split every global batch into disjoint halves.
  halves = [ArrayIterator(data, 4, seed=1, process_index=i, process_count=2) for i in range(2)]
  for step in range(5):
    a, b = (next(h)["x"] for h in halves)
    assert not set(a) & set(b)
    np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), np.sort(first[step]))
  with pytest.raises(ValueError, match="fewer than one global batch"):
    ArrayIterator({"x": np.arange(3)}, 4, seed=0)


def tiny_config(total_steps, **overrides):
  c = sit_recipe("softvq-b-64", "runlocal")
  c.data = ml_collections.ConfigDict(dict(source="synthetic", num_classes=4, num_examples=16))
  c.model.update(hidden_size=32, depth=1, num_heads=2, num_classes=4)
  c.tokenizer.update(image_size=32, enc_patch_size=8, dec_patch_size=8, num_latent_tokens=8,
                     codebook_embed_dim=4, codebook_size=16,
                     encoder_kwargs=dict(embed_dim=32, depth=1, num_heads=2),
                     decoder_kwargs=dict(embed_dim=32, depth=1, num_heads=2))
  c.total_steps = total_steps
  c.log_every = 2
  c.ckpt_every = 3
  c.sample_every = 0
  c.update(overrides)
  return c


def _final_params(workdir):
  from softvq_jax.checkpoint import TrainCheckpointer
  ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.latest_step()
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                             "state"))
  ckpt.close()
  return step, restored


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  sit_trainer.run(tiny_config(8), workdir)
  return _final_params(workdir)


def _assert_same_state(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_after_sigterm_is_bit_exact(uninterrupted, tmp_path, monkeypatch):
  workdir = str(tmp_path)

  class TermAt:
    def __init__(self, step):
      self.step = step

    def __call__(self, step, state):
      if step == self.step:
        os.kill(os.getpid(), signal.SIGTERM)

  original = sit_trainer.SampleGrid
  monkeypatch.setattr(sit_trainer, "SampleGrid", lambda *a, **k: TermAt(5))
  sit_trainer.run(tiny_config(8, sample_every=1), workdir)  # stops at 5 (SIGTERM)
  monkeypatch.setattr(sit_trainer, "SampleGrid", original)
  assert _final_params(workdir)[0] == 5
  # As if the run had logged step 6 and died before its next checkpoint (plus a torn line).
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 6, "loss": 1.0}) + "\n" + '{"step": 7, "lo')
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  killed_writer = metric_writers.create_default_writer(workdir)
  killed_writer.write_scalars(6, {"loss": 1.0})
  killed_writer.close()
  sit_trainer.run(tiny_config(8), workdir)
  step, params = _final_params(workdir)
  assert step == uninterrupted[0] == 8
  _assert_same_state(params, uninterrupted[1])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == sorted(set(steps)) and steps[-1] == 8 and 6 in steps
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  logged = []
  for name in os.listdir(workdir):
    if name.startswith("events.out.tfevents."):
      logged += [event.step for event in tf.compat.v1.train.summary_iterator(
          os.path.join(workdir, name)) for value in event.summary.value if value.tag == "loss"]
  assert sorted(logged) == steps  # TensorBoard: each logged step once


def test_a_run_stopped_by_sigterm_exits_with_the_preempted_status(tmp_path):
  """Checkpointed and stopped short of its last step, the job exits 75, so that a restart
  policy or a shell loop reruns it; the rerun that finishes exits 0."""
  from softvq_jax.train import loop  # pylint: disable=g-import-not-at-top
  (tmp_path / "tiny.py").write_text(
      "import sys\nsys.path.insert(0, 'tests')\nfrom test_train_engine import tiny_config\n"
      "def get_config(arg=None):\n  return tiny_config(int(arg))\n")
  script = (
      "import os, signal, sys; sys.path.insert(0, 'tests')\n"
      "from absl import app\n"
      "from softvq_jax import main\n"
      "from softvq_jax.train import sit_trainer\n"
      "class TermAt:\n"
      "  def __init__(self, *a, **k): pass\n"
      "  def __call__(self, step, state):\n"
      "    if step == 3: os.kill(os.getpid(), signal.SIGTERM)\n"
      "if os.environ.get('TERM_AT_3'): sit_trainer.SampleGrid = TermAt\n"
      "app.run(main.main, flags_parser=main._parse_flags)\n")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def job(total, **env):
    return subprocess.run(
        [sys.executable, "-c", script, f"--config={tmp_path / 'tiny.py'}:{total}",
         f"--workdir={tmp_path / 'run'}", "--config.sample_every=1"], cwd=repo,
        env=dict(os.environ, JAX_PLATFORMS="cpu", **env), capture_output=True, text=True,
        timeout=240)

  stopped = job(6, TERM_AT_3="1")
  assert stopped.returncode == loop.EXIT_STATUS_PREEMPTED == 75, stopped.stderr[-3000:]
  assert "Stopped at step 3 after a preemption signal" in stopped.stderr
  assert _final_params(str(tmp_path / "run"))[0] == 3
  finished = job(6)
  assert finished.returncode == 0, finished.stderr[-3000:]
  assert _final_params(str(tmp_path / "run"))[0] == 6


def test_trimming_metrics_keeps_every_line_that_is_not_a_later_row(tmp_path):
  """On resume, rows after the restored step go (they are logged again), and so does a last
  line torn by a kill; a user's notes and rows without a step stay."""
  from softvq_jax.train.loop import JsonlWriter  # pylint: disable=g-import-not-at-top
  path = tmp_path / "metrics.jsonl"
  lines = ["my lab notebook line\n", '{"step": 3, "loss": 1}\n', '["a", "list"]\n',
           '{"note": "no step"}\n', '{"step": "x"}\n', '{"step": 8, "loss": 2}\n']
  path.write_text("".join(lines) + '{"step": 9, "lo')
  JsonlWriter(str(path)).drop_after(5)
  assert path.read_text() == "".join(lines[:5])
  path.write_text("".join(lines[:2]) + "a last note without a newline")
  JsonlWriter(str(path)).drop_after(0)
  assert path.read_text() == lines[0] + "a last note without a newline\n"


def _run_in_a_fresh_process(workdir, total_steps: int, *, die_at_save: int | None = None):
  """``sit_trainer.run(tiny_config(total_steps), workdir)`` in a new Python process, as a
  rerun after a crash is; ``die_at_save``: SIGKILL itself when it reaches that step's save,
  once the earlier saves are durable (a fixed point, where a kill from outside could land
  on either side of a save)."""
  script = (
      "import os, signal, sys; sys.path.insert(0, 'tests');"
      "from test_train_engine import tiny_config;"
      "from softvq_jax import checkpoint;"
      "from softvq_jax.train import sit_trainer\n"
      "save = checkpoint.TrainCheckpointer.save\n"
      "def save_or_die(self, step, *args, **kwargs):\n"
      f"  if step == {die_at_save!r}:\n"
      "    self.wait(); os.kill(os.getpid(), signal.SIGKILL)\n"
      "  return save(self, step, *args, **kwargs)\n"
      "checkpoint.TrainCheckpointer.save = save_or_die\n"
      f"sit_trainer.run(tiny_config({total_steps}), {str(workdir)!r})")
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # same 8 fake devices as this process
  return subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True, timeout=240)


def test_a_damaged_checkpoint_is_named_by_its_step_and_alone(uninterrupted, tmp_path):
  del uninterrupted  # its programs are in the compile cache this run reuses
  workdir = tmp_path / "run"
  sit_trainer.run(tiny_config(8), str(workdir))
  damaged = 0
  for path in (workdir / "checkpoints" / "8" / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d":  # the arrays' bytes, not the metadata
      with open(path, "r+b") as f:
        f.truncate(100)
      damaged += 1
  assert damaged
  proc = _run_in_a_fresh_process(workdir, 10)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("softvq_jax.checkpoint.CheckpointError: step 8 of ")
  assert "could not be read (OUT_OF_RANGE" in last and "to resume from step 6" in last, last
  # What Orbax's abandoned reads raise after the failure would bury that line.
  for noise in ("Event loop is closed", "never retrieved", "Exception ignored", "never awaited"):
    assert noise not in proc.stderr


def test_only_the_orphans_of_a_failed_restore_are_dropped(monkeypatch):
  from types import SimpleNamespace  # pylint: disable=g-import-not-at-top
  from softvq_jax.utils import errors  # pylint: disable=g-import-not-at-top
  reached = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: reached.append(u.exc_value))
  errors.drop_orphans_of_failed_restores()
  errors.drop_orphans_of_failed_restores()  # once only: not a chain of hooks
  late_callback = RuntimeError("Event loop is closed")
  elsewhere = RuntimeError("a finaliser failed")
  for value in (late_callback, elsewhere, ValueError("Event loop is closed")):
    sys.unraisablehook(SimpleNamespace(exc_value=value, object=None))
  assert reached[0] is elsewhere and len(reached) == 2


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(tmp_path):
  # Every run in a fresh process: the reference too, so that no setting this test process
  # holds (other tests run in it) can tell the runs apart.
  killed = tmp_path / "killed"
  proc = _run_in_a_fresh_process(killed, 400, die_at_save=9)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert sorted(p.name for p in (killed / "checkpoints").iterdir()
                if p.name.isdigit()) == ["3", "6"]
  # Rerun with the uninterrupted run's length: resumes from the last complete checkpoint.
  proc = _run_in_a_fresh_process(killed, 8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = _run_in_a_fresh_process(tmp_path / "whole", 8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  step, params = _final_params(str(killed))
  assert step == 8
  _assert_same_state(params, _final_params(str(tmp_path / "whole"))[1])


def _poison_the_loss(monkeypatch, poison):
  """The SiT trainer's loss becomes ``poison(model, loss value, step)``."""
  real = sit_trainer.make_loss_fn

  def poisoned(transport):
    fn = real(transport)

    def loss(model, batch, key, step):
      value, aux = fn(model, batch, key, step)
      return poison(model, value, step), aux
    return loss

  monkeypatch.setattr(sit_trainer, "make_loss_fn", poisoned)


def test_nan_guard_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  _poison_the_loss(monkeypatch, lambda model, value, step: jnp.where(step >= 4, jnp.nan, value))
  # Loss of state step 4 = the loop's step 5, which neither logs nor saves: the sample grid
  # due there makes the loop check first, so it stops there, before the grid is written.
  with pytest.raises(FloatingPointError, match="at step 5;.*last good checkpoint is step 3"):
    sit_trainer.run(tiny_config(8, log_every=100, sample_every=1), workdir)
  assert _final_params(workdir)[0] == 3
  grids = sorted(os.listdir(os.path.join(workdir, "samples")))
  assert grids[-1] == "step_00000004.png", grids


def test_nan_guard_sees_nan_gradients_behind_a_finite_loss(tmp_path, monkeypatch):
  """sqrt(|w - stop_gradient(w)|) is 0 but its gradient is not finite: the loss stays finite
  while the update of step 6, a checkpoint step, turns the weights into NaN. It is not saved."""
  workdir = str(tmp_path)

  def spiked(model, value, step):
    w = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
    # Before step 6 (a checkpoint step) the square root is taken at 1 (gradient 0 through
    # the select).
    gap = jnp.where(step >= 5, w - jax.lax.stop_gradient(w), 1.0)
    return value + jnp.sum(jnp.sqrt(jnp.abs(gap))) - jnp.where(step >= 5, 0.0, w.size)

  _poison_the_loss(monkeypatch, spiked)
  with pytest.raises(FloatingPointError, match="param_norm is nan at step 6.*last good "
                                               "checkpoint is step 3"):
    sit_trainer.run(tiny_config(8, log_every=1), workdir)
  step, saved = _final_params(workdir)
  assert step == 3 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(saved))


def test_scanned_rematerialised_sit_trains(tmp_path):
  config = tiny_config(4, log_every=1)
  config.model.update(depth=2, scan_layers=True, remat_policy="nothing_saveable")
  last = sit_trainer.run(config, str(tmp_path))
  assert np.isfinite(last["loss"])
  step, params = _final_params(str(tmp_path))
  assert step == 4
  assert np.asarray(params["params"]["blocks"]["attn"]["qkv"]["kernel"]["value"]).shape[0] == 2
  # The EMA generator is exported, unstacked, for Generator.load and the sample job.
  from softvq_jax.generator import Generator
  gen = Generator.load(os.path.join(str(tmp_path), "generator"))
  stacked = np.asarray(params["ema"]["blocks"]["attn"]["qkv"]["kernel"]["value"])
  for i in range(2):
    np.testing.assert_array_equal(gen.model().blocks[i].attn.qkv.kernel[...], stacked[i])
  noise = np.random.default_rng(0).normal(size=(2,) + gen.config.latent_shape)
  assert np.isfinite(np.asarray(gen.sample(noise.astype(np.float32), np.array([0, 1]),
                                           method="euler", num_steps=2))).all()
  # The stacked checkpoint decides the layout of a resumed "auto" run; an explicit per-block
  # model is refused before anything is restored.
  from softvq_jax.checkpoint import TrainCheckpointer
  from softvq_jax.models.config import ConfigError
  ckpt = TrainCheckpointer(os.path.join(str(tmp_path), "checkpoints"))
  paths = ckpt.state_paths()
  ckpt.close()
  assert ("params", "blocks", "attn", "qkv", "kernel", "value") in paths
  config.model.scan_layers = False
  with pytest.raises(ConfigError, match="written with scan_layers=True"):
    sit_trainer.run(config, str(tmp_path))
  config.model.update(scan_layers="auto", remat_policy="auto")
  run = sit_trainer.prepare_training(config, str(tmp_path),
                                     lambda _: sit_trainer.make_loss_fn(config.transport))
  run.ckpt.close()
  assert int(run.state.step) == 4
  assert run.state.params["blocks"]["attn"]["qkv"]["kernel"][...].shape[0] == 2


def test_resuming_with_other_model_settings_is_refused_by_name(tmp_path):
  """Twice the heads at the same width: every array keeps its shape, so only the saved
  settings tell the runs apart."""
  from softvq_jax.models.config import ConfigError
  config = tiny_config(2)
  sit_trainer.run(config, str(tmp_path))
  config.total_steps = 4
  config.model.num_heads *= 2
  with pytest.raises(ConfigError, match=r"generator.num_heads: checkpoint 2, this run 4"):
    sit_trainer.run(config, str(tmp_path))


def test_resuming_with_other_run_settings_names_them_in_a_warning(tmp_path, caplog):
  """Data, optimizer and step counts may change on resume, but not silently: the job config
  is kept with each checkpoint and every changed field is named."""
  from softvq_jax.checkpoint import TrainCheckpointer  # pylint: disable=g-import-not-at-top
  from softvq_jax.train import common  # pylint: disable=g-import-not-at-top
  config = tiny_config(2)
  sit_trainer.run(config, str(tmp_path))
  ckpt = TrainCheckpointer(str(tmp_path / "checkpoints"))
  assert ckpt.meta()[common.RUN_CONFIG_META]["data"]["num_examples"] == 16
  assert common.warn_of_other_run_settings(ckpt, config) == []
  ckpt.close()
  config.total_steps = 4
  config.optim.lr = 0.5
  config.data.num_examples = 32
  with caplog.at_level("WARNING"):
    sit_trainer.run(config, str(tmp_path))
  (warning,) = [r.getMessage() for r in caplog.records if "settings other than" in r.getMessage()]
  assert "data.num_examples: checkpoint 16, this run 32" in warning
  assert "optim.lr: checkpoint 0.0001, this run 0.5" in warning
  assert "total_steps: checkpoint 2, this run 4" in warning
  assert "model." not in warning  # the model is the same


def test_checkpoints_from_before_a_config_field_existed_resume():
  """A field added to the model config since the checkpoint was written (a DiT's
  noise_schedule and diffusion_steps) is not a difference; a changed or dropped one is."""
  from types import SimpleNamespace  # pylint: disable=g-import-not-at-top
  from softvq_jax.models.config import ConfigError  # pylint: disable=g-import-not-at-top
  from softvq_jax.train import common  # pylint: disable=g-import-not-at-top
  stored = {"generator": {"kind": "dit", "num_heads": 2}, "diffusion": {"noise_schedule": "cosine"}}
  ckpt = SimpleNamespace(latest_step=lambda: 10, meta=lambda: stored, directory="ckpt")
  current = {"generator": {"kind": "dit", "num_heads": 2, "noise_schedule": "cosine",
                           "diffusion_steps": 1000}, "diffusion": {"noise_schedule": "cosine"}}
  common.check_resumable(ckpt, current)
  with pytest.raises(ConfigError, match=r"diffusion.noise_schedule: checkpoint 'cosine', this "
                                        r"run 'linear'"):
    common.check_resumable(ckpt, dict(current, diffusion={"noise_schedule": "linear"}))
  with pytest.raises(ConfigError, match=r"generator.num_heads: checkpoint 2, this run None"):
    common.check_resumable(ckpt, dict(current, generator={"kind": "dit"}))


def test_multi_process_runs_leave_sigterm_to_jax(monkeypatch):
  """jax.distributed's preemption sync needs its own SIGTERM handler: the loop's flag takes
  the signal only in single-process runs."""
  from softvq_jax.train.loop import PreemptionFlag
  before = signal.getsignal(signal.SIGTERM)
  flag = PreemptionFlag()
  assert signal.getsignal(signal.SIGTERM) != before
  flag.restore()
  assert signal.getsignal(signal.SIGTERM) == before
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  flag = PreemptionFlag()
  assert signal.getsignal(signal.SIGTERM) == before
  flag.restore()
