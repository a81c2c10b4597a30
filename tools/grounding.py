"""Text-to-video grounding pictures and retrieval listings from a teacher and a distilled student.

  python tools/grounding.py --teacher_workdir runs/teacher --student_workdir runs/student \\
      --data_dir runs/synthetic_data --sentence "slice the onion thinly" \\
      --sentence "whisk the eggs in a bowl" --output_dir runs/grounding

For each sentence: a heatmap of the cosine between every word piece and each of `--num_clips`
held-out clips (`<data_dir>/howto100m` validation shards), from the teacher's token states and
from the student's tokens through its distillation head (`--head`), one panel per model and
sentence, in `<output_dir>/grounding.png`. The clips shown are the teacher's best matches for the
sentences (then the pool's first clips). And the top-`--k` clips of `--retrieval_clips` held-out
clips per sentence, by mean token vector . clip vector, for both models, printed and written to
`<output_dir>/retrieval.md`. Sentences come from `--sentence` (repeatable) or `--sentences_file`
(one per line).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

from vidlankd_jax import errors, quiet

if __name__ == "__main__":
  quiet.quiet_tensorflow_runtime()  # before the imports below load jax

import numpy as np

from vidlankd_jax import runs
from vidlankd_jax import sharding
from vidlankd_jax.evaluation import grounding
from vidlankd_jax.objectives import FEATURE_OBJECTIVES
from vidlankd_jax.models.teacher import Teacher

CLIP_BATCH = 64
SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]")


def encode_sentences(sentences: list[str], vocab_file: str, lower_case: bool, max_len: int):
  """([CLS] pieces [SEP] ids [S, L], attention mask [S, L], word pieces per sentence)."""
  from vidlankd_jax.data import vocab as vocab_lib

  vocab = vocab_lib.WordPieceVocabulary(vocab_file, lower_case=lower_case)
  names = vocab_lib.read_vocab_file(vocab_file)
  rows = [[vocab.cls_id] + list(vocab.encode(s))[: max_len - 2] + [vocab.sep_id] for s in sentences]
  length = max(len(r) for r in rows)
  ids = np.zeros((len(rows), length), np.int32)
  mask = np.zeros_like(ids)
  for i, row in enumerate(rows):
    ids[i, : len(row)] = row
    mask[i, : len(row)] = 1
  return ids, mask, [[names[t] for t in row] for row in rows]


def held_out_clips(
    data_dir: str,
    vocab_file: str,
    lower_case: bool,
    feature_dim: int,
    max_steps: int,
    num_clips: int,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """The first `num_clips` validation clips: features [N, T, D], mask [N, T], captions."""
  import tensorflow as tf
  from vidlankd_jax.data import tasks, video_text
  from vidlankd_jax.data import vocab as vocab_lib

  pattern = tasks.task_file_pattern(data_dir, tasks.VIDEO_TEXT_TASK, "validation")
  files = sorted(glob.glob(pattern))
  if not files:
    raise errors.MissingFileError(f"no held-out clips: nothing matches {pattern}")
  parsed = tf.data.TFRecordDataset(files).map(
      lambda r: tf.io.parse_single_example(r, video_text.FEATURE_SPEC)
  )
  vocab = vocab_lib.WordPieceVocabulary(vocab_file, lower_case=lower_case)
  fitted = tasks.decode_video_clip(parsed, {"video_features": max_steps}, vocab, feature_dim)
  ds = tf.data.Dataset.zip((fitted, parsed.map(lambda ex: ex["caption"]))).take(num_clips)
  features, masks, captions = [], [], []
  for clip, caption in ds.as_numpy_iterator():
    features.append(clip["video_features"])
    masks.append(clip["video_mask"])
    captions.append(caption.decode("utf-8"))
  if not captions:
    raise errors.DataError(f"{pattern}: the validation shards hold no clips")
  return np.stack(features), np.stack(masks), captions


def clip_vectors(teacher: Teacher, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
  return np.concatenate(
      [
          grounding.teacher_clip_vectors(
              teacher, features[i : i + CLIP_BATCH], mask[i : i + CLIP_BATCH]
          )
          for i in range(0, len(features), CLIP_BATCH)
      ]
  )


def heatmap_clips(
    listings: list[list[tuple[int, float, str]]], num_clips: int, pool: int
) -> list[int]:
  """The clips the heatmaps show: each sentence's best matches in turn, then the pool's first."""
  chosen: list[int] = []
  for rank in range(max(len(l) for l in listings)):
    for listing in listings:
      if rank < len(listing) and listing[rank][0] not in chosen:
        chosen.append(listing[rank][0])
  chosen = chosen[:num_clips]
  chosen += [j for j in range(pool) if j not in chosen][: num_clips - len(chosen)]
  return chosen


def clip_label(index: int, caption: str, width: int = 28) -> str:
  text = caption if len(caption) <= width else caption[: width - 1] + "…"
  return f"#{index} {text}"


def listing_markdown(sentences: list[str], listings: dict[str, list], k: int, pool: int) -> str:
  lines = [f"# Text-to-video retrieval: top {k} of {pool} held-out clips", ""]
  for i, sentence in enumerate(sentences):
    lines += [f"## {sentence}", ""]
    for model, per_sentence in listings.items():
      lines += [f"**{model}**", "", "| rank | clip | score | caption |", "|---:|---:|---:|---|"]
      lines += [
          f"| {r} | {j} | {score:.4f} | {caption.replace('|', '/')} |"
          for r, (j, score, caption) in enumerate(per_sentence[i], start=1)
      ]
      lines.append("")
  return "\n".join(lines)


def run(args) -> dict:
  """Writes grounding.png and retrieval.md; returns what it computed (for callers and tests)."""
  from vidlankd_jax.data import vocab as vocab_lib

  sentences = list(args.sentence)
  if args.sentences_file:
    with open(args.sentences_file, encoding="utf-8") as f:
      sentences += [line.strip() for line in f if line.strip()]
  if not sentences:
    raise errors.DataError("no sentences: pass --sentence (repeatable) or --sentences_file")
  step = None if args.step < 0 else args.step
  mesh = sharding.single_device_mesh()
  teacher, config = runs.load_teacher_run(args.teacher_workdir, mesh, step=step)
  student = None
  if args.student_workdir:
    if args.head not in FEATURE_OBJECTIVES:
      raise errors.DataError(
          f"--head {args.head!r}: heads map tokens to the teacher for {FEATURE_OBJECTIVES}"
      )
    student = runs.load_student(args.student_workdir, mesh, heads=(args.head,), step=step)
  vocab_file = config.data.get("vocab_file") or vocab_lib.default_vocab_file()
  lower_case = bool(config.data.get("lower_case", True))
  features, video_mask, captions = held_out_clips(
      args.data_dir,
      vocab_file,
      lower_case,
      config.video.input_dim,
      config.video.max_steps,
      args.retrieval_clips,
  )
  clips = clip_vectors(teacher, features, video_mask)
  k = min(args.k, len(clips))

  ids, mask, pieces = encode_sentences(
      sentences, vocab_file, lower_case, config.model.max_position_embeddings
  )
  tokens = {"teacher": grounding.teacher_token_vectors(teacher, ids, mask)}
  if student is not None:
    tokens[f"student ({args.head} head)"] = grounding.student_token_vectors(
        student, ids, mask, head=args.head
    )
  listings = {
      name: grounding.retrieval_listing(
          grounding.sentence_vectors(vectors, mask), clips, captions, k
      )
      for name, vectors in tokens.items()
  }
  shown = heatmap_clips(listings["teacher"], args.num_clips, len(clips))
  labels = [clip_label(j, captions[j]) for j in shown]
  panels = []
  for i, sentence in enumerate(sentences):
    rows = [t for t, piece in enumerate(pieces[i]) if piece not in SPECIAL_TOKENS]
    for name, vectors in tokens.items():
      panels.append(
          grounding.GroundingPanel(
              title=f"{name}: {sentence}",
              tokens=[pieces[i][t] for t in rows],
              clip_labels=labels,
              scores=grounding.token_clip_similarity(vectors[i, rows], clips[shown]),
          )
      )
  os.makedirs(args.output_dir, exist_ok=True)
  picture = os.path.join(args.output_dir, "grounding.png")
  grounding.plot_grounding_heatmaps(panels, picture, columns=len(tokens))
  markdown = listing_markdown(sentences, listings, k, len(clips))
  with open(os.path.join(args.output_dir, "retrieval.md"), "w", encoding="utf-8") as f:
    f.write(markdown + "\n")
  print(markdown)
  print(f"wrote {picture} and {os.path.join(args.output_dir, 'retrieval.md')}")
  return {"panels": panels, "listings": listings, "picture": picture, "shown": shown}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--teacher_workdir", required=True)
  parser.add_argument("--student_workdir", default="", help="a distillation run (optional)")
  parser.add_argument(
      "--head", default="nst", help=f"the student's head: one of {FEATURE_OBJECTIVES}"
  )
  parser.add_argument("--data_dir", required=True, help="holds howto100m/ (validation shards)")
  parser.add_argument("--sentence", action="append", default=[], help="a sentence (repeatable)")
  parser.add_argument("--sentences_file", default="", help="one sentence per line")
  parser.add_argument("--num_clips", type=int, default=8, help="clips shown in the heatmaps")
  parser.add_argument("--retrieval_clips", type=int, default=256, help="held-out clips ranked")
  parser.add_argument("--k", type=int, default=5, help="clips listed per sentence")
  parser.add_argument(
      "--step", type=int, default=-1, help="checkpoint step of both runs; -1: latest"
  )
  parser.add_argument("--output_dir", required=True)
  args = parser.parse_args(argv)
  if args.num_clips < 1 or args.retrieval_clips < 1 or args.k < 1:
    parser.error("--num_clips, --retrieval_clips and --k must be positive")
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  quiet.quiet_libraries()
  run(args)
  return 0


if __name__ == "__main__":
  sys.exit(errors.run_tool(main))
