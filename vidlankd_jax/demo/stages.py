"""Stage bookkeeping: a finished stage is reused, never silently thrown away.

Each stage works in `<workdir>/<name>/` and, once everything in it is written, writes
`stage_done.json` last (atomically): the fingerprint of its settings (the resolved config, with
paths inside the workdir written relative to it, and the runs of the stages it reads), its
result and its wall time. A later run reuses the stage when that marker is there with the same
fingerprint, so a moved workdir redoes nothing. A finished stage whose own settings differ is
refused, naming its folder (another --workdir, or --fresh); one whose inputs were redone is
redone. A stage that did not finish is redone from scratch, except a resumable one (a training
stage, stopped by SIGTERM with its checkpoint) started with the same settings: it resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from typing import Any, Callable

from vidlankd_jax import errors
from vidlankd_jax.data import shards as shards_lib

MARKER = "stage_done.json"
STARTED = "stage_started.json"  # the fingerprint a resumable stage was started with
WORKDIR = "<workdir>"  # how settings write paths inside the workdir


def settings_fingerprint(settings: dict) -> str:
  """A stable hash of JSON-able settings."""
  return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def relative_paths(tree: Any, workdir: str) -> Any:
  """`tree` with every string path inside `workdir` written as `<workdir>/...`."""
  if isinstance(tree, dict):
    return {k: relative_paths(v, workdir) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [relative_paths(v, workdir) for v in tree]
  if isinstance(tree, str) and workdir in tree:
    return tree.replace(os.path.join(workdir, ""), WORKDIR + "/").replace(workdir, WORKDIR)
  return tree


def read_started(stage_dir: str) -> str | None:
  try:
    with open(os.path.join(stage_dir, STARTED), encoding="utf-8") as f:
      return json.load(f).get("fingerprint")
  except (OSError, ValueError, AttributeError):
    return None


def read_marker(stage_dir: str) -> dict | None:
  """The stage's completion marker, or None when absent or unreadable (a broken run)."""
  try:
    with open(os.path.join(stage_dir, MARKER), encoding="utf-8") as f:
      marker = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None
  return marker if isinstance(marker, dict) and {"fingerprint", "result"} <= set(marker) else None


@dataclasses.dataclass
class StageRecord:
  """What one stage did in this run: its result, its time, whether it was reused."""

  name: str
  title: str
  result: dict
  seconds: float
  reused: bool
  # Changes whenever the stage is (re)done: later stages put it in their own fingerprints.
  run_id: str


class StageRunner:
  """Runs the demo's stages in order with banners, reusing finished ones."""

  def __init__(self, workdir: str, num_stages: int, log: Callable[[str], None] = print):
    self.workdir = workdir
    self.num_stages = num_stages
    self.log = log
    self.records: dict[str, StageRecord] = {}

  def stage_dir(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def run(
      self,
      name: str,
      title: str,
      settings: dict,
      fn: Callable[[str], dict],
      after: tuple[str, ...] = (),
      resumable: bool = False,
  ) -> StageRecord:
    """`fn(stage_dir) -> result` unless an identical finished run of the stage is there.

    `after` names earlier stages whose outputs this one reads: redoing one of them redoes this.
    `resumable`: `fn` continues what an interrupted call left in `stage_dir` (a training stage
    resumes its checkpoint), so an unfinished folder started with the same settings is kept.
    """
    own = relative_paths(settings, os.path.abspath(self.workdir))
    settings = {**own, "after": {a: self.records[a].run_id for a in after}}
    fingerprint = settings_fingerprint(settings)
    stage_dir = self.stage_dir(name)
    index = len(self.records) + 1
    marker = read_marker(stage_dir)
    if marker is not None and fingerprint in (
        marker["fingerprint"],  # and a marker written with absolute paths, in this workdir:
        settings_fingerprint(relative_paths(marker.get("settings"), os.path.abspath(self.workdir))),
    ):
      self.log(
          f"=== [{index}/{self.num_stages}] {title}: reusing the finished stage in {stage_dir} "
          f"(took {shards_lib.format_seconds(marker['seconds'])}) ==="
      )
      record = StageRecord(
          name, title, marker["result"], float(marker["seconds"]), True, marker["run_id"]
      )
    else:
      self._clear(stage_dir, marker, own, fingerprint, resumable)
      self.log(f"\n=== [{index}/{self.num_stages}] {title} ===")
      os.makedirs(stage_dir, exist_ok=True)
      if resumable:
        shards_lib.write_json_atomic(os.path.join(stage_dir, STARTED), {"fingerprint": fingerprint})
      start = time.perf_counter()
      try:
        result = fn(stage_dir)
      except OSError as e:  # "[Errno 28] No space left on device" from a library: name the folder
        if isinstance(e, errors.UserError) or e.filename:
          raise
        raise errors.storage_error(e, stage_dir, f"writing the {name} stage") from e
      seconds = time.perf_counter() - start
      record = StageRecord(name, title, result, seconds, False, uuid.uuid4().hex)
      shards_lib.write_json_atomic(
          os.path.join(stage_dir, MARKER),
          {
              "stage": name,
              "fingerprint": fingerprint,
              "settings": settings,
              "result": result,
              "seconds": seconds,
              "run_id": record.run_id,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          },
      )
      self.log(f"=== {title}: done in {shards_lib.format_seconds(seconds)} ===")
    self.records[name] = record
    return record

  def _clear(self, stage_dir: str, marker, own: dict, fingerprint: str, resumable: bool) -> None:
    """Makes way for running a stage: refuses to drop a finished run of other settings, keeps a
    resumable one started with these, removes anything else (naming why)."""
    if not os.path.exists(stage_dir):
      return
    if marker is not None:
      earlier = relative_paths(marker.get("settings", {}), os.path.abspath(self.workdir))
      earlier = {k: v for k, v in earlier.items() if k != "after"}
      if earlier != own:
        changed = sorted(k for k in set(earlier) | set(own) if earlier.get(k) != own.get(k))
        raise errors.ConfigError(
            f"{stage_dir} holds a finished run of this stage with other settings "
            f"({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''})",
            self.workdir,
            "use another --workdir for these settings (or --fresh to redo every stage here)",
        )
      why = "a stage it reads was redone"
    elif resumable and read_started(stage_dir) == fingerprint:
      self.log(f"--- {stage_dir}: resuming the unfinished stage from its checkpoint")
      return
    else:
      why = "it did not finish"
    self.log(f"--- {stage_dir} holds an earlier run of this stage but {why}: redoing it")
    shutil.rmtree(stage_dir)


def json_ready(tree: Any) -> Any:
  """Numpy scalars and arrays -> Python numbers and lists, so results go into JSON markers."""
  if isinstance(tree, dict):
    return {str(k): json_ready(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [json_ready(v) for v in tree]
  if hasattr(tree, "tolist"):
    return tree.tolist()
  return tree
