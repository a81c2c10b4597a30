"""Reading a compiled XLA program's text (`compiled.as_text()`): its computations and how often
each runs, its collectives, and a per-instruction cost estimate.

Loops: XLA's cost analysis and the program text hold a `while` body once; a body whose loop has
a known trip count (`backend_config={"known_trip_count":{"n":...}}`, as a `scan` over layers
gets) is counted that many times here. Device ids in replica groups are positions in the
program's device assignment (for a jit on a mesh: `mesh.devices.flat`).
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

DTYPE_BYTES = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Bytes a chip sends per byte of the collective's payload in a group of n (ring algorithms).
TRAFFIC = {
    "all-reduce": lambda n: 2 * (n - 1) / n,
    "all-gather": lambda n: (n - 1) / n,
    "reduce-scatter": lambda n: (n - 1) / n,
    "all-to-all": lambda n: (n - 1) / n,
    "collective-permute": lambda n: 1.0,
}
# Instructions that move no data of their own.
FREE = {
    "parameter",
    "constant",
    "tuple",
    "get-tuple-element",
    "bitcast",
    "after-all",
    "partition-id",
    "replica-id",
    "iota",
    "while",
    "conditional",
    "call",
    "opt-barrier",
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"([a-z][\w\-]*)\(")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def element_bytes(dtype: str) -> float:
  if dtype.startswith("f8"):
    return 1
  return DTYPE_BYTES.get(dtype, 0)


def arrays(text: str) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, dims) of every array shape written in `text`."""
  out = []
  for dtype, dims in _ARRAY.findall(text):
    if dtype in DTYPE_BYTES or dtype.startswith("f8"):
      out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
  return out


def shape_bytes(text: str) -> float:
  """Bytes of every array shape in `text` (a shape, a tuple of shapes, an operand list)."""
  return float(sum(math.prod(dims) * element_bytes(dtype) for dtype, dims in arrays(text)))


def _closing(text: str, start: int) -> int:
  """Index of the bracket closing the one at `start`."""
  pairs = {"(": ")", "{": "}", "[": "]"}
  stack = []
  for i in range(start, len(text)):
    c = text[i]
    if c in pairs:
      stack.append(pairs[c])
    elif stack and c == stack[-1]:
      stack.pop()
      if not stack:
        return i
  return len(text) - 1


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str
  opcode: str
  operands: str
  attrs: str

  def attr(self, key: str) -> str | None:
    """The value of `key=...` (a bracketed value whole)."""
    at = self.attrs.find(key + "=")
    if at < 0:
      return None
    start = at + len(key) + 1
    if start < len(self.attrs) and self.attrs[start] in "{[(":
      return self.attrs[start : _closing(self.attrs, start) + 1]
    return re.match(r"[^,\s]*", self.attrs[start:]).group(0)


def parse_instruction(line: str) -> Instruction | None:
  match = _INSTRUCTION.match(line)
  if not match:
    return None
  name, rest = match.groups()
  rest = rest.strip()
  if rest.startswith("("):
    end = _closing(rest, 0) + 1
  else:
    end = rest.find(" ") if " " in rest else len(rest)
  shape, tail = rest[:end], rest[end:].strip()
  op = _OPCODE.match(tail)
  if not op:
    return None
  open_at = op.end() - 1
  close_at = _closing(tail, open_at)
  return Instruction(
      name=name,
      shape=shape,
      opcode=op.group(1),
      operands=tail[open_at + 1 : close_at],
      attrs=tail[close_at + 1 :],
  )


@dataclasses.dataclass
class Program:
  computations: dict[str, list[Instruction]]
  entry: str

  def __post_init__(self):
    self.shapes = {
        comp: {i.name: i.shape for i in insts} for comp, insts in self.computations.items()
    }

  def operand_shapes(self, comp: str, inst: Instruction) -> str:
    """The operands' shapes: written inline, or looked up by name in `comp`."""
    if arrays(inst.operands):
      return inst.operands
    table = self.shapes.get(comp, {})
    return " ".join(table.get(n, "") for n in re.findall(r"%?([\w.\-]+)", inst.operands))

  def multipliers(self) -> dict[str, float]:
    """How many times each computation runs per execution of the entry (while bodies with a
    known trip count that many times, called and fused computations as often as their
    caller); computations reached only as reducers (`to_apply`) are left out."""
    runs = {self.entry: 1.0}
    order = [self.entry]
    for name in order:  # breadth first: a callee is reached after every caller above it
      for inst in self.computations.get(name, ()):
        for callee, factor in callees(inst, self):
          if callee in self.computations:
            if callee not in runs:
              order.append(callee)
            runs[callee] = runs.get(callee, 0.0) + runs[name] * factor
    return runs

  def trip_count(self, loop: Instruction) -> float:
    """Iterations of a while loop: its known trip count, else the one integer constant its
    condition compares the counter with (a scan's `i < n`), else 1."""
    known = _TRIP_COUNT.search(loop.attrs)
    if known:
      return float(known.group(1))
    condition = (loop.attr("condition") or "").lstrip("%")
    bounds = [
        int(i.operands)
        for i in self.computations.get(condition, ())
        if i.opcode == "constant" and i.shape.startswith("s32[]") and i.operands.isdigit()
    ]
    return float(bounds[0]) if len(bounds) == 1 else 1.0


def callees(inst: Instruction, program: Program | None = None) -> list[tuple[str, float]]:
  """(computation, runs per run of `inst`) of what `inst` calls."""
  out = []
  if inst.opcode == "while":
    body = inst.attr("body")
    if body:
      out.append((body.lstrip("%"), program.trip_count(inst) if program else 1.0))
    return out
  for key in ("calls", "branch_computations"):
    value = inst.attr(key)
    if value:
      out += [(c.strip().lstrip("%"), 1.0) for c in value.strip("{}").split(",") if c.strip()]
  if inst.opcode == "call":
    value = inst.attr("to_apply")
    if value:
      out.append((value.lstrip("%"), 1.0))
  return out


def parse(text: str) -> Program:
  """The computations of an HLO module's text and the name of its entry."""
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    if current is None:
      header = _HEADER.match(line)
      if header and "=" not in line.split("(")[0]:
        current = header.group(2)
        computations[current] = []
        if header.group(1):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    inst = parse_instruction(line)
    if inst is not None:
      computations[current].append(inst)
  if entry is None:
    raise ValueError("no ENTRY computation in the program text")
  return Program(computations, entry)


def replica_groups(inst: Instruction, num_devices: int) -> list[list[int]]:
  """The device groups of a collective (pairs for collective-permute)."""
  pairs = inst.attr("source_target_pairs")
  if pairs:
    return [[int(x) for x in p.split(",")] for p in re.findall(r"\{(\d+,\d+)\}", pairs)]
  mesh_form = re.search(r"replica_groups=(mesh\[[^\]]*\]\s*\{[^}]*\})", inst.attrs)
  value = mesh_form.group(1) if mesh_form else inst.attr("replica_groups")
  if not value or value in ("{}", "{{}}"):
    return [list(range(num_devices))]
  if value.startswith("mesh["):  # mesh['axis_0'=4,'axis_1'=2] {'axis_1'}: vary along axis_1
    axes = re.findall(r"'(\w+)'=(\d+)", value.split("]")[0])
    chosen = re.findall(r"'(\w+)'", value.split("]", 1)[1])
    names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
    ids = np.arange(math.prod(sizes)).reshape(sizes)
    order = [i for i, a in enumerate(names) if a not in chosen] + [names.index(a) for a in chosen]
    group = math.prod(sizes[names.index(a)] for a in chosen)
    return ids.transpose(order).reshape(-1, group).tolist()
  iota = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", value)
  if iota:
    shape = [int(x) for x in iota.group(1).split(",")]
    dims = [int(x) for x in iota.group(2).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if iota.group(3):
      ids = ids.transpose([int(x) for x in iota.group(3).split(",")])
    return ids.reshape(shape[0], -1).tolist()
  return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", value)]


@dataclasses.dataclass
class Collective:
  kind: str
  payload_bytes: float  # per chip: the reduced / gathered / scattered / sent array
  group_size: int
  groups: list[list[int]]
  runs: float  # per step
  name: str

  @property
  def traffic_bytes(self) -> float:
    """Bytes each chip sends per step (ring algorithm over its group)."""
    n = max(self.group_size, 2 if self.kind == "collective-permute" else 1)
    return TRAFFIC[self.kind](n) * self.payload_bytes * self.runs if n > 1 else 0.0


def collectives(program: Program, num_devices: int) -> list[Collective]:
  """Every collective of the program (async pairs counted once, at their start)."""
  runs = program.multipliers()
  out = []
  for comp, instructions in program.computations.items():
    if comp not in runs:
      continue
    for inst in instructions:
      kind = inst.opcode.removesuffix("-start")
      if kind not in COLLECTIVES or inst.opcode.endswith("-done"):
        continue
      groups = replica_groups(inst, num_devices)
      n = len(groups[0]) if groups else 1
      payload = collective_payload(inst, kind, n)
      out.append(Collective(kind, payload, n, groups, runs[comp], inst.name))
  return out


def collective_payload(inst: Instruction, kind: str, n: int) -> float:
  """Bytes per chip of what a collective reduces, gathers, scatters or sends: its operands
  where the text shows their shapes, else from its result (an async start's result holds its
  operand first)."""
  operands = shape_bytes(inst.operands)
  if not operands:
    result = arrays(inst.shape)
    if inst.opcode.endswith("-start") and kind != "all-reduce" and result:
      result = result[:1]  # (operand, result, context...)
    operands = float(sum(math.prod(d) * element_bytes(t) for t, d in result))
    if kind == "reduce-scatter":
      operands *= n  # the result is the scattered 1/n
    elif kind == "all-gather" and not inst.opcode.endswith("-start"):
      return operands
  return operands * n if kind == "all-gather" else operands


_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')


def dcn_transfers(program: Program, num_slices: int) -> list[Collective]:
  """The cross-slice (DCN) halves of collectives in a multi-slice program: host-transfer
  `send`s to the Megascale runtime, one per slice-level exchange, with the collective's kind."""
  runs = program.multipliers()
  out = []
  for comp, instructions in program.computations.items():
    for inst in instructions:
      kind = _MEGASCALE.search(inst.attrs) if inst.opcode == "send" else None
      if kind is None or comp not in runs:
        continue
      name = kind.group(1).lower().replace("_", "-")
      payload = arrays(inst.shape)[:1]
      size = float(sum(math.prod(d) * element_bytes(t) for t, d in payload))
      out.append(
          Collective(
              name if name in TRAFFIC else "collective-permute",
              size,
              num_slices,
              [],
              runs[comp],
              inst.name,
          )
      )
  return out


def dot_flops(inst: Instruction, operand_shapes: str) -> float:
  """FLOPs of a dot or convolution (2 per multiply-add)."""
  if inst.opcode not in ("dot", "convolution"):
    return 0.0
  out = arrays(inst.shape)
  if not out:
    return 0.0
  out_elems = math.prod(out[0][1])
  operands = arrays(operand_shapes)
  if inst.opcode == "dot" and operands:
    lhs = operands[0][1]
    dims = inst.attr("lhs_contracting_dims") or "{}"
    contracted = math.prod(lhs[int(d)] for d in dims.strip("{}").split(",") if d)
    return 2.0 * out_elems * contracted
  if inst.opcode == "convolution" and len(operands) > 1:
    rhs = operands[1][1]
    labels = inst.attr("dim_labels") or ""
    kernel = labels.split("_")[1].split("->")[0] if "_" in labels else ""
    out_feature = rhs[kernel.index("o")] if "o" in kernel else 1
    return 2.0 * out_elems * math.prod(rhs) / max(out_feature, 1)
  return 0.0


@dataclasses.dataclass
class OpCost:
  name: str
  opcode: str
  what: str  # the jax operation it came from (metadata op_name), shortened
  flops: float
  bytes: float
  runs: float


def op_costs(program: Program) -> list[OpCost]:
  """FLOPs and HBM bytes (operands + result) of each top-level instruction, per step."""
  runs = program.multipliers()
  fused = {
      c
      for insts in program.computations.values()
      for i in insts
      if i.opcode == "fusion"
      for c, _ in callees(i)
  }
  out = []
  for comp, instructions in program.computations.items():
    if comp not in runs or comp in fused:
      continue
    for inst in instructions:
      if inst.opcode in FREE or inst.opcode.endswith("-done"):
        continue
      flops = dot_flops(inst, program.operand_shapes(comp, inst))
      if inst.opcode == "fusion":
        for callee, _ in callees(inst):
          flops += sum(
              dot_flops(i, program.operand_shapes(callee, i))
              for i in program.computations.get(callee, ())
          )
      meta = re.search(r'op_name="([^"]*)"', inst.attrs)
      what = meta.group(1).split("/")[-1] if meta else ""
      moved = shape_bytes(inst.shape) + shape_bytes(program.operand_shapes(comp, inst))
      out.append(OpCost(inst.name, inst.opcode, what, flops, moved, runs[comp]))
  return out
