"""Stage 1 resumes bit-exactly: both optimizers, EMA, discriminator statistics, LeCAM EMAs.

(A file of its own so that the test runner can put it next to test_stage1.py's compiles.)
"""

import json

import jax
import numpy as np
import pytest
from test_stage1 import gan_config

from softvq_jax.train import tokenizer_trainer


pytestmark = pytest.mark.usefixtures("few_xla_optimisations", "persistent_compile_cache")


def _final_state(workdir):
  import orbax.checkpoint as ocp
  from softvq_jax.checkpoint import TrainCheckpointer
  ckpt = TrainCheckpointer(str(workdir / "checkpoints"))
  step = ckpt.latest_step()
  ckpt.close()
  return step, ocp.StandardCheckpointer().restore(str(workdir / "checkpoints" / str(step) / "state"))


@pytest.mark.slow
def test_stage1_resume_is_bit_exact(tmp_path):
  """Both optimizers, EMA, discriminator statistics and LeCAM EMAs survive a restart exactly."""
  def config(total):
    c = gan_config(perceptual_weight=0.0, diff_aug=True, disc_cr_weight=4.0)
    c.total_steps = total
    c.log_every, c.vis_every, c.ckpt_every = 2, 100, 2
    return c

  tokenizer_trainer.run(config(4), str(tmp_path / "straight"))
  tokenizer_trainer.run(config(2), str(tmp_path / "resumed"))
  tokenizer_trainer.run(config(4), str(tmp_path / "resumed"))
  (s1, a), (s2, b) = _final_state(tmp_path / "straight"), _final_state(tmp_path / "resumed")
  assert s1 == s2 == 4
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  logs = [json.loads(l) for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in logs] == [2, 4]
