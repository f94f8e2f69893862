"""The generator recipes' "auto" graph options: scanned or per-block layers (by platform, or
the layout of the checkpoint being resumed) and rematerialisation only where memory needs it."""

import jax
import numpy as np
import pytest
from test_no_recompile import count_compiles
from test_train_engine import tiny_config

from softvq_jax import parallel
from softvq_jax.config_lib import sit_recipe
from softvq_jax.models.config import ConfigError
from softvq_jax.train import sit_trainer

PER_BLOCK = [("params", "blocks", "0", "attn", "qkv", "kernel", "value"),
             ("params", "x_embedder", "kernel", "value"), ("step",)]
STACKED = [("params", "blocks", "attn", "qkv", "kernel", "value"),
           ("params", "x_embedder", "kernel", "value"), ("step",)]


def test_recipes_default_to_auto_and_take_explicit_values():
  c = sit_recipe("softvq-b-64", None)
  assert (c.model.scan_layers, c.model.remat_policy) == ("auto", "auto")
  c.model.update(scan_layers=True, remat_policy="nothing_saveable")  # still overridable
  assert c.model.scan_layers is True
  local = sit_recipe("softvq-b-64", "runlocal")
  assert (local.model.scan_layers, local.model.remat_policy) == (False, "none")


@pytest.mark.parametrize("platform, expected", [("gpu", False), ("tpu", True), ("cpu", True)])
def test_auto_scans_everywhere_but_on_gpus(platform, expected):
  assert sit_trainer.resolve_scan_layers("auto", platform=platform) is expected


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_auto_resumes_in_the_checkpoints_layout(platform):
  resolve = sit_trainer.resolve_scan_layers
  assert resolve("auto", state_paths=STACKED, platform=platform) is True
  assert resolve("auto", state_paths=PER_BLOCK, platform=platform) is False


def test_explicit_scan_layers_that_contradict_the_checkpoint_or_are_not_bools_fail():
  resolve = sit_trainer.resolve_scan_layers
  assert resolve(True, state_paths=STACKED) is True
  with pytest.raises(ConfigError, match="written with scan_layers=True"):
    resolve(False, state_paths=STACKED)
  with pytest.raises(ConfigError, match="written with scan_layers=False"):
    resolve(True, state_paths=PER_BLOCK)
  with pytest.raises(ConfigError, match="true, false or 'auto'.*'yes'"):
    resolve("yes")
  assert sit_trainer.stacked_layout([("step",)]) is None


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
  config = tiny_config(1)
  config.model.update(depth=2, scan_layers=False, remat_policy="auto")
  run = sit_trainer.prepare_training(config, str(tmp_path_factory.mktemp("auto")),
                                     lambda _: sit_trainer.make_loss_fn(config.transport))
  batch = parallel.global_batch(next(run.data), run.mesh)
  yield run, batch
  run.ckpt.close()


@pytest.mark.parametrize("limit, policy", [(None, "none"), (1 << 50, "none"),
                                           (1, sit_trainer.AUTO_REMAT_POLICY)])
def test_auto_remat_keeps_the_plain_step_when_it_fits(auto_run, limit, policy):
  run, batch = auto_run
  step = sit_trainer.AutoRematStep(run.step_fn.make_step, run.mesh,
                                   run.step_fn.rules, memory_limit=limit)
  state = jax.tree.map(lambda x: x.copy(), run.state)  # the step donates its input
  with count_compiles() as compiles:
    new_state, metrics = step(state, batch)
    jax.block_until_ready(new_state)
  assert step.policy == policy and step.needed_bytes > 0
  # The memory check compiled the step the first call then ran: one compile, or two when
  # the plain step did not fit and the rematerialised one was compiled too.
  assert compiles[0] == (1 if policy == "none" else 2)
  with count_compiles() as again:
    jax.block_until_ready(step(new_state, batch))
  assert again[0] == 0
  assert np.isfinite(float(metrics["loss"]))


def test_processes_agree_on_the_policy(auto_run, monkeypatch):
  """One process over budget makes every process rematerialise (one program for all)."""
  from jax.experimental import multihost_utils
  run, batch = auto_run
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  gathered = []
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: gathered.append(int(x)) or np.array([int(x), 0]))
  step = sit_trainer.AutoRematStep(run.step_fn.make_step, run.mesh, run.step_fn.rules,
                                   memory_limit=None)
  step._choose(jax.tree.map(lambda x: x.copy(), run.state), batch)  # pylint: disable=protected-access
  assert gathered == [1] and step.policy == sit_trainer.AUTO_REMAT_POLICY


def test_the_trainer_builds_the_configured_residual_stream(tmp_path):
  from flax import nnx
  config = tiny_config(1, residual_dtype="bfloat16")
  run = sit_trainer.prepare_training(config, str(tmp_path),
                                     lambda _: sit_trainer.make_loss_fn(config.transport))
  run.ckpt.close()
  assert nnx.merge(run.graphdef, run.state.params, run.state.rest).residual_dtype == "bfloat16"
