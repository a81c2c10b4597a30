"""The session's trained tiny teachers, shared by every test that needs a trained one.

Two tiny teachers are trained by the real entry point (`python -m vidlankd_jax.main`) as
`configs/teacher.py:size=tiny` configures them, side by side on one emulated device each, on the
transfer experiment's generated world (`vidlankd_jax/data/world.py`: each caption names a concept
whose visual attributes the clip's features carry): one on the true video-text pairs and one on
the shuffled twin, whose training captions were dealt out to the wrong clips. Both are scored on
the same held-out clips with their true captions.

`tests/test_teacher_learns.py` checks what they learned, `tests/test_transfer.py` distils
students from both on the world's text, the distillation tests distil from the first. The
conftest's `tiny_teachers` fixture trains them once per session (its users run on one worker).
"""

from __future__ import annotations

import os

from support import multihost_worker as worker
from vidlankd_jax import configlib
from vidlankd_jax.data import vocab as vocab_lib
from vidlankd_jax.data import world as world_lib

CONFIG = "configs/teacher.py:size=tiny"
# The world at test size: the demo's concepts and pairs, a smaller probe.
WORLD = dict(
    num_concepts=48,
    num_videos=1000,
    num_validation_videos=40,
    student_sentences=16000,
    probe_per_concept=6,
)


def train(root: str) -> dict:
  """Writes the world and trains both teachers under `root`; returns {"world": its folder,
  "true"|"shuffled": {"workdir", "data_dir", "eval"}}, "eval" being the final evaluation's
  metrics. Every process must exit 0."""
  config = configlib.load("teacher", "size=tiny")
  world_dir = os.path.join(root, "world")
  world_lib.write_world(
      world_dir,
      **WORLD,
      word_budget=config.data.seq_len // 2,
      max_steps=config.video.max_steps,
      vocab_file=vocab_lib.default_vocab_file(),
      seed=0,
      log=lambda *_: None,
  )
  runs = {}
  for name, pairs in (("true", "video"), ("shuffled", "video_shuffled")):
    workdir = os.path.join(root, f"teacher_{name}")
    data_dir = os.path.join(world_dir, pairs)
    overrides = {
        "data.data_dir": data_dir,
        "eval.every_steps": config.train.steps,
        "checkpoint.every_steps": config.train.steps,
    }
    runs[name] = {"workdir": workdir, "data_dir": data_dir}
    runs[name]["procs"] = worker.launch(CONFIG, workdir, overrides, devices=1)
  for run in runs.values():
    logs = worker.wait(run["procs"], run["workdir"])
    assert run.pop("procs")[0].returncode == 0, logs[0][-3000:]
    run["eval"] = [m for m in worker.read_metrics(run["workdir"]) if "eval/recall@1" in m][-1]
  return {"world": world_dir, **runs}
