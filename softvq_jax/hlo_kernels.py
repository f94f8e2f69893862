"""The kernels of an optimised XLA GPU program, read from its HLO text, and a roofline estimate.

``python -m softvq_jax.bench --what kernels`` compiles a benchmark program for a GPU that is
not attached (see ``bench.py``) and reads the result with :func:`kernels`: one entry per
kernel the program launches (cuBLAS GEMMs with their epilogues, XLA fusions, copies),
with the bytes it reads and writes and, for GEMMs, its FLOPs. Loops count once per known
trip. :func:`estimate` turns the table into a time under stated assumptions: a GEMM takes
``max(FLOPs / gemm rate, bytes / bandwidth)`` (so does a cuDNN convolution), everything
else ``bytes / bandwidth``.

It is an estimate of what XLA emitted, not a measurement: it shows which kernels a change
adds or removes and how much traffic they move, so GPU work can be done and reviewed on a
machine without a GPU. Byte counts are those of operands and results; an operand that a
fusion only slices counts as the slices it reads, and a dynamic-update-slice (done in place,
as a scanned layer stack stores each layer's residuals) as the update it writes.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any, Iterable

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
          "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
# Not kernels: plumbing XLA resolves to buffer aliasing or constants.
_FREE = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "after-all",
         "partition-id", "replica-id", "opt-barrier", "add-dependency"}
# Ops that hand control to other computations rather than run a kernel of their own.
_CONTROL = {"while", "conditional", "call", "async-start", "async-done", "async-update"}
_SLICES = {"slice", "dynamic-slice"}
# Left out when listing what a fusion computes.
_PLUMBING = _FREE | {"broadcast"}


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  attributes: str
  parameter_number: int | None = None  # N of parameter(N)
  is_root: bool = False


@dataclasses.dataclass
class Kernel:
  """One launched kernel. ``kind``: ``gemm``, ``conv``, ``attention``, a fusion kind (``kLoop``,
  ``kInput``, ``kCustom``...) or the opcode of an unfused op (``copy``, ``transpose``...)."""
  name: str
  kind: str
  emitter: str          # custom-call target or fusion backend ("__triton", ...), else ""
  shape: str            # result shape, layouts dropped
  bytes_read: int
  bytes_written: int
  flops: float = 0.0    # GEMMs and convolutions: 2 x result elements x contracted size
  epilogue: str = ""    # cuBLASLt epilogue of a GEMM (DEFAULT, BIAS, GELU, BIAS_GELU, ...)
  accumulates: bool = False  # GEMM adds into an operand (cuBLASLt beta != 0)
  count: float = 1.0    # launches per program run (trip count of the enclosing loops)
  ops: str = ""         # fusions: the main HLO ops inside

  @property
  def bytes_moved(self) -> int:
    return self.bytes_read + self.bytes_written


def array_bytes(shape: str) -> int:
  """Bytes of every array in an HLO shape string (tuples summed, layouts ignored)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype in _BYTES:
      total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _dims(shape: str) -> list[int]:
  m = _ARRAY.search(shape)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def _split_balanced(text: str, start: int) -> int:
  """Index just past the parenthesis group opening at ``text[start]``."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] == "(":
      depth += 1
    elif text[i] == ")":
      depth -= 1
      if depth == 0:
        return i + 1
  raise ValueError(f"unbalanced parentheses in HLO line: {text[:200]}")


def _parse_instruction(line: str) -> Instruction | None:
  m = re.match(r"\s*(ROOT\s+)?%?([\w.\-]+)\s+=\s+", line)
  if not m:
    return None
  pos = m.end()
  if line[pos] == "(":
    end = _split_balanced(line, pos)
  else:
    end = line.index(" ", pos)
  shape = line[pos:end]
  rest = line[end:].lstrip()
  op = re.match(r"([a-z][\w\-]*)\(", rest)
  if not op:
    return None
  close = _split_balanced(rest, op.end() - 1)
  arguments = rest[op.end():close - 1]
  number = int(arguments) if op.group(1) == "parameter" and arguments.isdigit() else None
  return Instruction(m.group(2), shape, op.group(1), re.findall(r"%([\w.\-]+)", arguments),
                     rest[close:], number, is_root=bool(m.group(1)))


def parse_module(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
  """``({computation: [instructions]}, entry computation name)`` of an HLO module's text."""
  computations: dict[str, list[Instruction]] = {}
  entry, current = "", None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = computations.setdefault(header.group(2), [])
      if header.group(1):
        entry = header.group(2)
      continue
    if line.startswith("}"):
      current = None
      continue
    if current is not None:
      inst = _parse_instruction(line)
      if inst:
        current.append(inst)
  if not entry:
    raise ValueError("no ENTRY computation in the HLO text")
  return computations, entry


def _attr(attributes: str, key: str) -> str | None:
  m = re.search(rf"\b{key}=%?([\w.\-]+)", attributes)
  return m.group(1) if m else None


def _gemm_flops(result_shape: str, lhs_shape: str, contracting: Iterable[int]) -> float:
  lhs = _dims(lhs_shape)
  k = math.prod(lhs[i] for i in contracting) if lhs else 0
  return 2.0 * math.prod(_dims(result_shape)) * k


def _conv_flops(inst: Instruction, module: "_Module", target: str) -> float:
  """2 x output elements x (filter window x input features per group), from ``dim_labels``.

  cuDNN's backward-filter call keeps the forward convolution's labels but takes
  (input, output gradient) and returns the filter: there the output is operand 1 and
  the filter the result.
  """
  labels = re.search(r"dim_labels=\w+_(\w+)->", inst.attributes)
  result = _ARRAY.search(inst.shape)
  if not labels or not result or len(inst.operands) < 2:
    return 0.0
  output, kernel = result.group(0), module.shapes.get(inst.operands[1], "")
  if "backwardfilter" in target.lower():
    output, kernel = kernel, output
  per_output = math.prod(size for label, size in zip(labels.group(1), _dims(kernel))
                         if label != "o")
  return 2.0 * math.prod(_dims(output)) * per_output


def _contracting(text: str, json_key: str, hlo_key: str) -> list[int]:
  m = re.search(rf'"{json_key}":\[([^\]]*)\]', text)
  if m:
    return [int(x) for x in re.findall(r"\d+", m.group(1))]
  m = re.search(rf"{hlo_key}=\{{([\d,]*)\}}", text)
  return [int(x) for x in m.group(1).split(",") if x] if m else []


class _Module:
  def __init__(self, hlo_text: str):
    self.computations, self.entry = parse_module(hlo_text)
    self.shapes = {i.name: i.shape for body in self.computations.values() for i in body}

  def operand_bytes(self, inst: Instruction) -> int:
    return sum(array_bytes(self.shapes.get(o, "")) for o in inst.operands)

  def fusion_read_bytes(self, inst: Instruction, called: str) -> int:
    """Operand bytes of a fusion. A parameter only sliced inside counts as its slices; one
    that is only the buffer a dynamic-update-slice writes into is updated in place, unread."""
    body = self.computations.get(called, [])
    users = _users(body)
    total = 0
    for i in body:
      number = i.parameter_number  # which operand of the fusion it stands for
      if number is None or number >= len(inst.operands):
        continue
      full = array_bytes(self.shapes.get(inst.operands[number], ""))
      uses = _uses_through_bitcasts(i.name, users)
      if uses and all(u.opcode == "dynamic-update-slice" and through == u.operands[0]
                      for u, through in uses):
        continue
      if uses and all(u.opcode in _SLICES and through == u.operands[0] for u, through in uses):
        total += min(full, sum(array_bytes(u.shape) for u, _ in uses))
      else:
        total += full
    return total

  def fusion_written_bytes(self, inst: Instruction, called: str) -> int:
    """Result bytes of a fusion; a result that is a dynamic-update-slice (done in place)
    writes only its update."""
    instructions = self.computations.get(called, [])
    body = {i.name: i for i in instructions}
    root = _root(instructions)
    if root is None:
      return array_bytes(inst.shape)
    outputs = [body.get(o) for o in root.operands] if root.opcode == "tuple" else [root]
    total = 0
    for out in outputs:
      while out is not None and out.opcode == "bitcast":
        out = body.get(out.operands[0])
      if out is None:
        continue
      if out.opcode == "dynamic-update-slice" and len(out.operands) > 1:
        total += array_bytes(self.shapes.get(out.operands[1], ""))
      else:
        total += array_bytes(out.shape)
    return total

  def inner_dot_flops(self, called: str) -> float:
    flops = 0.0
    for i in self.computations.get(called, []):
      if i.opcode == "dot" and i.operands:
        flops += _gemm_flops(i.shape, self.shapes.get(i.operands[0], ""),
                             _contracting(i.attributes, "lhs_contracting_dimensions",
                                          "lhs_contracting_dims"))
    return flops

  def ops_inside(self, called: str, most: int = 4) -> str:
    return fused_ops(self.computations.get(called, []), most)


def _users(body: list[Instruction]) -> dict[str, list[Instruction]]:
  users = collections.defaultdict(list)
  for i in body:
    for o in i.operands:
      users[o].append(i)
  return users


def _uses_through_bitcasts(name: str, users: dict[str, list[Instruction]]
                           ) -> list[tuple[Instruction, str]]:
  """``(user, the operand name it uses)`` of ``name``, looking through bitcasts."""
  out = []
  for u in users.get(name, []):
    if u.opcode == "bitcast":
      out += _uses_through_bitcasts(u.name, users)
    else:
      out.append((u, name))
  return out


def _root(body: list[Instruction]) -> Instruction | None:
  roots = [i for i in body if i.is_root]
  return roots[-1] if roots else (body[-1] if body else None)


def fused_ops(body: list[Instruction], most: int) -> str:
  """The ``most`` commonest ops of a fused computation, ``"multiply x6, tanh x1"``."""
  counted = collections.Counter(i.opcode for i in body if i.opcode not in _PLUMBING)
  return ", ".join(f"{op} x{n}" for op, n in counted.most_common(most))


def fusion_kind_and_computation(inst: Instruction) -> tuple[str | None, str | None]:
  """``(kind, called computation)`` of a fusion instruction (``"kLoop"``, ``"fused_exp"``)."""
  return _attr(inst.attributes, "kind"), _attr(inst.attributes, "calls")


def kernels(hlo_text: str) -> list[Kernel]:
  """The kernels an optimised GPU HLO module launches, in program order (loops unrolled
  into counts: a while body with a known trip count contributes ``count = trips``)."""
  module = _Module(hlo_text)
  out: list[Kernel] = []
  _walk(module, module.entry, 1.0, out, set())
  return out


def _walk(module: _Module, computation: str, count: float, out: list[Kernel],
          stack: set[str]) -> None:
  if computation in stack:
    return
  stack = stack | {computation}
  for inst in module.computations.get(computation, []):
    op, attrs = inst.opcode, inst.attributes
    if op in _FREE:
      continue
    if op == "while":
      trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs)
      body = _attr(attrs, "body")
      if body:
        _walk(module, body, count * (int(trips.group(1)) if trips else 1), out, stack)
      continue
    if op in _CONTROL:
      for key in ("to_apply", "calls", "true_computation", "false_computation"):
        called = _attr(attrs, key)
        if called:
          _walk(module, called, count, out, stack)
      branches = re.search(r"branch_computations=\{([^}]*)\}", attrs)
      for called in re.findall(r"%?([\w.\-]+)", branches.group(1)) if branches else []:
        _walk(module, called, count, out, stack)
      continue
    out.append(_kernel(module, inst, count))


def _kernel(module: _Module, inst: Instruction, count: float) -> Kernel:
  attrs = inst.attributes
  shape = re.sub(r"\{[^{}]*\}", "", inst.shape)
  if inst.opcode == "custom-call":
    target = re.search(r'custom_call_target="([^"]+)"', attrs)
    target = target.group(1) if target else ""
    low = target.lower()
    # GEMM results are (output, workspace): the workspace is scratch, not traffic.
    result = _ARRAY.search(inst.shape)
    written = array_bytes(result.group(0)) if result else 0
    shape = result.group(0) if result else shape
    if "gemm" in low or "matmul" in low or "cublas" in low:
      lhs = module.shapes.get(inst.operands[0], "") if inst.operands else ""
      epilogue = re.search(r'"epilogue":"(\w+)"', attrs)
      beta = re.search(r'"beta":([-\d.eE+]+)', attrs)
      return Kernel(inst.name, "gemm", target, shape, module.operand_bytes(inst), written,
                    flops=_gemm_flops(result.group(0) if result else "", lhs,
                                      _contracting(attrs, "lhs_contracting_dimensions",
                                                   "lhs_contracting_dims")),
                    epilogue=epilogue.group(1) if epilogue else "",
                    accumulates=bool(beta and float(beta.group(1)) != 0.0), count=count)
    if "conv" in low:
      return Kernel(inst.name, "conv", target, shape, module.operand_bytes(inst), written,
                    flops=_conv_flops(inst, module, target), count=count)
    kind = "attention" if ("fmha" in low or "cudnn" in low) else "custom-call"
    return Kernel(inst.name, kind, target, shape, module.operand_bytes(inst), written,
                  count=count)
  if inst.opcode == "fusion":
    fusion_kind, called = fusion_kind_and_computation(inst)
    called = called or ""
    backend = re.search(r'"kind":"(\w+)"', attrs)
    emitter = backend.group(1) if backend else ""
    flops = module.inner_dot_flops(called)
    kind = "gemm" if flops else (fusion_kind or "fusion")
    return Kernel(inst.name, kind, emitter, shape, module.fusion_read_bytes(inst, called),
                  module.fusion_written_bytes(inst, called), flops=flops, count=count,
                  ops=module.ops_inside(called))
  if inst.opcode == "dynamic-update-slice" and len(inst.operands) > 1:
    # In place: reads and writes the update (and its indices), never the whole buffer.
    update = array_bytes(module.shapes.get(inst.operands[1], ""))
    return Kernel(inst.name, inst.opcode, "", shape, update, update, count=count)
  return Kernel(inst.name, inst.opcode, "", shape, module.operand_bytes(inst),
                array_bytes(inst.shape), count=count)


def estimate(table: list[Kernel], *, bandwidth: float, gemm_flops_per_s: float,
             top: int = 12) -> dict[str, Any]:
  """Kernel counts and a roofline time for ``table`` (see the module docstring)."""
  if bandwidth <= 0 or gemm_flops_per_s <= 0:
    raise ValueError("bandwidth and gemm_flops_per_s must be positive")
  seconds = collections.Counter()
  launches = collections.Counter()
  epilogues = collections.Counter()
  groups: dict[tuple, list] = {}
  gemm_flops = conv_flops = moved = 0.0
  accumulating = 0.0
  for k in table:
    memory_s = k.bytes_moved / bandwidth
    t = max(k.flops / gemm_flops_per_s, memory_s) if k.flops else memory_s
    seconds[k.kind] += t * k.count
    launches[k.kind] += k.count
    moved += k.bytes_moved * k.count
    if k.kind == "conv":
      conv_flops += k.flops * k.count
    if k.kind == "gemm":
      gemm_flops += k.flops * k.count
      epilogues[k.epilogue or k.emitter] += k.count
      accumulating += k.count if k.accumulates else 0
    key = (k.kind, k.emitter, k.ops or k.epilogue, k.shape[:80])
    g = groups.setdefault(key, [0.0, 0.0, 0.0])
    g[0] += t * k.count
    g[1] += k.count
    g[2] += k.bytes_moved * k.count
  total = sum(seconds.values())
  ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
  return dict(
      kernels=_number(sum(launches.values())),
      launches_by_kind={k: _number(v) for k, v in launches.most_common()},
      gemm_epilogues={k: _number(v) for k, v in epilogues.most_common()},
      gemms_accumulating=_number(accumulating),
      gemm_flops=gemm_flops, conv_flops=conv_flops, bytes_moved=moved,
      estimated_s=total,
      estimated_s_by_kind={k: v for k, v in seconds.most_common()},
      assumed_bandwidth_bytes_per_s=bandwidth, assumed_gemm_flops_per_s=gemm_flops_per_s,
      top=[dict(kind=kind, emitter=emitter, computes=what, shape=shape, launches=_number(n),
                estimated_s=t, bytes_moved=b, share=t / total if total else 0.0)
           for (kind, emitter, what, shape), (t, n, b) in ranked])


def _number(x: float) -> int | float:
  return int(x) if float(x).is_integer() else x

