"""Throughput of the full distillation step: frozen teacher forward + student step + KD losses.

The step timed is the training loop's own (`vidlankd_jax.train.distill.train_step`: one jitted
program with the teacher forward, the student forward and backward with dropout, every KD loss,
the CRD memory update and AdamW), on random token ids, with a freshly initialised teacher (its
values do not change the cost). Two sub-programs are timed alone against it:

* `teacher_share`: the teacher forward alone (last hidden states, L2-normalised, no vocabulary
  head), as the step runs it;
* `kd_loss_share`: the KD losses alone, forward and backward into the heads' outputs (with the
  CRD memory update), on head outputs and teacher states of the step's shapes.

FLOPs per step (matmul FLOPs; biases, LayerNorm, softmax and the KD losses are left out):

    T = B * L tokens, P masked positions per sequence, V vocabulary, F the FFN width
    encoder(n, H, F)   = n * (4 H^2 + 2 H F)                   weights used at every token
    attention(n, H)    = 4 * n * L * H                          QKᵀ and AV FLOPs per token
    student_forward    = 2 T (encoder_s + heads_s) + T attention_s + 2 B P (H_s^2 + V H_s)
                         (heads_s: each distillation head H_s^2 + H_s H_t; MLM head at P)
    teacher_forward    = 2 T encoder_t + T attention_t          (counted once, no backward)
    step_flops         = 3 * student_forward + teacher_forward  (backward = 2x forward)

i.e. the usual 6·N·tokens for training plus attention, with the teacher at 2·N_t·tokens. MFU is
step_flops / step_seconds / the device's dense bf16 peak (table below; null when unknown, e.g.
on CPU).

    python bench/distill_step.py --student_size=base --teacher_size=base --batch=256 \
        --dtype=bfloat16                                # 12L/768H on an accelerator
    python bench/distill_step.py --student_size=small --teacher_size=small --batch=128
    python bench/distill_step.py --student_size=tiny --teacher_size=tiny --batch=8 --steps=5

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vidlankd_jax import configlib
from vidlankd_jax import flops
from vidlankd_jax import sharding
from vidlankd_jax.objectives import FEATURE_OBJECTIVES, VOKEN_OBJECTIVE, parse_objectives
from vidlankd_jax.models.teacher import Teacher
from vidlankd_jax.train import distill
from vidlankd_jax.train import loop

# Dense bf16 peak FLOP/s per chip, by a substring of `device_kind` (first match wins).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
)


def peak_flops(device) -> float | None:
  if device.platform == "cpu":
    return None
  kind = device.device_kind
  return next((peak for name, peak in PEAK_BF16_FLOPS if name in kind), None)


def step_flops(config) -> dict[str, float]:
  """The FLOP count of the module docstring (`vidlankd_jax.flops`), split into student and
  teacher."""
  terms = flops.distill_step(config)
  student = sum(v for k, v in terms.items() if k.startswith("student"))
  teacher = sum(v for k, v in terms.items() if k.startswith("teacher"))
  return {"student_train": student, "teacher_forward": teacher, "step": student + teacher}


def random_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  b, l, p = config.train.batch_size, config.data.seq_len, config.data.max_predictions
  ids = rng.integers(5, config.model.vocab_size, (b, l)).astype(np.int32)
  masked = ids.copy()
  positions = np.sort(rng.permuted(np.tile(np.arange(1, l - 1), (b, 1)), axis=1)[:, :p], axis=1)
  np.put_along_axis(masked, positions, 103, axis=1)
  return {
      "input_ids": masked,
      "unmasked_ids": ids,
      "attention_mask": np.ones((b, l), np.int32),
      "token_type_ids": np.zeros((b, l), np.int32),
      "mlm_positions": positions.astype(np.int32),
      "mlm_targets": np.take_along_axis(ids, positions, axis=1),
      "mlm_weights": np.ones((b, p), np.float32),
      "example_id": np.arange(b, dtype=np.int32),  # the CRD memory's rows
  }


def flop_figures(flops: float, step_seconds: float) -> dict:
  """TFLOPs per step, achieved TFLOP/s, the device's bf16 peak and MFU (None where unknown)."""
  peak = peak_flops(jax.devices()[0])
  return {
      "step_tflops": flops / 1e12,
      "achieved_tflops_per_second": flops / step_seconds / 1e12,
      "peak_bf16_tflops_per_device": None if peak is None else peak / 1e12,
      "mfu": None if peak is None else flops / step_seconds / (peak * jax.device_count()),
  }


def report(result: dict) -> dict:
  """Prints every figure on its own line, then all of them as one JSON line (the last line)."""
  for k, v in result.items():
    if k != "device":
      print(f"{k:>28}: {v}")
  print(json.dumps(result))
  return result


def compiled(jitted, *args):
  """(the compiled program, seconds to lower and compile it)."""
  start = time.perf_counter()
  program = jitted.lower(*args).compile()
  return program, time.perf_counter() - start


def peak_memory_gib() -> float | None:
  """The device's peak memory in use so far (GiB); None where the backend does not say (CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def largest_batch_that_fits(measure, batch: int, fit: bool) -> dict:
  """`measure(batch)`, halving the batch while the device runs out of memory (with `fit`)."""
  while True:
    try:
      return measure(batch)
    except Exception as error:  # XLA reports RESOURCE_EXHAUSTED as a runtime error
      if not fit or "RESOURCE_EXHAUSTED" not in str(error) or batch <= 1:
        raise
      print(f"batch {batch} does not fit in device memory; trying {batch // 2}", flush=True)
      batch //= 2


def timed(fn, *args, steps: int, warmup: int, carry_first: bool = False):
  """(mean seconds per call after `warmup` calls, last output). With `carry_first` the first
  output feeds the next call's first argument (a donated training state)."""
  out = None
  for i in range(warmup + steps):
    if i == warmup:
      jax.block_until_ready(out)
      start = time.perf_counter()
    out = fn(*args)
    if carry_first:
      args = (out[0],) + args[1:]
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps, out


def build_config(args):
  config = configlib.load(
      "distill",
      f"size={args.student_size},teacher_size={args.teacher_size},objectives={args.objectives}",
  )
  config.train.batch_size = args.batch
  config.data.seq_len = args.seq_len
  config.data.max_predictions = args.max_predictions
  config.dtype = args.dtype
  if args.attention_impl:
    config.model.attention_impl = config.teacher.model.attention_impl = args.attention_impl
  config.model.remat = args.remat
  config.model.scan_layers = config.teacher.model.scan_layers = not args.unrolled
  config.kd.crd.memory_size = args.crd_memory_size  # no corpus to size it from
  return config


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--student_size", default="base")
  p.add_argument("--teacher_size", default="", help="default: the student's size")
  p.add_argument("--objectives", default="nst")
  p.add_argument("--batch", type=int, default=32, help="global batch (sequences)")
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--max_predictions", type=int, default=20)
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  p.add_argument("--attention_impl", default="", help="e.g. cudnn (NVIDIA GPUs)")
  p.add_argument("--remat", default="none", choices=("none", "dots", "full"))
  p.add_argument("--unrolled", action="store_true", help="a Python loop over layers, not a scan")
  p.add_argument("--fit_batch", action="store_true", help="halve the batch until it fits")
  p.add_argument("--crd_memory_size", type=int, default=1 << 20, help="rows of the CRD memory")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup_steps", type=int, default=2)
  args = p.parse_args(argv)
  args.teacher_size = args.teacher_size or args.student_size
  if VOKEN_OBJECTIVE in args.objectives.split("+"):
    p.error(
        "the voken objective needs a bank of teacher clip vectors read from video data; "
        "benchmark the feature objectives instead"
    )

  return report(largest_batch_that_fits(lambda b: measure(args, b), args.batch, args.fit_batch))


def setup_and_step(config, mesh):
  """The distillation setup (a random teacher where an objective needs one) and its jitted step."""
  teacher = (
      sharding.create_sharded(
          lambda: Teacher.from_config(config.teacher, dtype=config.dtype, rngs=nnx.Rngs(1)),
          mesh,
          config.sharding_rules,
      )
      if parse_objectives(config.kd.objectives)
      else None
  )
  setup = distill.pieces(config, mesh, teacher=teacher)
  step = loop.jit_train_step(distill.setup_of(config, setup).train_step, setup.state, mesh)
  return setup, step


def measure(args, batch_size: int) -> dict:
  """Times the step (and its parts) at `batch_size`; every figure of the result."""
  args.batch = batch_size
  config = build_config(args)
  mesh = sharding.make_mesh(config.mesh)
  objectives = parse_objectives(config.kd.objectives)
  setup, step = setup_and_step(config, mesh)
  models, state = setup.models, setup.state
  batch = sharding.global_batch(random_batch(config), mesh)
  state_sh = sharding.state_shardings(state)
  batch_sh = sharding.batch_sharding(mesh)

  def teacher_forward(frozen, batch):
    teacher = nnx.merge(models.teacher_def, frozen, models.teacher_rest)
    return distill.teacher_targets(teacher, batch, setup.kd)[1]

  teacher_fn = jax.jit(teacher_forward, in_shardings=(state_sh.frozen, batch_sh))
  targets = teacher_fn(state.frozen, batch) if objectives else None
  # Head outputs of the step's shapes: unit vectors (the teacher's, shifted by one sequence).
  heads = {name: jnp.roll(targets, 1, axis=0) for name in objectives if name in FEATURE_OBJECTIVES}

  # Soft-label KD reads MLM logits at the masked positions: random ones of the step's shape.
  logits = None
  if "kd" in objectives:
    shape = (config.train.batch_size, config.data.max_predictions, config.model.vocab_size)
    logits = jax.random.normal(jax.random.key(0), shape, jnp.float32)

  def kd_losses(heads, logits, targets, batch, extra):
    def total(heads, logits):
      terms, _, updates = distill.objective_terms(
          setup.kd,
          heads,
          targets,
          batch,
          extra,
          jax.random.key(0),
          mlm_logits=logits,
          teacher_logits=logits,
      )
      return sum(config.kd.weights[k] * v for k, v in terms.items()), updates

    return jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(heads, logits)

  kd_fn = jax.jit(kd_losses)
  timing = dict(steps=args.steps, warmup=args.warmup_steps)
  step, compile_seconds = compiled(step, state, batch)
  step_seconds, (state, metrics) = timed(step, state, batch, carry_first=True, **timing)
  peak_gib = peak_memory_gib()
  teacher_seconds = kd_seconds = 0.0
  if objectives:
    teacher_seconds, _ = timed(teacher_fn, state.frozen, batch, **timing)
    kd_seconds, _ = timed(kd_fn, heads, logits, targets, batch, state.extra, **timing)

  flops = step_flops(config)
  device = jax.devices()[0]
  tokens = config.train.batch_size * config.data.seq_len
  result = {
      "device": device.device_kind,
      "num_devices": jax.device_count(),
      "student_size": args.student_size,
      "teacher_size": args.teacher_size,
      "objectives": config.kd.objectives,
      "dtype": args.dtype,
      "batch": args.batch,
      "seq_len": args.seq_len,
      "steps": args.steps,
      "step_seconds": step_seconds,
      "sequences_per_second": config.train.batch_size / step_seconds,
      "tokens_per_second": tokens / step_seconds,
      "teacher_seconds": teacher_seconds,
      "teacher_share": teacher_seconds / step_seconds,
      "kd_loss_seconds": kd_seconds,
      "kd_loss_share": kd_seconds / step_seconds,
      "teacher_flop_share": flops["teacher_forward"] / flops["step"],
      **flop_figures(flops["step"], step_seconds),
      "compile_seconds": compile_seconds,
      "peak_memory_gib": peak_gib,
      "loss": float(metrics["loss"]),
  }
  return result


if __name__ == "__main__":
  main()
