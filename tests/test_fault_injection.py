"""The fault-injection table: each bad input or injected fault -> the one-line error it must
give (or the skip it counts) -> what must survive it.

Cheap cases, each on a tiny state or a stub input (no model is compiled here): the teacher's
real loop under faults is in test_faults.py, exact resumes after kills in test_resume.py and the
SIGKILL soak test below.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import pytest
import tensorflow as tf

from vidlankd_jax import checkpoint as ckpt_lib
from vidlankd_jax import configlib
from vidlankd_jax import errors
from vidlankd_jax import sharding
from vidlankd_jax import train_state as common
from vidlankd_jax.data import pipeline
from vidlankd_jax.data import shards
from vidlankd_jax.data import tasks
from vidlankd_jax.train import loop

import multihost_worker as worker


def tiny_state(value=1.0, shape=(64, 64)):
  """A state whose `w` is noise around `value` (incompressible, so a flipped byte is data)."""
  mesh = sharding.single_device_mesh()
  w = value + 0.01 * jax.random.normal(jax.random.key(0), shape)
  params = {"w": jax.device_put(w, sharding.replicated(mesh))}
  optimizer = common.make_optimizer(configlib.load("teacher", "size=tiny").optimizer, 10)
  return common.init_train_state(optimizer, params)


def manager(directory, **kwargs):
  return ckpt_lib.CheckpointManager(
      str(directory), every_steps=1, keep=5, async_save=False, fingerprint={"stage": "t"}, **kwargs
  )


def saved_steps(directory, values=(1.0, 2.0)):
  """Checkpoints 1, 2, ... of a tiny state whose `w` holds `values[i]`."""
  m = manager(directory)
  for step, value in enumerate(values, start=1):
    m.save(step, tiny_state(value), force=True)
  m.close()
  return str(directory)


def data_files(directory, step, item="params"):
  files = glob.glob(os.path.join(directory, str(step), item, "**", "d", "*"), recursive=True)
  assert files, os.listdir(os.path.join(directory, str(step), item))
  return files


def flip_a_bit(files):
  """One bit in the middle of the largest data file: inside an array's bytes."""
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x10
  open(path, "wb").write(bytes(data))


def restore(directory, **kwargs):
  m = manager(directory)
  try:
    return m.restore_newest_good(tiny_state(0.0), **kwargs)
  finally:
    m.close()


# ---------------------------------------------------------------------------------------------
# Each case injects its fault and returns the message the user would see.


def bit_flip_in_params(tmp_path):
  directory = saved_steps(tmp_path / "ck")
  flip_a_bit(data_files(directory, 2))
  with pytest.raises(ckpt_lib.CorruptCheckpointError) as error:
    restore(directory, fall_back=False)
  assert os.path.isdir(os.path.join(directory, "1"))  # nothing deleted
  return str(error.value)


def data_file_removed(tmp_path):
  directory = saved_steps(tmp_path / "ck")
  for path in data_files(directory, 2):
    os.remove(path)
  with pytest.raises(ckpt_lib.CorruptCheckpointError) as error:
    restore(directory, fall_back=False)
  return str(error.value)


def corrupt_newest_falls_back(tmp_path, capsys):
  """With on_corrupt='previous' the damaged step is moved aside and step 1 restored."""
  directory = saved_steps(tmp_path / "ck")
  flip_a_bit(data_files(directory, 2))
  state, meta = restore(directory, fall_back=True)
  assert meta["step"] == 1 and abs(float(state.params["w"].mean()) - 1.0) < 0.01
  assert os.path.isdir(os.path.join(directory, "corrupt-2"))  # kept for inspection
  return capsys.readouterr().out.strip().splitlines()[-1]


def nonfinite_teacher_params(tmp_path):
  directory = saved_steps(tmp_path / "ck", values=(float("nan"),))
  with pytest.raises(ckpt_lib.CorruptCheckpointError) as error:
    ckpt_lib.restore_params(directory, ckpt_lib.abstract_like(tiny_state().params))
  with pytest.raises(ckpt_lib.CorruptCheckpointError, match="NaN or inf"):
    ckpt_lib.restore_params_numpy(directory)
  return str(error.value)


def checkpoint_of_another_shape(tmp_path):
  directory = saved_steps(tmp_path / "ck")
  m = manager(directory)
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError) as error:
    m.restore(tiny_state(shape=(3, 4)))
  m.close()
  return str(error.value)


def empty_training_split(tmp_path):
  """Shards without a record (an empty input converted): an error before the first step."""
  data_dir = str(tmp_path / "data")
  folder, prefix = tasks.TASK_FILES[tasks.WIKI103_TASK]
  os.makedirs(os.path.join(data_dir, folder))
  path = os.path.join(data_dir, folder, shards.shard_name(prefix, "train", 0, 1))
  with tf.io.TFRecordWriter(path):
    pass
  spec = tasks.InputSpec(task=tasks.WIKI103_TASK, data_dir=data_dir, seq_len=16, max_predictions=2)
  started = time.monotonic()
  with pytest.raises(ValueError) as error:
    tasks.make_dataset(spec, "train", batch_size=2, shard_index=0, num_shards=1, seed=0)
  assert time.monotonic() - started < 30
  return str(error.value)


def blocked_input(timeout_s=0.0, interrupted=None):
  never = threading.Event()

  def batches():
    never.wait()
    yield {}

  return pipeline.DevicePrefetch(
      batches(), sharding.single_device_mesh(), timeout_s=timeout_s, interrupted=interrupted
  )


def sigterm_while_waiting_for_input(tmp_path):
  flag = threading.Event()
  batches = blocked_input(interrupted=flag.is_set)
  threading.Timer(0.3, flag.set).start()
  started = time.monotonic()
  with pytest.raises(pipeline.InputWaitInterrupted) as error:
    next(batches)
  assert time.monotonic() - started < 2
  batches.close()
  return str(error.value)


def input_never_comes(tmp_path):
  batches = blocked_input(timeout_s=0.5)
  with pytest.raises(TimeoutError) as error:
    next(batches)
  batches.close()
  return str(error.value)


def unwritable_workdir(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(ckpt_lib.CheckpointSaveError) as error:
    loop.check_writable(str(blocker / "run"))
  return str(error.value)


def diverged_run_with_skip_policy(tmp_path, capsys):
  counter = loop.SkipCounter(limit=3)
  counter.record(1, True)
  counter.record(2, False)
  counter.record(3, True)  # a good step resets the count
  with pytest.raises(loop.NonFiniteError) as error:
    for step in (4, 5, 6):
      counter.record(step, False)
  assert counter.total == 4
  assert "[step 5] 2 skipped in a row, 3 in this run" in capsys.readouterr().out
  return str(error.value)


def metrics_cut_mid_line_and_repeated(tmp_path):
  """A run killed mid-write, and one killed before its first checkpoint and rerun twice."""
  writer = loop.MetricsWriter(str(tmp_path), tensorboard=False)
  lines = [{"step": s, "train/loss": 1.0} for s in (1, 2, 2, 3)]
  writer.path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "tr')
  writer.rewind(2)
  kept = [json.loads(x) for x in writer.path.read_text().splitlines()]
  assert [x["step"] for x in kept] == [1, 2]
  writer.rewind(0)  # no checkpoint: every logged step will be logged again
  assert writer.path.read_text() == ""
  return f"{len(kept)} lines kept"


def second_sigterm(tmp_path):
  """The first SIGTERM asks for a checkpoint at the next boundary; the second exits at once."""
  code = (
      "import os, signal, time\n"
      "from vidlankd_jax import checkpoint\n"
      "watcher = checkpoint.PreemptionWatcher()\n"
      "os.kill(os.getpid(), signal.SIGTERM)\n"
      "assert watcher.signalled\n"
      "os.kill(os.getpid(), signal.SIGTERM)\n"
      "time.sleep(30)\n"
  )
  started = time.monotonic()
  done = subprocess.run(
      [sys.executable, "-c", code], env=worker.env(1), capture_output=True, text=True, timeout=60
  )
  assert done.returncode == 128 + signal.SIGTERM and time.monotonic() - started < 25
  return done.stderr.strip().splitlines()[-1]


CASES = [
    (
        bit_flip_in_params,
        r"checkpoint .*/ck/2/params is damaged: array w differs from the digest "
        r"recorded when it was saved; delete .*/ck/2 .*to resume from step 1",
    ),
    (data_file_removed, r"checkpoint .*/ck/2/params is damaged or incomplete: .*missing; delete "),
    (corrupt_newest_falls_back, r"moved aside to .*/ck/corrupt-2, trying the previous step"),
    (nonfinite_teacher_params, r"checkpoint .*/ck/1/params holds NaN or inf values in w"),
    (
        checkpoint_of_another_shape,
        r"ck/2/params cannot be restored into this run's state: "
        r"w: checkpoint \(64, 64\) vs this run \(3, 4\)",
    ),
    (empty_training_split, r"the train split has no records \(.*train.*\); its input was empty"),
    (sigterm_while_waiting_for_input, r"stopped on request while waiting for the next batch"),
    (input_never_comes, r"no training batch within 1 s \(config.train.input_timeout_s=0.5\)"),
    (unwritable_workdir, r"cannot write to .*a_file/run \(.*\): choose another --workdir"),
    (
        diverged_run_with_skip_policy,
        r"3 non-finite steps in a row \(steps 4-6, "
        r"config.train.max_skips_in_a_row=3\): the run diverged",
    ),
    (metrics_cut_mid_line_and_repeated, r"2 lines kept"),
    (second_sigterm, r"second SIGTERM: exiting at once"),
]


@pytest.mark.parametrize("case, expected", CASES, ids=[c.__name__ for c, _ in CASES])
def test_fault(case, expected, tmp_path, capsys):
  kwargs = {"capsys": capsys} if "capsys" in case.__code__.co_varnames else {}
  message = case(tmp_path, **kwargs)
  assert re.search(expected, message), message
  assert "\n" not in errors.one_line(Exception(message))
