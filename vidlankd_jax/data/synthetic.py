"""A small generated video-text corpus in HowTo100M's on-disk layout, for tests and the demo.

It is generated, not real video: each of `num_concepts` concepts (named by an everyday noun) has
a random 2D and 3D feature prototype; a video is a run of caption segments, each about one
concept, whose seconds carry that concept's prototypes plus noise, and whose caption names the
concept inside a piece of real English text. The features therefore carry what the captions say,
so a teacher has something true to learn; shuffling the pairing destroys it.

The concept is meant to be the strongest signal on both sides: each second's noise is smaller
than its prototype (`noise`, the ratio of their norms), and the words around a concept come from
a small pool of real sentences shared by all videos. With per-video unique text and noise larger
than the signal, a tiny teacher fits its training pairs by memorising the filler words and the
noise of each clip and ranks held-out clips at chance.

Layout written (as HowTo100M's): `caption.json` {video: {"start", "end", "text"}},
`features_2d/VID.npy` [T, 2048] at 1 per second, `features_3d/VID.npy` [ceil(1.5 T), 2048],
float16, L2-normalised rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

from vidlankd_jax import errors

import numpy as np

CONCEPT_NAMES = (
    "onion",
    "guitar",
    "bicycle",
    "garden",
    "cake",
    "paint",
    "engine",
    "puppy",
    "tent",
    "laptop",
    "bread",
    "kayak",
    "hammer",
    "violin",
    "candle",
    "carpet",
    "soap",
    "kite",
    "pasta",
    "ladder",
    "bottle",
    "mirror",
    "pumpkin",
    "saddle",
)

FALLBACK_SENTENCES = (
    "this is how you get a clean result every time",
    "take your time and work slowly from one side",
    "make sure everything is ready before you start",
    "you can see the difference right away",
    "we will come back to this step in a minute",
    "it takes a little practice but it is worth it",
)


@dataclasses.dataclass(frozen=True)
class SyntheticCorpus:
  """Where a generated corpus lies and what it holds."""

  caption_json: str
  features_2d_dir: str
  features_3d_dir: str
  concepts: tuple[str, ...]
  num_videos: int


def real_sentences(path: str | None = None, limit: int = 2000) -> list[str]:
  """Short lowercase word sequences from real English text (gensim's Lee news corpus if found)."""
  if path is None:
    try:
      import gensim.test.utils as gtu

      path = gtu.datapath("lee_background.cor")
    except ImportError:
      path = None
  sentences = []
  if path and os.path.exists(path):
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        for sent in re.split(r"[.!?]", line):
          words = re.findall(r"[a-z']+", sent.lower())
          if 5 <= len(words):
            sentences.append(" ".join(words[:10]))
          if len(sentences) >= limit:
            return sentences
  return sentences or list(FALLBACK_SENTENCES)


def _unit(rng: np.random.Generator, shape) -> np.ndarray:
  x = rng.standard_normal(shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_corpus(
    out_dir: str,
    *,
    num_videos: int = 200,
    num_concepts: int = 16,
    segments_per_video: tuple[int, int] = (4, 8),
    seconds_per_segment: tuple[int, int] = (3, 6),
    noise: float = 0.4,
    dim: int = 2048,
    seed: int = 0,
    text_path: str | None = None,
    num_sentences: int = 40,
    concepts: tuple[str, ...] | None = None,
    prototypes: tuple[np.ndarray, np.ndarray] | None = None,
    sentences: list[str] | None = None,
) -> SyntheticCorpus:
  """Writes the corpus under `out_dir` and returns where its parts are.

  `noise`: the norm of each second's noise relative to its unit prototype; `num_sentences`: the
  pool of real sentences the captions' filler words are drawn from. `concepts`, `prototypes`
  (unit 2D and 3D features [num_concepts, dim]) and `sentences` replace the defaults (the first
  `num_concepts` names, random prototypes, gensim's sentences): `data/world.py` builds its
  prototypes from the concepts' visual attributes.
  """
  if concepts is None:
    if num_concepts > len(CONCEPT_NAMES):
      raise errors.DataError(f"at most {len(CONCEPT_NAMES)} concepts, got {num_concepts}")
    concepts = CONCEPT_NAMES[:num_concepts]
  num_concepts = len(concepts)
  rng = np.random.default_rng(seed)
  if prototypes is None:
    prototypes = (_unit(rng, (num_concepts, dim)), _unit(rng, (num_concepts, dim)))
  proto_2d, proto_3d = prototypes
  for proto in prototypes:
    if proto.shape != (num_concepts, dim):
      raise errors.DataError(f"prototypes of shape {proto.shape}, expected {(num_concepts, dim)}")
  sentences = sentences or real_sentences(text_path, limit=num_sentences)
  dirs = {k: os.path.join(out_dir, f"features_{k}") for k in ("2d", "3d")}
  for d in dirs.values():
    os.makedirs(d, exist_ok=True)
  captions = {}
  for v in range(num_videos):
    vid = f"synth{v:05d}"
    n_seg = int(rng.integers(segments_per_video[0], segments_per_video[1] + 1))
    lengths = rng.integers(seconds_per_segment[0], seconds_per_segment[1] + 1, n_seg)
    labels = rng.integers(0, num_concepts, n_seg)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(float)
    total = int(np.sum(lengths))
    per_second = np.repeat(labels, lengths)  # [T]
    t3 = math.ceil(1.5 * total)
    per_clip3d = per_second[np.minimum((np.arange(t3) / 1.5).astype(int), total - 1)]
    f2 = proto_2d[per_second] + noise * rng.standard_normal((total, dim)) / math.sqrt(dim)
    f3 = proto_3d[per_clip3d] + noise * rng.standard_normal((t3, dim)) / math.sqrt(dim)
    for key, feats in (("2d", f2), ("3d", f3)):
      feats = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
      np.save(os.path.join(dirs[key], f"{vid}.npy"), feats.astype(np.float16))
    texts = []
    for lab in labels:
      words = sentences[int(rng.integers(len(sentences)))].split()
      cut = int(rng.integers(1, len(words)))
      texts.append(" ".join(words[:cut] + [concepts[lab]] + words[cut : cut + 3]))
    captions[vid] = {"start": starts.tolist(), "end": (starts + lengths).tolist(), "text": texts}
  caption_json = os.path.join(out_dir, "caption.json")
  tmp = caption_json + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(captions, f)
  os.replace(tmp, caption_json)
  return SyntheticCorpus(caption_json, dirs["2d"], dirs["3d"], tuple(concepts), num_videos)


def write_shuffled_corpus(
    raw_dir: str, out_dir: str, *, num_validation_videos: int, seed: int = 0
) -> None:
  """Copies the generated corpus in `raw_dir` to `out_dir` with its training captions mispaired.

  The caption texts of the training videos' segments are permuted among those segments; times and
  features are unchanged, so the converter cuts clips of the same seconds, now paired with captions
  about other concepts. The held-out videos (the converter's own choice of
  `num_validation_videos`) keep their true captions, so both teachers are scored on the same
  held-out pairs. The control that separates what the video carries from any extra training.
  """
  import shutil

  from vidlankd_jax.data import howto100m

  caption_json = os.path.join(raw_dir, "caption.json")
  with open(caption_json, encoding="utf-8") as f:
    captions = json.load(f)
  held_out = howto100m.select_validation_videos(
      caption_json, num_validation_videos, howto100m.ConvertConfig.hash_salt
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
    shutil.copytree(os.path.join(raw_dir, sub), os.path.join(out_dir, sub), dirs_exist_ok=True)
  tmp = os.path.join(out_dir, "caption.json.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(captions, f)
  os.replace(tmp, os.path.join(out_dir, "caption.json"))


def convert_corpus(
    raw: str,
    data_dir: str,
    *,
    num_validation_videos: int,
    word_budget: int,
    max_steps: int,
    log=print,
) -> dict:
  """The generated corpus in `raw` -> `data_dir/howto100m` by the real HowTo100M converter
  (every window of each video); returns the conversion summary."""
  from vidlankd_jax.data import howto100m

  cfg = howto100m.ConvertConfig(
      caption_json=os.path.join(raw, "caption.json"),
      features_2d_dir=os.path.join(raw, "features_2d"),
      features_3d_dir=os.path.join(raw, "features_3d"),
      output_dir=os.path.join(data_dir, "howto100m"),
      pairing="all",
      word_budget=word_budget,
      max_steps=max_steps,
      num_validation_videos=num_validation_videos,
      train_shards=2,
      validation_shards=1,
  )
  return howto100m.convert(cfg, log=log)


def prepare_video_text(
    data_dir: str,
    *,
    num_videos: int = 200,
    num_concepts: int = 16,
    num_validation_videos: int = 40,
    word_budget: int = 16,
    max_steps: int = 16,
    seed: int = 0,
    log=print,
) -> str:
  """Generates the corpus under `data_dir/synthetic_raw` and converts it into `data_dir/howto100m`
  with the real converter (every window of each video); reuses finished work."""
  raw = os.path.join(data_dir, "synthetic_raw")
  corpus_done = os.path.join(raw, "caption.json")
  if not os.path.exists(corpus_done):
    log(
        f"generating a synthetic video-text corpus ({num_videos} videos, {num_concepts} concepts) "
        f"in {raw}: the video features are GENERATED, not real video"
    )
    write_corpus(raw, num_videos=num_videos, num_concepts=num_concepts, seed=seed)
  convert_corpus(
      raw,
      data_dir,
      num_validation_videos=num_validation_videos,
      word_budget=word_budget,
      max_steps=max_steps,
      log=log,
  )
  return data_dir
