"""Pod behaviour on one machine: several JAX processes on 127.0.0.1 (gloo CPU collectives).

Each process is `python -m vidlankd_jax.main --coordinator_address=... --process_id=i` with its
own emulated CPU devices and reads its own shard of the data. A 2-process x 4-device teacher
run, preempted by SIGTERM on one process and started again, and a 4-process x 2-device
distillation run (reading that teacher's checkpoint on every process) each equal a
single-process run that reads the same global batches. The teacher's checkpoint then restores
onto 1 process x 8 devices and 1 x 4 devices.
"""

import signal

import jax
import numpy as np
import pytest

from vidlankd_jax import checkpoint as ckpt_lib
from vidlankd_jax import configlib
from vidlankd_jax import errors
from vidlankd_jax import sharding
from vidlankd_jax.data import synthetic
from vidlankd_jax.models import layout
from vidlankd_jax.train import loop
from vidlankd_jax.train import teacher as teacher_train

from support import multihost_worker as worker

TEACHER = "configs/teacher.py:size=tiny"
DISTILL = "configs/distill.py:size=tiny,objectives=nst+crd"
TEACHER_STEPS = 12
DISTILL_STEPS = 3
pytestmark = pytest.mark.slow


def teacher_overrides(data_dir):
  return {
      "data.data_dir": data_dir,
      "train.steps": TEACHER_STEPS,
      "train.log_every": 1,
      "eval.every_steps": TEACHER_STEPS,
      "eval.batches": 1,
      "eval.retrieval_clips": 32,
      "checkpoint.every_steps": 5,
      "checkpoint.preemption_check_every": 2,
      # Batches cut to their longest clip (8 or 16 steps), the length agreed between the hosts.
      "data.video_bucket": 8,
  }


def distill_overrides(text_dir, teacher_dir):
  return {
      "data.data_dir": text_dir,
      "teacher.workdir": teacher_dir,
      "train.steps": DISTILL_STEPS,
      "train.log_every": 1,
      "eval.every_steps": DISTILL_STEPS,
      "eval.batches": 2,
      "checkpoint.every_steps": DISTILL_STEPS,
  }


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  synthetic.prepare_video_text(str(root / "video"), log=lambda *_: None)
  return {
      "root": root,
      "video": str(root / "video"),
      "cache": str(root / "jax_cache"),
      "text": worker.write_text_corpus(str(root)),
  }


@pytest.fixture(scope="module")
def teacher_runs(shared):
  """(single-process reference, 2 x 4 run): the latter stopped by SIGTERM on process 1, rerun."""
  reference = str(shared["root"] / "teacher_1x8")
  two_hosts = str(shared["root"] / "teacher_2x4")
  overrides = teacher_overrides(shared["video"])
  ref_procs = worker.launch(
      TEACHER,
      reference,
      overrides,
      devices=8,
      cache_dir=shared["cache"],
      worker_options=("--as_hosts=2",),
  )
  procs = worker.launch(
      TEACHER, two_hosts, overrides, processes=2, devices=4, cache_dir=shared["cache"]
  )
  worker.wait_for_step(two_hosts, 3, procs)
  procs[1].send_signal(signal.SIGTERM)
  first_logs = worker.wait(procs, two_hosts)
  assert [p.returncode for p in procs] == [errors.STOPPED_EXIT] * 2, "\n".join(
      log[-3000:] for log in first_logs
  )
  stopped = worker.checkpoint_steps(two_hosts)[0][-1]
  second_logs = worker.run(
      TEACHER, two_hosts, overrides, processes=2, devices=4, cache_dir=shared["cache"]
  )
  worker.wait(ref_procs, reference)
  assert ref_procs[0].returncode == 0
  return {
      "reference": reference,
      "two_hosts": two_hosts,
      "stopped": stopped,
      "first_logs": first_logs,
      "second_logs": second_logs,
  }


def assert_same_training(workdir, reference, rtol):
  got, want = worker.read_metrics(workdir), worker.read_metrics(reference)
  assert [m["step"] for m in got] == [m["step"] for m in want]
  for g, w in zip(got, want):
    assert set(g) == set(w)
    for key in g:
      if key.endswith("loss") or key == "train/grad_norm":
        np.testing.assert_allclose(g[key], w[key], rtol=rtol, err_msg=f"{key} at step {g['step']}")
  for a, b in zip(
      jax.tree.leaves(worker.final_params(workdir)),
      jax.tree.leaves(worker.final_params(reference)),
      strict=True,
  ):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_preempted_two_host_teacher_stops_together_and_resumes(teacher_runs):
  stopped = teacher_runs["stopped"]
  assert 3 <= stopped < TEACHER_STEPS and stopped % 2 == 0  # agreed at a check, every 2 steps
  # One host was signalled; both stopped at the agreed step (both exited 0 with a checkpoint
  # of that step, which needs every process). Process 0 says so once for the job: the other
  # process prints no progress, stop or resume line (a 64-host pod would print 64 copies).
  first, second = teacher_runs["first_logs"], teacher_runs["second_logs"]
  assert f"stopped at step {stopped} on request" in first[0]
  assert f"resuming from checkpoint step {stopped}" in second[0]
  assert f"[step {stopped}] " in first[0] and f"[step {TEACHER_STEPS}] " in second[0]
  for log in (first[1], second[1]):
    assert "stopped at step" not in log and "resuming from" not in log and "[step " not in log


def test_two_host_teacher_equals_one_process_over_the_same_global_batch(teacher_runs):
  assert_same_training(teacher_runs["two_hosts"], teacher_runs["reference"], rtol=1e-4)


@pytest.mark.parametrize("devices", [8, 4])
def test_two_host_checkpoint_restores_onto_one_process(teacher_runs, shared, devices):
  config = configlib.load("teacher", "size=tiny")
  config.mesh.data, config.mesh.tensor = devices // 2, 2  # another layout too: tensor-parallel
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:devices])
  state = teacher_train.init(config, mesh).state
  manager = loop.checkpoint_manager(config, teacher_runs["two_hosts"], ckpt_lib.fingerprint(config))
  restored, meta = manager.restore(state)
  manager.close()
  assert meta["step"] == int(restored.step) == TEACHER_STEPS
  saved = worker.final_params(teacher_runs["two_hosts"])
  for path, leaf in jax.tree_util.tree_leaves_with_path(restored.params):
    assert leaf.sharding.mesh == mesh and len(leaf.sharding.device_set) == devices, path
  saved = layout.stacked(saved)  # on disk one entry per layer, in memory stacked
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(saved), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_four_host_distillation_equals_one_process_over_the_same_global_batch(teacher_runs, shared):
  reference = str(shared["root"] / "distill_1x8")
  four_hosts = str(shared["root"] / "distill_4x2")
  overrides = distill_overrides(shared["text"], teacher_runs["two_hosts"])
  ref_procs = worker.launch(
      DISTILL,
      reference,
      overrides,
      devices=8,
      cache_dir=shared["cache"],
      worker_options=("--as_hosts=4",),
  )
  worker.run(DISTILL, four_hosts, overrides, processes=4, devices=2, cache_dir=shared["cache"])
  worker.wait(ref_procs, reference)
  assert ref_procs[0].returncode == 0
  assert_same_training(four_hosts, reference, rtol=1e-4)
  assert any("train/crd_loss" in m for m in worker.read_metrics(four_hosts))  # CRD memory on
