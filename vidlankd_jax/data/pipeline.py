"""The host side of every stage's input: which files, which shard, which batch comes next.

Each process reads its own shard of the global batch (chosen from the rows its devices hold,
`sharding.host_data_shard`) as numpy arrays; `sharding.global_batch` turns them into global
arrays. Pretraining stages read `InputSpec`s (derived once from a config by `input_spec`);
fine-tuning reads registered downstream benchmarks. TensorFlow is imported only when data is read.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from typing import Iterator

import jax
import numpy as np

from vidlankd_jax import errors
from vidlankd_jax import sharding


def resolve_vocab(data_cfg, model_vocab_size: int) -> str:
  """The vocabulary file `data_cfg.vocab_file` names (default: bert-base-uncased), checked
  against the model's embedding table."""
  from vidlankd_jax.data import vocab as vocab_lib

  path = data_cfg.vocab_file or vocab_lib.default_vocab_file()
  size = len(vocab_lib.read_vocab_file(path))
  if size > model_vocab_size:
    raise errors.DataError(
        f"vocabulary {path} has {size} entries but config.model.vocab_size is "
        f"{model_vocab_size}: set --config.model.vocab_size={size}"
    )
  return path


def example_text_batch(
    batch_size: int, seq_len: int, max_predictions: int, *, example_id: bool = False
) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes and dtypes of a global MLM batch as the device receives it (`tasks`'s text
  features, without loading TensorFlow): what ahead-of-time compilation lowers a step with."""
  tokens = jax.ShapeDtypeStruct((batch_size, seq_len), np.int32)
  positions = jax.ShapeDtypeStruct((batch_size, max_predictions), np.int32)
  batch = {
      "input_ids": tokens,
      "attention_mask": tokens,
      "token_type_ids": tokens,
      "unmasked_ids": tokens,
      "mlm_positions": positions,
      "mlm_targets": positions,
      "mlm_weights": jax.ShapeDtypeStruct((batch_size, max_predictions), np.float32),
  }
  if example_id:
    batch["example_id"] = jax.ShapeDtypeStruct((batch_size,), np.int32)
  return batch


def input_spec(data_cfg, vocab_file: str, video_cfg=None, **overrides):
  """The `InputSpec` of a pretraining stage: `data_cfg`'s text settings and, for video-text,
  the video shape of the tower that reads it (`video_cfg.max_steps`, `video_cfg.input_dim`)."""
  from vidlankd_jax.data import tasks

  fields = dict(
      task=data_cfg.task,
      data_dir=data_cfg.data_dir,
      vocab_file=vocab_file,
      lower_case=bool(data_cfg.lower_case),
      seq_len=int(data_cfg.seq_len),
      max_predictions=int(data_cfg.max_predictions),
      mask_prob=float(data_cfg.mask_prob),
      masking=str(data_cfg.masking),
      shuffle_buffer=int(data_cfg.shuffle_buffer),
  )
  if video_cfg is not None:
    fields.update(video_steps=int(video_cfg.max_steps), video_dim=int(video_cfg.input_dim))
    fields.update(video_bucket=int(data_cfg.get("video_bucket", 0)))
  fields.update(overrides)
  return tasks.InputSpec(**fields)


def host_batches(
    spec,
    mesh,
    split: str,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    repeat: bool = True,
    shuffle: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
  """This host's rows of each global batch of `spec.task` (numpy).

  Training (`repeat`) is an endless stream that starts at exactly the batch `start_step` reads;
  evaluation is one pass, every host yielding the same number of batches (`in_lockstep`).
  """
  from vidlankd_jax.data import tasks  # deferred: TensorFlow is only needed once data is read

  shard_index, num_shards = sharding.host_data_shard(mesh, global_batch_size)
  ds = tasks.make_dataset(
      spec,
      split,
      batch_size=global_batch_size // num_shards,
      shard_index=shard_index,
      num_shards=num_shards,
      seed=seed,
      start_step=start_step,
      repeat=repeat,
      shuffle=shuffle,
  )
  batches = ds.as_numpy_iterator()
  if not (repeat or jax.process_count() == 1):
    batches = in_lockstep(batches)
  if spec.video_bucket:
    # Every process opens its streams in the same order: the same name for the same stream.
    name = f"{spec.task}/{split}/{next(_STREAMS)}"
    batches = trim_video_padding(batches, spec.video_bucket, name=name)
  return batches


def eval_batches(spec, mesh, config) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over the validation split in `config.eval.batch_size` global batches."""
  return host_batches(
      spec,
      mesh,
      "validation",
      global_batch_size=config.eval.batch_size,
      seed=config.seed,
      repeat=False,
      shuffle=False,
  )


_STREAMS = itertools.count()


def trim_video_padding(batches, bucket: int, *, name: str):
  """Cuts each batch's video arrays to its longest clip rounded up to a multiple of `bucket`
  steps (the same on every host): no padding beyond that is transferred or computed.

  A step's shapes are one of at most max_steps / bucket, each compiled once. With several
  processes the length is agreed through the coordination service (host-side, ahead of the
  step, from the prefetch thread).
  """
  for index, batch in enumerate(batches):
    if "video_mask" not in batch:
      yield batch
      continue
    max_steps = batch["video_mask"].shape[1]
    longest = int(batch["video_mask"].sum(axis=1).max(initial=0))
    steps = sharding.agreed_maximum(
        f"vidlankd/video_steps/{name}/{index}",
        min(max_steps, max(bucket, -(-longest // bucket) * bucket)),
        forget=f"vidlankd/video_steps/{name}/{index - 16}" if index >= 16 else None,
    )
    yield dict(
        batch,
        video_features=batch["video_features"][:, :steps],
        video_mask=batch["video_mask"][:, :steps],
    )


def in_lockstep(batches):
  """One pass over each host's shard, the same number of batches on every host.

  Hosts' shards of a split may differ by a batch; each jitted step is a collective that every
  process must join, so a host whose shard is done yields all-zero batches (`valid` = 0:
  padding to evaluation) until every host's is done.
  """
  from jax.experimental import multihost_utils

  last = None
  while True:
    batch = next(batches, None)
    more = multihost_utils.process_allgather(np.asarray(batch is not None))
    if not np.any(more):
      return
    if batch is None and last is None:
      raise errors.DataError(
          f"process {jax.process_index()} has no data in its shard of this split"
      )
    last = batch if batch is not None else last
    yield batch if batch is not None else jax.tree.map(np.zeros_like, last)


def downstream_batches(
    task_name: str,
    split: str,
    mesh,
    *,
    global_batch_size: int,
    seq_len: int,
    seed: int,
    shuffle_buffer: int,
    start_step: int = 0,
    features: tuple[str, ...] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """This host's rows of the endless, shuffled training stream of a registered benchmark.

  The order is a function of `seed`; `start_step` skips the batches a run stopped at that step
  has already trained on, so a resumed fine-tuning run reads what an uninterrupted one would.
  `features` keeps only those arrays (strings and bookkeeping stay behind).
  """
  import seqio

  from vidlankd_jax.data import downstream

  shard_index, num_shards = sharding.host_data_shard(mesh, global_batch_size)
  ds = downstream.get_downstream_dataset(
      task_name,
      split,
      batch_size=global_batch_size // num_shards,
      seq_len=seq_len,
      shuffle=True,
      seed=seed,
      repeat=True,
      shuffle_buffer_size=shuffle_buffer,
      shard_info=seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None,
  )
  if features is not None:
    ds = ds.map(lambda batch: {k: batch[k] for k in features})
  return ds.skip(start_step).as_numpy_iterator()


def prepare_synthetic_video_text(data_cfg, video_cfg) -> None:
  """Generates and converts the GENERATED video-text corpus (`data=synthetic` configs) once,
  on process 0; the other processes wait for it."""
  if jax.process_index() == 0:
    from vidlankd_jax.data import synthetic

    try:
      synthetic.prepare_video_text(
          data_cfg.data_dir, word_budget=data_cfg.seq_len // 2, max_steps=video_cfg.max_steps
      )
    except errors.DataError as e:  # the generated data of another size or sequence length
      raise errors.ConfigError(
          errors.one_line(e),
          "config.data.data_dir",
          f"the folder ({os.path.abspath(data_cfg.data_dir)}, relative to the current folder) "
          "holds data=synthetic data of other settings: set --config.data.data_dir=<new folder>",
      ) from e
  sharding.wait_for_all_processes("synthetic video-text data")


class InputTimeoutError(errors.UserError, TimeoutError):
  """No batch came within `config.train.input_timeout_s`: stuck input or unreachable storage."""


class InputWaitInterrupted(Exception):
  """The wait for the next batch ended early on request (SIGTERM): no step is running."""


class DevicePrefetch:
  """Global batches assembled and sent to the devices by a background thread, `size` ahead of
  the step that reads them, so the host never makes a step wait for its input.

  Errors of the host pipeline are raised by `next` in the caller's thread; `close` stops the
  thread (it exits on its own too: it is a daemon and never holds the interpreter open). Every
  wait for a batch is bounded: `interrupted()` (e.g. a SIGTERM flag) is polled while waiting
  and ends it with `InputWaitInterrupted`; no batch within `timeout_s` is a `TimeoutError`.
  """

  _END = object()
  _POLL_S = 0.2

  def __init__(
      self,
      host_batches: Iterator[dict],
      mesh,
      size: int = 2,
      *,
      timeout_s: float = 0.0,
      interrupted=None,
  ):
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._timeout_s = float(timeout_s)
    self._interrupted = interrupted or (lambda: False)
    self._thread = threading.Thread(
        target=self._fill, args=(host_batches, mesh), name="device-prefetch", daemon=True
    )
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=self._POLL_S)
        return True
      except queue.Full:
        continue
    return False

  def _fill(self, host_batches, mesh) -> None:
    try:
      for batch in host_batches:
        if not self._put(sharding.global_batch(batch, mesh)):
          return
    except BaseException as error:  # handed to the reader, raised in its thread
      self._put(error)
      return
    self._put(self._END)

  def __iter__(self):
    return self

  def _get(self):
    started = time.monotonic()
    while True:
      try:
        return self._queue.get(timeout=self._POLL_S)
      except queue.Empty:
        if self._interrupted():
          raise InputWaitInterrupted("stopped on request while waiting for the next batch")
        waited = time.monotonic() - started
        if self._timeout_s > 0 and waited > self._timeout_s:
          raise InputTimeoutError(
              f"no training batch within {waited:.0f} s (config.train.input_timeout_s="
              f"{self._timeout_s:g}): the input pipeline is stuck or its storage is unreachable"
          )

  def __next__(self) -> dict:
    item = self._get()
    if item is self._END:
      self._put(self._END)  # every later call ends too
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self) -> None:
    self._stop.set()
    while not self._queue.empty():
      self._queue.get_nowait()
