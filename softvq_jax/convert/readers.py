"""Turns a checkpoint file into a flat ``{name: np.ndarray}`` PyTorch state dict."""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from softvq_jax.convert.torch_pickle import TorchCheckpointError, load_torch_zip

_PREFIXES = ("module.", "_orig_mod.")


class CheckpointFormatError(ValueError):
  pass


def read_checkpoint(path: str, *, weights: str = "auto") -> dict[str, np.ndarray]:
  """Reads ``.safetensors`` or a PyTorch zip (``.pt``, ``.pth``, ``.bin``, ``.ckpt``).

  ``weights`` picks the entry of a training checkpoint that holds several state
  dicts: ``"auto"`` prefers ``ema`` (as the reference's loader does), then
  ``model``/``state_dict``; ``"ema"`` or ``"model"`` force one.
  """
  if os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint {path} is a folder; name the checkpoint file in it "
                            "(model.safetensors, *.pt, ...)")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  if path.endswith(".safetensors"):
    from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      state = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
      raise CheckpointFormatError(f"cannot read {path} as safetensors: {e}") from e
    state = _select_state_dict(state, weights, path)  # one flat state dict: checks weights
  else:
    try:
      obj = load_torch_zip(path)
    except TorchCheckpointError as e:
      raise CheckpointFormatError(str(e)) from e
    state = _select_state_dict(obj, weights, path)
  return strip_prefixes(state)


def _select_state_dict(obj: Any, weights: str, path: str) -> Mapping[str, np.ndarray]:
  if not isinstance(obj, Mapping):
    raise CheckpointFormatError(f"{path} holds a {type(obj).__name__}, not a state dict")
  order = {"auto": ("ema", "model", "state_dict"), "ema": ("ema",), "model": ("model",)}
  if weights not in order:
    raise ValueError(f"weights must be one of {sorted(order)}, got {weights!r}")
  if all(isinstance(v, np.ndarray) for v in obj.values()):
    if weights != "auto":
      raise CheckpointFormatError(
          f"{path} holds one set of weights (a plain state dict, no 'ema' or 'model' entry), so "
          f"weights={weights!r} has nothing to choose; leave it at 'auto' (--weights auto)")
    return obj
  for key in order[weights]:
    if isinstance(obj.get(key), Mapping):
      return obj[key]
  raise CheckpointFormatError(
      f"{path} is a dict with keys {sorted(map(str, obj))[:10]} but none of {order[weights]} "
      "holds a state dict")


def strip_prefixes(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Removes the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
  out = {}
  for name, value in state.items():
    if not isinstance(value, np.ndarray):
      raise CheckpointFormatError(f"entry {name!r} is a {type(value).__name__}, not a tensor")
    stripped = name
    while stripped.startswith(_PREFIXES):
      for prefix in _PREFIXES:
        if stripped.startswith(prefix):
          stripped = stripped[len(prefix):]
    if stripped in out:
      raise CheckpointFormatError(f"{name!r} and another entry both map to {stripped!r}")
    out[stripped] = value
  return out
