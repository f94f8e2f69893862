"""PyTorch state dict -> NNX parameters through one regex table.

Each rule maps a PyTorch name to an NNX path (``encoder.model.blocks.0.attn.qkv.kernel``)
and names a layout transform. Every source tensor is used at most once, every
model parameter must be filled exactly once, and all problems are reported
together in one ``ConversionError``.
"""

from __future__ import annotations

import enum
import re
from typing import Iterable, Mapping, Sequence

import numpy as np


class ConversionError(ValueError):
  """Lists every missing, unmapped, extra or mis-shaped tensor of a checkpoint."""


class Transform(enum.Enum):
  IDENTITY = "identity"
  LINEAR = "linear"          # nn.Linear weight [out, in] -> kernel [in, out]
  CONV_OIHW = "conv_oihw"    # nn.Conv2d weight OIHW -> HWIO

  def apply(self, x: np.ndarray) -> np.ndarray:
    if self is Transform.LINEAR:
      if x.ndim != 2:
        raise ValueError(f"a Linear weight must be 2-D, got shape {x.shape}")
      return np.ascontiguousarray(x.T)
    if self is Transform.CONV_OIHW:
      if x.ndim != 4:
        raise ValueError(f"a Conv2d weight must be 4-D, got shape {x.shape}")
      return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
    return np.ascontiguousarray(x)


Rule = tuple[str, str, Transform]
Path = tuple  # of str | int


def parse_path(dotted: str) -> Path:
  return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def format_path(path: Sequence) -> str:
  return ".".join(str(p) for p in path)


def map_state_dict(
    state: Mapping[str, np.ndarray],
    target_shapes: Mapping[Path, tuple[int, ...]],
    rules: Iterable[Rule],
    ignored: Iterable[str] = (),
    *,
    unused_if_absent: Iterable[str] = (),
    dtype=np.float32,
) -> tuple[dict[Path, np.ndarray], list[str]]:
  """Maps ``state`` onto ``target_shapes``; returns (params by path, ignored names)."""
  compiled = [(re.compile(p), r, t) for p, r, t in rules]
  ignored_res = [re.compile(p) for p in ignored]
  unused_res = [re.compile(p) for p in unused_if_absent]
  problems: list[str] = []
  out: dict[Path, np.ndarray] = {}
  source_of: dict[Path, str] = {}
  skipped: list[str] = []
  claimed: set[Path] = set()  # paths some tensor mapped to, even if it could not be used
  for name in sorted(state):
    value = state[name]
    if any(r.fullmatch(name) for r in ignored_res):
      skipped.append(name)
      continue
    for pattern, replacement, transform in compiled:
      match = pattern.fullmatch(name)
      if match:
        break
    else:
      problems.append(f"unexpected tensor {name} {tuple(value.shape)}: no rule maps it")
      continue
    path = parse_path(match.expand(replacement))
    claimed.add(path)
    if path not in target_shapes and any(r.fullmatch(name) for r in unused_res):
      skipped.append(name)
      continue
    if path not in target_shapes:
      problems.append(f"unexpected tensor {name} {tuple(value.shape)}: the model has no "
                      f"parameter {format_path(path)}")
      continue
    if path in out:
      problems.append(f"{name} and {source_of[path]} both map to {format_path(path)}")
      continue
    try:
      converted = transform.apply(np.asarray(value))
    except ValueError as e:
      problems.append(f"{name}: {e}")
      continue
    expected = tuple(target_shapes[path])
    if converted.shape != expected:
      problems.append(f"mis-shaped tensor {name}: {tuple(value.shape)} in the checkpoint gives "
                      f"{converted.shape} after {transform.value}, the model's "
                      f"{format_path(path)} needs {expected}")
      continue
    if not np.issubdtype(converted.dtype, np.floating) and converted.dtype.kind != "V":
      problems.append(f"{name} has dtype {converted.dtype}; a float tensor is expected")
      continue
    converted = converted.astype(dtype)
    bad = int(np.size(converted) - np.count_nonzero(np.isfinite(converted)))
    if bad:
      # No trained weight is NaN or infinite: the file is damaged (or was saved mid-divergence),
      # and every output of the model would be NaN.
      problems.append(f"{name} holds {bad} non-finite value(s) (NaN or inf) of {converted.size}")
      continue
    out[path] = converted
    source_of[path] = name
  for path in sorted(set(target_shapes) - claimed, key=format_path):
    problems.append(f"missing tensor for {format_path(path)} {tuple(target_shapes[path])}")
  if problems:
    header = f"checkpoint does not match the model ({len(problems)} problem(s)):"
    raise ConversionError("\n  ".join([header] + problems))
  return out, skipped
