"""Stage bookkeeping: a finished stage is reused, an unfinished or outdated one is redone.

Each stage works in `<workdir>/<name>/` and, once everything in it is written, writes
`stage_done.json` last (atomically): the fingerprint of its settings (the resolved config and
the fingerprints of the stages it reads), its result and its wall time. A later run reuses the
stage only when that marker is there with the same fingerprint; otherwise the folder is removed
and the stage runs from scratch, so a crash, an interrupt or a changed config is never reused.
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

from vidlankd_jax.data import shards as shards_lib

MARKER = "stage_done.json"


def settings_fingerprint(settings: dict) -> str:
  """A stable hash of JSON-able settings."""
  return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
  ) -> StageRecord:
    """`fn(stage_dir) -> result` unless an identical finished run of the stage is there.

    `after` names earlier stages whose outputs this one reads: redoing one of them redoes this.
    """
    settings = {**settings, "after": {a: self.records[a].run_id for a in after}}
    fingerprint = settings_fingerprint(settings)
    stage_dir = self.stage_dir(name)
    index = len(self.records) + 1
    marker = read_marker(stage_dir)
    if marker is not None and marker["fingerprint"] == fingerprint:
      self.log(
          f"=== [{index}/{self.num_stages}] {title}: reusing the finished stage in {stage_dir} "
          f"(took {shards_lib.format_seconds(marker['seconds'])}) ==="
      )
      record = StageRecord(
          name, title, marker["result"], float(marker["seconds"]), True, marker["run_id"]
      )
    else:
      if os.path.exists(stage_dir):
        why = "its settings changed" if marker is not None else "it did not finish"
        self.log(
            f"--- {stage_dir} holds an earlier run of this stage but {why}: redoing it from scratch"
        )
        shutil.rmtree(stage_dir)
      self.log(f"\n=== [{index}/{self.num_stages}] {title} ===")
      os.makedirs(stage_dir)
      start = time.perf_counter()
      result = fn(stage_dir)
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


def json_ready(tree: Any) -> Any:
  """Numpy scalars and arrays -> Python numbers and lists, so results go into JSON markers."""
  if isinstance(tree, dict):
    return {str(k): json_ready(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [json_ready(v) for v in tree]
  if hasattr(tree, "tolist"):
    return tree.tolist()
  return tree
