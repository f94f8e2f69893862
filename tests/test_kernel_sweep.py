"""The GPU kernels' tuning sweep (softvq_jax.kernel_sweep), run on toy shapes in Pallas'
interpreter: every variant runs the kernel, computes what the default computes, and leaves
the module constants as they were."""

from __future__ import annotations

import json

import jax
import pytest

from softvq_jax import kernel_sweep
from softvq_jax.models import adaln, short_attention


def test_every_variant_runs_the_kernel_and_matches_the_default(tmp_path, capsys):
  before = {m: {n: getattr(m, n) for n in variants[0]}
            for m, variants in ((short_attention, kernel_sweep.ATTENTION_VARIANTS),
                                (adaln, kernel_sweep.ADALN_VARIANTS))}
  out = tmp_path / "sweep.jsonl"
  lines = kernel_sweep.main(["--tiny", "--repeats", "1", "--warmup", "0", "--out", str(out)])
  assert [json.loads(l) for l in out.read_text().splitlines()] == lines
  assert len(capsys.readouterr().out.splitlines()) == len(lines)
  for kernel, variants in (("short_attention", kernel_sweep.ATTENTION_VARIANTS),
                           ("residual_adaln", kernel_sweep.ADALN_VARIANTS)):
    mine = [l for l in lines if l["kernel"] == kernel]
    assert len(mine) == len(variants)
    assert mine[0]["default"] and not any(l["default"] for l in mine[1:])
    assert len({json.dumps(l["variant"], sort_keys=True) for l in mine}) == len(variants)
    for line in mine:
      assert line["median_s"] > 0 and line["tiny"] and line["platform"] == "cpu"
      # Other tiles and row steps round otherwise at most at float32's level here.
      assert line["max_rel_diff_vs_default"] < 1e-5, line
  after = {m: {n: getattr(m, n) for n in names} for m, names in before.items()}
  assert after == before
  for case, shape in ((kernel_sweep._attention_case, kernel_sweep.TINY_SHAPES["short_attention"]),
                      (kernel_sweep._adaln_case, kernel_sweep.TINY_SHAPES["residual_adaln"])):
    step, args = case(shape)
    assert str(jax.make_jaxpr(step)(*args)).count("pallas_call") == 2  # forward and backward


def test_a_variant_that_computes_otherwise_shows_in_its_line():
  reference = (jax.numpy.ones((2, 3)),)
  assert kernel_sweep._relative_difference((reference[0] * 1.5,), reference) == pytest.approx(0.5)


def test_the_sweep_refuses_what_it_cannot_do():
  with pytest.raises(SystemExit):  # the interpreter's times are of no use
    kernel_sweep.main(["--kernel", "short_attention"])
  with pytest.raises(AttributeError, match="has no _NO_SUCH_CONSTANT"):
    with kernel_sweep.module_constants(adaln, {"_NO_SUCH_CONSTANT": 1}):
      pass
  with pytest.raises(SystemExit):
    kernel_sweep.main(["--tiny", "--repeats", "0"])
