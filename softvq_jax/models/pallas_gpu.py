"""What the Pallas GPU (Triton) kernels of ``adaln`` and ``short_attention`` share."""

from __future__ import annotations

from jax.experimental import pallas as pl

from softvq_jax.models import layers


def block_extent(n: int) -> int:
  """The extent of a kernel tile axis that covers ``n`` elements: Triton's blocks are powers
  of two, and its dot takes no operand narrower than 16."""
  return max(16, pl.next_power_of_2(n))


def interpret() -> bool:
  """Whether the kernels run in Pallas' interpreter: for CPU programs (the tests), which
  then execute the GPU kernels' bodies, index arithmetic and masks."""
  return layers.compile_target() == "cpu"
