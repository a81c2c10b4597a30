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
import numpy as np
import pytest
import tensorflow as tf

from vidlankd_jax import checkpoint as ckpt_lib
from vidlankd_jax import configlib
from vidlankd_jax import errors
from vidlankd_jax import runs
from vidlankd_jax import sharding
from vidlankd_jax import train_state as common
from vidlankd_jax.data import howto100m
from vidlankd_jax.data import pipeline
from vidlankd_jax.data import shards
from vidlankd_jax.data import tasks
from vidlankd_jax.data import text
from vidlankd_jax.data import vocab as vocab_lib
from vidlankd_jax.train import loop

from support import multihost_worker as worker
import test_howto100m_convert as conv


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
  assert done.returncode == errors.STOPPED_EXIT and time.monotonic() - started < 25
  return done.stderr.strip().splitlines()[-1]


def disk_full_during_a_background_save(tmp_path):
  """A file-size limit (as a full disk) makes the asynchronous save fail: the next check says
  so at once, naming the step and the storage's error, and the manager closes cleanly."""
  code = (
      "import resource, signal, sys, time\n"
      "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
      "from vidlankd_jax import quiet\n"
      "quiet.quiet_libraries()  # as every command without --verbosity=1\n"
      f"quiet.log_libraries_to({str(tmp_path / 'library.log')!r})\n"
      "import jax\n"
      "from vidlankd_jax import checkpoint as ck, configlib, sharding, train_state as ts\n"
      "mesh = sharding.single_device_mesh()\n"
      "w = jax.device_put(jax.random.normal(jax.random.key(0), (256, 256)), "
      "sharding.replicated(mesh))\n"
      "optimizer = ts.make_optimizer(configlib.load('teacher', 'size=tiny').optimizer, 10)\n"
      f"m = ck.CheckpointManager({str(tmp_path / 'ck')!r}, every_steps=1, keep=2, "
      "fingerprint={})\n"
      "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
      "started = time.monotonic()\n"
      "m.save(1, ts.init_train_state(optimizer, {'w': w}), force=True)\n"
      "try:\n"
      "  while time.monotonic() - started < 60:\n"
      "    m.check_saves()\n"
      "    time.sleep(0.05)\n"
      "except ck.CheckpointSaveError as e:\n"
      "  m.close()\n"
      "  print(f'{time.monotonic() - started:.1f} s: {e}')\n"
  )
  done = subprocess.run(
      [sys.executable, "-c", code], env=worker.env(1), capture_output=True, text=True, timeout=120
  )
  lines = done.stdout.strip().splitlines()
  assert done.returncode == 0 and lines, done.stderr[-2000:]
  assert float(lines[-1].split(" s:")[0]) < 30
  # Orbax's own tracebacks (hundreds of lines) go to the library log, not to the console.
  assert "Traceback" not in done.stderr, done.stderr[-2000:]
  assert "Traceback" in (tmp_path / "library.log").read_text()
  return lines[-1]


def config_json_that_does_not_describe_the_weights(tmp_path):
  """An old rejected rerun's config.json (another num_heads) is not used to build a model for
  the checkpoint's weights (fine-tuning's init, tools/export_hf.py)."""
  config = configlib.load("teacher", "size=tiny")
  m = ckpt_lib.CheckpointManager(
      str(tmp_path / "checkpoints"), every_steps=1, keep=1, fingerprint=ckpt_lib.fingerprint(config)
  )
  m.save(1, tiny_state(), force=True)
  m.close()
  config.model.num_heads = 4
  runs.write_config(config, str(tmp_path))
  run = runs.Run(str(tmp_path))
  shapes = {k: config.model[k] for k in ("hidden_size", "num_layers", "intermediate_size")}
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError) as error:
    runs.saved_num_heads(run, shapes)
  return str(error.value)


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
    (
        config_json_that_does_not_describe_the_weights,
        r"config.json does not describe the weights "
        r"in .*checkpoints \(model.num_heads: config.json 4 vs checkpoint 2\)",
    ),
    (
        disk_full_during_a_background_save,
        r"saving checkpoint step 1 to .*/ck failed in the "
        r"background \(.*File too large.*\): free space .*the last checkpoint is none",
    ),
]


# ---------------------------------------------------------------------------------------------
# Data tools: the HowTo100M converter and the text tool.

VIDEOS = {f"v{i}": (30, conv.regular_captions(30)) for i in range(4)}


def howto_layout(tmp_path, videos=VIDEOS):
  root = str(tmp_path / "howto")
  os.makedirs(root)
  conv.make_layout(root, videos)
  return root


def convert(root, out="out", **kwargs):
  cfg = conv.config(root, os.path.join(root, out), **kwargs)
  return howto100m.convert(cfg, log=lambda *_: None)


def skipped(summary, reason):
  return f"{reason}: {summary['skipped'].get(reason, 0)} skipped"


def npy_header_claims_terabytes(tmp_path):
  root = howto_layout(tmp_path)
  with open(os.path.join(root, "f2d", "v1.npy"), "wb") as f:
    header = {"descr": "<f2", "fortran_order": False, "shape": (1 << 30, 2048)}
    np.lib.format.write_array_header_1_0(f, header)
    f.write(b"\0" * 64)
  summary = convert(root, skip_bad=True)
  assert summary["videos_written"] == 3
  assert any("header claims shape" in e for e in summary["skipped_examples"])
  return skipped(summary, "unreadable_features")


def complex_features(tmp_path):
  root = howto_layout(tmp_path)
  np.save(os.path.join(root, "f3d", "v2.npy"), np.ones([45, 2048], np.complex64))
  with pytest.raises(howto100m.BadInputError, match="'v2'.*complex values"):
    convert(root, out="stop")
  return skipped(convert(root, skip_bad=True), "unreadable_features")


def lone_surrogate_in_a_caption(tmp_path):
  root = howto_layout(tmp_path)
  path = os.path.join(root, "caption.json")
  text = open(path).read().replace('"text": ["', '"text": ["\\ud800 ', 1)
  open(path, "w").write(text)
  with pytest.raises(howto100m.BadInputError, match="'v0'.*not valid Unicode"):
    convert(root, out="stop")
  return skipped(convert(root, skip_bad=True), "non_text_caption")


def second_object_after_the_caption_file(tmp_path):
  root = howto_layout(tmp_path)
  with open(os.path.join(root, "caption.json"), "a") as f:
    f.write('{"v9": {}}')
  with pytest.raises(ValueError) as error:
    convert(root)
  return str(error.value)


def duplicate_video_ids(tmp_path):
  root = howto_layout(tmp_path)
  path = os.path.join(root, "caption.json")
  entry = json.dumps(conv.regular_captions(30))
  text = open(path).read().rstrip()
  open(path, "w").write(text[:-1] + f', "v1": {entry}}}')
  with pytest.raises(ValueError) as error:
    convert(root)
  return str(error.value)


def caption_file_edited_in_place(tmp_path):
  root = howto_layout(tmp_path)
  convert(root)
  path = os.path.join(root, "caption.json")
  captions = json.load(open(path))
  captions["v0"]["text"][0] = "changed words"
  json.dump(captions, open(path, "w"))
  with pytest.raises(ValueError) as error:
    convert(root)
  return str(error.value)


def second_converter_on_one_output(tmp_path):
  root = howto_layout(tmp_path)
  with shards.output_lock(os.path.join(root, "out")):
    with pytest.raises(ValueError) as error:
      convert(root)
  assert convert(root)["videos_written"] == 4  # the lock is freed with its holder
  return str(error.value)


def converter_worker_killed(tmp_path):
  """A worker SIGKILLed as soon as it exists: the job fails at once, naming the shards."""
  root = howto_layout(tmp_path)
  import multiprocessing

  def kill_first_worker():
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
      children = multiprocessing.active_children()
      if children:
        os.kill(children[0].pid, signal.SIGKILL)
        return
      time.sleep(0.01)

  threading.Thread(target=kill_first_worker, daemon=True).start()
  started = time.monotonic()
  with pytest.raises(howto100m.WorkerDiedError) as error:
    convert(root, workers=2)
  assert time.monotonic() - started < 60
  return str(error.value)


def empty_text_corpus(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  out = tmp_path / "out"
  with pytest.raises(ValueError) as error:
    text.convert_text([str(empty)], str(out), text_vocab(), prefix="x", log=lambda *_: None)
  assert not glob.glob(str(out / "x-train.tfrecord-*"))  # no empty shard to spin on
  return str(error.value)


def malformed_mediawiki_xml(tmp_path):
  path = tmp_path / "dump.xml"
  path.write_text(
      '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">'
      "<page><title>A</title><ns>0</ns><revision><text>cut short"
  )
  with pytest.raises(ValueError) as error:
    list(text.iter_paragraphs(str(path)))
  return str(error.value)


def one_huge_line(tmp_path):
  """A line of 3.5 limits is read in pieces no longer than 1.5 limits, every word kept."""
  import io

  words = " ".join(f"w{i}" for i in range(3000))
  pieces = list(text._bounded_lines(io.StringIO(words + "\nnext\n"), limit=4000))
  assert max(len(p) for p, _ in pieces) <= 6000 and pieces[-1] == ("next", True)
  assert " ".join(p for p, _ in pieces[:-1]).split() == words.split()
  return f"{len(pieces) - 1} pieces"


_VOCAB = []


def text_vocab():
  if not _VOCAB:
    _VOCAB.append(vocab_lib.WordPieceVocabulary(vocab_lib.default_vocab_file()))
  return _VOCAB[0]


DATA_CASES = [
    (npy_header_claims_terabytes, r"unreadable_features: 1 skipped"),
    (complex_features, r"unreadable_features: 1 skipped"),
    (lone_surrogate_in_a_caption, r"non_text_caption: 1 skipped"),
    (
        second_object_after_the_caption_file,
        r"caption.json: invalid JSON at character \d+: more "
        r"data after the caption object's closing '}'",
    ),
    (duplicate_video_ids, r"caption.json: video id 'v1' appears twice"),
    (caption_file_edited_in_place, r"holds shards converted with other settings .*input_files"),
    (second_converter_on_one_output, r"another converter \(pid \d+\) is writing to .*out"),
    (
        converter_worker_killed,
        r"a converter worker died .* before shard\(s\) howto100m-.* were " r"finished",
    ),
    (empty_text_corpus, r"empty.txt: no 126-token block in 0 paragraphs"),
    (malformed_mediawiki_xml, r"dump.xml: malformed MediaWiki XML"),
    (one_huge_line, r"\d+ pieces"),
]


# ---------------------------------------------------------------------------------------------
# Bad input that once became a plausible number or threw finished work away: each is now a
# named error, a counted skip, or kept work.


def tsv_benchmark(directory, rows, name="custom_labels"):
  """A two-label classification benchmark over `{split: [(sentence, label)]}` TSV files."""
  from vidlankd_jax.data import downstream
  from vidlankd_jax.evaluation import metrics

  os.makedirs(directory, exist_ok=True)
  for split, split_rows in rows.items():
    with open(os.path.join(directory, f"{split}.tsv"), "w", encoding="utf-8") as f:
      f.writelines(f"{sentence}\t{label}\n" for sentence, label in split_rows)

  def read(path):
    lines = [line.rstrip("\n").split("\t") for line in open(path, encoding="utf-8")]
    return {
        "sentence": np.asarray([s for s, _ in lines], dtype=object),
        "label": np.asarray([int(label) for _, label in lines], np.int32),
    }

  return downstream.DownstreamSpec(
      name=name,
      kind="classification",
      num_labels=2,
      metric_fn=metrics.accuracy_metric,
      source=downstream.file_source(
          {s: os.path.join(directory, f"{s}.tsv") for s in rows}, read, lambda s, p: str(p)
      ),
      formatter=lambda ex: {"text_a": ex["sentence"], "label": ex["label"]},
      description="a test benchmark",
      seq_len=16,
  )


def finetune_on_an_empty_train_tsv(tmp_path):
  """Was: 0 steps, results.md with accuracy 50.0, exit 0."""
  from vidlankd_jax.data import downstream

  spec = tsv_benchmark(tmp_path, {"train": [], "validation": [("fine", 1)]}, "empty_train")
  with pytest.raises(errors.DataError) as error:
    downstream.training_stats(spec, 16)
  return str(error.value)


def finetune_label_outside_the_label_set(tmp_path):
  """Was: label 7 of 2 left out of the training statistics and scored as wrong, exit 0."""
  from vidlankd_jax.data import downstream

  rows = {"train": [("good", 1), ("odd", 7), ("bad", 0)], "validation": [("x", 1), ("y", -1)]}
  spec = tsv_benchmark(tmp_path, rows)
  with pytest.raises(errors.DataError, match=r"validation split .*\(row 1: -1\)"):
    downstream.check_labels(spec, "validation", np.array([1, -1]))
  with pytest.raises(errors.DataError) as error:
    downstream.training_stats(spec, 16)
  return str(error.value)


def config_values_that_train_on_nonsense(tmp_path):
  """Was: gradient ascent, 0 or -5 steps "finished", negative intervals accepted, exit 0."""
  messages = []
  for key, value in (
      ("train.steps", 0),
      ("train.steps", -5),
      ("checkpoint.every_steps", -3),
      ("train.batch_size", 0),
      ("optimizer.learning_rate", -1e-3),
  ):
    config = configlib.load("teacher", "size=tiny")
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(errors.ConfigError, match=rf"\(config\.{key}\)") as error:
      configlib.validate(config, 1)
    assert error.value.exit_code == errors.USAGE_EXIT
    messages.append(str(error.value))
  return messages[-1]


def fake_models(devices=8):
  """What `extract.run` reads of FeatureModels, without a model (no video reaches it here)."""
  import types

  return types.SimpleNamespace(
      fns={"2d": None},
      mesh=types.SimpleNamespace(size=devices),
      dtype="float32",
      l2_normalize=True,
  )


def odd_aspect_ratio_video(tmp_path):
  """Was: a 1 s 2560x16 video padded to the whole batch: 14 GB, 6m43s at batch 8."""
  from vidlankd_jax.features import extract
  from vidlankd_jax.features import streams as streams_lib

  stream = streams_lib.STREAM_2D
  frame = (*stream.frame_shape(16, 2560), 3)  # the short side scaled to 224: 224 x 35840
  assert extract.batch_rows(64 * 8, stream, (224, 224, 3), 8) == 512
  rows = extract.batch_rows(64 * 8, stream, frame, 8)
  batcher = extract.Batcher(rows, 8)
  batcher.add("odd", 0, np.zeros((1, 1, 1, 3), np.uint8))  # one real frame
  pixels, _ = batcher.take(pad=True)
  assert rows == 8 and len(pixels) == 8  # one frame per device, not 64
  small = extract.Batcher(512, 8)
  small.add("v", 0, np.zeros((20, 1, 1, 3), np.uint8))
  assert len(small.take(pad=True)[0]) == 32  # a partial batch: the next power of two
  return f"{frame[:2]} frames: {rows} a batch on 8 devices, padded to {len(pixels)}"


def video_that_ended_two_runs(tmp_path):
  """Was: a video that killed the job left no manifest line, so every rerun met it again."""
  from vidlankd_jax.features import extract

  (tmp_path / "videos").mkdir()
  for name in ("killer", "good"):
    (tmp_path / "videos" / f"{name}.mp4").write_bytes(b"")
  cfg = extract.ExtractConfig(
      output_dir=str(tmp_path / "out"), video_dir=str(tmp_path / "videos"), streams=("2d",)
  )
  os.makedirs(tmp_path / "out" / extract.MANIFEST_DIR)
  path = str(tmp_path / "videos" / "killer.mp4")
  with open(tmp_path / "out" / extract.MANIFEST_DIR / f"{cfg.host_tag}.jsonl", "w") as f:
    for _ in range(2):  # what two runs that died while decoding it left
      f.write(json.dumps({"video": "killer", "path": path, "status": "started"}) + "\n")
  given = []

  def run(todo):
    given.extend(v for v, _ in todo)
    yield from ()

  summary = extract.run(cfg, fake_models(), log=lambda _: None, pool=types_namespace(run=run))
  assert given == ["good"] and summary["skipped"] == {"ended_the_run": 1}
  return summary["skipped_examples"][0]


def types_namespace(**kwargs):
  import types

  return types.SimpleNamespace(**kwargs)


def decoder_crash_is_retried_once(tmp_path):
  """Was: a decode worker killed from outside recorded its video as a permanent skip."""
  from vidlankd_jax.features import extract

  manifest = tmp_path / extract.MANIFEST_DIR
  manifest.mkdir()
  record = {"video": "v", "status": "skipped", "reason": "decoder_crashed", "detail": "exit -9"}
  (manifest / "host-00000-of-00001.jsonl").write_text(json.dumps(record) + "\n")
  assert extract.read_manifests(str(tmp_path))["v"]["tries"] == 1  # retried by the next run
  (manifest / "host-00000-of-00001.jsonl").write_text(2 * (json.dumps(record) + "\n"))
  return f"decoder_crashed tries: {extract.read_manifests(str(tmp_path))['v']['tries']}"


def truncated_download(tmp_path):
  """Was: half of a 6 s faststart mp4 recorded `ok` with 2 rows, "2 extracted, 0 skipped"."""
  import imageio_ffmpeg

  from vidlankd_jax.features import decode
  from vidlankd_jax.features import streams as streams_lib

  full = str(tmp_path / "full.mp4")
  subprocess.run(
      [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i"]
      + ["testsrc2=size=160x120:rate=10:duration=6", "-c:v", "libx264", "-pix_fmt", "yuv420p"]
      + ["-movflags", "+faststart", full],
      check=True,
  )
  data = open(full, "rb").read()
  (tmp_path / "half.mp4").write_bytes(data[: len(data) // 2])
  assert list(decode.decode_video(full, (streams_lib.STREAM_2D,)))[-1][1]["rows_2d"] == 6
  with pytest.raises(decode.DecodeError) as error:
    list(decode.decode_video(str(tmp_path / "half.mp4"), (streams_lib.STREAM_2D,)))
  assert error.value.reason == "truncated"
  return str(error.value)


def second_extraction_job_on_one_output(tmp_path):
  """Was: both jobs ran, doubling the manifest; the second deleted the first's temporaries."""
  from vidlankd_jax.features import extract

  (tmp_path / "videos").mkdir()
  cfg = extract.ExtractConfig(
      output_dir=str(tmp_path / "out"), video_dir=str(tmp_path / "videos"), streams=("2d",)
  )
  in_flight = tmp_path / "out" / "howto100m_feature" / "v.npy.tmp-h0-1"
  in_flight.parent.mkdir(parents=True)
  in_flight.write_bytes(b"the first job's")
  lock_dir = str(tmp_path / "out" / extract.MANIFEST_DIR)
  with shards.output_lock(lock_dir, f".lock-{cfg.host_tag}", "feature extraction job"):
    with pytest.raises(errors.DataError) as error:
      extract.run(cfg, fake_models(), log=lambda _: None, pool=types_namespace(run=None))
  assert in_flight.exists()
  return str(error.value)


def extraction_on_a_full_disk(tmp_path):
  """Was: `4096 requested and 4032 written`, naming no file."""
  target = tmp_path / "v.npy"
  code = (
      "import resource, signal\n"
      "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
      "import numpy as np\n"
      "from vidlankd_jax.data import shards\n"
      "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
      f"with shards.atomic_open({str(target)!r}, 'wb') as f:\n"
      "  np.save(f, np.zeros((64, 2048), np.float16))\n"
  )
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert done.returncode == 1 and not target.exists()
  return done.stderr.strip().splitlines()[-1]


def demo_with_another_seed(tmp_path):
  """Was: `vidlankd demo --seed 1` on a seed-0 workdir removed every finished stage."""
  from vidlankd_jax.demo import pipeline

  workdir = str(tmp_path / "demo")
  os.makedirs(workdir)
  pipeline.claim_workdir(workdir, {"size": "demo", "seed": 0, "steps": None}, fresh=False)
  with pytest.raises(errors.ConfigError) as error:
    pipeline.claim_workdir(workdir, {"size": "demo", "seed": 1, "steps": None}, fresh=False)
  return str(error.value)


def stage_runs(workdir, calls, value=1, stop=False):
  """Stage `a` (settings hold a path inside `workdir`) of a StageRunner; a resumable stage `b`
  that is stopped (as by SIGTERM) when `stop`, keeping what it wrote."""
  from vidlankd_jax.demo import stages

  def a(stage_dir):
    calls.append("a")
    return {"value": value}

  def b(stage_dir):
    calls.append("b")
    kept = os.path.exists(os.path.join(stage_dir, "checkpoint"))
    open(os.path.join(stage_dir, "checkpoint"), "w").close()
    if stop:
      raise loop.Preempted("stopped at step 3 on request")
    return {"resumed": kept}

  runner = stages.StageRunner(workdir, 2, log=lambda _: None)
  runner.run("a", "a", {"v": value, "data_dir": os.path.join(workdir, "data")}, a)
  return runner.run("b", "b", {}, b, after=("a",), resumable=True)


def demo_stage_with_other_settings(tmp_path):
  """Was: a finished stage of other settings deleted; a moved workdir redid every stage."""
  import shutil

  calls = []
  stage_runs(str(tmp_path / "w"), calls)
  shutil.move(str(tmp_path / "w"), str(tmp_path / "moved"))
  assert stage_runs(str(tmp_path / "moved"), calls).reused and calls == ["a", "b"]
  with pytest.raises(errors.ConfigError) as error:
    stage_runs(str(tmp_path / "moved"), calls, value=2)
  assert os.path.exists(tmp_path / "moved" / "a" / "stage_done.json")  # kept
  return str(error.value)


def sigterm_during_a_demo_stage(tmp_path):
  """Was: exit 1 "an internal error", and the rerun deleted the stage's checkpoint."""
  calls = []
  with pytest.raises(errors.Stopped) as error:
    stage_runs(str(tmp_path), calls, stop=True)
  assert errors.exit_code(error.value) == errors.STOPPED_EXIT
  record = stage_runs(str(tmp_path), calls)
  assert calls == ["a", "b", "b"] and record.result == {"resumed": True}
  return f"rerun: {record.result}"


def sigterm_outside_a_training_step(tmp_path):
  """Was: 0 for a preempted run, 143 between fine-tuning seeds: a controller saw "done"."""
  code = (
      "import os, signal, sys, time\n"
      "from vidlankd_jax import errors\n"
      "errors.stop_on_sigterm()\n"
      "sys.exit(errors.run_cli(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(30))))\n"
  )
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert done.returncode == errors.STOPPED_EXIT == 75, done.stderr[-2000:]
  return done.stderr.strip().splitlines()[-1]


def garbled_teacher_metadata(tmp_path):
  """Was: a raw JSON error naming no file when distilling from such a teacher."""
  directory = saved_steps(tmp_path / "ck")
  files = glob.glob(os.path.join(directory, "2", "meta", "*"))
  assert files, os.listdir(os.path.join(directory, "2"))
  for path in files:
    if os.path.isfile(path):
      open(path, "w").write("{garbled")
  with pytest.raises(ckpt_lib.CorruptCheckpointError) as error:
    ckpt_lib.read_meta(directory)
  return str(error.value)


def tensorstore_error_with_its_spec(tmp_path):
  """Was: a damaged data file's message embedding TensorStore's 700-character JSON spec."""
  spec = '{"context":{"cache_pool":{}},"driver":"zarr3","kvstore":' + '"x' * 350 + '"}'
  error = ValueError(
      'DATA_LOSS: Error reading "w/0.0" in OCDBT database at local file "/r/ck/2/params/": '
      "checksum mismatch [source locations='tensorstore/kvstore/ocdbt/io.cc:12'] "
      f"[tensorstore_spec='{spec}']"
  )
  return ckpt_lib._short(error)


def converter_with_every_video_in_validation(tmp_path):
  """Was: 0-byte train shards, exit 0; the teacher then blamed "empty input"."""
  root = howto_layout(tmp_path)
  with pytest.raises(errors.DataError) as error:
    convert(root, num_validation_videos=len(VIDEOS))
  return str(error.value)


def caption_file_with_a_bom(tmp_path):
  root = howto_layout(tmp_path)
  path = os.path.join(root, "caption.json")
  data = open(path, "rb").read()
  open(path, "wb").write(b"\xef\xbb\xbf" + data)
  with pytest.raises(errors.DataError) as error:
    convert(root)
  return str(error.value)


def mediawiki_page_without_an_id(tmp_path):
  """Was: an AttributeError "internal error"."""
  path = tmp_path / "dump.xml"
  path.write_text(
      '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">'
      "<page><title>A</title><ns>0</ns><revision><text>Some text.</text></revision></page>"
      "</mediawiki>"
  )
  with pytest.raises(errors.DataError) as error:
    list(text.iter_paragraphs(str(path)))
  return str(error.value)


def a_bug_keeps_its_traceback_and_the_workdir_keeps_it_too(tmp_path, capsys):
  """Was: a KeyError of ours printed as one line, like a config mistake; no trace on a pod."""
  errors.set_workdir(str(tmp_path))
  try:
    code = errors.run_cli(lambda: {}["missing"])
    bug = capsys.readouterr().err
    user = errors.run_cli(lambda: (_ for _ in ()).throw(errors.ConfigError("bad", "config.x", "y")))
    line = capsys.readouterr().err
  finally:
    errors.set_workdir(None)
  assert code == 1 and "Traceback" in bug and "internal error" in bug
  assert user == 2 and "Traceback" not in line and line.count("\n") == 1
  assert open(tmp_path / "error.txt").read().count("Traceback") == 2
  return line.strip()


FAULT_CASES = [
    (finetune_on_an_empty_train_tsv, r"the train split holds no example \(empty_train\)"),
    (
        finetune_label_outside_the_label_set,
        r"1 label\(s\) of the train split are outside 0..1 \(row 1: 7\) \(custom_labels\)",
    ),
    (config_values_that_train_on_nonsense, r"-0.001 is not positive .*a negative one ascends"),
    (odd_aspect_ratio_video, r"\(224, 35840\) frames: 8 a batch on 8 devices, padded to 8"),
    (video_that_ended_two_runs, r"killer .*: ended_the_run: two runs ended"),
    (decoder_crash_is_retried_once, r"tries: 2"),
    (truncated_download, r"truncated: frames end at 2.\d s of the container's 6.0 s"),
    (
        second_extraction_job_on_one_output,
        r"another feature extraction job \(pid \d+\) is writing to .*manifest",
    ),
    (extraction_on_a_full_disk, r"StorageError: writing failed: .* \(.*v.npy\): free space"),
    (demo_with_another_seed, r"demo holds the demo of seed 0; .*demo.json\): give this run"),
    (demo_stage_with_other_settings, r"moved/a holds a finished run of this stage with other"),
    (sigterm_during_a_demo_stage, r"rerun: \{'resumed': True\}"),
    (sigterm_outside_a_training_step, r"^stopped by SIGTERM outside a training step.*exit 75"),
    (garbled_teacher_metadata, r"checkpoint .*ck/2/meta is damaged: its JSON cannot be read"),
    (tensorstore_error_with_its_spec, r'^DATA_LOSS: Error reading "w/0.0" .*checksum mismatch$'),
    (
        converter_with_every_video_in_validation,
        r"every written video went to the validation split .*--num_validation_videos",
    ),
    (caption_file_with_a_bom, r"starts with a byte-order mark \(BOM\)"),
    (mediawiki_page_without_an_id, r"dump.xml: malformed MediaWiki XML \(a <page> .* <id>\)"),
    (
        a_bug_keeps_its_traceback_and_the_workdir_keeps_it_too,
        r"^error: bad \(config.x\): y \[traceback in .*error.txt\]$",
    ),
]


# ---------------------------------------------------------------------------------------------
# The commands: one line, exit 2 for usage and config, 1 for data; the traceback on request.


def command(args, tmp_path):
  done = subprocess.run(
      [sys.executable, *args],
      env=worker.env(8),
      cwd=worker.REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  return done.returncode, done.stderr.strip()


def main_with_indivisible_batch(tmp_path):
  args = [
      "-m",
      "vidlankd_jax.main",
      "--config=configs/teacher.py:size=tiny,data=synthetic",
      "--config.train.batch_size=12",
      f"--workdir={tmp_path / 'run'}",
  ]
  code, stderr = command(args, tmp_path)
  assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
  assert not (tmp_path / "run" / "config.json").exists()
  code, verbose = command(args + ["--verbosity=1"], tmp_path)
  assert code == 2 and "Traceback" in verbose
  return stderr.splitlines()[-1]


def tool_with_a_missing_caption_file(tmp_path):
  args = [
      "tools/convert_howto100m.py",
      f"--caption_json={tmp_path / 'nope.json'}",
      f"--features_2d_dir={tmp_path}",
      f"--features_3d_dir={tmp_path}",
      f"--output_dir={tmp_path / 'out'}",
  ]
  code, stderr = command(args, tmp_path)
  assert code == 1 and "Traceback" not in stderr, stderr[-2000:]
  return stderr.splitlines()[-1]


def main_with_a_misspelled_config_key(tmp_path):
  """Was: a 55-line ml_collections traceback, exit 1."""
  args = ["-m", "vidlankd_jax.main", "--config=configs/teacher.py:size=tiny,data=synthetic"]
  code, stderr = command(args + ["--config.train.stepz=10", f"--workdir={tmp_path}"], tmp_path)
  assert code == 2 and "Traceback" not in stderr and len(stderr.splitlines()) == 1, stderr
  return stderr


def main_with_a_value_of_the_wrong_type(tmp_path):
  """Was: absl's FATAL line, exit 1."""
  args = ["-m", "vidlankd_jax.main", "--config=configs/teacher.py:size=tiny,data=synthetic"]
  code, stderr = command(args + ["--config.train.steps=abc", f"--workdir={tmp_path}"], tmp_path)
  assert code == 2 and "Traceback" not in stderr and len(stderr.splitlines()) == 1, stderr
  return stderr


def flag_errors_name_the_flag(tmp_path, capsys):
  """Was: absl's FATAL line or a traceback, exit 1, for a bad `:arg`, value type, size or a
  missing config file. Now one line naming the flag, exit 2 (main.parse_flags on fresh flags)."""
  from absl import flags
  from ml_collections import config_flags

  from vidlankd_jax import main as main_lib

  lines = []
  for arg in (
      ["--config=configs/teacher.py:size=huge"],
      ["--config=configs/teacher.py:sise=tiny"],
      ["--config=configs/nope.py"],
  ):
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
    with pytest.raises(SystemExit) as exit_status:
      main_lib.parse_flags(["prog", *arg], values)
    err = capsys.readouterr().err
    assert exit_status.value.code == errors.USAGE_EXIT and "Traceback" not in err, err
    assert arg[-1].split(":")[0] in err.splitlines()[-1]
    lines.append(err.splitlines()[-1])
  assert "unknown model size 'huge'" in lines[0] and "'sise'" in lines[1], lines
  return lines[-1]


COMMAND_CASES = [
    (
        main_with_a_misspelled_config_key,
        r'^error: unknown flag or config key \(--config.train.stepz\): did you mean "steps"\?$',
    ),
    (
        main_with_a_value_of_the_wrong_type,
        r"^error: invalid literal for int\(\) with base 10: 'abc' \(--config.train.steps=abc\)",
    ),
    (flag_errors_name_the_flag, r"^error: config file not found \(--config=configs/nope.py\)"),
    (
        main_with_indivisible_batch,
        r"^error: global batch 12 is not divisible by the data-parallel "
        r"size 8 \(mesh data 8 x fsdp 1 on 8 devices\) \(config.train.batch_size\): use a "
        r"multiple of 8$",
    ),
    (
        tool_with_a_missing_caption_file,
        r"^error: caption file .*nope.json " r"does not exist",
    ),
]


@pytest.mark.parametrize(
    "case, expected",
    CASES + DATA_CASES + FAULT_CASES + COMMAND_CASES,
    ids=[c.__name__ for c, _ in CASES + DATA_CASES + FAULT_CASES + COMMAND_CASES],
)
def test_fault(case, expected, tmp_path, capsys):
  kwargs = {"capsys": capsys} if "capsys" in case.__code__.co_varnames else {}
  message = case(tmp_path, **kwargs)
  assert re.search(expected, message), message
  assert "\n" not in errors.one_line(Exception(message))


def test_a_dead_converter_worker_ends_the_job_even_if_the_others_ignore_sigterm(
    tmp_path, monkeypatch
):
  """When a worker dies, Python's executor stops the others with SIGTERM and then joins them; a
  worker that SIGTERM does not end (one started while the pool broke, and so never sent it;
  here, stuck workers that ignore it) must not keep the converter waiting forever."""
  import multiprocessing

  from support import converter_faults

  monkeypatch.setattr(howto100m, "_init_worker", converter_faults.init_ignoring_sigterm)
  root = howto_layout(tmp_path)
  outcome = {}

  def convert_with_two_workers():
    try:
      convert(root, workers=2)
    except Exception as e:  # noqa: BLE001  (checked in the test's thread)
      outcome["error"] = e

  def ignores_sigterm(pid):
    try:
      with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        ignored = next(line for line in f if line.startswith("SigIgn:")).split()[1]
    except OSError:
      return False
    return bool(int(ignored, 16) >> (signal.SIGTERM - 1) & 1)

  job = threading.Thread(target=convert_with_two_workers, daemon=True)
  job.start()
  deadline = time.monotonic() + 60
  workers = []
  while time.monotonic() < deadline:  # until both workers are starting, deaf to SIGTERM
    workers = multiprocessing.active_children()
    if len(workers) == 2 and all(ignores_sigterm(w.pid) for w in workers):
      break
    time.sleep(0.01)
  assert len(workers) == 2, workers
  os.kill(workers[0].pid, signal.SIGKILL)
  job.join(120)
  assert not job.is_alive(), "the converter is still waiting for its workers after 120 s"
  assert isinstance(outcome.get("error"), howto100m.WorkerDiedError), outcome
  assert re.search(
      r"a converter worker died .* before shard\(s\) howto100m-", str(outcome["error"])
  )
  assert not multiprocessing.active_children()


def test_conversions_recorded_before_input_fingerprints_are_still_accepted(tmp_path):
  """Data converted before input files were fingerprinted is reused, not refused."""
  shards.write_json_atomic(str(tmp_path / "x-conversion.json"), {"pairing": "all"})
  shards.check_settings(str(tmp_path), "x-conversion", {"pairing": "all", "input_files": {"a": 1}})
  with pytest.raises(ValueError, match="other settings.*pairing"):
    shards.check_settings(str(tmp_path), "x-conversion", {"pairing": "reference"})
