"""The grounding probe: how well each model's text representations find the right video clip.

For every held-out clip the caption is the query and the clip's teacher vector (the teacher's
video encoder) the target; text-to-clip recall@k ranks all held-out clips (the teacher's own
retrieval metric, `evaluation.retrieval.retrieval_metrics`). The rows:

* teacher: its own token states averaged over the caption, zero-shot (what it was trained for);
* NST student through its distillation head, zero-shot: the head maps tokens into the
  teacher's space, which only a distilled student has;
* linear probe, for every student alike: a ridge-regression map from the student's mean-pooled
  last hidden states to the teacher's clip vectors, fitted on the TRAINING clips' captions and
  scored on the held-out ones. The text-only baseline has no head, so this is the fair
  comparison: same probe, same data, different representations. An untrained student of the
  same shape shows what the probe gets from random features.
"""

from __future__ import annotations

import os
import re

import numpy as np
from flax import nnx

from vidlankd_jax import errors
from vidlankd_jax import runs
from vidlankd_jax.data import pipeline
from vidlankd_jax.data import synthetic
from vidlankd_jax.evaluation import grounding
from vidlankd_jax.evaluation import ridge
from vidlankd_jax.evaluation.retrieval import retrieval_metrics
from vidlankd_jax.ops import masked_mean_pool

RIDGE_PENALTIES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
TEXT_INPUTS = ("unmasked_ids", "attention_mask", "token_type_ids")


def load_student(config, workdir: str | None, mesh):
  """The student of `workdir`'s last checkpoint, or a fresh one of `config` when None."""
  if workdir is None:
    return runs.build_student(config, mesh)
  return runs.load_student(workdir, mesh)


@nnx.jit
def pooled_hidden(student, input_ids, attention_mask, token_type_ids):
  """[B, H] the student's last hidden states averaged over the real tokens (no head)."""
  hidden = student.language.bert.encode(input_ids, attention_mask, token_type_ids)
  return masked_mean_pool(hidden, attention_mask)


def read_clips(
    teacher, students: dict, spec, mesh, split: str, *, max_clips: int, batch_size: int
) -> dict[str, np.ndarray]:
  """Captions and vectors of up to `max_clips` clips of `split`, in file order.

  Returns ids/mask [N, L], `clip` [N, H] (teacher clip vectors), `teacher` [N, H] (its sentence
  vectors), `pooled/<name>` [N, H_s] per student and `head/<name>` [N, H] per student with an
  NST head (sentence vectors through the head).
  """
  batches = pipeline.host_batches(
      spec, mesh, split, global_batch_size=batch_size, seed=0, repeat=False, shuffle=False
  )
  out: dict[str, list] = {}
  count = 0
  for batch in batches:
    keep = batch["valid"] > 0  # the last batch is padded with empty rows
    ids, mask, types = (batch[k] for k in TEXT_INPUTS)
    rows = {
        "ids": ids,
        "mask": mask,
        "clip": grounding.teacher_clip_vectors(
            teacher, batch["video_features"], batch["video_mask"]
        ),
        "teacher": grounding.sentence_vectors(
            grounding.teacher_token_vectors(teacher, ids, mask, types), mask
        ),
    }
    for name, student in students.items():
      rows[f"pooled/{name}"] = np.asarray(pooled_hidden(student, ids, mask, types))
      if "nst" in student.kd_heads:
        rows[f"head/{name}"] = grounding.sentence_vectors(
            grounding.student_token_vectors(student, ids, mask, types, head="nst"), mask
        )
    for key, value in rows.items():
      out.setdefault(key, []).append(np.asarray(value)[keep])
    count += int(keep.sum())
    if count >= max_clips:
      break
  if not count:
    raise errors.DataError(f"no {split} clips in {spec.data_dir}")
  return {k: np.concatenate(v)[:max_clips] for k, v in out.items()}


def unit_rows(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def predict_ridge(model: ridge.Ridge, x: np.ndarray) -> np.ndarray:
  return unit_rows(ridge.decision(model, x))


def linear_probe(train_x, train_y, test_x, test_y, *, holdout_fraction: float = 0.2) -> dict:
  """Ridge map fitted on training pairs (its penalty chosen on their last `holdout_fraction`
  by mean cosine), then text-to-clip retrieval on the test pairs."""
  cut = int(len(train_x) * (1 - holdout_fraction))

  def fit(x, y, penalty):  # the penalty is per example: scale-free in N
    return ridge.fit(x, y, penalty * len(x))

  def holdout_cosine(penalty):
    model = fit(train_x[:cut], train_y[:cut], penalty)
    return float(
        np.mean(np.sum(predict_ridge(model, train_x[cut:]) * unit_rows(train_y[cut:]), -1))
    )

  penalty = max(RIDGE_PENALTIES, key=holdout_cosine)
  model = fit(train_x, train_y, penalty)
  metrics = retrieval_metrics(predict_ridge(model, test_x).astype(np.float32), test_y)
  return {**metrics, "ridge_penalty": penalty}


def concepts_named(text: str, concepts: tuple[str, ...]) -> list[str]:
  """The generated corpus's concept words a caption names, in order."""
  words = re.findall(r"[a-z]+", text.lower())
  return [w for w in words if w in concepts]


def grounding_examples(
    teacher,
    nst_student,
    test: dict,
    vocab,
    *,
    num_sentences: int,
    num_clips: int,
    concepts: tuple[str, ...],
):
  """Heatmap panels and top-3 retrieval listings for a few held-out captions.

  Sentences are held-out captions naming one concept each (distinct concepts); the columns are
  their own clips plus other single-concept clips, labelled by the concept their caption names
  (the generated corpus's ground truth). Panels: teacher tokens and NST-student tokens (through
  its head) against the teacher's clip vectors.
  """
  captions = [vocab.decode([i for i in ids if i not in vocab.special_ids]) for ids in test["ids"]]
  named = [concepts_named(c, concepts) for c in captions]
  single = [i for i, n in enumerate(named) if len(n) == 1]
  chosen, seen = [], set()
  for i in single:
    if named[i][0] not in seen:
      chosen.append(i)
      seen.add(named[i][0])
  if not chosen:
    raise errors.DataError("no held-out caption names exactly one concept: too few held-out clips")
  sentences = chosen[:num_sentences]
  columns = chosen[:num_clips]
  labels = [f"{named[j][0]} #{j}" for j in columns]
  ids, mask = test["ids"][sentences], test["mask"][sentences]
  teacher_tokens = grounding.teacher_token_vectors(teacher, ids, mask)
  student_tokens = grounding.student_token_vectors(nst_student, ids, mask, head="nst")
  clips = test["clip"][columns]
  panels = []
  for row, index in enumerate(sentences):
    real = [t for t in range(ids.shape[1]) if mask[row, t] and ids[row, t] not in vocab.special_ids]
    tokens = [vocab.tokens[int(ids[row, t])] for t in real]
    for who, vectors in (("teacher", teacher_tokens), ("NST student (head)", student_tokens)):
      panels.append(
          grounding.GroundingPanel(
              title=f"{who}: clip #{index} ({named[index][0]})",
              tokens=tokens,
              clip_labels=labels,
              scores=grounding.token_clip_similarity(vectors[row][real], clips),
          )
      )
  listings = {
      "teacher": grounding.retrieval_listing(
          test["teacher"][sentences], test["clip"], captions, k=3
      ),
      "NST student (head)": grounding.retrieval_listing(
          test["head/nst"][sentences], test["clip"], captions, k=3
      ),
  }
  examples = [
      {
          "clip": int(i),
          "caption": captions[i],
          **{
              who: [{"clip": j, "score": s, "caption": c} for j, s, c in listing[n]]
              for who, listing in listings.items()
          },
      }
      for n, i in enumerate(sentences)
  ]
  return panels, examples


def run_probe(
    *,
    teacher_config,
    student_configs: dict,
    student_workdirs: dict,
    out_dir: str,
    max_train_clips: int,
    max_test_clips: int,
    num_sentences: int = 2,
    num_clips: int = 6,
    concepts: tuple[str, ...] = tuple(synthetic.CONCEPT_NAMES),
    log=print,
) -> dict:
  """Loads the teacher and the students, reads the clips, scores every row, draws the heatmap.

  `student_configs[name]` is the distill config of each student, `student_workdirs[name]` its
  run (None: an untrained student of that config). A student named "nst" must have an NST head.
  """
  from vidlankd_jax import sharding
  from vidlankd_jax.data import vocab as vocab_lib

  nst_config = student_configs["nst"]
  mesh = sharding.make_mesh(nst_config.mesh)
  teacher = runs.load_teacher(
      nst_config.teacher, runs.Run(nst_config.teacher.workdir), mesh, nst_config.sharding_rules
  )
  students = {
      name: load_student(cfg, student_workdirs[name], mesh) for name, cfg in student_configs.items()
  }
  vocab_file = pipeline.resolve_vocab(teacher_config.data, teacher_config.model.vocab_size)
  spec = pipeline.input_spec(teacher_config.data, vocab_file, teacher_config.video)
  batch_size = int(teacher_config.eval.batch_size)
  train = read_clips(
      teacher, students, spec, mesh, "train", max_clips=max_train_clips, batch_size=batch_size
  )
  test = read_clips(
      teacher, students, spec, mesh, "validation", max_clips=max_test_clips, batch_size=batch_size
  )
  log(
      f"probe: {len(train['clip'])} training clips fit the linear maps, {len(test['clip'])} held-out "
      "clips are ranked"
  )
  rows = {"teacher (zero-shot)": retrieval_metrics(test["teacher"], test["clip"])}
  for name in students:
    if f"head/{name}" in test:
      rows[f"{name} student, NST head (zero-shot)"] = retrieval_metrics(
          test[f"head/{name}"], test["clip"]
      )
  for name in students:
    rows[f"{name} student, linear probe"] = linear_probe(
        train[f"pooled/{name}"], train["clip"], test[f"pooled/{name}"], test["clip"]
    )
  vocab = vocab_lib.WordPieceVocabulary(vocab_file)
  panels, examples = grounding_examples(
      teacher,
      students["nst"],
      test,
      vocab,
      num_sentences=num_sentences,
      num_clips=num_clips,
      concepts=concepts,
  )
  heatmap = os.path.join(out_dir, "grounding.png")
  grounding.plot_grounding_heatmaps(panels, heatmap)
  return {
      "rows": rows,
      "examples": examples,
      "heatmap": heatmap,
      "train_clips": len(train["clip"]),
      "test_clips": len(test["clip"]),
  }
