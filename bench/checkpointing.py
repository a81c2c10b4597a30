"""Checkpoint save time and the time a preemption costs, for the teacher of a given size.

* `save_blocking_s`: how long `CheckpointManager.save` holds the training loop (the arrays are
  copied off the devices; the writing goes on in the background); `save_total_s`: until the
  checkpoint is committed on disk. Medians of `--saves` saves of the whole train state
  (parameters and AdamW moments), on this machine's devices.
* `preemption_lost_s`: from SIGTERM to a running `python -m vidlankd_jax.main` to the first
  step finished by the same command started again (what a preempted pod slice loses, besides
  its wait for new machines), split into `stop_s` (finish the step, checkpoint, exit) and
  `restart_s` (start, restore, compile, first step). The JAX compilation cache is warm (filled
  by the first run), as on a pod whose cache lives on persistent storage.

    python bench/checkpointing.py --size=small --batch=8
    python bench/checkpointing.py --size=tiny --batch=16 --saves=3

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def save_times(size: str, saves: int, workdir: str) -> dict:
  """Blocking and total seconds of `saves` saves of a fresh teacher's train state."""
  import jax
  from vidlankd_jax import checkpoint as ckpt_lib
  from vidlankd_jax import configlib
  from vidlankd_jax import sharding
  from vidlankd_jax.train import teacher as teacher_train

  config = configlib.load("teacher", f"size={size}")
  mesh = sharding.make_mesh(config.mesh)
  state = teacher_train.build(config, mesh).state
  nbytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
  manager = ckpt_lib.CheckpointManager(os.path.join(workdir, "saves"), every_steps=1, keep=1)
  blocking, total = [], []
  for step in range(1, saves + 1):
    start = time.perf_counter()
    manager.save(step, state, force=True)
    blocking.append(time.perf_counter() - start)
    manager.wait()
    total.append(time.perf_counter() - start)
  manager.close()
  return {
      "state_megabytes": nbytes / 2**20,
      "devices": jax.device_count(),
      "save_blocking_s": statistics.median(blocking),
      "save_total_s": statistics.median(total),
  }


def logged_steps(workdir: str) -> list[int]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line)["step"] for line in f if line.endswith("\n")]


def wait_for(predicate, proc, what: str, timeout: float = 3600) -> None:
  deadline = time.monotonic() + timeout
  while not predicate():
    if proc.poll() is not None:
      raise RuntimeError(f"the run ended before {what} (exit code {proc.returncode})")
    if time.monotonic() > deadline:
      raise RuntimeError(f"timed out waiting for {what}")
    time.sleep(0.05)


def preemption_times(size: str, batch: int, workdir: str) -> dict:
  """SIGTERM after the second step of a run; the same command again until its first step."""
  data_dir = os.path.join(workdir, "data")
  command = [
      sys.executable,
      "-m",
      "vidlankd_jax.main",
      f"--config=configs/teacher.py:size={size},data=synthetic",
      f"--workdir={os.path.join(workdir, 'run')}",
      f"--config.data.data_dir={data_dir}",
      f"--config.train.batch_size={batch}",
      f"--config.eval.batch_size={batch}",
      "--config.train.steps=1000",
      "--config.train.log_every=1",
      "--config.eval.every_steps=1000",
      "--config.checkpoint.every_steps=1000",
  ]
  env = dict(
      os.environ,
      JAX_COMPILATION_CACHE_DIR=os.path.join(workdir, "jax_cache"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  run_dir = os.path.join(workdir, "run")
  with open(os.path.join(workdir, "first.log"), "w") as log:
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_for(lambda: len(logged_steps(run_dir)) >= 2, first, "the first run's second step")
    sigterm = time.perf_counter()
    first.send_signal(signal.SIGTERM)
    if first.wait() != 0:
      raise RuntimeError(f"the preempted run exited with {first.returncode}")
  exited = time.perf_counter()
  stopped = max(logged_steps(run_dir))
  with open(os.path.join(workdir, "second.log"), "w") as log:
    second = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_for(lambda: max(logged_steps(run_dir)) > stopped, second, "the resumed run's first step")
    resumed = time.perf_counter()
    second.send_signal(signal.SIGTERM)
    second.wait()
  return {
      "stopped_at_step": stopped,
      "preemption_lost_s": resumed - sigterm,
      "stop_s": exited - sigterm,
      "restart_s": resumed - exited,
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", default="small")
  p.add_argument("--batch", type=int, default=8, help="global batch of the preempted run")
  p.add_argument("--saves", type=int, default=3)
  p.add_argument("--workdir", default="", help="default: a temporary directory")
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or tmp
    result = {"model": f"teacher size={args.size}", "batch": args.batch}
    result.update(save_times(args.size, args.saves, workdir))
    result.update(preemption_times(args.size, args.batch, workdir))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
