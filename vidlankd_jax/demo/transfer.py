"""The transfer experiment: does distilling from a video-text teacher teach a text-only student
what only the video shows?

On the GENERATED world of `data/world.py`, concepts' visual attributes live only in the clips.
A teacher trained on the true video-text pairs (and a twin on shuffled pairs) is distilled into
students on attribute-free text; each student is then read by one frozen-encoder probe:

* features: the student's last hidden state at the concept word's token (one WordPiece), the
  encoder frozen; the same for every student, so only the representations differ;
* classifier: a ridge classifier per attribute (one-hot targets, features standardised on the
  training sentences), fitted on sentences about the TRAIN concepts, scored on sentences about
  the HELD-OUT concepts; its penalty is chosen on the training concepts alone (fit on half of
  them, score on the other half);
* score: held-out accuracy averaged over the attributes, per held-out concept; chance is the
  mean of 1 / classes. Text-only and untrained students can only be at chance by construction.

Students (same text, steps and seeds): `nst` and the other objectives (their config names),
`text_only` (objectives=none), `shuffled_teacher` (NST from the shuffled-pair teacher) and
`untrained` (the initial weights). Means and 95% intervals: `evaluation.bootstrap.bootstrap_ci`
over seeds and held-out concepts. Every training run goes through `vidlankd_jax.main.run`.
"""

from __future__ import annotations

import os

import numpy as np

from vidlankd_jax import errors
from vidlankd_jax.data import world as world_lib
from vidlankd_jax.demo import stage_configs
from vidlankd_jax.evaluation import ridge
from vidlankd_jax.evaluation.bootstrap import bootstrap_ci

RIDGE_PENALTIES = (0.1, 1.0, 10.0, 100.0)
# Every KD term's weight is the tiny config's times this: at the tiny config's own weights a few
# hundred steps leave the KD terms too weak against MLM to transfer the attributes (docs/demo.md
# gives the measurements).
KD_WEIGHT_SCALE = 30.0
# The students' steps: NST's transfer grows with them (docs/demo.md).
STUDENT_STEPS = 400
# Student name -> (objectives, which teacher it distils from).
BASE_STUDENTS = {
    "nst": ("nst", "video"),
    "text_only": ("none", "video"),
    "shuffled_teacher": ("nst", "video_shuffled"),
}
UNTRAINED = "untrained"


def student_names(objectives: tuple[str, ...]) -> dict[str, tuple[str, str]]:
  """The trained students of an experiment: NST, each extra objective, the two controls."""
  names = dict(BASE_STUDENTS)
  for objective in objectives:
    if objective not in ("nst", "none"):
      names[objective] = (objective, "video")
  return names


def encode_sentences(vocab, sentences: list[dict], seq_len: int) -> dict[str, np.ndarray]:
  """[CLS] sentence [SEP] ids, masks and the position of each sentence's concept token."""
  ids = np.zeros((len(sentences), seq_len), np.int32)
  position = np.zeros(len(sentences), np.int32)
  for row, sentence in enumerate(sentences):
    pieces = [vocab.cls_id] + list(vocab.encode(sentence["text"]))[: seq_len - 2] + [vocab.sep_id]
    concept = vocab.encode(sentence["concept"])
    if len(concept) != 1 or concept[0] not in pieces:
      raise errors.DataError(
          f"probe sentence {sentence['text']!r}: concept {sentence['concept']!r} is not one token of it"
      )
    ids[row, : len(pieces)] = pieces
    position[row] = pieces.index(concept[0])
  return {"ids": ids, "mask": (ids > 0).astype(np.int32), "position": position}


def concept_states(encode, inputs: dict, batch_size: int = 64) -> np.ndarray:
  """[N, H] the encoder's last hidden state at each sentence's concept token."""
  out = []
  for start in range(0, len(inputs["ids"]), batch_size):
    ids = inputs["ids"][start : start + batch_size]
    pad = batch_size - len(ids)  # one shape: one compilation
    full = np.pad(ids, ((0, pad), (0, 0)))
    mask = np.pad(inputs["mask"][start : start + batch_size], ((0, pad), (0, 0)))
    hidden = np.asarray(encode(full, mask, np.zeros_like(full)))[: len(ids)]
    out.append(hidden[np.arange(len(ids)), inputs["position"][start : start + batch_size]])
  return np.concatenate(out).astype(np.float64)


def choose_penalty(x, y, concepts: np.ndarray, num_classes: int) -> float:
  """The penalty whose classifier, fitted on half of the training concepts, best names the
  attribute for the other half (both directions): held-out concepts, as at test time."""
  names = sorted(set(concepts))
  half = set(names[::2])
  first = np.asarray([c in half for c in concepts])

  def accuracy(penalty, fit_on):
    model = ridge.fit_classifier(x[fit_on], y[fit_on], num_classes, penalty)
    return np.mean(np.argmax(ridge.decision(model, x[~fit_on]), -1) == y[~fit_on])

  def score(penalty):
    return sum(accuracy(penalty, a) for a in (first, ~first))

  return max(RIDGE_PENALTIES, key=score)


def attribute_probe(
    world, probe: dict, train_x: np.ndarray, test_x: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """(accuracy per held-out concept, averaged over the attributes; the probe's class scores per
  held-out concept [concepts, all attribute classes]), concepts in `world.held_out` order."""
  train_c = np.asarray([s["concept"] for s in probe["train"]])
  test_c = np.asarray([s["concept"] for s in probe["test"]])
  correct = np.zeros(len(test_c))
  scores = []
  for name, classes in world_lib.ATTRIBUTES.items():
    train_y = np.asarray([world.label(c, name) for c in train_c])
    test_y = np.asarray([world.label(c, name) for c in test_c])
    penalty = choose_penalty(train_x, train_y, train_c, len(classes))
    decision = ridge.decision(ridge.fit_classifier(train_x, train_y, len(classes), penalty), test_x)
    correct += np.argmax(decision, -1) == test_y
    scores.append(decision)
  correct /= len(world_lib.ATTRIBUTES)
  scores = np.concatenate(scores, axis=-1)
  per_concept = [test_c == c for c in world.held_out]
  return (
      np.asarray([correct[m].mean() for m in per_concept]),
      np.stack([scores[m].mean(0) for m in per_concept]),
  )


def chance(world) -> float:
  return float(np.mean([1 / len(c) for c in world_lib.ATTRIBUTES.values()]))


def summarize(per_seed: list[np.ndarray], *, seed: int = 0) -> dict:
  """{"mean", "ci95", "per_seed"}: per-seed accuracies and the two-level bootstrap interval."""
  mean, low, high = bootstrap_ci(per_seed, seed=seed)
  return {"mean": mean, "ci95": [low, high], "per_seed": [float(np.mean(s)) for s in per_seed]}


def paired_difference(a: list[np.ndarray], b: list[np.ndarray], *, seed: int = 0) -> dict:
  """The interval of a - b, paired by seed and held-out concept."""
  return summarize([x - y for x, y in zip(a, b)], seed=seed)


def evaluate_runs(
    world_dir: str,
    teacher_dirs: dict[str, str],
    students: dict[str, list[str | None]],
    configs: dict[str, list],
) -> dict:
  """Per-concept held-out accuracies of each student run (None: untrained of that config) and
  of each teacher's own token states; returns {"students": {name: [array per seed]},
  "teachers": {which: array}}."""
  from vidlankd_jax import runs
  from vidlankd_jax import sharding
  from vidlankd_jax.data import pipeline
  from vidlankd_jax.data import vocab as vocab_lib
  from vidlankd_jax.evaluation import grounding

  world, probe = world_lib.read_world(world_dir)
  any_config = next(iter(configs.values()))[0]
  mesh = sharding.make_mesh(any_config.mesh)
  vocab = vocab_lib.WordPieceVocabulary(
      pipeline.resolve_vocab(any_config.data, any_config.model.vocab_size)
  )
  seq_len = int(any_config.data.seq_len)
  inputs = {split: encode_sentences(vocab, probe[split], seq_len) for split in ("train", "test")}

  def score(encode, key):
    states = {split: concept_states(encode, inputs[split]) for split in inputs}
    accuracy, out["class_scores"][key] = attribute_probe(
        world, probe, states["train"], states["test"]
    )
    return accuracy

  out = {"students": {}, "teachers": {}, "class_scores": {}}
  for name, workdirs in students.items():
    out["students"][name] = []
    for k, (workdir, config) in enumerate(zip(workdirs, configs[name])):
      student = (
          runs.build_student(config, mesh) if workdir is None else runs.load_student(workdir, mesh)
      )
      out["students"][name].append(
          score(
              lambda i, m, t, s=student: grounding.student_hidden_states(s, i, m, t),
              f"{name}/{k}",
          )
      )
  for which, teacher_dir in teacher_dirs.items():
    teacher, _ = runs.load_teacher_run(teacher_dir, mesh)
    out["teachers"][which] = score(
        lambda i, m, t, teacher=teacher: grounding.teacher_token_vectors(teacher, i, m, t),
        f"teacher/{which}",
    )
  return out


def class_labels() -> list[str]:
  """The twelve attribute classes, attribute by attribute: the columns of the concept panels."""
  return [c for classes in world_lib.ATTRIBUTES.values() for c in classes]


def plot_concept_panels(world, class_scores: dict, panels: dict[str, str], path: str, rows: int):
  """The probe's attribute-class scores of the concept word in held-out sentences, one panel per
  model side by side ({title: class_scores key}); each row label gives the true attributes."""
  from vidlankd_jax.evaluation import grounding

  concepts = world.held_out[:rows]
  labels = [
      f"{c} ({', '.join(classes[world.label(c, a)] for a, classes in world_lib.ATTRIBUTES.items())})"
      for c in concepts
  ]
  grounding.plot_grounding_heatmaps(
      [
          grounding.GroundingPanel(
              title, labels, class_labels(), class_scores[key][: len(concepts)]
          )
          for title, key in panels.items()
      ],
      path,
      columns=3,
      value_label="probe score",
      shared_scale=False,
  )


def run_experiment(
    world_dir: str,
    teacher_dirs: dict[str, str],
    out_dir: str,
    *,
    steps: int,
    num_seeds: int,
    objectives: tuple[str, ...],
    seed: int,
    log=print,
) -> dict:
  """Trains every student of the experiment through `vidlankd_jax.main.run` (each seed into
  `out_dir/<student>/seed<k>`), scores them and the teachers, writes `transfer.png` and
  `transfer_tokens.png` into `out_dir`; returns the results (JSON-ready)."""
  from vidlankd_jax import main as main_lib
  from vidlankd_jax.evaluation import plots

  seeds = [seed * 100 + k for k in range(num_seeds)]
  configs, workdirs = {}, {}
  for name, (objective, which) in student_names(objectives).items():
    configs[name], workdirs[name] = [], []
    for k, student_seed in enumerate(seeds):
      config = stage_configs.student_config(
          os.path.join(world_dir, "text"),
          teacher_dirs[which],
          objective,
          steps=steps,
          seed=student_seed,
          kd_weight_scale=KD_WEIGHT_SCALE,
      )
      run_dir = os.path.join(out_dir, name, f"seed{k}")
      log(f"transfer: {name} student, seed {student_seed} ({objective}, {steps} steps)")
      main_lib.run(config, run_dir)
      configs[name].append(config)
      workdirs[name].append(run_dir)
  configs[UNTRAINED] = configs["text_only"]
  workdirs[UNTRAINED] = [None] * num_seeds
  scores = evaluate_runs(world_dir, teacher_dirs, workdirs, configs)
  world, _ = world_lib.read_world(world_dir)
  students = {name: summarize(per_seed, seed=seed) for name, per_seed in scores["students"].items()}
  teachers = {which: float(np.mean(acc)) for which, acc in scores["teachers"].items()}
  difference = {
      f"{name} - text_only": paired_difference(
          scores["students"][name], scores["students"]["text_only"], seed=seed
      )
      for name in students
      if name != "text_only"
  }
  plots.plot_intervals(
      students,
      os.path.join(out_dir, "transfer.png"),
      reference=chance(world),
      ylabel="attribute accuracy, held-out concepts",
      title="Video-only attributes of held-out concepts, read from frozen students "
      "(mean, 95% CI, seeds)",
  )
  panels = {"teacher (true pairs)": "teacher/video"}
  panels.update({f"{name} student": f"{name}/0" for name in students})
  plot_concept_panels(
      world, scores["class_scores"], panels, os.path.join(out_dir, "transfer_tokens.png"), rows=12
  )
  return {
      "transfer": students,
      "chance": chance(world),
      "teachers": teachers,
      "differences": difference,
      "seeds": seeds,
      "steps": steps,
      "held_out_concepts": len(world.held_out),
      "probe": "frozen encoder, concept-token state, ridge classifier per attribute",
  }
