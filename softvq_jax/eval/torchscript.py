"""Reads the tensors and plain attributes of a TorchScript (``torch.jit.save``) file without torch.

A TorchScript file is a zip holding ``<root>/code/`` (TorchScript source, which we never
run), ``<root>/constants.pkl``, ``<root>/data.pkl`` (the module tree: one object per
``nn.Module`` with its parameters, buffers and attributes) and ``<root>/data/<n>`` (raw
storages). ``data.pkl`` is an ordinary pickle, so the allow-list unpickler of
:mod:`softvq_jax.convert.torch_pickle` reads it; the only extra globals TorchScript uses
are ``torch.jit._pickle.build_*list`` (typed lists, e.g. a ``padding`` of ``[0, 3]``),
which become plain lists here. Every other global still becomes an inert placeholder.
"""

from __future__ import annotations

import zipfile
from typing import Any

import numpy as np

from softvq_jax.convert import torch_pickle
from softvq_jax.convert.torch_pickle import Opaque, TorchCheckpointError

_LIST_BUILDERS = ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist",
                  "build_genericlist")


def _build_list(items):
  return list(items)


class _TorchScriptUnpickler(torch_pickle._RestrictedUnpickler):  # pylint: disable=protected-access

  def find_class(self, module: str, name: str):
    if module == "torch.jit._pickle" and name in _LIST_BUILDERS:
      return _build_list
    return super().find_class(module, name)


def load_torchscript(path: str) -> Any:
  """The object graph of ``data.pkl``: modules are :class:`Opaque` with a ``state`` dict."""
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise TorchCheckpointError(f"{path} is not a TorchScript zip file") from e
  with archive:
    names = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    roots = [n[: -len("/data.pkl")] for n in names]
    roots = [r for r in roots if f"{r}/code/" in {n[: len(r) + 6] for n in archive.namelist()}]
    if len(roots) != 1:
      raise TorchCheckpointError(f"{path}: expected one TorchScript root with code/ and data.pkl, "
                                 f"found {roots}")
    root = roots[0]
    with archive.open(f"{root}/data.pkl") as f:
      return _TorchScriptUnpickler(f, archive, root).load()


def module_tree(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Flattens a TorchScript module into ``{dotted.name: array}`` and ``{dotted.name: attribute}``.

  The second dict holds the plain Python attributes each module stored (ints, floats,
  bools, lists such as ``stride`` or ``padding``), minus ``training`` and hook flags.
  """
  tensors: dict[str, np.ndarray] = {}
  attributes: dict[str, Any] = {}

  def walk(obj: Any, prefix: str) -> None:
    state = getattr(obj, "state", None)
    if not isinstance(state, dict):
      raise TorchCheckpointError(f"module {prefix or '<root>'} has no attribute dict")
    for key, value in state.items():
      name = f"{prefix}{key}"
      if isinstance(value, Opaque):
        walk(value, name + ".")
      elif isinstance(value, np.ndarray):
        tensors[name] = value
      elif key not in ("training", "_is_full_backward_hook"):
        attributes[name] = value

  walk(load_torchscript(path), "")
  return tensors, attributes
