"""The session's trained tiny teachers, shared by every test that needs a trained one.

Two tiny teachers are trained by the real entry point (`python -m vidlankd_jax.main`) as
`configs/teacher.py:size=tiny,data=synthetic` configures them, side by side on one emulated
device each: one on the generated corpus (`vidlankd_jax/data/synthetic.py`: each caption segment
names a concept whose feature prototype the video's seconds carry) and one on a copy of it whose
training captions were dealt out to the wrong seconds. `tests/test_teacher_learns.py` checks what
they learned; the distillation tests distil from the first. The conftest's `tiny_teachers`
fixture trains them once per session (its users run on one test worker).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil

import numpy as np

import multihost_worker as worker
from vidlankd_jax import configlib
from vidlankd_jax.data import howto100m
from vidlankd_jax.data import synthetic

CONFIG = "configs/teacher.py:size=tiny,data=synthetic"


def write_shuffled_corpus(raw_dir: str, out_dir: str, seed: int = 0) -> None:
  """Copies the generated corpus in `raw_dir` to `out_dir` with its training captions mispaired.

  The caption texts of the training videos' segments are permuted among those segments; times and
  features are unchanged, so the converter cuts clips of the same seconds, now paired with captions
  about other concepts. The held-out videos (the converter's own choice) keep their true
  captions, so both teachers are scored on the same held-out pairs.
  """
  caption_json = os.path.join(raw_dir, "caption.json")
  with open(caption_json, encoding="utf-8") as f:
    captions = json.load(f)
  num_held_out = (
      inspect.signature(synthetic.prepare_video_text).parameters["num_validation_videos"].default
  )
  held_out = howto100m.select_validation_videos(
      caption_json, num_held_out, howto100m.ConvertConfig.hash_salt
  )
  slots = [
      (vid, i)
      for vid in sorted(captions)
      if vid not in held_out
      for i in range(len(captions[vid]["text"]))
  ]
  texts = [captions[vid]["text"][i] for vid, i in slots]
  order = np.random.default_rng(seed).permutation(len(texts))
  for (vid, i), j in zip(slots, order):
    captions[vid]["text"][i] = texts[j]
  os.makedirs(out_dir, exist_ok=True)
  for sub in ("features_2d", "features_3d"):
    shutil.copytree(os.path.join(raw_dir, sub), os.path.join(out_dir, sub))
  with open(os.path.join(out_dir, "caption.json"), "w", encoding="utf-8") as f:
    json.dump(captions, f)


def train(root: str) -> dict:
  """Trains both teachers under `root`; returns {"true"|"shuffled": {"workdir", "data_dir",
  "eval"}}, "eval" being the final evaluation's metrics. Every process must exit 0."""
  config = configlib.load("teacher", "size=tiny,data=synthetic")
  true_dir, shuffled_dir = os.path.join(root, "true"), os.path.join(root, "shuffled")
  synthetic.prepare_video_text(
      true_dir, word_budget=config.data.seq_len // 2, max_steps=config.video.max_steps
  )
  write_shuffled_corpus(
      os.path.join(true_dir, "synthetic_raw"), os.path.join(shuffled_dir, "synthetic_raw")
  )
  runs = {}
  for name, data_dir in (("true", true_dir), ("shuffled", shuffled_dir)):
    workdir = os.path.join(root, f"teacher_{name}")
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
  return runs
