"""Input pipeline throughput per CPU core at the paper's shapes, against what accelerators need.

Writes synthetic shards in the converters' formats (text: 126-token blocks of random
non-special ids; video-text: captions of ~126 words and float16 4096-d features of 32..384
steps), then times `make_dataset` (parse, tokenize captions, wrap, mask, pad, batch) on one core:
the process is pinned to one CPU and tf.data to a one-thread pool.

Demand: one accelerator chip running a stage's step at `--mfu` of `--peak_tflops` consumes
peak * mfu / FLOPs-per-example examples per second (FLOPs per example from the step benchmarks'
counts, bench/distill_step.py and bench/teacher_step.py); divided by the measured rate per core,
that is the host cores each chip needs. Defaults: an H100/H200 (989 dense bf16 TFLOP/s) at 40%.

  python bench/input_pipeline.py [--seconds 20] [--workdir /tmp/bench_input]
The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _pin_to_one_core() -> int:
  """Pins this process to one CPU; returns the core count tf.data may use."""
  try:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  except (AttributeError, OSError):
    pass
  return 1


def write_text_shards(directory: str, num_blocks: int, num_shards: int, seed: int = 0) -> None:
  from vidlankd_jax.data import shards as shards_lib
  from vidlankd_jax.data import text as text_lib

  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  for s in range(num_shards):
    name = shards_lib.shard_name("wiki103", "train", s, num_shards)
    with shards_lib.ShardWriter(directory, name) as writer:
      for _ in range(num_blocks // num_shards):
        writer.write(text_lib.block_to_example(rng.integers(999, 30522, 126)))
      writer.commit({})


def write_video_shards(
    directory: str, num_clips: int, num_shards: int, vocab, seed: int = 0
) -> float:
  """Returns the mean number of steps per clip."""
  from vidlankd_jax.data import shards as shards_lib
  from vidlankd_jax.data import video_text

  rng = np.random.default_rng(seed)
  words = [t for t in vocab.tokens[2000:12000] if t.isalpha()]
  os.makedirs(directory, exist_ok=True)
  steps_total = 0
  for s in range(num_shards):
    name = shards_lib.shard_name("howto100m", "train", s, num_shards)
    with shards_lib.ShardWriter(directory, name) as writer:
      for i in range(num_clips // num_shards):
        steps = int(rng.integers(32, 385))
        steps_total += steps
        feats = rng.standard_normal([steps, 4096], dtype=np.float32) * 0.02
        caption = " ".join(rng.choice(words, 126))
        writer.write(video_text.clip_to_example(f"v{s}_{i}", 0.0, float(steps), caption, feats))
      writer.commit({})
  return steps_total / max(1, (num_clips // num_shards) * num_shards)


def time_pipeline(ds, batch_size: int, seconds: float, warmup_batches: int = 3) -> float:
  """Examples per second after a warm-up."""
  it = iter(ds)
  for _ in range(warmup_batches):
    next(it)
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(it)
    n += batch_size
  return n / (time.perf_counter() - start)


def demand_table(text_rate, video_rate, mean_steps, peak_tflops, mfu) -> list[dict]:
  """Examples per second one chip consumes per stage and size, and host cores that takes."""
  from distill_step import step_flops as distill_flops
  from teacher_step import step_flops as teacher_flops

  from vidlankd_jax import configlib

  rows = []
  for stage, size in (
      ("distill", "small"),
      ("distill", "base"),
      ("teacher", "small"),
      ("teacher", "base"),
  ):
    if stage == "distill":
      config = configlib.load("distill", f"size={size},objectives=nst")
      config.train.batch_size = 1
      per_example, rate, unit = distill_flops(config)["step"], text_rate, "sequences"
    else:
      config = configlib.load("teacher", f"size={size}")
      config.train.batch_size = 1
      config.video.max_steps = int(round(mean_steps))  # padding excluded: the mean clip
      per_example, rate, unit = teacher_flops(config)["step"], video_rate, "clips"
    needed = peak_tflops * 1e12 * mfu / per_example
    rows.append(
        {
            "stage": stage,
            "size": size,
            "per_chip_per_s": round(needed, 1),
            "unit": unit,
            "host_cores_per_chip": round(needed / rate, 2),
        }
    )
    print(
        f"{stage} {size}: one chip at {100 * mfu:.0f}% of {peak_tflops:.0f} TFLOP/s reads "
        f"{needed:,.0f} {unit}/s = {needed / rate:.2f} host cores at the measured rate",
        flush=True,
    )
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seconds", type=float, default=20.0, help="timing per pipeline")
  p.add_argument("--workdir", default=None, help="default: a temporary directory")
  p.add_argument("--text_blocks", type=int, default=20_000)
  p.add_argument("--video_clips", type=int, default=96)
  p.add_argument("--text_batch", type=int, default=256)
  p.add_argument("--video_batch", type=int, default=32)
  p.add_argument("--peak_tflops", type=float, default=989.0, help="one chip's dense bf16 peak")
  p.add_argument("--mfu", type=float, default=0.4, help="the utilisation the demand assumes")
  args = p.parse_args(argv)

  cores = _pin_to_one_core()
  import tensorflow as tf

  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  from vidlankd_jax.data import tasks
  from vidlankd_jax.data import vocab as vocab_lib

  workdir = args.workdir or tempfile.mkdtemp(prefix="bench_input_")
  vocab = vocab_lib.WordPieceVocabulary(vocab_lib.default_vocab_file())
  try:
    write_text_shards(os.path.join(workdir, "wiki103"), args.text_blocks, 4)
    mean_steps = write_video_shards(os.path.join(workdir, "howto100m"), args.video_clips, 4, vocab)

    def run(task: str, batch: int) -> float:
      spec = tasks.InputSpec(
          task=task,
          data_dir=workdir,
          vocab_file=vocab.vocab_file,
          shuffle_buffer=1000 if task == "wiki103_mlm" else 16,
      )
      ds = tasks.make_dataset(spec, "train", batch_size=batch, shard_index=0, num_shards=1, seed=0)
      options = tf.data.Options()
      options.threading.private_threadpool_size = cores
      return time_pipeline(ds.with_options(options), batch, args.seconds)

    text_rate = run("wiki103_mlm", args.text_batch) / cores
    print(f"text  (L=128, P=20):            {text_rate:8.1f} seq/s/core", flush=True)
    video_rate = run("howto100m_video_text", args.video_batch) / cores
    mb = video_rate * mean_steps * 4096 * 2 / 1e6
    print(
        f"video (L=128, T<=384, D=4096):  {video_rate:8.1f} clips/s/core "
        f"({mean_steps:.0f} steps/clip on average, {mb:.0f} MB/s of float16 features)",
        flush=True,
    )
  finally:
    if args.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)
  result = {
      "text_seq_per_s_per_core": round(text_rate, 1),
      "video_clips_per_s_per_core": round(video_rate, 1),
      "video_mean_steps": round(mean_steps, 1),
      "cores": cores,
      "demand": demand_table(text_rate, video_rate, mean_steps, args.peak_tflops, args.mfu),
  }
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
