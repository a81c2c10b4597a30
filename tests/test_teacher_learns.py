"""Science check: the teacher learns which clip a caption describes, and only from true pairs.

Two tiny teachers are trained by the real entry point (`python -m vidlankd_jax.main`) on the
generated corpus (`vidlankd_jax/data/synthetic.py`: each caption segment names a concept whose
feature prototype the video's seconds carry) for the same steps: one on the true pairs and one on
a copy of the corpus whose training captions were dealt out to the wrong seconds. Both are scored
on the same held-out clips with their true captions.
"""

import inspect
import os

import pytest

import multihost_worker as worker
from vidlankd_jax import configlib
from vidlankd_jax.data import synthetic

# Held-out recall@1 must exceed chance (1 / held-out clips) by this factor when trained on true
# pairs, and stay under it when trained on shuffled ones.
FAR_ABOVE_CHANCE = 5.0


def write_shuffled_corpus(raw_dir: str, out_dir: str, seed: int = 0) -> None:
  """The corpus with its training captions mispaired (`synthetic.write_shuffled_corpus`), its
  held-out videos those `prepare_video_text` holds out by default."""
  num_held_out = (
      inspect.signature(synthetic.prepare_video_text).parameters["num_validation_videos"].default
  )
  synthetic.write_shuffled_corpus(raw_dir, out_dir, num_validation_videos=num_held_out, seed=seed)


def train_both(tmp_path) -> tuple[dict, dict, int]:
  """Final eval metrics of the tiny teacher on the true and on the mispaired corpus.

  Both run the real entry point as they are configured (`configs/teacher.py:size=tiny`), side by
  side on one emulated device each (two cores), on corpora converted by the real converter.
  """
  config = configlib.load("teacher", "size=tiny,data=synthetic")
  true_dir, shuffled_dir = str(tmp_path / "true"), str(tmp_path / "shuffled")
  synthetic.prepare_video_text(
      true_dir, word_budget=config.data.seq_len // 2, max_steps=config.video.max_steps
  )
  write_shuffled_corpus(
      os.path.join(true_dir, "synthetic_raw"), os.path.join(shuffled_dir, "synthetic_raw")
  )
  runs = {}
  for name, data_dir in (("true", true_dir), ("shuffled", shuffled_dir)):
    workdir = str(tmp_path / f"teacher_{name}")
    overrides = {
        "data.data_dir": data_dir,
        "eval.every_steps": config.train.steps,
        "checkpoint.every_steps": config.train.steps,
    }
    runs[name] = (
        workdir,
        worker.launch("configs/teacher.py:size=tiny,data=synthetic", workdir, overrides, devices=1),
    )
  metrics = {}
  for name, (workdir, procs) in runs.items():
    logs = worker.wait(procs, workdir)
    assert procs[0].returncode == 0, logs[0][-3000:]
    metrics[name] = [m for m in worker.read_metrics(workdir) if "eval/recall@1" in m][-1]
  return metrics["true"], metrics["shuffled"], config.train.steps


@pytest.mark.slow
def test_teacher_retrieves_held_out_clips_far_above_chance_only_from_true_pairs(tmp_path):
  true, shuffled, steps = train_both(tmp_path)
  assert true["eval/retrieval_clips"] == shuffled["eval/retrieval_clips"]  # the same held-out set
  chance = true["eval/chance_recall@1"]
  figures = (
      f"text-to-video recall@1 over {int(true['eval/retrieval_clips'])} held-out clips "
      f"after {steps} steps (chance {chance:.4f}): true pairs "
      f"{true['eval/recall@1']:.4f} (median rank {true['eval/median_rank']:.0f}), shuffled "
      f"pairs {shuffled['eval/recall@1']:.4f} (median rank {shuffled['eval/median_rank']:.0f})"
  )
  print(figures)
  assert true["eval/recall@1"] >= FAR_ABOVE_CHANCE * chance, figures
  assert shuffled["eval/recall@1"] < FAR_ABOVE_CHANCE * chance, figures
  assert true["eval/median_rank"] < shuffled["eval/median_rank"], figures
