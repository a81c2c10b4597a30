"""Throughput of the teacher's training step: language encoder + MLM, video encoder, contrastive loss.

The step timed is the training loop's own (`vidlankd_jax.train.teacher.train_step`: one jitted
program with both towers' forward and backward with dropout, the MLM and contrastive losses and
AdamW), on random token ids and random video features of the config's shapes.

FLOPs per step (matmul FLOPs, as in bench/distill_step.py; biases, LayerNorm, softmax and the
contrastive loss are left out):

    T = B * L text tokens, S = B * Tv video steps, D video input width, Q its projection
    text_forward   = 2 T encoder_l + T attention_l(L) + MLM head at B * P positions
    video_forward  = 2 S (D Q + Q H_v + encoder_v) + S attention_v(Tv) + 2 B 3 H_v^2
                     (3 H_v^2: the pooler and the two-layer clip MLP on the first step)
    step_flops     = 3 * text_forward + (3, or 1 when the video tower is frozen) * video_forward

    python bench/teacher_step.py --size=small --batch=8 --steps=3 --dtype=float32   # CPU
    python bench/teacher_step.py --size=base --batch=64 --dtype=bfloat16            # accelerator
    python bench/teacher_step.py --size=tiny --batch=16 --steps=10 --dtype=float32

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from distill_step import (
    compiled,
    largest_batch_that_fits,
    peak_memory_gib,
    flop_figures,  # noqa: E402
    random_batch,
    report,
    timed,
)
from vidlankd_jax import configlib  # noqa: E402
from vidlankd_jax import flops  # noqa: E402
from vidlankd_jax import sharding  # noqa: E402
from vidlankd_jax.train import loop  # noqa: E402
from vidlankd_jax.train import teacher as teacher_train  # noqa: E402


def step_flops(config) -> dict[str, float]:
  """The FLOP count of the module docstring (`vidlankd_jax.flops`), split into the two towers."""
  terms = flops.teacher_step(config)
  text = sum(v for k, v in terms.items() if k.startswith("text"))
  video = sum(v for k, v in terms.items() if k.startswith("video"))
  return {"text_train": text, "video_train": video, "step": text + video}


def teacher_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """A text MLM batch (as the distillation benchmark's) plus unit-norm video features, every
  step real."""
  batch = random_batch(config, seed)
  rng = np.random.default_rng(seed + 1)
  b, t, d = config.train.batch_size, config.video.max_steps, config.video.input_dim
  features = rng.standard_normal((b, t, d)).astype(np.float32)
  features /= np.linalg.norm(features, axis=-1, keepdims=True)
  return {**batch, "video_features": features, "video_mask": np.ones((b, t), np.int32)}


def build_config(args):
  config = configlib.load("teacher", f"size={args.size},video_size={args.video_size}")
  config.train.batch_size = args.batch
  config.data.seq_len = args.seq_len or config.data.seq_len
  config.data.max_predictions = args.max_predictions or config.data.max_predictions
  if args.video_steps:
    config.video.max_steps = args.video_steps
  config.dtype = args.dtype
  if args.attention_impl:
    config.model.attention_impl = config.video.attention_impl = args.attention_impl
  config.model.remat = config.video.remat = args.remat
  config.model.scan_layers = config.video.scan_layers = not args.unrolled
  config.video.frozen = args.frozen_video
  config.loss.contrastive = args.contrastive
  return config


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", default="small", help="language encoder size (configlib.MODEL_SIZES)")
  p.add_argument("--video_size", default="", help="default: the language encoder's size")
  p.add_argument("--batch", type=int, default=32, help="global batch (clip-text pairs)")
  p.add_argument("--seq_len", type=int, default=0, help="default: the config's (128; tiny 32)")
  p.add_argument(
      "--max_predictions", type=int, default=0, help="default: the config's (20; tiny 6)"
  )
  p.add_argument("--video_steps", type=int, default=0, help="default: the config's (384; tiny 16)")
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  p.add_argument("--attention_impl", default="", help="e.g. cudnn (NVIDIA GPUs)")
  p.add_argument("--remat", default="none", choices=("none", "dots", "full"))
  p.add_argument("--unrolled", action="store_true", help="a Python loop over layers, not a scan")
  p.add_argument("--fit_batch", action="store_true", help="halve the batch until it fits")
  p.add_argument(
      "--frozen_video", action="store_true", help="the released code's frozen video tower"
  )
  p.add_argument("--contrastive", default="paired_hinge", choices=teacher_train.CONTRASTIVE_LOSSES)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup_steps", type=int, default=2)
  args = p.parse_args(argv)

  return report(largest_batch_that_fits(lambda b: measure(args, b), args.batch, args.fit_batch))


def measure(args, batch_size: int) -> dict:
  """Times the teacher's step at `batch_size`; every figure of the result."""
  args.batch = batch_size
  config = build_config(args)
  mesh = sharding.make_mesh(config.mesh)
  setup = teacher_train.init(config, mesh)
  state = setup.state
  step = loop.jit_train_step(setup.train_step, state, mesh)
  batch = sharding.global_batch(teacher_batch(config), mesh)
  step, compile_seconds = compiled(step, state, batch)
  step_seconds, (state, metrics) = timed(
      step, state, batch, carry_first=True, steps=args.steps, warmup=args.warmup_steps
  )
  peak_gib = peak_memory_gib()

  flops = step_flops(config)
  device = jax.devices()[0]
  result = {
      "device": device.device_kind,
      "num_devices": jax.device_count(),
      "size": args.size,
      "video_size": args.video_size or args.size,
      "contrastive": args.contrastive,
      "frozen_video": args.frozen_video,
      "dtype": args.dtype,
      "batch": args.batch,
      "seq_len": config.data.seq_len,
      "video_steps": config.video.max_steps,
      "steps": args.steps,
      "step_seconds": step_seconds,
      "pairs_per_second": config.train.batch_size / step_seconds,
      "tokens_per_second": config.train.batch_size
      * (config.data.seq_len + config.video.max_steps)
      / step_seconds,
      "video_flop_share": flops["video_train"] / flops["step"],
      **flop_figures(flops["step"], step_seconds),
      "compile_seconds": compile_seconds,
      "peak_memory_gib": peak_gib,
      "loss": float(metrics["loss"]),
  }
  return result


if __name__ == "__main__":
  main()
