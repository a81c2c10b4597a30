"""The feature extraction job: videos -> OUT/howto100m_feature/<vid>.npy (2D, [T, 2048]) and
OUT/howto100m_feature3d/<vid>.npy (3D, [ceil(F / 16), 2048] for the F frames sampled at 24 fps),
L2-normalised float16 rows (`l2_normalize`, `half_precision`: the reference's flags).

One host's flow: the sorted video list -> this host's share -> minus finished videos ->
`DecodePool` (worker processes) -> per stream and frame shape, a `Batcher` that packs the model
inputs of many videos into fixed global batches -> the jitted model step, batch axis sharded over
the mesh's data axes -> rows back to their videos -> each finished video's files (temporary file
+ rename) and its manifest line. Decoding, the accelerator and writing overlap: workers decode
ahead while batches run, and results are fetched one batch behind.

Pods: host h of n takes the videos i with i % n == h and runs on its own devices. Extraction is
embarrassingly parallel, so hosts never synchronise: no cross-host collective, nothing to wait
for, and a slow or failed host delays only its own share (rerun it alone).

Memory: a batch holds the pixels of `batch_size` nominal inputs per device (224 x 224 frames,
16 x 112 x 112 clips); larger frames (an odd aspect ratio scaled to a short side of 224) make
batches of fewer rows, and a partial batch is padded only to the next power of two of the devices,
so a video costs what its pixels cost.

Reruns: a video whose output files all exist is finished; files appear only complete, so a
killed run leaves at most temporary files (`.npy.tmp-h<host>-<pid>`, removed by the next run of
that host). Videos the manifest records as skipped are skipped again unless `retry_skipped`,
except a decoder crash, retried once. One job per host and output folder: a second is refused
(`shards.output_lock`).

Manifest: OUT/manifest/host-<h>-of-<n>.jsonl, JSON lines per video: `started` when its first
rows arrive, then `ok` with its duration, frames and rows per stream, or `skipped` with the
reason and detail. A video still `started` when a run ended (killed: out of memory?) is retried
once; in progress when a second run ended, it is skipped as `ended_the_run`. A summary of the run
is written beside it (`.summary.json`) and returned.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import glob
import json
import os
import time
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vidlankd_jax import errors
from vidlankd_jax import sharding
from vidlankd_jax.data import shards
from vidlankd_jax.features import decode as decode_lib
from vidlankd_jax.features import streams as streams_lib
from vidlankd_jax.models import resnet

VIDEO_EXTENSIONS = (
    ".mp4",
    ".webm",
    ".mkv",
    ".avi",
    ".mov",
    ".m4v",
    ".flv",
    ".mpg",
    ".mpeg",
    ".3gp",
    ".ogv",
    ".wmv",
)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MANIFEST_DIR = "manifest"
# Skips that may not happen again (a worker killed from outside): retried once on a rerun.
RETRIED_SKIPS = ("decoder_crashed",)


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
  output_dir: str
  video_dir: str | None = None  # every video file under it (recursively)
  video_list: str | None = None  # or: a file with one video path per line
  streams: tuple[str, ...] = ("2d", "3d")
  batch_size: int = 64  # model inputs per device per step (the reference's batch: 64)
  scaler: str = "bilinear"  # the frame scaler (features/streams.py: what the reference ran)
  l2_normalize: bool = True  # rows divided by their L2 norm (the reference's --l2_normalize 1)
  half_precision: bool = True  # rows stored as float16 (the reference's --half_precision 1)
  workers: int = 4  # decode processes
  host_index: int = 0
  num_hosts: int = 1
  stall_timeout: float = 300.0  # seconds a decode worker may go without sending anything
  retry_skipped: bool = False
  progress_interval: float = 30.0

  def __post_init__(self):
    if (self.video_dir is None) == (self.video_list is None):
      raise errors.DataError("give exactly one of video_dir and video_list")
    streams_lib.parse_streams(",".join(self.streams), self.scaler)
    for name in ("batch_size", "workers", "num_hosts"):
      if getattr(self, name) < 1:
        raise errors.DataError(f"{name} must be >= 1, got {getattr(self, name)}")
    if not 0 <= self.host_index < self.num_hosts:
      raise errors.DataError(f"host_index must be in [0, {self.num_hosts}), got {self.host_index}")

  @property
  def stream_specs(self) -> tuple[streams_lib.Stream, ...]:
    return streams_lib.parse_streams(",".join(self.streams), self.scaler)

  @property
  def host_tag(self) -> str:
    return f"host-{self.host_index:05d}-of-{self.num_hosts:05d}"


# ------------------------------------------------------------------------------------------
# Which videos


def video_id(path: str) -> str:
  """The id a video's feature files are named by: its file name without the extension."""
  return os.path.splitext(os.path.basename(path))[0]


def find_videos(cfg: ExtractConfig) -> list[tuple[str, str]]:
  """(video id, path) of every video, sorted by id; two files with one id are an error."""
  if cfg.video_dir is not None:
    if not os.path.isdir(cfg.video_dir):
      raise errors.ConfigError(
          f"video folder not found ({cfg.video_dir}): pass the folder that holds the videos"
      )
    paths = [
        os.path.join(root, name)
        for root, _, names in os.walk(cfg.video_dir)
        for name in names
        if name.lower().endswith(VIDEO_EXTENSIONS)
    ]
  else:
    if not os.path.isfile(cfg.video_list):
      raise errors.ConfigError(
          f"video list not found ({cfg.video_list}): pass a file with one video path per line"
      )
    base = os.path.dirname(os.path.abspath(cfg.video_list))
    with open(cfg.video_list, encoding="utf-8") as f:
      lines = [line.strip() for line in f]
    paths = [os.path.join(base, line) for line in lines if line and not line.startswith("#")]
  by_id: dict[str, str] = {}
  for path in paths:
    vid = video_id(path)
    if vid in by_id and by_id[vid] != path:
      raise errors.DataError(
          f"two videos would write the same feature files {vid}.npy ({by_id[vid]}, {path}): "
          "rename one of them or leave it out of the list"
      )
    by_id[vid] = path
  return sorted(by_id.items())


def host_share(videos: Sequence, host_index: int, num_hosts: int) -> list:
  return list(videos[host_index::num_hosts])


def output_path(output_dir: str, stream: streams_lib.Stream, vid: str) -> str:
  return os.path.join(output_dir, stream.folder, vid + ".npy")


def finished_videos(output_dir: str, streams: Sequence[streams_lib.Stream]) -> set[str]:
  """Ids with a complete file in every stream's folder (one listing per folder)."""
  done = None
  for stream in streams:
    folder = os.path.join(output_dir, stream.folder)
    names = (
        {n[:-4] for n in os.listdir(folder) if n.endswith(".npy")}
        if os.path.isdir(folder)
        else set()
    )
    done = names if done is None else done & names
  return done or set()


def remove_stale_temporaries(cfg: ExtractConfig) -> int:
  """Deletes the temporary files an earlier run of this host left when it was killed."""
  removed = 0
  for stream in cfg.stream_specs:
    pattern = os.path.join(cfg.output_dir, stream.folder, f"*.npy.tmp-h{cfg.host_index}-*")
    for path in glob.glob(pattern):
      os.remove(path)
      removed += 1
  return removed


def iter_manifest(output_dir: str) -> Iterable[dict]:
  """Every record of every host's manifest, in file order (a line cut by a crash is ignored)."""
  for path in sorted(glob.glob(os.path.join(output_dir, MANIFEST_DIR, "*.jsonl"))):
    with open(path, encoding="utf-8") as f:
      for line in f:
        with contextlib.suppress(json.JSONDecodeError):
          yield json.loads(line)


def read_manifests(output_dir: str) -> dict[str, dict]:
  """The last outcome (`ok` or `skipped`) of each video in every host's manifest, with
  `ended_runs`: how many runs ended while it was in progress since (its `started` records), and
  `tries`: its records of a retried skip in a row."""
  last: dict[str, dict] = {}
  for record in iter_manifest(output_dir):
    vid = record.get("video")
    earlier = last.get(vid, {})
    if record.get("status") == "started":
      last[vid] = {**earlier, "ended_runs": earlier.get("ended_runs", 0) + 1}
      continue
    again = record.get("reason") in RETRIED_SKIPS and record.get("reason") == earlier.get("reason")
    last[vid] = {**record, "ended_runs": 0, "tries": earlier.get("tries", 0) + 1 if again else 1}
  return last


def batch_rows(global_batch: int, stream: streams_lib.Stream, input_shape, devices: int) -> int:
  """Rows per batch for model inputs of `input_shape` ([H, W, 3] or [T, H, W, 3]): the global
  batch at the stream's nominal frame size, fewer for larger frames so that a batch holds the
  pixels of a nominal one (a 2560x16 video's 35840x224 frames: one per device, not 64); a
  multiple of the devices."""
  nominal = stream.size * stream.size
  pixels = max(int(input_shape[-3]) * int(input_shape[-2]), nominal)
  return max(devices, global_batch * nominal // pixels // devices * devices)


# ------------------------------------------------------------------------------------------
# Batches


@dataclasses.dataclass(frozen=True)
class Segment:
  """Rows [start, start + count) of a batch are rows [offset, offset + count) of a video."""

  video: str
  offset: int
  start: int
  count: int


def padded_rows(rows: int, size: int, granule: int = 1) -> int:
  """Rows a partial batch of `rows` is padded to: `granule` (the devices) times the smallest
  power of two that holds them, at most `size`: a short video's 10 frames run as 16, not 64, at
  the cost of one compiled shape per power of two."""
  units = -(-rows // granule)
  return min(size, granule * (1 << max(units - 1, 0).bit_length()))


class Batcher:
  """Packs model inputs of one shape, from any number of videos, into batches of `size` rows;
  a last partial batch is padded to `padded_rows` (a multiple of `granule`)."""

  def __init__(self, size: int, granule: int = 1):
    self.size, self.granule = size, granule
    self._pieces: collections.deque = collections.deque()  # (video, offset, rows)
    self.rows = 0

  def add(self, video: str, offset: int, rows: np.ndarray) -> None:
    self._pieces.append((video, offset, rows))
    self.rows += len(rows)

  def holds(self, video: str) -> bool:
    return any(piece[0] == video for piece in self._pieces)

  def take(self, pad: bool = False) -> tuple[np.ndarray, list[Segment]] | None:
    """The next full batch; with `pad`, also a last partial one, zero-filled to `padded_rows`."""
    if self.rows < self.size and not (pad and self.rows):
      return None
    parts, segments, filled = [], [], 0
    while filled < self.size and self._pieces:
      video, offset, rows = self._pieces.popleft()
      n = min(len(rows), self.size - filled)
      if n < len(rows):
        self._pieces.appendleft((video, offset + n, rows[n:]))
      parts.append(rows[:n])
      segments.append(Segment(video, offset, filled, n))
      filled += n
    self.rows -= filled
    target = padded_rows(filled, self.size, self.granule)
    if filled < target:
      parts.append(np.zeros((target - filled,) + parts[0].shape[1:], parts[0].dtype))
    return np.concatenate(parts), segments


def l2_normalize(x):
  """Rows divided by their L2 norm (at least 1e-12), as torch's F.normalize."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def make_feature_fn(
    model: resnet.ResNet,
    stream: streams_lib.Stream,
    mesh,
    dtype=jnp.float32,
    normalize: bool = True,
) -> Callable[[np.ndarray], jax.Array]:
  """uint8 model inputs [B, ...] (this host's rows) -> float32 features [B, D] (L2-normalised
  unless not `normalize`) on the devices, B sharded over the mesh's batch axes; the weights
  replicated. One compiled program per input shape."""
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding.replicated(mesh))
  rows = sharding.batch_sharding(mesh)

  @functools.partial(jax.jit, in_shardings=(sharding.replicated(mesh), rows), out_shardings=rows)
  def features(state, pixels):
    net = nnx.merge(graphdef, state)
    features = net(stream.normalize(pixels), dtype=dtype)
    return l2_normalize(features) if normalize else features

  return lambda pixels: features(state, jax.make_array_from_process_local_data(rows, pixels))


def local_mesh():
  """All of this host's devices on the data axis: hosts run independently."""
  return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())


class FeatureModels:
  """Each stream's model jitted over `mesh` (default: this host's devices) in `dtype`, its rows
  L2-normalised unless not `l2_normalize`; compiled once per input shape and reusable across
  runs."""

  def __init__(
      self,
      models: dict[str, resnet.ResNet],
      dtype: str = "float32",
      mesh=None,
      l2_normalize: bool = True,
  ):
    if dtype not in DTYPES:
      raise errors.DataError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    self.mesh = mesh or local_mesh()
    self.dtype = dtype
    self.l2_normalize = l2_normalize
    self.fns = {
        name: make_feature_fn(
            model, streams_lib.STREAMS[name], self.mesh, DTYPES[dtype], l2_normalize
        )
        for name, model in models.items()
    }


# ------------------------------------------------------------------------------------------
# The job


@dataclasses.dataclass
class _Video:
  path: str
  received: dict  # stream -> rows received so far
  outstanding: int = 0  # rows received whose features have not come back
  pieces: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
  info: dict | None = None
  failed: bool = False


class _Manifest:

  def __init__(self, cfg: ExtractConfig):
    os.makedirs(os.path.join(cfg.output_dir, MANIFEST_DIR), exist_ok=True)
    self.path = os.path.join(cfg.output_dir, MANIFEST_DIR, cfg.host_tag + ".jsonl")

  def append(self, record: dict) -> None:
    try:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    except OSError as e:  # a full disk: name the manifest
      raise errors.storage_error(e, self.path) from e


def run(
    cfg: ExtractConfig,
    models: FeatureModels,
    *,
    log: Callable[[str], None] = print,
    pool: decode_lib.DecodePool | None = None,
    videos: list[tuple[str, str]] | None = None,
) -> dict:
  """Extracts this host's share of the videos; returns the summary (also written beside the
  manifest). `videos` is `find_videos(cfg)` when already listed; `pool` replaces the default
  DecodePool (tests inject failing decoders). A second job of this host on `cfg.output_dir` is
  refused while this one runs."""
  lock_dir = os.path.join(cfg.output_dir, MANIFEST_DIR)
  with shards.output_lock(lock_dir, f".lock-{cfg.host_tag}", "feature extraction job"):
    return _run_locked(cfg, models, log=log, pool=pool, videos=videos)


def _run_locked(cfg: ExtractConfig, models: FeatureModels, *, log, pool, videos) -> dict:
  streams = cfg.stream_specs
  missing = [s.name for s in streams if s.name not in models.fns]
  if missing:
    raise errors.DataError(f"no model given for stream(s) {missing}")
  if models.l2_normalize != cfg.l2_normalize:
    raise ValueError(
        f"the models' l2_normalize ({models.l2_normalize}) differs from the config's "
        f"({cfg.l2_normalize})"
    )
  start = time.monotonic()
  videos = find_videos(cfg) if videos is None else videos
  share = host_share(videos, cfg.host_index, cfg.num_hosts)
  for stream in streams:
    os.makedirs(os.path.join(cfg.output_dir, stream.folder), exist_ok=True)
  remove_stale_temporaries(cfg)
  finished = finished_videos(cfg.output_dir, streams)
  earlier = read_manifests(cfg.output_dir)
  previously_skipped = (
      set()
      if cfg.retry_skipped
      else {
          vid
          for vid, rec in earlier.items()
          if rec.get("status") == "skipped"
          and (rec.get("reason") not in RETRIED_SKIPS or rec.get("tries", 1) >= 2)
          and not rec.get("ended_runs")
      }
  )
  ended_twice = {
      vid
      for vid, rec in earlier.items()
      if rec.get("ended_runs", 0) >= 2 and vid not in finished and not cfg.retry_skipped
  }
  todo = [
      (v, p)
      for v, p in share
      if v not in finished and v not in previously_skipped and v not in ended_twice
  ]
  summary = {
      "host": cfg.host_tag,
      "videos_listed": len(videos),
      "host_videos": len(share),
      "already_done": sum(v in finished for v, _ in share),
      "previously_skipped": sum(v in previously_skipped and v not in finished for v, _ in share),
      "extracted": 0,
      "skipped": {},
      "skipped_examples": [],
      "rows": {s.name: 0 for s in streams},
      "streams": [s.name for s in streams],
      "dtype": models.dtype,
      "scaler": cfg.scaler,
      "l2_normalize": cfg.l2_normalize,
      "half_precision": cfg.half_precision,
  }
  log(
      f"[extract] {cfg.host_tag}: {len(share)} of {len(videos)} videos, "
      f"{summary['already_done']} already done, {summary['previously_skipped']} skipped before"
      f"{' (use --retry_skipped to retry them)' if summary['previously_skipped'] else ''}, "
      f"{len(todo)} to extract"
  )
  global_batch = cfg.batch_size * models.mesh.size
  by_name = {s.name: s for s in streams}
  manifest = _Manifest(cfg)
  for vid in (v for v, _ in share if v in ended_twice):
    path = dict(share)[vid]
    log(f"[extract] {vid}: the last two runs ended while it was in progress")
    _skip_record(
        summary,
        manifest,
        log,
        vid,
        path,
        "ended_the_run",
        "two runs ended (killed, out "
        "of memory?) while it was in progress; --retry_skipped tries it again",
    )
  progress = shards.Progress("extract", len(todo), "videos", cfg.progress_interval)
  pool = pool or decode_lib.DecodePool(streams, cfg.workers, stall_timeout=cfg.stall_timeout)

  state: dict[str, _Video] = {}
  batchers: dict[tuple, Batcher] = {}
  inflight: collections.deque = collections.deque()  # (stream, features on device, segments)
  # Decoded videos still waiting for features, with the rows dispatched when they were decoded.
  waiting: collections.deque = collections.deque()
  counts = {"videos": 0, "rows": collections.Counter(), "dispatched": 0}

  def skip(vid: str, path: str, reason: str, detail: str) -> None:
    _skip_record(summary, manifest, log, vid, path, reason, detail)
    counts["videos"] += 1

  def write(vid: str, video: _Video) -> None:
    record = {"video": vid, "path": video.path, "status": "ok", **video.info}
    for stream in streams:
      pieces = sorted(video.pieces[stream.name], key=lambda p: p[0])
      rows = np.concatenate([p[1] for p in pieces])
      rows = rows.astype(np.float16 if cfg.half_precision else np.float32)
      assert len(rows) == video.info[f"rows_{stream.name}"], (vid, stream.name, len(rows))
      with shards.atomic_open(
          output_path(cfg.output_dir, stream, vid), "wb", tag=f"-h{cfg.host_index}-{os.getpid()}"
      ) as f:
        np.save(f, rows)
      summary["rows"][stream.name] += len(rows)
    manifest.append(record)
    summary["extracted"] += 1
    counts["videos"] += 1

  def finish_if_complete(vid: str) -> None:
    video = state[vid]
    if video.outstanding == 0 and (video.failed or video.info is not None):
      del state[vid]
      if not video.failed:
        write(vid, video)

  def collect(drain: bool = False) -> None:
    """Brings back computed batches, the oldest first, and hands their rows to their videos;
    waits only to keep at most two batches in flight (or, with `drain`, for all of them)."""
    while inflight and (drain or len(inflight) > 2 or inflight[0][1].is_ready()):
      stream, features, segments = inflight.popleft()
      features = np.asarray(features)
      counts["rows"][stream] += sum(s.count for s in segments)
      for seg in segments:
        video = state[seg.video]
        video.outstanding -= seg.count
        if not video.failed:
          video.pieces[stream].append((seg.offset, features[seg.start : seg.start + seg.count]))
        finish_if_complete(seg.video)

  def dispatch(key: tuple, pad: bool = False) -> None:
    while (batch := batchers[key].take(pad)) is not None:
      pixels, segments = batch
      inflight.append((key[0], models.fns[key[0]](pixels), segments))
      counts["dispatched"] += len(pixels)
      collect()

  def flush_waiting() -> None:
    """Runs, padded, the partial batches a decoded video waits on once other batches worth
    `patience` rows went ahead of it: inputs of a rare frame shape do not wait for the end."""
    patience = 2 * global_batch * len(streams)
    while waiting and waiting[0][0] not in state:
      waiting.popleft()
    if waiting and counts["dispatched"] - waiting[0][1] > patience:
      vid, _ = waiting.popleft()
      for key, batcher in batchers.items():
        if batcher.holds(vid):
          dispatch(key, pad=True)

  def on_event(vid: str, kind: str, payload) -> None:
    if vid not in state:  # recorded first: a run that dies on this video leaves its name
      manifest.append({"video": vid, "path": paths[vid], "status": "started"})
    video = state.setdefault(vid, _Video(paths[vid], {s.name: 0 for s in streams}))
    if kind == "rows":
      name, rows = payload
      if video.failed:
        return
      key = (name,) + rows.shape[1:]
      if key not in batchers:
        size = batch_rows(global_batch, by_name[name], rows.shape[1:], models.mesh.size)
        batchers[key] = Batcher(size, models.mesh.size)
        log(f"[extract] compiling the {name} model for inputs {rows.shape[1:]} ({size} a batch)")
      batchers[key].add(vid, video.received[name], rows)
      video.received[name] += len(rows)
      video.outstanding += len(rows)
      dispatch(key)
    elif kind == "done":
      video.info = payload
      if video.outstanding:
        waiting.append((vid, counts["dispatched"]))
      finish_if_complete(vid)
    else:
      reason, detail = payload
      video.failed = True
      skip(vid, video.path, reason, detail)
      finish_if_complete(vid)

  paths = dict(todo)
  with contextlib.closing(pool.run(todo)) as events:
    for vid, kind, payload in events:
      on_event(vid, kind, payload)
      flush_waiting()
      collect()
      elapsed = max(time.monotonic() - start, 1e-9)
      extra = _rates(counts["rows"], elapsed, by_name) + _unfinished(state, by_name)
      progress.set(counts["videos"], extra=extra)
  for key in batchers:
    dispatch(key, pad=True)
  collect(drain=True)
  assert not state, f"videos left unfinished: {sorted(state)[:5]}"
  elapsed = time.monotonic() - start
  progress.done = counts["videos"]
  progress.finish(extra=_rates(counts["rows"], elapsed, by_name))
  summary["seconds"] = round(elapsed, 3)
  shards.write_json_atomic(manifest.path[: -len(".jsonl")] + ".summary.json", summary)
  skipped = sum(summary["skipped"].values())
  log(
      f"[extract] {summary['extracted']} videos extracted, {skipped} skipped "
      f"{summary['skipped'] or ''}; manifest {manifest.path}"
  )
  return summary


def _skip_record(summary, manifest, log, vid: str, path: str, reason: str, detail: str) -> None:
  """Counts a skipped video in `summary`, logs it and records it in the manifest."""
  summary["skipped"][reason] = summary["skipped"].get(reason, 0) + 1
  message = f"{vid} ({path}): {reason}: {detail}"
  if len(summary["skipped_examples"]) < 50:
    summary["skipped_examples"].append(message)
  log(f"[extract] skipped {message}")
  manifest.append(
      {"video": vid, "path": path, "status": "skipped", "reason": reason, "detail": detail}
  )


def _rates(rows: collections.Counter, elapsed: float, streams: dict) -> str:
  """Model inputs per second of each stream, in the stream's own units."""
  unit = {name: "frames" if s.clip_frames == 1 else "clips" for name, s in streams.items()}
  return ", ".join(f"{name}: {rows[name] / elapsed:,.1f} {unit[name]}/s" for name in streams)


def _unfinished(state: dict, streams: dict) -> str:
  """How far the videos being extracted are: seconds of video decoded (progress inside a long
  video, which the video count shows only once it is done)."""
  if not state:
    return ""
  seconds = max(
      sum(v.received[name] * s.clip_frames / s.fps for v in state.values())
      for name, s in streams.items()
  )
  return f", {len(state)} unfinished video(s): {shards.format_seconds(seconds)} of video decoded"


def default_hosts() -> tuple[int, int]:
  """(host index, host count) from JAX's distributed runtime (0, 1 when there is none)."""
  return jax.process_index(), jax.process_count()
