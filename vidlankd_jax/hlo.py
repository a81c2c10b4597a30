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

  def operand_shapes(self, comp: str, inst: Instruction) -> list[str]:
    """Each operand's shape: written inline, or looked up by name in `comp`."""
    table = self.shapes.get(comp, {})
    out = []
    for operand in split_operands(inst.operands):
      if arrays(operand):
        out.append(operand)
      else:
        names = re.findall(r"%?([\w.\-]+)", operand)
        out.append(table.get(names[-1], "") if names else "")
    return out

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


def device_order(spec: str | None, count: int) -> np.ndarray:
  """The devices at a mesh's positions: `[2,2]T(1,0)` (iota reshaped, transposed), a list of
  ids, or none written (0, 1, ...)."""
  if not spec:
    return np.arange(count)
  iota = re.match(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", spec)
  if iota:
    ids = np.arange(count).reshape([int(x) for x in iota.group(1).split(",")])
    if iota.group(2):
      ids = ids.transpose([int(x) for x in iota.group(2).split(",")])
    return ids.reshape(-1)
  return np.array([int(x) for x in re.findall(r"\d+", spec)])


def replica_groups(inst: Instruction, num_devices: int) -> list[list[int]]:
  """The device groups of a collective (pairs for collective-permute)."""
  pairs = inst.attr("source_target_pairs")
  if pairs:
    return [[int(x) for x in p.split(",")] for p in re.findall(r"\{(\d+,\d+)\}", pairs)]
  # mesh['axis_0'=4,'axis_1'=2][, device_ids=(...)] {'axis_1'}: groups vary along axis_1; the
  # devices at the mesh's positions are device_ids (iota form [2,2]T(1,0), or a list) or 0, 1, ...
  mesh_form = re.search(
      r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\((\[[\d,]+\](?:T\([\d,]+\))?|[\d,\s]*)\))?"
      r"\s*\{([^}]*)\}",
      inst.attrs,
  )
  iota_form = re.search(r"replica_groups=(\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)", inst.attrs)
  value = iota_form.group(1) if iota_form else inst.attr("replica_groups")
  if not mesh_form and (not value or value in ("{}", "{{}}")):
    return [list(range(num_devices))]
  if mesh_form:
    axes = re.findall(r"'(\w+)'=(\d+)", mesh_form.group(1))
    chosen = re.findall(r"'(\w+)'", mesh_form.group(3))
    names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
    ids = device_order(mesh_form.group(2), math.prod(sizes)).reshape(sizes)
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


def split_operands(operands: str) -> list[str]:
  """The operand list split at its top-level commas (shapes hold commas of their own)."""
  out, depth, last = [], 0, 0
  for i, c in enumerate(operands):
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    elif c == "," and depth == 0:
      out.append(operands[last:i].strip())
      last = i + 1
  tail = operands[last:].strip()
  return out + [tail] if tail else out


def _window(inst: Instruction, spatial: int) -> dict[str, list]:
  """A convolution's window per spatial dimension: size, stride, lhs/rhs dilation, low pad."""
  fields = dict(re.findall(r"(\w+)=([^\s}]+)", inst.attr("window") or ""))

  def per_dim(key, default):
    value = fields.get(key)
    return [int(x) for x in value.split("x")] if value else [default] * spatial

  pads = fields.get("pad")
  low = [int(p.split("_")[0]) for p in pads.split("x")] if pads else [0] * spatial
  return {
      "size": per_dim("size", 1),
      "stride": per_dim("stride", 1),
      "lhs_dilate": per_dim("lhs_dilate", 1),
      "rhs_dilate": per_dim("rhs_dilate", 1),
      "pad_low": low,
  }


def conv_flops(inst: Instruction, operand_shapes: list[str]) -> float:
  """FLOPs of a convolution: 2 per multiply-add that lands on an input element, i.e. window
  taps on dilation holes and padding left out (XLA on TPU writes batched matmuls as convolutions
  with a dilated input whose window touches one real element in `lhs_dilate`)."""
  out = arrays(inst.shape)
  shapes = [arrays(s) for s in operand_shapes[:2]]
  labels = inst.attr("dim_labels") or ""
  if not out or len(shapes) < 2 or not all(shapes) or "->" not in labels:
    return 0.0
  lhs, rhs, res = shapes[0][0][1], shapes[1][0][1], out[0][1]
  lhs_labels, rest = labels.split("_", 1)
  rhs_labels, out_labels = rest.split("->")
  spatial = sorted(c for c in out_labels if c.isdigit())
  window = _window(inst, len(spatial))
  taps = 1
  for j, label in enumerate(spatial):
    n, size = lhs[lhs_labels.index(label)], window["size"][j]
    o = np.arange(res[out_labels.index(label)])[:, None]
    k = np.arange(size)[None, :]
    pos = o * window["stride"][j] + k * window["rhs_dilate"][j] - window["pad_low"][j]
    dilate = window["lhs_dilate"][j]
    taps *= int(((pos >= 0) & (pos <= (n - 1) * dilate) & (pos % dilate == 0)).sum())
  rows = math.prod(d for d, c in zip(res, out_labels) if not c.isdigit())
  return 2.0 * rows * taps * rhs[rhs_labels.index("i")]


def dot_flops(inst: Instruction, operand_shapes: list[str]) -> float:
  """FLOPs of a dot (2 x output elements x contracted size) or a convolution (`conv_flops`)."""
  if inst.opcode == "convolution":
    return conv_flops(inst, operand_shapes)
  if inst.opcode != "dot":
    return 0.0
  out = arrays(inst.shape)
  lhs = arrays(operand_shapes[0]) if operand_shapes else []
  if not out or not lhs:
    return 0.0
  dims = inst.attr("lhs_contracting_dims") or "{}"
  contracted = math.prod(lhs[0][1][int(d)] for d in dims.strip("{}").split(",") if d)
  return 2.0 * math.prod(out[0][1]) * contracted


@dataclasses.dataclass
class OpCost:
  name: str
  opcode: str
  what: str  # the jax operation it came from (metadata op_name), shortened
  flops: float
  bytes: float
  runs: float


# Instructions that read only part of their first operand (a slice of it, rows of a table).
PARTIAL_READS = {"dynamic-slice", "gather", "slice"}
# Instructions that update their first operand in place: only the update is read and written.
IN_PLACE = {"dynamic-update-slice": 1, "scatter": 2}


def _uses(body: list[Instruction]) -> dict[str, list[tuple[Instruction, int]]]:
  """{name: [(user, operand position)]} within one computation."""
  users: dict[str, list[tuple[Instruction, int]]] = {}
  for i in body:
    for k, operand in enumerate(split_operands(i.operands)):
      names = re.findall(r"%?([\w.\-]+)", operand)
      if names:
        users.setdefault(names[-1], []).append((i, k))
  return users


def _parameter_read(program: Program, comp: str, index: int) -> float:
  """Bytes a fused computation reads of its parameter `index`: a slice's size where it only
  slices it, nothing where it updates it in place, what a nested fusion reads of it, else all."""
  body = program.computations.get(comp, [])
  param = next(
      (i for i in body if i.opcode == "parameter" and i.operands.strip() == str(index)), None
  )
  if param is None:
    return 0.0
  whole = shape_bytes(param.shape)
  read = 0.0
  for user, k in _uses(body).get(param.name, []):
    if user.opcode in PARTIAL_READS and k == 0:
      read += shape_bytes(user.shape)
    elif user.opcode in IN_PLACE and k == 0:
      continue  # the buffer updated in place: its untouched part is neither read nor written
    elif user.opcode == "fusion":
      read += _parameter_read(program, body_name(user), k)
    else:
      read += whole
  return min(read, whole)


def _written(program: Program, comp: str, inst: Instruction) -> float:
  """Bytes an instruction of `comp` writes: its result, or the update of an in-place one."""
  if inst.opcode in IN_PLACE:
    parts = program.operand_shapes(comp, inst)
    return shape_bytes(parts[IN_PLACE[inst.opcode]]) if len(parts) > IN_PLACE[inst.opcode] else 0.0
  if inst.opcode == "fusion":
    body = program.computations.get(body_name(inst), [])
    if body:
      return _written(program, body_name(inst), body[-1])
  if inst.opcode == "tuple":
    by_name = {i.name: i for i in program.computations.get(comp, [])}
    names = [re.findall(r"%?([\w.\-]+)", o) for o in split_operands(inst.operands)]
    return sum(_written(program, comp, by_name[n[-1]]) for n in names if n and n[-1] in by_name)
  return shape_bytes(inst.shape)


def _moved(program: Program, comp: str, inst: Instruction) -> float:
  """HBM bytes an instruction reads and writes: its operands and result, but of an operand it
  only slices the slice, and of a buffer it updates in place the update (a fusion is looked
  into: its parameters as its body, nested fusions included, uses them; its root as written)."""
  operands = program.operand_shapes(comp, inst)
  if inst.opcode in IN_PLACE:
    return _written(program, comp, inst) + sum(shape_bytes(o) for o in operands[1:])
  if inst.opcode in PARTIAL_READS:
    return 2 * shape_bytes(inst.shape) + sum(shape_bytes(o) for o in operands[1:])
  if inst.opcode != "fusion" or body_name(inst) not in program.computations:
    return shape_bytes(inst.shape) + sum(shape_bytes(o) for o in operands)
  body = body_name(inst)
  read = sum(_parameter_read(program, body, k) for k in range(len(operands)))
  return read + _written(program, comp, inst)


def body_name(inst: Instruction) -> str:
  called = callees(inst)
  return called[0][0] if called else ""


def op_costs(program: Program) -> list[OpCost]:
  """FLOPs (`dot_flops` of its dots and convolutions) and HBM bytes (`_moved`) of each
  top-level instruction, and how often it runs per step."""
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
        flops += fused_flops(program, body_name(inst))
      meta = re.search(r'op_name="([^"]*)"', inst.attrs)
      what = meta.group(1).split("/")[-1] if meta else ""
      out.append(
          OpCost(inst.name, inst.opcode, what, flops, _moved(program, comp, inst), runs[comp])
      )
  return out


def fused_flops(program: Program, comp: str) -> float:
  """Matmul FLOPs of a fused computation (nested fusions included)."""
  total = 0.0
  for i in program.computations.get(comp, ()):
    total += dot_flops(i, program.operand_shapes(comp, i))
    if i.opcode == "fusion":
      total += fused_flops(program, body_name(i))
  return total


def matmul_flops(program: Program) -> float:
  """Matmul FLOPs per step of the whole program (loop bodies times their trip counts)."""
  return sum(op.flops * op.runs for op in op_costs(program))
