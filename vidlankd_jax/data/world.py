"""A GENERATED world where video knows what text cannot tell: the transfer experiment's data.

Concepts (everyday nouns, each ONE WordPiece of the bert-base-uncased vocabulary, checked here:
token-level distillation acts per token) have visual attributes (shape, colour, motion: four
classes each, balanced over the concepts and drawn at random per world seed). The attributes
exist only in the video:

* teacher pairs: generated clips whose features are built from the concept's attributes (one
  random unit prototype per attribute class, summed over the attributes, plus noise), captioned
  by real English word sequences with the concept word inserted (`data/synthetic.py`'s layout,
  converted by the real HowTo100M converter); the shuffled twin deals the training captions out
  to the wrong clips (`synthetic.write_shuffled_corpus`);
* student text: other real English word sequences with a concept word inserted at random,
  several per 30-token block, every concept equally often; nothing in a sentence depends on the
  concept's attributes, so text alone cannot reveal them;
* probe sentences: a third pool of real word sequences, one concept each; the task is to name an
  attribute of that concept. Its classifier is fitted on sentences about the TRAIN concepts and
  scored on sentences about the HELD-OUT concepts (half of them), which appear in the teacher's
  pairs and in the student's text but never in the probe's training split.

Files under `out_dir`: `world.json` (concepts, attributes, split), `raw/` and `raw_shuffled/`
(the generated corpora), `video/howto100m/` and `video_shuffled/howto100m/` (converted pairs),
`text/wikipedia/` (the student text as `wikipedia_mlm` shards of 126-token blocks, cut to the
student's sequence length by the pipeline: the generated text takes the place of Wikipedia), `probe.json` (the probe sentences).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from vidlankd_jax import errors
from vidlankd_jax.data import shards as shards_lib
from vidlankd_jax.data import synthetic

ATTRIBUTES = {
    "shape": ("round", "long", "flat", "boxy"),
    "colour": ("red", "green", "blue", "yellow"),
    "motion": ("still", "rolling", "spinning", "bouncing"),
}
CONCEPT_WORDS = (
    "onion guitar bicycle garden cake paint engine puppy tent laptop bread hammer violin candle "
    "carpet soap kite pasta ladder bottle mirror pumpkin saddle apple banana tomato potato carrot "
    "lemon cherry piano drum trumpet flute camera radio clock lamp chair sofa bucket basket "
    "shovel rope wheel truck boat horse rabbit chicken turtle snake spider bell hat shoe glove "
    "jacket scarf blanket pillow towel brush knife spoon"
).split()
WORLD_FILE = "world.json"
PROBE_FILE = "probe.json"


@dataclasses.dataclass(frozen=True)
class World:
  """Concept words, their attribute classes ({attribute: [num_concepts] ints}) and the split."""

  concepts: tuple[str, ...]
  attributes: dict[str, list[int]]
  held_out: tuple[str, ...]
  seed: int

  @property
  def train_concepts(self) -> tuple[str, ...]:
    return tuple(c for c in self.concepts if c not in self.held_out)

  def label(self, concept: str, attribute: str) -> int:
    return self.attributes[attribute][self.concepts.index(concept)]


def check_single_pieces(words, vocab_file: str) -> None:
  """Every concept word must be one WordPiece (a whole entry of the vocabulary)."""
  with open(vocab_file, encoding="utf-8") as f:
    entries = {line.rstrip("\n") for line in f}
  split = [w for w in words if w not in entries]
  if split:
    raise errors.DataError(f"{vocab_file}: concept words {split} are not single WordPieces")


def make_world(num_concepts: int, seed: int) -> World:
  """Attributes drawn per seed, each class equally often among the probe's training concepts
  and among the held-out ones (exactly when `num_concepts` is a multiple of 8): a probe that
  learned nothing then sits at chance on held-out concepts, where an uneven split would put a
  class that is common in training rare at test time and such a probe below chance."""
  if not len(ATTRIBUTES["shape"]) * 2 <= num_concepts <= len(CONCEPT_WORDS):
    raise errors.DataError(f"num_concepts must be in [8, {len(CONCEPT_WORDS)}], got {num_concepts}")
  rng = np.random.default_rng([seed, 1])
  concepts = tuple(
      CONCEPT_WORDS[i] for i in sorted(rng.permutation(len(CONCEPT_WORDS))[:num_concepts])
  )
  order = rng.permutation(num_concepts)
  halves = (order[: num_concepts // 2], order[num_concepts // 2 :])
  attributes = {}
  for name, classes in ATTRIBUTES.items():
    labels = np.zeros(num_concepts, np.int64)
    for half in halves:
      labels[half] = rng.permutation(np.arange(len(half)) % len(classes))
    attributes[name] = labels.tolist()
  held_out = tuple(concepts[i] for i in sorted(halves[0]))
  return World(concepts, attributes, held_out, seed)


def attribute_prototypes(world: World, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Unit 2D and 3D features [num_concepts, dim] of each concept: the sum of one random unit
  vector per attribute class it has. Concepts alike in an attribute share a component."""
  rng = np.random.default_rng([seed, 2])
  out = []
  for _ in ("2d", "3d"):
    total = np.zeros((len(world.concepts), dim))
    for name, classes in ATTRIBUTES.items():
      proto = rng.standard_normal((len(classes), dim))
      proto /= np.linalg.norm(proto, axis=-1, keepdims=True)
      total += proto[np.asarray(world.attributes[name])]
    out.append(total / np.linalg.norm(total, axis=-1, keepdims=True))
  return out[0], out[1]


def insert_concept(words: list[str], concept: str, rng: np.random.Generator) -> str:
  """A real word sequence with the concept word put at a random place inside."""
  cut = int(rng.integers(1, len(words)))
  return " ".join(words[:cut] + [concept] + words[cut:])


def sentence_pools(count: int) -> tuple[list[str], list[str], list[str]]:
  """Three disjoint pools of real word sequences: captions, student text, probe sentences."""
  sentences = [" ".join(s.split()[:7]) for s in synthetic.real_sentences(limit=count * 3)]
  if len(sentences) < 3 * count:
    raise errors.DataError(
        f"the world needs {3 * count} real sentences, gensim's Lee corpus gave {len(sentences)}: "
        "install gensim (a dependency of this project) with its test data"
    )
  return sentences[:count], sentences[count : 2 * count], sentences[2 * count : 3 * count]


def write_student_text(path: str, world: World, pool: list[str], num_sentences: int, seed: int):
  """Lines of student text: each a few sentences, every concept mentioned equally often."""
  rng = np.random.default_rng([seed, 3])
  names = np.resize(rng.permutation(len(world.concepts)), num_sentences)
  rng.shuffle(names)
  sentences = [
      insert_concept(pool[int(rng.integers(len(pool)))].split(), world.concepts[c], rng)
      for c in names
  ]
  lines = [" . ".join(sentences[i : i + 4]) + " ." for i in range(0, len(sentences), 4)]
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(line + "\n" for line in lines))


def probe_sentences(world: World, pool: list[str], per_concept: int, seed: int) -> dict:
  """{"train"|"test": [{"text", "concept"}]}: sentences about train / held-out concepts."""
  rng = np.random.default_rng([seed, 4])
  out = {"train": [], "test": []}
  for concept in world.concepts:
    split = "test" if concept in world.held_out else "train"
    for _ in range(per_concept):
      words = pool[int(rng.integers(len(pool)))].split()
      out[split].append({"text": insert_concept(words, concept, rng), "concept": concept})
  return out


def write_world(
    out_dir: str,
    *,
    num_concepts: int,
    num_videos: int,
    num_validation_videos: int,
    segments_per_video: tuple[int, int] = (1, 1),
    student_sentences: int,
    text_fractions: tuple[float, ...] = (1.0,),
    probe_per_concept: int,
    word_budget: int,
    max_steps: int,
    vocab_file: str,
    seed: int,
    log=print,
) -> dict:
  """Writes the whole world under `out_dir`; returns its summary (sizes and the split)."""
  from vidlankd_jax.data import text as text_lib
  from vidlankd_jax.data import vocab as vocab_lib

  world = make_world(num_concepts, seed)
  check_single_pieces(world.concepts, vocab_file)
  captions, student_pool, probe_pool = sentence_pools(200)
  log(
      f"world: {num_concepts} concepts with GENERATED visual attributes "
      f"({', '.join(ATTRIBUTES)}; {len(world.held_out)} held out from the probe's training); "
      "the clips are built from the attributes, the text never mentions them"
  )
  raw, raw_shuffled = os.path.join(out_dir, "raw"), os.path.join(out_dir, "raw_shuffled")
  synthetic.write_corpus(
      raw,
      num_videos=num_videos,
      segments_per_video=segments_per_video,
      concepts=world.concepts,
      prototypes=attribute_prototypes(world, 2048, seed),
      sentences=captions,
      seed=seed,
  )
  synthetic.write_shuffled_corpus(
      raw, raw_shuffled, num_validation_videos=num_validation_videos, seed=seed
  )
  video = {}
  for name, source in (("video", raw), ("video_shuffled", raw_shuffled)):
    video[name] = synthetic.convert_corpus(
        source,
        os.path.join(out_dir, name),
        num_validation_videos=num_validation_videos,
        word_budget=word_budget,
        max_steps=max_steps,
        log=lambda *_: None,
    )["splits"]
  vocab = vocab_lib.WordPieceVocabulary(vocab_file)
  text = {}
  for fraction in text_fractions:
    if not 0 < fraction <= 1:
      raise errors.DataError(f"text fractions must be in (0, 1], got {fraction}")
    folder = os.path.join(out_dir, text_folder(fraction))
    os.makedirs(folder, exist_ok=True)
    for split, count in (("train", student_sentences), ("validation", student_sentences // 10)):
      if split == "train":
        count = max(1, int(round(count * fraction)))
      lines = os.path.join(folder, f"student_{split}.txt")
      write_student_text(lines, world, student_pool, count, seed + (split == "validation"))
      blocks = text_lib.convert_text(
          [lines],
          os.path.join(folder, "wikipedia"),
          vocab,
          prefix="wikipedia",
          split=split,
          num_shards=1,
          fmt="lines",
          clean=False,  # generated sentences, not the released corpora: each one is kept
          log=lambda *_: None,
      )["blocks"]
      text[f"{text_folder(fraction)}/{split}"] = blocks
  probe = probe_sentences(world, probe_pool, probe_per_concept, seed)
  shards_lib.write_json_atomic(os.path.join(out_dir, PROBE_FILE), probe)
  shards_lib.write_json_atomic(os.path.join(out_dir, WORLD_FILE), dataclasses.asdict(world))
  summary = {
      "concepts": num_concepts,
      "held_out": list(world.held_out),
      "video_clips": {k: {s: v[s]["clips"] for s in v} for k, v in video.items()},
      "text_blocks": text,
      "probe_sentences": {k: len(v) for k, v in probe.items()},
  }
  log(
      f"world: {summary['video_clips']['video']['train']} train clips, {text['text/train']} student "
      f"text blocks, probe {len(probe['train'])} train / {len(probe['test'])} held-out sentences"
  )
  return summary


def text_folder(fraction: float) -> str:
  """The folder (under the world) of the student text cut to `fraction` of its sentences."""
  return "text" if fraction == 1.0 else f"text_{fraction:g}"


def read_world(out_dir: str) -> tuple[World, dict]:
  """The world and its probe sentences as `write_world` left them."""
  path = os.path.join(out_dir, WORLD_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
    with open(os.path.join(out_dir, PROBE_FILE), encoding="utf-8") as f:
      probe = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise errors.DataError(f"{out_dir}: not a finished world ({e})") from e
  world = World(tuple(raw["concepts"]), raw["attributes"], tuple(raw["held_out"]), raw["seed"])
  return world, probe
