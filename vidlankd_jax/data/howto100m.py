"""HowTo100M captions + pre-extracted features -> video-text clip TFRecords.

Input (the HowTo100M release layout):
  caption.json     {video_id: {"start": [s...], "end": [s...], "text": [str...]}} (ASR segments)
  features_2d/     VID.npy  [T, 2048]            ResNet-152, one step per second
  features_3d/     VID.npy  [~ceil(1.5 T), 2048] ResNeXt-101, 16 frames at 24 fps (1.5 per s)

Per video, each stream is L2-normalised per time step (as the reference loader does before it
concatenates; an all-zero step stays zero; `l2_normalize=False` keeps the stored values).
Captions are cut into clips as the released loader does (VidLanKD `vteacher/data.py` lines
75-85): consecutive ASR segments joined with " . ", the budget counting the "." tokens, the
segment that reaches it included. The release's overlap removal never fires (it compares text
that ends in " . "); following its intent, `caption_overlap="remove"` drops the words a segment
repeats from the end of the previous one (ASR windows overlap), `"keep"` is the release as run.
A clip of seconds [start, end] reads the 2D steps floor(start)..ceil(end), both included, and as
many 3D steps chosen by linspace over that clip's own 3D span floor(1.5 start)..ceil(1.5 end)
(the release's `_load_indexed_video_feature_untied`, lines 127-158); the 2D and 3D halves are
concatenated: [steps, 4096] at 1 step per second. Spans longer than `max_steps` are uniformly
subsampled to `max_steps`. Pairing `reference` keeps each video's opening clip only (the
released code); `all` keeps every window.

The validation split is the `num_validation_videos` videos with the smallest salted hash of
their id: deterministic, independent of file order, and stable when videos are added.

Conversion runs in three stages, all streaming with bounded memory: (1) choose validation videos,
(2) route each caption entry to its output shard's work file, (3) convert shards in parallel,
each written under a temporary name and renamed when complete; a marker per finished shard lets
an interrupted run resume. Bad input stops the run with an error naming the video and the file,
or, with `skip_bad`, skips the video and counts the reason in the summary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import io
import json
import math
import multiprocessing
from concurrent import futures
import os
import re
import time
from typing import Any, Iterator, Sequence

import numpy as np

from vidlankd_jax import errors
from vidlankd_jax.data import shards as shards_lib
from vidlankd_jax.data import video_text

PREFIX = "howto100m"
SPLITS = ("train", "validation")
PAIRINGS = ("reference", "all")
CAPTION_OVERLAPS = ("remove", "keep")
# Between joined ASR segments, as the released loader (`sent += text + ' . '`).
SEGMENT_SEPARATOR = "."
FEATURES_3D_PER_SECOND = 24.0 / 16.0

# Reasons a video is rejected (keys of the summary's "skipped" counts).
BAD_REASONS = (
    "malformed_captions",
    "non_text_caption",
    "empty_captions",
    "bad_caption_times",
    "caption_past_video_end",
    "missing_features",
    "unreadable_features",
    "wrong_feature_shape",
    "nonfinite_features",
    "misaligned_3d_features",
)


class BadInputError(errors.DataError):
  """A video whose captions or features cannot make a correct record."""

  def __init__(self, reason: str, video_id: str, path: str, detail: str):
    assert reason in BAD_REASONS, reason
    self.reason, self.video_id, self.path, self.detail = reason, video_id, path, detail
    super().__init__(f"video {video_id!r} ({path}): {reason}: {detail}")

  def __reduce__(self):  # keeps the fields when raised in a worker process
    return (BadInputError, (self.reason, self.video_id, self.path, self.detail))


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
  """Settings of one conversion; the output-affecting ones are recorded beside the shards."""

  caption_json: str
  features_2d_dir: str
  features_3d_dir: str
  output_dir: str
  pairing: str = "reference"
  word_budget: int = 126
  # "remove": a segment's words that repeat the end of the previous one are dropped (the
  # release's intent); "keep": kept, as the released loader's check never fires.
  caption_overlap: str = "remove"
  max_steps: int = 384
  num_validation_videos: int = 10_000
  train_shards: int = 64
  validation_shards: int = 4
  dim_2d: int = 2048
  dim_3d: int = 2048
  # Seconds a caption may run past the last feature step (ASR times overshoot slightly).
  time_tolerance: float = 2.0
  # Allowed |len(3D) - 1.5 T| as a fraction of 1.5 T (plus 2 steps) before 3D is misaligned.
  max_3d_length_mismatch: float = 0.1
  hash_salt: str = "howto100m"
  # Divide each stream's step by its L2 norm before concatenating (the reference loader's rule;
  # the HowTo100M extractor's own default output is already unit-norm, so this changes nothing
  # there but makes other extractors' features comparable).
  l2_normalize: bool = True
  skip_bad: bool = False
  workers: int = 1
  progress_interval: float = 30.0

  def __post_init__(self):
    if self.pairing not in PAIRINGS:
      raise errors.DataError(f"pairing must be one of {PAIRINGS}, got {self.pairing!r}.")
    if self.caption_overlap not in CAPTION_OVERLAPS:
      raise errors.DataError(
          f"caption_overlap must be one of {CAPTION_OVERLAPS}, got {self.caption_overlap!r}."
      )
    for field in (
        "word_budget",
        "max_steps",
        "train_shards",
        "validation_shards",
        "dim_2d",
        "dim_3d",
        "workers",
    ):
      if getattr(self, field) <= 0:
        raise errors.DataError(f"{field} must be positive, got {getattr(self, field)}.")
    if self.num_validation_videos < 0:
      raise errors.DataError("num_validation_videos must be >= 0.")

  def num_shards(self, split: str) -> int:
    return self.train_shards if split == "train" else self.validation_shards

  def fingerprint(self) -> dict:
    """The settings that determine the output's content."""
    keep = (
        "caption_json",
        "features_2d_dir",
        "features_3d_dir",
        "pairing",
        "word_budget",
        "caption_overlap",
        "max_steps",
        "num_validation_videos",
        "train_shards",
        "validation_shards",
        "dim_2d",
        "dim_3d",
        "time_tolerance",
        "max_3d_length_mismatch",
        "hash_salt",
        "l2_normalize",
    )
    d = {k: getattr(self, k) for k in keep}
    for k in ("caption_json", "features_2d_dir", "features_3d_dir"):
      d[k] = os.path.abspath(d[k])
    return d


# ------------------------------------------------------------------------------------------
# Streaming JSON


def iter_json_object(
    path: str, chunk_chars: int = 1 << 20, max_value_chars: int = 256 << 20
) -> Iterator[tuple[str, Any]]:
  """Yields the (key, value) pairs of a top-level JSON object without loading the file."""
  decoder = json.JSONDecoder()
  ws = re.compile(r"[ \t\n\r]*")
  try:
    raw = open(path, "rb")
  except OSError as e:
    raise errors.DataError(f"{path}: cannot open the caption file ({e}).") from e
  with raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
    buf, pos, consumed, eof = "", 0, 0, False

    def fill() -> None:
      nonlocal buf, pos, consumed, eof
      chunk = f.read(chunk_chars)
      eof = not chunk
      consumed += pos
      buf, pos = buf[pos:] + chunk, 0

    def error(msg: str) -> ValueError:
      if consumed + pos == 0 and buf.startswith("\ufeff"):
        msg = "the file starts with a byte-order mark (BOM): save it as UTF-8 without a BOM"
      return errors.DataError(f"{path}: invalid JSON at character {consumed + pos}: {msg}")

    def peek() -> str:
      nonlocal pos
      while True:
        pos = ws.match(buf, pos).end()
        if pos < len(buf):
          return buf[pos]
        if eof:
          return ""
        fill()

    def value() -> Any:
      nonlocal pos
      while True:
        try:
          obj, end = decoder.raw_decode(buf, pos)
          if end < len(buf) or eof:  # a number at the buffer end may continue
            pos = end
            return obj
        except json.JSONDecodeError as e:
          if eof or len(buf) - pos > max_value_chars:
            raise error(e.msg) from None
        fill()

    try:
      if peek() != "{":
        raise error("the caption file must hold one JSON object {video_id: {...}}")
      pos += 1
      if peek() == "}":
        pos += 1
        if peek():
          raise error("more data after the caption object's closing '}' (one object only)")
        return
      while True:
        if peek() != '"':
          raise error("expected a video id string")
        key = value()
        if peek() != ":":
          raise error(f"expected ':' after key {key!r}")
        pos += 1
        peek()
        yield key, value()
        c = peek()
        if c == "}":
          pos += 1
          if peek():
            raise error("more data after the caption object's closing '}' (one object only)")
          return
        if c != ",":
          raise error("expected ',' or '}'")
        pos += 1
    except UnicodeDecodeError as e:
      raise errors.DataError(f"{path}: not UTF-8 ({e}).") from None


# ------------------------------------------------------------------------------------------
# Captions


@dataclasses.dataclass(frozen=True)
class Segment:
  start: float
  end: float
  words: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Window:
  """Consecutive segments [first, last] joined into one caption."""

  start: float
  end: float
  text: str
  first: int
  last: int


def _is_unicode(text: str) -> bool:
  """False for strings holding lone surrogates (JSON "\\ud800" escapes): no UTF-8 form."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def parse_segments(video_id: str, entry: Any, caption_path: str) -> tuple[list[Segment], int]:
  """Validates one caption entry; returns its non-blank segments by start time and the number
  of blank segments dropped."""

  def bad(reason: str, detail: str) -> BadInputError:
    return BadInputError(reason, video_id, caption_path, detail)

  if not _is_unicode(video_id):
    raise bad("malformed_captions", "the video id is not valid Unicode")
  if not video_id or "/" in video_id or "\\" in video_id or video_id in (".", ".."):
    raise bad("malformed_captions", "the video id is not a plain file name")
  if not isinstance(entry, dict) or not all(k in entry for k in ("start", "end", "text")):
    raise bad("malformed_captions", 'expected {"start": [...], "end": [...], "text": [...]}')
  starts, ends, texts = entry["start"], entry["end"], entry["text"]
  if not all(isinstance(x, list) for x in (starts, ends, texts)):
    raise bad("malformed_captions", "start, end and text must be lists")
  if not len(starts) == len(ends) == len(texts):
    raise bad(
        "malformed_captions",
        f"start/end/text lengths differ: {len(starts)}/{len(ends)}/{len(texts)}",
    )
  segments, blank = [], 0
  for i, (s, e, t) in enumerate(zip(starts, ends, texts)):
    if not isinstance(t, str):
      raise bad("non_text_caption", f"segment {i} text is {type(t).__name__}: {t!r:.60}")
    if not _is_unicode(t):
      raise bad("non_text_caption", f"segment {i} text is not valid Unicode: {t!r:.60}")
    ok_num = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (s, e))
    if not ok_num or not (math.isfinite(s) and math.isfinite(e)) or s < 0 or e < s:
      raise bad("bad_caption_times", f"segment {i} has start={s!r} end={e!r}")
    words = tuple(t.split())
    if not words:
      blank += 1
      continue
    segments.append(Segment(float(s), float(e), words))
  if not segments:
    raise bad("empty_captions", f"no caption text in {len(texts)} segments")
  segments.sort(key=lambda seg: seg.start)
  return segments, blank


def remove_overlap(previous: Sequence[str], following: Sequence[str]) -> list[str]:
  """`following` without its longest prefix that repeats a suffix of `previous` (ASR segments
  overlap in time, so a segment often starts with the last words of the one before)."""
  prev = [w.casefold() for w in previous]
  nxt = [w.casefold() for w in following]
  for k in range(min(len(prev), len(nxt)), 0, -1):
    if prev[-k:] == nxt[:k]:
      return list(following[k:])
  return list(following)


def join_segments(
    segments: Sequence[Segment], word_budget: int, pairing: str, overlap: str = "remove"
) -> list[Window]:
  """Cuts segments into windows as the released loader (`vteacher/data.py` lines 75-85): each
  segment followed by ".", until the budget is reached (the segment that reaches it included).
  The release counts `sent.split(' ')` of text ending in " . ": words, periods and the empty
  string after the last space, so a window closes at `word_budget - 1` words and periods.
  `overlap="remove"` drops a segment's words that repeat the end of the previous one (a segment
  left empty adds no period); `reference` pairing keeps the first window only."""
  windows = []
  i = 0
  while i < len(segments):
    tokens, j = [], i
    while True:
      words = segments[j].words
      if j > i and overlap == "remove":
        words = remove_overlap(segments[j - 1].words, words)
      if words:
        tokens += [*words, SEGMENT_SEPARATOR]
      if len(tokens) + 1 >= word_budget or j + 1 == len(segments):
        break
      j += 1
    windows.append(Window(segments[i].start, segments[j].end, " ".join(tokens), i, j))
    if pairing == "reference":
      break
    i = j + 1
  return windows


# ------------------------------------------------------------------------------------------
# Features


def feature_paths(cfg: ConvertConfig, video_id: str) -> tuple[str, str]:
  return (
      os.path.join(cfg.features_2d_dir, video_id + ".npy"),
      os.path.join(cfg.features_3d_dir, video_id + ".npy"),
  )


def check_npy_size(path: str) -> None:
  """ValueError unless the .npy header's shape and dtype fit in the file: a damaged header
  claiming terabytes must not be allocated before it is found wrong."""
  with open(path, "rb") as f:
    version = np.lib.format.read_magic(f)
    read_header = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }.get(version)
    if read_header is None:
      return  # np.load reports other versions itself
    shape, _, dtype = read_header(f, max_header_size=1 << 20)
    data_bytes = math.prod(shape) * dtype.itemsize
    available = os.path.getsize(path) - f.tell()
  if not dtype.hasobject and data_bytes > available:
    raise errors.DataError(
        f"the header claims shape {shape} of {dtype} ({data_bytes} bytes) but the file holds "
        f"{available} bytes of data (truncated or a damaged header)"
    )


def load_feature_file(video_id: str, path: str, dim: int) -> np.ndarray:
  """Loads one [steps, dim] feature file, rejecting missing, unreadable, misshapen or
  non-finite data."""
  if not os.path.isfile(path):
    raise BadInputError("missing_features", video_id, path, "no feature file")
  try:
    check_npy_size(path)
    array = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, MemoryError) as e:
    raise BadInputError("unreadable_features", video_id, path, str(e)) from None
  if isinstance(array, np.ndarray) and np.issubdtype(array.dtype, np.complexfloating):
    raise BadInputError(
        "unreadable_features", video_id, path, f"complex values (dtype {array.dtype})"
    )
  if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.number):
    raise BadInputError(
        "unreadable_features",
        video_id,
        path,
        f"not a numeric array (dtype {getattr(array, 'dtype', None)})",
    )
  if array.ndim != 2 or array.shape[1] != dim or array.shape[0] == 0:
    raise BadInputError(
        "wrong_feature_shape", video_id, path, f"shape {array.shape}, expected [steps>0, {dim}]"
    )
  if not np.isfinite(array).all():
    raise BadInputError("nonfinite_features", video_id, path, "NaN or inf values")
  return array


def l2_normalize_steps(features: np.ndarray) -> np.ndarray:
  """Each row (time step) divided by its L2 norm, in float32; all-zero rows stay zero."""
  features = np.asarray(features, np.float32)
  norms = np.linalg.norm(features, axis=-1, keepdims=True)
  return features / np.where(norms > 0, norms, 1.0)


def load_video_features(cfg: ConvertConfig, video_id: str) -> tuple[np.ndarray, np.ndarray]:
  """The 2D [T, dim_2d] (one step per second) and 3D [~1.5 T, dim_3d] streams as float16, each
  L2-normalised per step unless `cfg.l2_normalize` is off."""
  path_2d, path_3d = feature_paths(cfg, video_id)
  f2d = load_feature_file(video_id, path_2d, cfg.dim_2d)
  f3d = load_feature_file(video_id, path_3d, cfg.dim_3d)
  expected = FEATURES_3D_PER_SECOND * len(f2d)
  if abs(len(f3d) - expected) > cfg.max_3d_length_mismatch * expected + 2:
    raise BadInputError(
        "misaligned_3d_features",
        video_id,
        path_3d,
        f"{len(f3d)} 3D steps for {len(f2d)} 2D steps (expected about {expected:.0f})",
    )
  if cfg.l2_normalize:
    f2d, f3d = l2_normalize_steps(f2d), l2_normalize_steps(f3d)
  streams = []
  for path, stream in ((path_2d, f2d), (path_3d, f3d)):
    stream = np.asarray(stream).astype(np.float16)
    if not np.isfinite(stream).all():
      raise BadInputError("nonfinite_features", video_id, path, "values overflow float16")
    streams.append(stream)
  return streams[0], streams[1]


def _span(start: float, end: float, rate: float, num_steps: int) -> tuple[int, int]:
  """First and last (included) step of [start, end] at `rate` steps per second, clamped to the
  stream as the release clamps (first <= num_steps - 2, last <= num_steps - 1), and to 0."""
  first = max(0, min(int(math.floor(start * rate)), num_steps - 2))
  last = max(first, min(int(math.ceil(end * rate)), num_steps - 1))
  return first, last


def clip_step_indices(
    start: float, end: float, num_2d: int, num_3d: int, max_steps: int
) -> tuple[np.ndarray, np.ndarray]:
  """The 2D and 3D steps of the clip [start, end] (the release's
  `_load_indexed_video_feature_untied`): 2D steps floor(start)..ceil(end) both included, 3D
  steps by linspace over the clip's own 3D span as many as the 2D ones; both subsampled
  uniformly to `max_steps` when the 2D span is longer."""
  first_2d, last_2d = _span(start, end, 1.0, num_2d)
  first_3d, last_3d = _span(start, end, FEATURES_3D_PER_SECOND, num_3d)
  steps = last_2d - first_2d + 1
  if steps > max_steps:
    steps_2d = np.linspace(first_2d, last_2d, max_steps).astype(np.int64)
  else:
    steps_2d = np.arange(first_2d, last_2d + 1, dtype=np.int64)
  steps_3d = np.linspace(first_3d, last_3d, len(steps_2d)).astype(np.int64)
  return steps_2d, steps_3d


@dataclasses.dataclass(frozen=True)
class Clip:
  video_id: str
  start: float
  end: float
  caption: str
  features: np.ndarray  # float16 [steps, D]


def make_video_clips(cfg: ConvertConfig, video_id: str, entry: Any) -> tuple[list[Clip], dict]:
  """All clips of one video and counts about them; raises BadInputError on bad input."""
  segments, blank = parse_segments(video_id, entry, cfg.caption_json)
  f2d, f3d = load_video_features(cfg, video_id)
  duration = float(len(f2d))
  late = [s for s in segments if s.end > duration + cfg.time_tolerance]
  if late:
    raise BadInputError(
        "caption_past_video_end",
        video_id,
        cfg.caption_json,
        f"a segment ends at {late[0].end:.1f}s but the features cover {duration:.0f}s "
        f"({feature_paths(cfg, video_id)[0]})",
    )
  clips, subsampled = [], 0
  for window in join_segments(segments, cfg.word_budget, cfg.pairing, cfg.caption_overlap):
    steps_2d, steps_3d = clip_step_indices(
        window.start, window.end, len(f2d), len(f3d), cfg.max_steps
    )
    first, last = _span(window.start, window.end, 1.0, len(f2d))
    subsampled += int(last - first + 1 > cfg.max_steps)
    features = np.concatenate([f2d[steps_2d], f3d[steps_3d]], axis=-1)
    clips.append(Clip(video_id, window.start, window.end, window.text, features))
  return clips, {"blank_segments": blank, "subsampled_clips": subsampled}


# ------------------------------------------------------------------------------------------
# Splitting and routing


def _hash(salt: str, video_id: str) -> int:
  key = f"{salt}\0{video_id}".encode("utf-8", "surrogatepass")  # a bad id is reported later
  digest = hashlib.blake2b(key, digest_size=8).digest()
  return int.from_bytes(digest, "big")


def select_validation_videos(caption_json: str, num_videos: int, salt: str) -> set[str]:
  """The `num_videos` video ids with the smallest salted hash (a bounded heap, one pass)."""
  heap: list[tuple[int, str]] = []  # max-heap by negated hash
  for video_id, _ in iter_json_object(caption_json):
    item = (-_hash(salt + ":split", video_id), video_id)
    if len(heap) < num_videos:
      heapq.heappush(heap, item)
    elif num_videos and item > heap[0]:
      heapq.heapreplace(heap, item)
  return {video_id for _, video_id in heap}


def shard_of(video_id: str, num_shards: int, salt: str) -> int:
  return _hash(salt + ":shard", video_id) % num_shards


def _route_file(cfg: ConvertConfig, split: str, index: int) -> str:
  name = shards_lib.shard_name(PREFIX, split, index, cfg.num_shards(split))
  return os.path.join(shards_lib.work_dir(cfg.output_dir), name + ".captions.jsonl")


def route_captions(cfg: ConvertConfig, flush_every: int = 20_000) -> dict:
  """Writes each caption entry to its shard's JSON-lines work file; returns videos per shard.

  Finished routing is recorded in a marker, so a resumed run skips it.
  """
  marker = os.path.join(shards_lib.work_dir(cfg.output_dir), "routing.done.json")
  if os.path.exists(marker):
    with open(marker, encoding="utf-8") as f:
      return json.load(f)
  os.makedirs(shards_lib.work_dir(cfg.output_dir), exist_ok=True)
  validation = select_validation_videos(cfg.caption_json, cfg.num_validation_videos, cfg.hash_salt)
  counts = {split: [0] * cfg.num_shards(split) for split in SPLITS}
  for split in SPLITS:
    for index in range(cfg.num_shards(split)):
      open(_route_file(cfg, split, index), "w").close()
  pending: dict[tuple[str, int], list[str]] = {}

  def flush() -> None:
    for (split, index), lines in pending.items():
      with open(_route_file(cfg, split, index), "a", encoding="utf-8") as f:
        f.write("".join(lines))
    pending.clear()

  buffered, seen = 0, set()
  for video_id, entry in iter_json_object(cfg.caption_json):
    if video_id in seen:
      raise errors.DataError(
          f"{cfg.caption_json}: video id {video_id!r} appears twice; keep one entry per video"
      )
    seen.add(video_id)
    split = "validation" if video_id in validation else "train"
    index = shard_of(video_id, cfg.num_shards(split), cfg.hash_salt)
    # ASCII escapes: a lone surrogate survives routing and is reported (or skipped) by its video.
    line = json.dumps({"video_id": video_id, "entry": entry}) + "\n"
    pending.setdefault((split, index), []).append(line)
    counts[split][index] += 1
    buffered += 1
    if buffered >= flush_every:
      flush()
      buffered = 0
  flush()
  shards_lib.write_json_atomic(marker, counts)
  return counts


# ------------------------------------------------------------------------------------------
# Shard conversion

_progress_counter = None  # a shared multiprocessing.Value in worker processes


def _init_worker(counter) -> None:
  global _progress_counter
  _progress_counter = counter


def convert_shard(cfg: ConvertConfig, split: str, index: int) -> dict:
  """Converts one shard's videos; returns its statistics (also stored in its marker)."""
  import tensorflow as tf  # noqa: F401  (TFRecord writing; imported in worker processes)

  name = shards_lib.shard_name(PREFIX, split, index, cfg.num_shards(split))
  stats: dict = {
      "split": split,
      "videos": 0,
      "videos_written": 0,
      "clips": 0,
      "feature_steps": 0,
      "blank_segments": 0,
      "subsampled_clips": 0,
      "skipped": {},
      "skipped_examples": [],
  }
  with (
      shards_lib.ShardWriter(cfg.output_dir, name) as writer,
      open(_route_file(cfg, split, index), encoding="utf-8") as routed,
  ):
    for line in routed:
      item = json.loads(line)
      video_id = item["video_id"]
      stats["videos"] += 1
      try:
        clips, info = make_video_clips(cfg, video_id, item["entry"])
      except BadInputError as e:
        if not cfg.skip_bad:
          raise
        stats["skipped"][e.reason] = stats["skipped"].get(e.reason, 0) + 1
        if len(stats["skipped_examples"]) < 20:
          stats["skipped_examples"].append(str(e))
      else:
        for clip in clips:
          writer.write(
              video_text.clip_to_example(
                  clip.video_id, clip.start, clip.end, clip.caption, clip.features
              )
          )
          stats["feature_steps"] += len(clip.features)
        stats["clips"] += len(clips)
        stats["videos_written"] += 1
        stats["blank_segments"] += info["blank_segments"]
        stats["subsampled_clips"] += info["subsampled_clips"]
      if _progress_counter is not None:
        with _progress_counter.get_lock():
          _progress_counter.value += 1
    writer.commit(stats)
  return stats


def _convert_shard_task(args) -> dict:
  return convert_shard(*args)


class WorkerDiedError(errors.UserError, RuntimeError):
  """A converter worker process ended without finishing its shard (killed, out of memory)."""


def _convert_in_workers(cfg: ConvertConfig, tasks, progress, names) -> dict:
  """Shards converted by `cfg.workers` processes. A worker that dies fails the job at once,
  naming the shards left unfinished (a multiprocessing.Pool would wait for it forever)."""
  ctx = multiprocessing.get_context("spawn")
  counter = ctx.Value("q", 0)
  results = {}
  pool = futures.ProcessPoolExecutor(
      min(cfg.workers, len(tasks)), mp_context=ctx, initializer=_init_worker, initargs=(counter,)
  )
  try:
    running = {pool.submit(_convert_shard_task, task): task[1:] for task in tasks}
    while running:
      finished, _ = futures.wait(running, timeout=min(1.0, cfg.progress_interval))
      progress.set(counter.value)
      for future in finished:
        results[running.pop(future)] = future.result()
  except futures.process.BrokenProcessPool:
    _kill_workers(pool)
    left = sorted(names[task[1:]] for task in tasks if task[1:] not in results)
    raise WorkerDiedError(
        f"a converter worker died (killed or out of memory) before shard(s) "
        f"{', '.join(left)} were finished in {cfg.output_dir}: finished shards are kept; "
        "rerun the same command to convert the rest (fewer --workers if memory is short)"
    ) from None
  except BaseException:
    _kill_workers(pool)
    raise
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
  return results


def _kill_workers(pool: futures.ProcessPoolExecutor) -> None:
  """Kills the pool's live workers before it is shut down after a failure.

  Once a worker has died, the executor asks the others to stop (SIGTERM) and then joins every
  worker; one started while it was doing so is never asked, sits waiting for a task, and the
  join (and so the job) would wait for it forever.
  """
  for process in list((getattr(pool, "_processes", None) or {}).values()):
    if process.is_alive():
      process.kill()


def convert(cfg: ConvertConfig, log=print) -> dict:
  """Runs the whole conversion (resuming finished shards) and writes the summary JSON.

  The output folder is locked against a second converter; the settings and the caption file's
  size and time are recorded with the shards, and a rerun with either changed is refused.
  """
  for path in (cfg.features_2d_dir, cfg.features_3d_dir):
    if not os.path.isdir(path):
      raise errors.DataError(f"feature directory {path} does not exist.")
  if not os.path.isfile(cfg.caption_json):
    raise errors.DataError(f"caption file {cfg.caption_json} does not exist.")
  with shards_lib.output_lock(cfg.output_dir):
    return _convert_locked(cfg, log)


def _convert_locked(cfg: ConvertConfig, log) -> dict:
  settings = cfg.fingerprint() | {"input_files": shards_lib.input_fingerprint([cfg.caption_json])}
  shards_lib.check_settings(cfg.output_dir, f"{PREFIX}-conversion", settings)
  shards_lib.remove_temporaries(cfg.output_dir)
  all_shards = [(split, i) for split in SPLITS for i in range(cfg.num_shards(split))]
  names = {
      key: shards_lib.shard_name(PREFIX, key[0], key[1], cfg.num_shards(key[0]))
      for key in all_shards
  }
  done = {key: shards_lib.read_marker(cfg.output_dir, names[key]) for key in all_shards}
  pending = [key for key in all_shards if done[key] is None]
  log(f"[{PREFIX}] {len(all_shards) - len(pending)} of {len(all_shards)} shards already done")
  if pending:
    counts = route_captions(cfg)
    total = sum(counts[s][i] for s, i in pending)
    progress = shards_lib.Progress(PREFIX, total, "videos", cfg.progress_interval)
    tasks = [(cfg, split, index) for split, index in pending]
    if cfg.workers == 1:
      for task in tasks:
        done[task[1:]] = _convert_shard_task(task)
        progress.set(progress.done + done[task[1:]]["videos"])
    else:
      for key, stats in _convert_in_workers(cfg, tasks, progress, names).items():
        done[key] = stats
    progress.finish()
  summary = summarize(cfg, [done[key] for key in all_shards])
  shards_lib.write_json_atomic(os.path.join(cfg.output_dir, f"{PREFIX}-summary.json"), summary)
  log(f"[{PREFIX}] " + json.dumps({k: summary[k] for k in ("videos", "clips", "skipped")}))
  train = summary["splits"]["train"]
  if summary["videos_written"] and not train.get("videos_written", 0):
    raise errors.DataError(
        f"every written video went to the validation split ({summary['videos_written']} videos, "
        f"--num_validation_videos={cfg.num_validation_videos}): the train shards in "
        f"{cfg.output_dir} are empty",
        "--num_validation_videos",
        "use fewer validation videos than the caption file has, with another --output_dir",
    )
  return summary


def summarize(cfg: ConvertConfig, shard_stats: Sequence[dict]) -> dict:
  """Totals over shards: videos, clips and skipped videos by reason, overall and per split."""
  per_split = {}
  for split in SPLITS:
    stats = [s for s in shard_stats if s["split"] == split]
    per_split[split] = shards_lib.merge_counts(
        [{k: v for k, v in s.items() if k not in ("split", "skipped_examples")} for s in stats]
    )
    per_split[split]["shards"] = len(stats)
  total = shards_lib.merge_counts(per_split.values())
  examples = [e for s in shard_stats for e in s.get("skipped_examples", [])][:50]
  return {
      "videos": total.get("videos", 0),
      "videos_written": total.get("videos_written", 0),
      "clips": total.get("clips", 0),
      "skipped": total.get("skipped", {}),
      "skipped_examples": examples,
      "splits": per_split,
      "config": cfg.fingerprint(),
      "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
  }
