"""Science check: distilling from a video-text teacher teaches a text-only student what only the
video shows (the transfer experiment of vidlankd_jax/demo/transfer.py, at test size).

In the generated world the concepts' visual attributes exist only in the clips; the students
read attribute-free text. A frozen-encoder probe names the attributes of held-out concepts from
each student's concept-token state. Asserted: the NST student beats the text-only baseline with
a 95% interval of the paired difference above 0; the student distilled from the shuffled-pair
teacher stays within noise of the baseline (its interval of the difference covers 0).
"""

import numpy as np
import pytest

from vidlankd_jax import main as main_lib
from vidlankd_jax.data import world as world_lib
from vidlankd_jax.demo import transfer

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def world_and_teachers(tiny_teachers):
  """The session's world and its two tiny teachers, as {"video"|"video_shuffled": workdir}."""
  teachers = {"video": tiny_teachers["true"], "video_shuffled": tiny_teachers["shuffled"]}
  return tiny_teachers["world"], {which: run["workdir"] for which, run in teachers.items()}


@pytest.fixture(scope="module")
def scores(world_and_teachers, tmp_path_factory):
  world_dir, teachers = world_and_teachers
  root = tmp_path_factory.mktemp("students")
  configs, workdirs = {}, {}
  for name, (objective, which) in transfer.BASE_STUDENTS.items():
    configs[name] = [
        transfer.student_config(
            world_dir, teachers[which], objective, steps=transfer.STUDENT_STEPS, seed=s
        )
        for s in SEEDS
    ]
    workdirs[name] = [str(root / f"{name}{s}") for s in SEEDS]
    for config, workdir in zip(configs[name], workdirs[name]):
      main_lib.run(config, workdir)
  configs["untrained"], workdirs["untrained"] = configs["text_only"], [None] * len(SEEDS)
  return transfer.evaluate_runs(world_dir, teachers, workdirs, configs)


@pytest.mark.slow
def test_nst_transfers_video_only_attributes_and_the_shuffled_teacher_does_not(
    scores, world_and_teachers
):
  world, _ = world_lib.read_world(world_and_teachers[0])
  students = scores["students"]
  summary = {name: transfer.summarize(s) for name, s in students.items()}
  nst_gain = transfer.paired_difference(students["nst"], students["text_only"])
  control = transfer.paired_difference(students["shuffled_teacher"], students["text_only"])
  figures = (
      f"held-out attribute accuracy (chance {transfer.chance(world):.3f}; teacher "
      f"{np.mean(scores['teachers']['video']):.3f}, shuffled teacher "
      f"{np.mean(scores['teachers']['video_shuffled']):.3f}): "
      + ", ".join(
          f"{n} {s['mean']:.3f} {np.round(s['ci95'], 3).tolist()}" for n, s in summary.items()
      )
      + f"; nst - text_only {nst_gain['mean']:+.3f} {np.round(nst_gain['ci95'], 3).tolist()}"
      + f"; shuffled - text_only {control['mean']:+.3f} {np.round(control['ci95'], 3).tolist()}"
  )
  print(figures)
  # The teacher itself must know the attributes of concepts the probe never saw labelled.
  assert np.mean(scores["teachers"]["video"]) > summary["text_only"]["ci95"][1], figures
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
  for name, classes in world_lib.ATTRIBUTES.items():  # balanced classes
    assert np.bincount(world.attributes[name]).tolist() == [48 // len(classes)] * len(classes)
