"""Sharded TFRecord output shared by the data converters: names, atomic writes, progress.

A shard is written under a temporary name and renamed into place only when complete, then a
marker (JSON with the shard's statistics) is written beside the work files. A converter that is
interrupted and started again keeps every shard with a marker and redoes the others; readers
never see a partial shard because the glob pattern matches final names only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
from typing import IO, TYPE_CHECKING, Callable, Iterable, Iterator

from vidlankd_jax import errors

if TYPE_CHECKING:
  import tensorflow as tf  # imported where records are written: the helpers below need no TF

WORK_DIR = "_work"

# Pretraining task -> (sub-folder of data_dir, shard file prefix): where the converters write it.
PRETRAINING_TASK_FILES = {
    "howto100m_video_text": ("howto100m", "howto100m"),
    "wiki103_mlm": ("wiki103", "wiki103"),
    "wikipedia_mlm": ("wikipedia", "wikipedia"),
}


def text_summary_path(data_dir: str, task_name: str, split: str = "train") -> str:
  """The summary JSON tools/make_text_tfrecords.py writes beside a text task's shards."""
  folder, prefix = PRETRAINING_TASK_FILES[task_name]
  return os.path.join(data_dir, folder, f"{prefix}-{split}-summary.json")


def read_text_summary(data_dir: str, task_name: str, split: str = "train") -> dict | None:
  """A text split's conversion summary (`blocks`: its examples), or None when there is none.
  Local paths and gs:// alike, without TensorFlow."""
  from etils import epath

  path = epath.Path(text_summary_path(data_dir, task_name, split))
  return json.loads(path.read_text()) if path.exists() else None


def shard_name(prefix: str, split: str, index: int, num_shards: int) -> str:
  """`{prefix}-{split}.tfrecord-00003-of-00064`."""
  return f"{prefix}-{split}.tfrecord-{index:05d}-of-{num_shards:05d}"


def shard_pattern(prefix: str, split: str) -> str:
  """Glob of the finished shards of one split (never temporary files)."""
  return f"{prefix}-{split}.tfrecord-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]"


def work_dir(output_dir: str) -> str:
  return os.path.join(output_dir, WORK_DIR)


def marker_path(output_dir: str, name: str) -> str:
  return os.path.join(work_dir(output_dir), name + ".done.json")


def read_marker(output_dir: str, name: str) -> dict | None:
  """The statistics of a finished shard, or None if it must be (re)written."""
  path = marker_path(output_dir, name)
  if not (os.path.exists(path) and os.path.exists(os.path.join(output_dir, name))):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def remove_temporaries(output_dir: str) -> None:
  """Deletes temporary shards left by a killed run (never finished shards or markers)."""
  directory = work_dir(output_dir)
  if os.path.isdir(directory):
    for name in os.listdir(directory):
      if ".tmp" in name and not name.endswith(".done.json"):
        os.remove(os.path.join(directory, name))


# Settings that conversions made before they existed did not record: not compared for those.
RECORDED_SINCE = ("input_files",)


def check_settings(output_dir: str, name: str, settings: dict) -> None:
  """Records the settings of a conversion in `name`.json, or refuses to continue one made
  with other settings (its finished shards would silently mix with new ones)."""
  path = os.path.join(output_dir, name + ".json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      previous = json.load(f)
    diff = {
        k: (previous.get(k), v)
        for k, v in settings.items()
        if previous.get(k) != v and (k in previous or k not in RECORDED_SINCE)
    }
    if diff:
      raise errors.DataError(
          f"{output_dir} holds shards converted with other settings "
          f"(setting: (before, now)) {diff}; use a new output directory."
      )
  else:
    os.makedirs(output_dir, exist_ok=True)
    write_json_atomic(path, settings)


def input_fingerprint(paths: Iterable[str]) -> dict:
  """Size and modification time of each input file: recorded with the settings, so a caption
  file or corpus edited in place is noticed instead of its old shards being reused."""
  out = {}
  for path in paths:
    stat = os.stat(path)
    out[os.path.abspath(path)] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
  return out


@contextlib.contextmanager
def output_lock(output_dir: str, name: str = ".lock", job: str = "converter") -> Iterator[None]:
  """Holds `<output_dir>/<name>` (an advisory `flock`, freed by the OS if the process dies): a
  second `job` on the same output folder is refused instead of writing doubled output (`name`
  per host lets the hosts of one job share a folder)."""
  import fcntl

  os.makedirs(output_dir, exist_ok=True)
  path = os.path.join(output_dir, name)
  with open(path, "a+", encoding="utf-8") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      holder = f.read().strip() or "unknown"
      raise errors.DataError(
          f"another {job} (pid {holder}) is writing to {output_dir}: wait for it to finish "
          "or use another output directory"
      ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", tag: str | None = None) -> Iterator[IO]:
  """Opens a temporary file beside `path` (`{path}.tmp{tag}`, tag: the process id by default)
  for writing; when the block ends it is synced and renamed onto `path`, and when the block
  raises it is deleted: `path` only ever holds a complete file."""
  tmp = f"{path}.tmp{os.getpid() if tag is None else tag}"
  try:
    with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:  # a full disk: numpy says "4096 requested and 4032 written", no file
    if isinstance(e, errors.UserError) or (e.filename and e.errno != errno.ENOSPC):
      raise
    raise errors.storage_error(e, path) from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json_atomic(path: str, obj) -> None:
  with atomic_open(path) as f:
    json.dump(obj, f, indent=1, sort_keys=True)


class ShardWriter:
  """Writes one shard to a temporary file; `commit` renames it and records its marker.

  Used as a context manager: leaving the block by an exception deletes the temporary file,
  so an error never leaves a partial shard or touches shards already written.
  """

  def __init__(self, output_dir: str, name: str):
    self.output_dir = output_dir
    self.name = name
    os.makedirs(work_dir(output_dir), exist_ok=True)
    self._tmp = os.path.join(work_dir(output_dir), f"{name}.tmp{os.getpid()}")
    self._writer: tf.io.TFRecordWriter | None = None
    self.num_records = 0

  def __enter__(self) -> "ShardWriter":
    import tensorflow as tf

    self._writer = tf.io.TFRecordWriter(self._tmp)
    return self

  def write(self, record: bytes) -> None:
    self._writer.write(record)
    self.num_records += 1

  def commit(self, stats: dict) -> None:
    """Moves the finished shard into place, then writes its marker with `stats` (plus the
    shard's record count, which readers use to resume mid-epoch without counting)."""
    self._writer.close()
    self._writer = None
    os.replace(self._tmp, os.path.join(self.output_dir, self.name))
    write_json_atomic(
        marker_path(self.output_dir, self.name), {**stats, "records": self.num_records}
    )

  def __exit__(self, exc_type, exc, tb) -> None:
    if self._writer is not None:
      self._writer.close()
    if os.path.exists(self._tmp):
      os.remove(self._tmp)


def format_seconds(seconds: float) -> str:
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """Prints one line per `interval` seconds: done/total, rate and ETA."""

  def __init__(
      self,
      name: str,
      total: float | None,
      unit: str,
      interval: float = 30.0,
      stream=None,
      clock: Callable[[], float] = time.monotonic,
  ):
    self.name, self.total, self.unit, self.interval = name, total, unit, interval
    self.stream = stream or sys.stderr
    self._clock = clock
    self._start = self._last = clock()
    self.done = 0.0

  @staticmethod
  def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.2f}".rstrip("0").rstrip(".")

  def line(self) -> str:
    elapsed = max(self._clock() - self._start, 1e-9)
    rate = self.done / elapsed
    text = f"[{self.name}] {self._num(self.done)}"
    if self.total:
      pct = 100.0 * self.done / self.total
      eta = (self.total - self.done) / rate if rate > 0 else float("inf")
      eta_text = format_seconds(eta) if eta != float("inf") else "?"
      text += (
          f"/{self._num(self.total)} {self.unit} ({pct:.1f}%), "
          f"{self._num(rate)} {self.unit}/s, ETA {eta_text}"
      )
    else:
      text += f" {self.unit}, {self._num(rate)} {self.unit}/s"
    return text + f", elapsed {format_seconds(elapsed)}"

  def set(self, done: float, extra: str = "") -> None:
    """Records progress and prints a line if the interval has passed."""
    self.done = done
    now = self._clock()
    if now - self._last >= self.interval:
      self._last = now
      print(self.line() + (f", {extra}" if extra else ""), file=self.stream, flush=True)

  def finish(self, extra: str = "") -> None:
    print(self.line() + (f", {extra}" if extra else "") + " (done)", file=self.stream, flush=True)


def merge_counts(dicts: Iterable[dict]) -> dict:
  """Sums numeric values key by key, recursing into nested dicts."""
  total: dict = {}
  for d in dicts:
    for key, value in d.items():
      if isinstance(value, dict):
        total[key] = merge_counts([total.get(key, {}), value])
      elif isinstance(value, (int, float)) and not isinstance(value, bool):
        total[key] = total.get(key, 0) + value
  return total
