"""Science check: distilling from a video-text teacher teaches a text-only student what only the
video shows (the transfer experiment of vidlankd_jax/demo/transfer.py at the demo's size, on the
session's tiny teachers).

In the generated world the concepts' visual attributes exist only in the clips; the students
read attribute-free text. A frozen-encoder probe names the attributes of held-out concepts from
each student's concept-token state. Asserted: the NST student beats the text-only baseline with
a 95% interval of the paired difference above 0; the student distilled from the shuffled-pair
teacher stays within noise of the baseline (its interval of the difference covers 0).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from support import multihost_worker as worker
from vidlankd_jax.data import world as world_lib
from vidlankd_jax.demo import transfer

# Three seeds, as the demo: with two, the NST gain's interval was not clear of 0 (docs/demo.md
# gives the per-seed figures).
NUM_SEEDS = 3


@pytest.fixture(scope="module")
def results(tiny_teachers, tmp_path_factory):
  """The transfer experiment (NST, text-only, shuffled-teacher and untrained students) on the
  session's world and teachers, run as the demo runs it: one process, one device."""
  out_dir = str(tmp_path_factory.mktemp("transfer"))
  command = [
      sys.executable,
      os.path.join(os.path.dirname(__file__), "support", "transfer_worker.py"),
      tiny_teachers["world"],
      tiny_teachers["true"]["workdir"],
      tiny_teachers["shuffled"]["workdir"],
      out_dir,
      str(NUM_SEEDS),
  ]
  env = worker.env(1, os.environ.get("JAX_COMPILATION_CACHE_DIR"))
  done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=840)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  with open(os.path.join(out_dir, "results.json"), encoding="utf-8") as f:
    return json.load(f)


@pytest.mark.slow
def test_nst_transfers_video_only_attributes_and_the_shuffled_teacher_does_not(results):
  students, teachers = results["transfer"], results["teachers"]
  nst_gain = results["differences"]["nst - text_only"]
  control = results["differences"]["shuffled_teacher - text_only"]
  figures = (
      f"held-out attribute accuracy (chance {results['chance']:.3f}; teacher "
      f"{teachers['video']:.3f}, shuffled teacher {teachers['video_shuffled']:.3f}): "
      + ", ".join(
          f"{n} {s['mean']:.3f} {np.round(s['ci95'], 3).tolist()}" for n, s in students.items()
      )
      + f"; nst - text_only {nst_gain['mean']:+.3f} {np.round(nst_gain['ci95'], 3).tolist()}"
      + f"; shuffled - text_only {control['mean']:+.3f} {np.round(control['ci95'], 3).tolist()}"
  )
  print(figures)
  assert all(len(s["per_seed"]) == NUM_SEEDS for s in students.values()), figures
  # The teacher itself must know the attributes of concepts the probe never saw labelled.
  assert teachers["video"] > students["text_only"]["ci95"][1], figures
  assert nst_gain["ci95"][0] > 0, figures
  assert control["ci95"][0] <= 0 <= control["ci95"][1], figures


def test_the_probe_reads_attributes_only_when_the_features_carry_them():
  world = world_lib.make_world(32, 0)
  rng = np.random.default_rng(0)
  probe = world_lib.probe_sentences(world, ["a b c d"], per_concept=4, seed=0)
  codes = {n: rng.standard_normal((len(c), 16)) for n, c in world_lib.ATTRIBUTES.items()}

  def features(split, informative):
    rows = []
    for sentence in probe[split]:
      noise = rng.standard_normal(16)
      signal = sum(codes[n][world.label(sentence["concept"], n)] for n in codes)
      rows.append(noise + (2 * signal if informative else 0))
    return np.asarray(rows)

  accuracy, scores = transfer.attribute_probe(
      world, probe, features("train", True), features("test", True)
  )
  assert accuracy.shape == (len(world.held_out),) and scores.shape == (len(world.held_out), 12)
  assert accuracy.mean() > 0.9
  chance_level, _ = transfer.attribute_probe(
      world, probe, features("train", False), features("test", False)
  )
  assert abs(chance_level.mean() - transfer.chance(world)) < 0.12


def test_world_concepts_are_single_word_pieces_and_the_split_is_clean(bert_vocab_file):
  world_lib.check_single_pieces(world_lib.CONCEPT_WORDS, bert_vocab_file)
  with pytest.raises(ValueError, match="not single WordPieces"):
    world_lib.check_single_pieces(["kayak"], bert_vocab_file)
  world = world_lib.make_world(48, 0)
  probe = world_lib.probe_sentences(world, ["one two three"], per_concept=2, seed=0)
  assert {s["concept"] for s in probe["test"]} == set(world.held_out)
  assert not {s["concept"] for s in probe["train"]} & set(world.held_out)
  for name, classes in world_lib.ATTRIBUTES.items():  # balanced classes on both sides
    for concepts in (world.train_concepts, world.held_out):
      labels = [world.label(c, name) for c in concepts]
      assert np.bincount(labels).tolist() == [24 // len(classes)] * len(classes)
