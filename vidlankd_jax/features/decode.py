"""Video decoding with PyAV through FFmpeg's own filters, and a pool of decode processes.

`decode_video` reproduces the reference extractor's `ffmpeg -i VIDEO -filter_complex
"fps=..,scale=W:H[,crop=..]" -f rawvideo -pix_fmt rgb24 pipe:` inside one process: the same
libavfilter filters in the same order (`Stream.filters`), fed the decoded frames with the
timestamps the ffmpeg program gives them (shifted so the file starts at 0). The video is decoded
once for both streams (the reference runs ffmpeg once per stream). What the ffmpeg program does
and this does too: a packet that fails to decode is skipped, and a read error ends the video
early (both are counted in the video's info). What it does and this does not: rotate by the
display matrix (the reference sizes the scaler from the coded width and height, so a rotated
video would be distorted; YouTube downloads carry no rotation).

`DecodePool` runs `decode_video` in worker processes, one video per worker at a time, and yields
their messages as they arrive. A worker that dies (a crash inside a decoder, an out-of-memory
kill) or sends nothing for `stall_timeout` seconds is ended and replaced, and its video is
reported as skipped (`decoder_crashed`, `decode_timeout`): the job goes on and nothing hangs.

No JAX here: the workers import this module.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
import signal
import threading
import time
from fractions import Fraction
from multiprocessing import connection
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from vidlankd_jax.features.streams import Stream

# Why a video is skipped (the manifest's and the summary's `reason`).
SKIP_REASONS = (
    "missing_file",
    "undecodable",
    "no_video_stream",
    "empty_video",
    "decoder_error",
    "decoder_crashed",
    "decode_timeout",
    "truncated",
)

# FFmpeg's AV_TIME_BASE: container start times are in microseconds.
_AV_TIME_BASE = 1_000_000


class DecodeError(Exception):
  """A video that yields no features; `reason` is one of SKIP_REASONS."""

  def __init__(self, reason: str, detail: str):
    assert reason in SKIP_REASONS, reason
    self.reason, self.detail = reason, detail
    super().__init__(f"{reason}: {detail}")

  def __reduce__(self):
    return (DecodeError, (self.reason, self.detail))


def _round_half_away(x: Fraction) -> int:
  """FFmpeg's default rounding (AV_ROUND_NEAR_INF)."""
  return int(x + Fraction(1, 2)) if x >= 0 else -int(-x + Fraction(1, 2))


def start_offset(container_start_us: int | None, time_base: Fraction) -> int:
  """The ffmpeg program's shift of a stream's timestamps so the file starts at 0, in the
  stream's time base (av_rescale_q of the container's start time)."""
  if not container_start_us:
    return 0
  return _round_half_away(Fraction(container_start_us, _AV_TIME_BASE) / time_base)


def build_graph(video_stream, stream: Stream):
  """The reference's filter chain for one stream, ending in rgb24 frames."""
  import av

  codec = video_stream.codec_context
  graph = av.filter.Graph()
  source = graph.add(
      "buffer",
      video_size=f"{codec.width}x{codec.height}",
      pix_fmt=codec.format.name,
      time_base=str(video_stream.time_base),
      pixel_aspect=str(codec.sample_aspect_ratio or "0/1"),
      # The ffmpeg program tells the scaler the decoder's colour matrix and range.
      colorspace=str(int(codec.colorspace)),
      range=str(int(codec.color_range)),
  )
  chain = [source] + [
      graph.add(name, args) for name, args in stream.filters(codec.height, codec.width)
  ]
  chain += [graph.add("format", "rgb24"), graph.add("buffersink")]
  graph.link_nodes(*chain).configure()
  return graph


class _StreamFrames:
  """Frames of one stream coming out of its filter graph, grouped into model inputs."""

  def __init__(self, stream: Stream, graph, rows_per_chunk: int):
    self.stream, self.graph, self.rows_per_chunk = stream, graph, rows_per_chunk
    self.pending: list[np.ndarray] = []
    self.frames = 0

  def push(self, frame) -> None:
    import av

    self.graph.vpush(frame)
    while True:
      try:
        out = self.graph.vpull()
      except (av.error.BlockingIOError, av.error.EOFError):
        return
      self.pending.append(out.to_ndarray())
      self.frames += 1

  def chunks(self, final: bool) -> Iterator[np.ndarray]:
    """Full chunks of `rows_per_chunk` inputs; with `final`, the rest, the last clip padded with
    zero frames as the reference pads (before normalisation)."""
    per_chunk = self.rows_per_chunk * self.stream.clip_frames
    while len(self.pending) >= per_chunk or (final and self.pending):
      take, self.pending = self.pending[:per_chunk], self.pending[per_chunk:]
      frames = np.stack(take)
      short = -len(frames) % self.stream.clip_frames
      if short:
        frames = np.concatenate([frames, np.zeros((short,) + frames.shape[1:], frames.dtype)])
      if self.stream.clip_frames > 1:
        frames = frames.reshape((-1, self.stream.clip_frames) + frames.shape[1:])
      yield frames


def decode_video(
    path: str, streams: Sequence[Stream], rows_per_chunk: int = 16, threads: int = 0
) -> Iterator[tuple]:
  """Decodes one video for every stream at once, with `threads` decoder threads (0: FFmpeg
  picks).

  Yields ("rows", (stream name, uint8 array)) messages, each of at most `rows_per_chunk` model
  inputs ([n, H, W, 3] frames for 2D, [n, 16, 112, 112, 3] clips for 3D), then one
  ("done", info). Raises DecodeError when the video yields nothing.
  """
  import av

  if not os.path.isfile(path):
    raise DecodeError("missing_file", "no such file")
  try:
    container = av.open(path)
  except av.error.FFmpegError as e:
    raise DecodeError("undecodable", f"cannot open: {e}") from None
  with container:
    if not container.streams.video:
      raise DecodeError("no_video_stream", "the file has no video stream")
    video = container.streams.video[0]
    video.thread_type = "AUTO"  # frame and slice threads: faster, the same pixels
    video.codec_context.thread_count = threads
    codec = video.codec_context
    if not codec.width or not codec.height:
      raise DecodeError("undecodable", "the video stream has no frame size")
    try:
      outputs = [_StreamFrames(s, build_graph(video, s), rows_per_chunk) for s in streams]
    except (av.error.FFmpegError, ValueError) as e:
      raise DecodeError("undecodable", f"cannot set up the filters: {e}") from None
    offset = start_offset(container.start_time, video.time_base)
    info = {"width": codec.width, "height": codec.height, "source_frames": 0, "decode_errors": 0}
    info["read_error"] = None
    last_pts = None
    packets = container.demux(video)
    while True:
      try:
        packet = next(packets)
      except StopIteration:
        break
      except av.error.FFmpegError as e:  # the ffmpeg program stops reading here too
        info["read_error"] = str(e)
        break
      try:
        frames = packet.decode()
      except av.error.FFmpegError:  # the ffmpeg program skips such packets
        info["decode_errors"] += 1
        continue
      for frame in frames:
        pts = frame.pts if frame.pts is not None else frame.dts
        if pts is None:  # the fps filter drops frames without a timestamp
          continue
        frame.pts = pts - offset
        last_pts = frame.pts if last_pts is None else max(last_pts, frame.pts)
        info["source_frames"] += 1
        for out in outputs:
          out.push(frame)
          for chunk in out.chunks(final=False):
            yield ("rows", (out.stream.name, chunk))
    for out in outputs:
      out.push(None)
      for chunk in out.chunks(final=True):
        yield ("rows", (out.stream.name, chunk))
    info["duration"] = _duration(container, video)
    check_complete(info, last_pts, video)
    for out in outputs:
      if out.frames == 0:
        raise DecodeError(
            "empty_video", f"no {out.stream.name} frames ({info['source_frames']} decoded)"
        )
      info[f"frames_{out.stream.name}"] = out.frames
      info[f"rows_{out.stream.name}"] = out.stream.rows(out.frames)
  yield ("done", info)


# A decode that ends this much before the container's duration is a truncated file.
TRUNCATED_SLACK_S, TRUNCATED_SLACK_FRACTION = 1.0, 0.05


def check_complete(info: dict, last_pts: int | None, video) -> None:
  """Raises DecodeError("truncated") when the decoded frames end well before the duration the
  container declares (a download cut short: the index promises frames the file lacks)."""
  duration = info["duration"]
  if not duration or last_pts is None or not video.time_base:
    return
  rate = video.average_rate or video.guessed_rate
  frame = float(1 / rate) if rate else 0.0
  covered = float(last_pts * video.time_base) + frame
  if covered < duration - max(TRUNCATED_SLACK_S, TRUNCATED_SLACK_FRACTION * duration):
    why = f"; read error: {info['read_error']}" if info["read_error"] else ""
    raise DecodeError(
        "truncated",
        f"frames end at {covered:.1f} s of the container's {duration:.1f} s "
        f"({info['decode_errors']} undecodable packets{why}): download the file again",
    )


def _duration(container, video) -> float | None:
  """Seconds: the stream's duration, else the container's (None when neither is known)."""
  if video.duration is not None and video.time_base:
    return float(video.duration * video.time_base)
  if container.duration is not None:
    return container.duration / _AV_TIME_BASE
  return None


# ------------------------------------------------------------------------------------------
# Worker processes


def _worker_main(conn, streams, rows_per_chunk: int, threads: int, decode_fn: Callable) -> None:
  """A decode process: takes (video_id, path) tasks until it receives None."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends workers
  while True:
    try:
      task = conn.recv()
    except (EOFError, OSError):
      return
    if task is None:
      return
    video_id, path = task
    try:
      for kind, payload in decode_fn(path, streams, rows_per_chunk, threads):
        conn.send((video_id, kind, payload))
    except DecodeError as e:
      conn.send((video_id, "skip", (e.reason, e.detail)))
    except Exception as e:  # a bug or an unforeseen library error: skip the video, keep going
      conn.send((video_id, "skip", ("decoder_error", f"{type(e).__name__}: {e}")))


@dataclasses.dataclass
class _Worker:
  process: multiprocessing.Process
  conn: connection.Connection
  video: tuple[str, str] | None = None
  last_heard: float = 0.0


class DecodePool:
  """Decodes videos in `num_workers` processes; `run` yields (video_id, kind, payload) with kind
  "rows" (stream name, uint8 array), "done" (info dict) or "skip" (reason, detail).
  Each worker's decoder gets `threads` threads (default: the cores shared out among workers).

  Messages of one video arrive in order; messages of different videos interleave. A video that
  is skipped after some of its rows were sent must be dropped by the consumer. Workers are
  spawned (the parent runs JAX threads), so they import the main script again: a script that
  runs a pool needs Python's `if __name__ == "__main__":` guard and should keep heavy imports
  out of its top level (tools/extract_video_features.py does).
  """

  def __init__(
      self,
      streams: Sequence[Stream],
      num_workers: int,
      *,
      stall_timeout: float = 300.0,
      rows_per_chunk: int = 16,
      threads: int | None = None,
      max_buffered: int | None = None,
      decode_fn: Callable = decode_video,
  ):
    if num_workers < 1:
      raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    self.streams = tuple(streams)
    self.num_workers = num_workers
    self.stall_timeout = stall_timeout
    self.rows_per_chunk = rows_per_chunk
    self.threads = threads if threads is not None else max(1, (os.cpu_count() or 1) // num_workers)
    self.max_buffered = max_buffered or 4 * num_workers + 4
    self.decode_fn = decode_fn
    self._ctx = multiprocessing.get_context("spawn")  # the parent runs JAX threads: never fork

  def run(self, videos: Iterable[tuple[str, str]]) -> Iterator[tuple]:
    """Yields every message of every (video_id, path) in `videos`; ends the workers on exit."""
    events: queue.Queue = queue.Queue(self.max_buffered)
    stop = threading.Event()
    thread = threading.Thread(
        target=self._feed, args=(iter(videos), events, stop), name="decode-pool", daemon=True
    )
    thread.start()
    try:
      while True:
        event = events.get()
        if event is None:
          return
        if isinstance(event, BaseException):
          raise event
        yield event
    finally:
      stop.set()
      thread.join()

  # The feeding thread ---------------------------------------------------------------------

  def _start_worker(self) -> _Worker:
    parent, child = self._ctx.Pipe()
    process = self._ctx.Process(
        target=_worker_main,
        args=(child, self.streams, self.rows_per_chunk, self.threads, self.decode_fn),
        daemon=True,
    )
    process.start()
    child.close()
    return _Worker(process, parent)

  @staticmethod
  def _end_worker(worker: _Worker, grace: float = 0.0) -> None:
    worker.conn.close()
    worker.process.join(grace)
    if worker.process.is_alive():
      worker.process.terminate()
      worker.process.join(5)
      if worker.process.is_alive():
        worker.process.kill()
    worker.process.join()

  def _feed(self, videos: Iterator, events: queue.Queue, stop: threading.Event) -> None:
    workers: list[_Worker] = []

    def put(event) -> bool:
      """Hands an event to the consumer; time spent waiting for it is not a worker's stall."""
      start = time.monotonic()
      while not stop.is_set():
        try:
          events.put(event, timeout=0.2)
          break
        except queue.Full:
          continue
      waited = time.monotonic() - start
      for w in workers:
        w.last_heard += waited
      return not stop.is_set()

    def give(worker: _Worker | None, video) -> None:
      """Sends `video` to `worker` (a new one when None, or when the pipe to it is broken)."""
      if worker is None:
        worker = self._start_worker()
        workers.append(worker)
      try:
        worker.conn.send(video)
      except (OSError, ValueError):  # it died while idle
        retire(worker)
        worker = self._start_worker()
        workers.append(worker)
        worker.conn.send(video)
      worker.video, worker.last_heard = video, time.monotonic()

    def retire(worker: _Worker) -> None:
      workers.remove(worker)
      self._end_worker(worker)

    def next_video(worker: _Worker | None) -> None:
      video = next(videos, None)
      if video is not None:
        give(worker, video)
      elif worker is not None:
        worker.video = None

    def replace(worker: _Worker, reason: str, detail: str) -> None:
      """Ends a dead or stuck worker, reports its video, and starts the next video afresh."""
      video_id = worker.video[0]
      retire(worker)
      put((video_id, "skip", (reason, detail)))
      next_video(None)

    try:
      for _ in range(self.num_workers):
        next_video(None)
      while not stop.is_set():
        busy = [w for w in workers if w.video is not None]
        if not busy:
          break
        waitables = [w.conn for w in busy] + [w.process.sentinel for w in busy]
        ready = set(connection.wait(waitables, timeout=1.0))
        for worker in busy:
          if worker.conn in ready:
            try:
              message = worker.conn.recv()
            except (EOFError, OSError):
              worker.process.join(5)
              replace(worker, "decoder_crashed", f"exit code {worker.process.exitcode}")
              continue
            worker.last_heard = time.monotonic()
            if not put(message):
              return
            if message[1] in ("done", "skip"):
              next_video(worker)
          elif worker.process.sentinel in ready:
            worker.process.join(5)
            replace(worker, "decoder_crashed", f"exit code {worker.process.exitcode}")
          elif time.monotonic() - worker.last_heard > self.stall_timeout:
            replace(worker, "decode_timeout", f"no progress for {self.stall_timeout:.0f} s")
      put(None)
    except BaseException as e:  # noqa: BLE001  (handed to the consumer, which re-raises it)
      put(e)
    finally:
      for worker in workers:
        try:
          worker.conn.send(None)
        except (OSError, ValueError):
          pass
      for worker in workers:
        self._end_worker(worker, grace=2.0)
