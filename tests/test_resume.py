"""Exact resume of `python -m vidlankd_jax.main` (the teacher) after SIGTERM and after SIGKILL.

Each run is a real process. A run stopped by SIGTERM checkpoints at the next step boundary and
exits 75 (resumable); one killed by SIGKILL while its asynchronous save is in flight leaves the
previous checkpoint usable. Started again with the same command, both end with the parameters and
the metrics (bit for bit, on CPU) of a run that was never stopped.
"""

import os
import signal
import time

import jax
import numpy as np
import pytest

from vidlankd_jax import errors

from support import multihost_worker as worker

CONFIG = "configs/teacher.py:size=tiny,data=synthetic"
STEPS = 12
DEVICES = 2


def overrides(data_dir):
  return {
      "data.data_dir": data_dir,
      "train.steps": STEPS,
      "train.log_every": 1,
      "eval.every_steps": STEPS,
      "eval.batches": 1,
      "eval.retrieval_clips": 32,
      "checkpoint.every_steps": 4,
      "checkpoint.keep": 2,
  }


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  root = tmp_path_factory.mktemp("resume")
  return {"root": root, "data": str(root / "data"), "cache": str(root / "jax_cache")}


def start(shared, workdir, **kwargs):
  return worker.launch(
      CONFIG,
      workdir,
      overrides(shared["data"]),
      devices=DEVICES,
      cache_dir=shared["cache"],
      **kwargs,
  )


def run(shared, workdir):
  return worker.run(
      CONFIG, workdir, overrides(shared["data"]), devices=DEVICES, cache_dir=shared["cache"]
  )[0]


@pytest.fixture(scope="module")
def uninterrupted(shared):
  workdir = str(shared["root"] / "uninterrupted")
  run(shared, workdir)
  return worker.final_params(workdir), worker.read_metrics(workdir)


def assert_same_run(workdir, uninterrupted):
  params, metrics = uninterrupted
  for a, b in zip(
      jax.tree.leaves(worker.final_params(workdir)), jax.tree.leaves(params), strict=True
  ):
    np.testing.assert_array_equal(a, b)
  assert worker.read_metrics(workdir) == metrics  # every step logged once, with equal values
  assert metrics[-1]["step"] == STEPS and "eval/recall@1" in metrics[-1]


@pytest.mark.slow
def test_sigterm_checkpoints_and_rerun_continues_exactly(shared, uninterrupted):
  workdir = str(shared["root"] / "sigterm")
  procs = start(shared, workdir)
  worker.wait_for_step(workdir, 3, procs)
  procs[0].send_signal(signal.SIGTERM)
  log = worker.wait(procs, workdir)[0]
  assert procs[0].returncode == errors.STOPPED_EXIT, log[-3000:]
  steps, unfinished = worker.checkpoint_steps(workdir)
  stopped = steps[-1]
  assert 3 <= stopped < STEPS and not unfinished, (steps, unfinished)
  assert f"stopped at step {stopped} on request" in log

  log = run(shared, workdir)
  assert f"resuming from checkpoint step {stopped}" in log
  assert_same_run(workdir, uninterrupted)


@pytest.mark.slow
def test_sigkill_during_an_async_save_keeps_the_previous_checkpoint(shared, uninterrupted):
  workdir = str(shared["root"] / "sigkill")
  procs = start(shared, workdir, worker_options=("--stall_save_at=8",))
  marker = os.path.join(workdir, "stalled_save")
  worker.wait_for_step(workdir, 8, procs)
  while not os.path.exists(marker):  # the save of step 8 has written its files, uncommitted
    assert procs[0].poll() is None, worker.wait(procs, workdir)[0][-3000:]
    time.sleep(0.01)
  procs[0].send_signal(signal.SIGKILL)
  worker.wait(procs, workdir)
  steps, unfinished = worker.checkpoint_steps(workdir)
  assert steps == [4] and unfinished and unfinished[0].startswith("8."), (steps, unfinished)
  assert max(m["step"] for m in worker.read_metrics(workdir)) >= 8  # logged past the checkpoint

  log = run(shared, workdir)
  assert f"discarding unfinished checkpoint save(s) {unfinished[0]}" in log
  assert "resuming from checkpoint step 4" in log
  assert_same_run(workdir, uninterrupted)


SOAK_SEED = 17
SOAK_KILLS = 3


@pytest.mark.slow
def test_soak_random_sigkills_end_like_an_uninterrupted_run(shared, uninterrupted):
  """Seeded soak: SIGKILL the run at random moments (a random step reached plus a random delay,
  so kills land in steps, logging and saves alike), rerun, repeat; then finish. Every kill
  loses at most the steps since the last checkpoint and the end is the uninterrupted run's."""
  rng = np.random.default_rng(SOAK_SEED)
  workdir = str(shared["root"] / "soak")
  kills = []
  for _ in range(SOAK_KILLS):
    saved = max(worker.checkpoint_steps(workdir)[0], default=0) if kills else 0
    target = int(rng.integers(saved + 1, STEPS))  # a step the rerun has still to take
    procs = start(shared, workdir)
    worker.wait_for_step(workdir, target, procs)
    time.sleep(float(rng.uniform(0.0, 0.3)))
    procs[0].send_signal(signal.SIGKILL)
    worker.wait(procs, workdir)
    kills.append((target, worker.checkpoint_steps(workdir)[0][-1:]))
  run(shared, workdir)
  print(f"soak: seed {SOAK_SEED}, (kill after step, checkpoints left) {kills}")
  assert_same_run(workdir, uninterrupted)
