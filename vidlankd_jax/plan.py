"""`vidlankd plan`: a pod run planned on this machine from the TPU compiler's own numbers.

  vidlankd plan --config=configs/distill.py:size=base --topology=v5e:4x4 [--num_slices=2] \
      [--config.mesh.fsdp=4 ...] [--json=plan.json]

The stage's program is built abstractly through the stage contract (`init(..., abstract=True)`:
no weights, no teacher checkpoint), the mesh from the topology's devices by the run's own
`sharding.make_mesh` (the hybrid ICI/DCN mesh for slices), and the train step
`loop.jit_train_step` makes (the one `loop.fit` runs: same shardings, donation and dtype, the
frozen teacher included) is lowered with abstract arguments and compiled by libtpu for that
topology (deviceless ahead-of-time compilation). Per chip it reports the HBM by kind against the
chip's, FLOPs and bytes (scanned layers corrected, see `layer_corrected_costs`), the analytic
FLOPs term by term and the replication factor, collectives by kind, and an ESTIMATE of the step
time: nothing runs on a TPU here.

Replication factor: the compiled program's matmul FLOPs per chip (its dots and convolutions,
`hlo.matmul_flops`, loop bodies times their trip counts) x chips / the analytic matmul FLOPs of
`vidlankd_jax/flops.py`: both sides count matmuls, so elementwise work (softmax, LayerNorm, the
optimiser update), large against the matmuls at tiny width, does not read as repeated work.

Estimate (a roofline, not a measurement): max(FLOPs / peak, HBM bytes / HBM bandwidth) (or the
compiler's `optimal_seconds` where it is positive and larger) + ICI traffic / ICI bandwidth +
DCN traffic / DCN bandwidth, collectives not overlapped with compute.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import ml_collections

from vidlankd_jax import configlib
from vidlankd_jax import errors
from vidlankd_jax import hlo
from vidlankd_jax import quiet
from vidlankd_jax import sharding
from vidlankd_jax.train import loop
from vidlankd_jax.train import stages


class PlanError(errors.DataError):
  """A run the topology cannot hold (HBM overflow, a mesh off the torus): one line, exit 1."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip figures the estimate uses (bytes and FLOPs per second)."""

  peak_flops: float  # dense bfloat16
  hbm_bytes: float
  hbm_bw: float
  ici_bw: float  # bidirectional, all of the chip's links
  dcn_bw: float | None  # None: no public per-chip figure


CHIPS = {
    # https://cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s. ICI: six
    # links of 4.5e10 B/s each way (https://jax-ml.github.io/scaling-book/tpus/). No per-chip
    # DCN figure is published.
    "v4": Chip(275e12, 32 * 2**30, 1200e9, 6 * 2 * 45e9, None),
    # https://cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GiB HBM at 819 GB/s, ICI
    # 400 GB/s bidirectional per chip, DCN 6.4 Tbps per 256-chip pod.
    "v5e": Chip(197e12, 16 * 2**30, 819e9, 400e9, 6.4e12 / 8 / 256),
    # https://cloud.google.com/tpu/docs/v5p-training: 459 TFLOP/s bf16, 95 GiB HBM at 2765 GB/s,
    # ICI 1200 GB/s bidirectional per chip, DCN 50 Gbps per chip.
    "v5p": Chip(459e12, 95 * 2**30, 2765e9, 1200e9, 50e9 / 8),
    # https://cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM at 1638 GB/s, ICI
    # 800 GB/s bidirectional per chip; no per-chip DCN figure there.
    "v6e": Chip(918e12, 32e9, 1638e9, 800e9, None),
}
HBM_KINDS = ("params_and_opt", "batch", "temp", "output", "code")


def chip_of(topology: str) -> Chip:
  kind = topology.split(":")[0]
  if kind not in CHIPS:
    raise PlanError(
        f"--topology {topology!r}: the chip {kind!r} is not one of {sorted(CHIPS)} "
        "(write e.g. v5e:4x4, v4:2x2x2)"
    )
  return CHIPS[kind]


def topology_devices(topology: str, num_slices: int) -> list:
  """The devices of `num_slices` slices of `topology`, from libtpu (no TPU needed); its
  start-up lines on stderr are dropped."""
  from jax.experimental import topologies

  try:
    with quiet.stderr_noise_dropped():
      desc = topologies.get_topology_desc(
          platform="tpu", topology_name=topology, num_slices=num_slices
      )
  except Exception as e:  # libtpu's own message says what it cannot make of the name
    raise PlanError(f"--topology {topology!r}: {hlo_one_line(e)}") from e
  return list(desc.devices)


def hlo_one_line(error: BaseException) -> str:
  return " ".join(str(error).split())[:300]


def nbytes_per_chip(tree) -> float:
  """Bytes each chip holds of a tree of abstract arrays with NamedShardings."""
  total = 0.0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shard) * leaf.dtype.itemsize
  return total


def with_batch_sharding(batch: dict, mesh) -> dict:
  spec = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=spec) for k, v in batch.items()}


@dataclasses.dataclass
class Built:
  """A stage's train step, jitted as the loop does, with its abstract arguments."""

  jitted: object
  state: object
  batch: dict


def build_step(config, mesh) -> Built:
  module = stages.get(config.stage)
  setup = module.init(config, mesh, abstract=True)
  batch = with_batch_sharding(module.example_batch(config), mesh)
  return Built(loop.jit_train_step(setup.train_step, setup.state, mesh), setup.state, batch)


def compile_step(built: Built):
  """(the compiled program, seconds to lower and compile)."""
  start = time.perf_counter()
  with quiet.stderr_noise_dropped():
    compiled = built.jitted.lower(built.state, built.batch).compile()
  return compiled, time.perf_counter() - start


def cost(compiled) -> dict:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return dict(analysis or {})


def layer_stacks(config) -> list[str]:
  """Config sections of the stage's layer stacks (those with `num_layers` and `scan_layers`)."""
  found = []

  def walk(node, prefix):
    for key in node.keys():
      value = node[key]
      if isinstance(value, ml_collections.ConfigDict):
        path = f"{prefix}{key}"
        if "num_layers" in value and "scan_layers" in value:
          found.append(path)
        walk(value, path + ".")

  walk(config, "")
  return found


def section(config, path: str):
  node = config
  for key in path.split("."):
    node = node[key]
  return node


def variant(config, layers: dict[str, int]):
  """`config` with its layer stacks unrolled at `layers` layers each and no accumulation (one
  micro-batch as the global batch)."""
  out = ml_collections.ConfigDict(config.to_dict())
  accum = int(config.optimizer.get("grad_accum_steps", 1))
  out.optimizer.grad_accum_steps = 1
  out.train.batch_size = config.train.batch_size // accum
  for path, n in layers.items():
    section(out, path).num_layers = n
    section(out, path).scan_layers = False
  return out


def layer_corrected_costs(config, mesh) -> dict:
  """FLOPs and HBM bytes per chip of the whole step, from compiles of unrolled variants.

  XLA's cost analysis counts a `scan` body once. Each layer stack is compiled unrolled at one
  layer, and each in turn at two; the difference is one layer's cost, extrapolated to the
  config's depth. Gradient accumulation (a scan over micro-batches) is counted by compiling one
  micro-batch and multiplying by their number (the optimiser update is then counted that many
  times, an overcount of a few FLOPs per parameter). A variant whose program equals the base's
  (a stack the step never runs, e.g. the distillation teacher's video tower) costs nothing.
  """
  stacks = layer_stacks(config)
  base_layers = {path: 1 for path in stacks}
  built = build_step(variant(config, base_layers), mesh)
  base_text = built.jitted.lower(built.state, built.batch).as_text()
  base = cost(compile_step(built)[0])
  flops, moved = base.get("flops", 0.0), base.get("bytes accessed", 0.0)
  per_layer = {}
  for path in stacks:
    depth = int(section(config, path).num_layers)
    built = build_step(variant(config, {**base_layers, path: 2}), mesh)
    if built.jitted.lower(built.state, built.batch).as_text() == base_text or depth == 1:
      continue
    two = cost(compile_step(built)[0])
    per_layer[path] = two.get("flops", 0.0) - base.get("flops", 0.0)
    flops += (depth - 1) * per_layer[path]
    moved += (depth - 1) * (two.get("bytes accessed", 0.0) - base.get("bytes accessed", 0.0))
  accum = int(config.optimizer.get("grad_accum_steps", 1))
  return {"flops": flops * accum, "bytes": moved * accum, "flops_per_layer": per_layer}


def hbm_breakdown(compiled, built: Built) -> dict[str, float]:
  """Per-chip HBM of the step: the state (parameters, optimiser state, frozen teacher, extra),
  the batch, temporaries, outputs not aliased to donated inputs, and the program."""
  memory = compiled.memory_analysis()
  out = {
      "params_and_opt": nbytes_per_chip(built.state),
      "batch": nbytes_per_chip(built.batch),
      "temp": float(memory.temp_size_in_bytes),
      "output": float(memory.output_size_in_bytes - memory.alias_size_in_bytes),
      "code": float(memory.generated_code_size_in_bytes),
  }
  out["total"] = sum(out[k] for k in HBM_KINDS)
  return out


def slice_of(mesh) -> list[int]:
  """The slice of each device, in the program's device order."""
  return [getattr(d, "slice_index", 0) or 0 for d in mesh.devices.flat]


def collective_summary(collectives, mesh, dcn=()) -> dict:
  """{kind: count, bytes_per_chip, dcn_bytes_per_chip} per step.

  Bytes are what each chip sends (ring algorithms over its group). A multi-slice program's
  cross-slice exchanges (`hlo.dcn_transfers`, given as `dcn`) count as DCN traffic. A collective
  whose groups span slices is taken as run hierarchically: within each slice over ICI, then
  across the slices over the DCN on 1/(chips per slice in the group) of the payload.
  """
  slices = slice_of(mesh)
  out = {
      kind: {"count": 0, "bytes_per_chip": 0.0, "dcn_bytes_per_chip": 0.0}
      for kind in hlo.COLLECTIVES
  }
  for c in collectives:
    entry = out[c.kind]
    entry["count"] += int(round(c.runs))
    entry["bytes_per_chip"] += c.traffic_bytes
    spans = max(len({slices[d] for d in group}) for group in c.groups)
    if spans > 1:
      local = c.group_size / spans
      share = hlo.TRAFFIC[c.kind](spans) * c.payload_bytes * c.runs
      entry["dcn_bytes_per_chip"] += share / local if c.kind != "collective-permute" else share
  for c in dcn:
    entry = out[c.kind]
    entry["count"] += int(round(c.runs))
    entry["bytes_per_chip"] += c.traffic_bytes
    entry["dcn_bytes_per_chip"] += c.traffic_bytes
  return out


def estimate(chip: Chip, flops: float, moved: float, summary: dict, optimal_s: float) -> dict:
  """The roofline step time of the module docstring and its parts (seconds)."""
  dcn = sum(v["dcn_bytes_per_chip"] for v in summary.values())
  ici = sum(v["bytes_per_chip"] for v in summary.values()) - dcn
  parts = {
      "compute_s": flops / chip.peak_flops,
      "hbm_s": moved / chip.hbm_bw,
      "ici_s": ici / chip.ici_bw,
      "dcn_s": None if dcn and chip.dcn_bw is None else dcn / (chip.dcn_bw or 1.0),
      "compiler_optimal_s": optimal_s if optimal_s > 0 else None,
  }
  core = max(parts["compute_s"], parts["hbm_s"], optimal_s if optimal_s > 0 else 0.0)
  parts["step_s"] = None if parts["dcn_s"] is None else core + parts["ici_s"] + parts["dcn_s"]
  return parts


def top_ops(program: hlo.Program, chip: Chip, count: int = 8) -> list[dict]:
  """The instructions with the largest estimated time per step (roofline of each)."""
  rows = []
  for op in hlo.op_costs(program):
    seconds = op.runs * max(op.flops / chip.peak_flops, op.bytes / chip.hbm_bw)
    rows.append(
        {
            "op": op.name,
            "what": op.what,
            "seconds": seconds,
            "flops": op.flops * op.runs,
            "bytes": op.bytes * op.runs,
        }
    )
  return sorted(rows, key=lambda r: -r["seconds"])[:count]


def tokens_per_step(config) -> int:
  b, l = config.train.batch_size, config.data.get("seq_len", 0) or 0
  return int(b * l)


def fix_for_overflow(config, mesh_shape: dict) -> str:
  """The settings that lower per-chip HBM, in the order to try them."""
  per_chip = config.train.batch_size // (mesh_shape["data"] * mesh_shape["fsdp"])
  remat = config.model.get("remat", "none")
  todo = []
  if remat != "full":
    todo.append(f"--config.model.remat={'dots' if remat == 'none' else 'full'}")
  todo.append("a larger --config.mesh.fsdp (parameters and optimiser state sharded)")
  if per_chip > 1:
    todo.append(
        f"--config.optimizer.grad_accum_steps={2 * int(config.optimizer.grad_accum_steps)} "
        f"(per-chip batch {per_chip} now)"
    )
  return ", or ".join(todo)


def plan(config, topology: str, num_slices: int = 1, *, correct_layers: bool = True) -> dict:
  """Compiles the stage's train step for `num_slices` slices of `topology` and returns the
  plan (the JSON object `--json` writes, plus `analytic_terms`, `estimate`, `top_ops` and the
  program text under `hlo_text`). Raises PlanError for a mesh the topology cannot hold."""
  chip = chip_of(topology)
  devices = topology_devices(topology, num_slices)
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh.num_slices = num_slices
  try:
    mesh = sharding.make_mesh(config.mesh, devices)
  except ValueError as e:
    raise PlanError(str(e)) from None
  configlib.validate(config, len(devices))
  built = build_step(config, mesh)
  compiled, compile_s = compile_step(built)
  memory = hbm_breakdown(compiled, built)
  compiled_cost = cost(compiled)
  text = compiled.as_text()
  program = hlo.parse(text)
  summary = collective_summary(
      hlo.collectives(program, len(devices)), mesh, hlo.dcn_transfers(program, num_slices)
  )
  if correct_layers:
    corrected = layer_corrected_costs(config, mesh)
    flops, moved = corrected["flops"], corrected["bytes"]
  else:
    flops, moved = compiled_cost.get("flops", 0.0), compiled_cost.get("bytes accessed", 0.0)
  terms = stages.get(config.stage).step_flops(config)
  analytic = float(sum(terms.values()))
  chips = len(devices)
  matmul = hlo.matmul_flops(program)
  optimal = float(compiled_cost.get("optimal_seconds", -1.0))
  parts = estimate(chip, flops, moved, summary, optimal)
  step_s = parts["step_s"]
  steps = int(config.train.get("steps", 0) or 0)
  return {
      "stage": config.stage,
      "topology": topology,
      "num_slices": num_slices,
      "chips": chips,
      "mesh": {axis: int(size) for axis, size in mesh.shape.items()},
      "global_batch": int(config.train.batch_size),
      "hbm_capacity_bytes": chip.hbm_bytes,
      "hbm_bytes": memory,
      "fits": memory["total"] <= chip.hbm_bytes,
      "flops_per_chip": flops,
      "analytic_flops": analytic,
      "matmul_flops_per_chip": matmul,
      "replication": matmul * chips / analytic if analytic else None,
      "replication_all_ops": flops * chips / analytic if analytic else None,
      "estimated_step_s": step_s,
      "estimated_mfu": None if not step_s else analytic / chips / step_s / chip.peak_flops,
      "collectives": summary,
      "compile_s": compile_s,
      "analytic_terms": terms,
      "hbm_bytes_per_chip_accessed": moved,
      "flops_as_compiled": compiled_cost.get("flops", 0.0),
      "flops_correction": "unrolled 1- and 2-layer compiles, extrapolated"
      if correct_layers
      else "none (a scan's body counted once)",
      "estimate": parts,
      "tokens_per_s": tokens_per_step(config) / step_s if step_s else None,
      "recipe_steps": steps,
      "hours_to_recipe_steps": steps * step_s / 3600 if step_s and steps else None,
      "top_ops": top_ops(program, chip),
      "hlo_text": text,
  }


JSON_KEYS = (
    "stage",
    "topology",
    "num_slices",
    "chips",
    "mesh",
    "global_batch",
    "hbm_capacity_bytes",
    "hbm_bytes",
    "fits",
    "flops_per_chip",
    "analytic_flops",
    "replication",
    "estimated_step_s",
    "estimated_mfu",
    "collectives",
    "compile_s",
)


def gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def report(result: dict) -> str:
  """The plan as the lines `vidlankd plan` prints."""
  r, est = result, result["estimate"]
  mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
  lines = [
      f"{r['stage']} on {r['topology']} x {r['num_slices']} slice(s): {r['chips']} chips, "
      f"mesh {mesh}, global batch {r['global_batch']}; compiled in {r['compile_s']:.1f} s",
      "HBM per chip: "
      + ", ".join(f"{k} {gib(r['hbm_bytes'][k])}" for k in HBM_KINDS)
      + f"; total {gib(r['hbm_bytes']['total'])} of {gib(r['hbm_capacity_bytes'])}: "
      + (
          "fits"
          if r["fits"]
          else f"OVERFLOWS by {gib(r['hbm_bytes']['total'] - r['hbm_capacity_bytes'])}"
      ),
      f"FLOPs per chip {r['flops_per_chip']:.3e} ({r['flops_correction']}; as compiled "
      f"{r['flops_as_compiled']:.3e}); HBM traffic {r['hbm_bytes_per_chip_accessed'] / 1e9:.2f} GB",
      f"analytic FLOPs of the step {r['analytic_flops']:.3e} (matmuls, vidlankd_jax/flops.py):",
  ]
  lines += [f"  {name}: {value:.3e}" for name, value in r["analytic_terms"].items()]
  replication = r["replication"]
  lines.append(
      f"replication factor (matmul FLOPs per chip {r['matmul_flops_per_chip']:.3e}, from the "
      "compiled program's dots and convolutions, x chips / analytic): "
      + ("n/a" if replication is None else f"{replication:.3f}")
      + (
          ""
          if r["replication_all_ops"] is None
          else f" (all of the compiler's FLOPs, elementwise included: {r['replication_all_ops']:.3f})"
      )
  )
  lines.append("collectives per step (count, bytes sent per chip, of which over the DCN):")
  for kind, c in r["collectives"].items():
    if c["count"]:
      lines.append(
          f"  {kind}: {c['count']}, {c['bytes_per_chip'] / 2**20:.1f} MiB, "
          f"DCN {c['dcn_bytes_per_chip'] / 2**20:.1f} MiB"
      )
  step = r["estimated_step_s"]
  if r["flops_correction"].startswith("none"):
    lines.append(
        "NOTE: --as_compiled counts each scanned layer stack's body once: the compiler's FLOPs"
        " and HBM traffic above and the step time and MFU below are not the whole step's (the"
        " replication factor is: it counts loop bodies by their trip counts)"
    )
  if step is None:
    lines.append("ESTIMATE: none (no public DCN bandwidth for this chip, and DCN traffic)")
  else:
    lines.append(
        f"ESTIMATE (roofline, not a measurement): step {step * 1e3:.1f} ms = max(compute "
        f"{est['compute_s'] * 1e3:.1f} ms, HBM {est['hbm_s'] * 1e3:.1f} ms) + ICI "
        f"{est['ici_s'] * 1e3:.1f} ms + DCN {est['dcn_s'] * 1e3:.1f} ms; MFU "
        f"{r['estimated_mfu']:.1%}; {r['tokens_per_s']:.3g} tokens/s"
        + (
            f"; {r['hours_to_recipe_steps']:.1f} h to the recipe's {r['recipe_steps']} steps"
            if r["hours_to_recipe_steps"]
            else ""
        )
    )
  lines.append(
      "top ops by estimated time (ESTIMATE: each instruction's roofline times its loop trip "
      "count; FLOPs of its dots and convolutions, bytes of its operands and result as read and "
      "written, a slice or an in-place update counted at its size):"
  )
  for op in r["top_ops"]:
    lines.append(
        f"  {op['seconds'] * 1e3:8.2f} ms  {op['op']} {op['what']} "
        f"({op['flops']:.2e} FLOPs, {op['bytes'] / 1e6:.1f} MB)"
    )
  return "\n".join(lines)


def write_json(result: dict, path: str) -> str:
  """Writes the plan's JSON keys to `path` and the compiled program beside it; returns the
  program's path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({k: result[k] for k in JSON_KEYS}, f, indent=2)
  hlo_path = os.path.splitext(path)[0] + ".hlo.txt"
  with open(hlo_path, "w") as f:
    f.write(result["hlo_text"])
  return hlo_path


def check(result: dict, config) -> None:
  """PlanError when the step does not fit the chip's HBM, naming the overflow and the fix."""
  if not result["fits"]:
    over = result["hbm_bytes"]["total"] - result["hbm_capacity_bytes"]
    raise PlanError(
        f"{result['stage']} does not fit {result['topology']}: {gib(result['hbm_bytes']['total'])}"
        f" per chip of {gib(result['hbm_capacity_bytes'])} (over by {gib(over)}; temporaries "
        f"{gib(result['hbm_bytes']['temp'])}): set {fix_for_overflow(config, result['mesh'])}"
    )


def main(args, config) -> int:
  """`vidlankd plan` with parsed arguments and the loaded config."""
  result = plan(config, args.topology, args.num_slices, correct_layers=not args.as_compiled)
  print(report(result), flush=True)
  if args.json:
    hlo_path = write_json(result, args.json)
    print(f"wrote {args.json} and the compiled program {hlo_path}", flush=True)
  check(result, config)
  return 0
