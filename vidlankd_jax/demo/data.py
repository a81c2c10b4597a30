"""The demo's data, made offline by the project's own tools from text that packages ship.

* Student text: gensim's English Wikipedia sample (a MediaWiki XML dump of ~100 articles),
  read by `data.text.iter_paragraphs`, split by article into train/validation, and cut into
  126-token TFRecord blocks by `data.text.convert_text` (the code of tools/make_text_tfrecords.py).
* Teacher video-text pairs: the GENERATED corpus of `data.synthetic`, in HowTo100M's layout,
  converted by the real HowTo100M converter.
* Downstream: Pang & Lee's movie-review sentence polarity (real sentences, positive/negative;
  the source of SST's sentences), 200 labelled sentences shipped in gensim's test data, split
  into train/validation TSVs and registered as the benchmark `movie_polarity` through the
  downstream registry (`register_benchmarks` is the fine-tuning config's benchmarks module).
"""

from __future__ import annotations

import csv
import os

from vidlankd_jax import errors

import numpy as np

BENCHMARK = "movie_polarity"
BENCHMARKS_MODULE = "vidlankd_jax.demo.data"
WIKIPEDIA_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
POLARITY_FILE = "pang_lee_polarity.cor"
POLARITY_ENCODING = "cp1252"  # as Pang & Lee released it (em dashes, accented letters)
POLARITY_LABELS = ("neg", "pos")
SPLITS = ("train", "validation")


def gensim_test_file(name: str) -> str:
  """The path of a file in gensim's test data (gensim is an install requirement)."""
  try:
    from gensim.test import utils as gensim_test
  except ImportError as e:
    raise ImportError(
        "the demo reads real text shipped in gensim's test data: pip install gensim"
    ) from e
  path = gensim_test.datapath(name)
  if not os.path.isfile(path):
    raise errors.MissingFileError(f"{path}: not in this gensim installation's test data")
  return path


# ------------------------------------------------------------------------------------- text


def write_wikipedia_lines(
    out_dir: str, *, max_articles: int, validation_every: int = 10
) -> dict[str, str]:
  """Articles of gensim's Wikipedia sample as one-article-per-line files, every
  `validation_every`-th article held out; returns split -> path."""
  from vidlankd_jax.data import text as text_lib

  source = gensim_test_file(WIKIPEDIA_SAMPLE)
  os.makedirs(out_dir, exist_ok=True)
  articles: dict[int, list[str]] = {}
  for para in text_lib.iter_paragraphs(source, "mediawiki"):
    if para.doc_index >= max_articles:
      break
    articles.setdefault(para.doc_index, []).append(para.text)
  paths = {split: os.path.join(out_dir, f"{split}.txt") for split in SPLITS}
  lines = {split: [] for split in SPLITS}
  for index, paragraphs in sorted(articles.items()):
    split = "validation" if index % validation_every == validation_every - 1 else "train"
    lines[split].append(" ".join(paragraphs))
  for split, path in paths.items():
    if not lines[split]:
      raise errors.DataError(f"{source}: no {split} articles among the first {max_articles}")
    with open(path, "w", encoding="utf-8") as f:
      f.write("".join(line + "\n" for line in lines[split]))
  return paths


def make_text_tfrecords(data_dir: str, vocab_file: str, *, max_articles: int, log=print) -> dict:
  """Wikipedia sample -> `data_dir/wikipedia/wikipedia-{train,validation}` shards (the
  `wikipedia_mlm` task); returns each split's conversion summary."""
  from vidlankd_jax.data import text as text_lib
  from vidlankd_jax.data import vocab as vocab_lib

  raw = write_wikipedia_lines(os.path.join(data_dir, "wikipedia_raw"), max_articles=max_articles)
  vocab = vocab_lib.WordPieceVocabulary(vocab_file)
  return {
      split: text_lib.convert_text(
          [raw[split]],
          os.path.join(data_dir, "wikipedia"),
          vocab,
          prefix="wikipedia",
          split=split,
          fmt="lines",
          num_shards=2 if split == "train" else 1,
          clean=False,  # the demo's own article paragraphs, kept whole (its figures' corpus)
          log=log,
      )
      for split in SPLITS
  }


# ------------------------------------------------------------------------------ downstream


def read_polarity(path: str) -> tuple[list[str], list[int]]:
  """`__label__neg text` / `__label__pos text` lines -> sentences and 0/1 labels."""
  sentences, labels = [], []
  with open(path, encoding=POLARITY_ENCODING) as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      tag, _, sentence = line.strip().partition(" ")
      label = tag.removeprefix("__label__")
      if label not in POLARITY_LABELS or not sentence:
        raise errors.DataError(
            f"{path}:{lineno}: expected '__label__neg|pos <sentence>', got {line[:60]!r}"
        )
      sentences.append(sentence)
      labels.append(POLARITY_LABELS.index(label))
  return sentences, labels


def write_polarity_benchmark(
    out_dir: str, *, validation_fraction: float = 0.25, seed: int = 0
) -> dict:
  """Shuffles the 200 labelled sentences once and writes `train.tsv` / `validation.tsv`
  (sentence TAB label), stratified so both splits are balanced; returns the split sizes."""
  sentences, labels = read_polarity(gensim_test_file(POLARITY_FILE))
  rng = np.random.default_rng(seed)
  labels_arr = np.asarray(labels)
  rows = {split: [] for split in SPLITS}
  for label in range(len(POLARITY_LABELS)):
    index = rng.permutation(np.flatnonzero(labels_arr == label))
    cut = int(round(len(index) * validation_fraction))
    rows["validation"] += [(sentences[i], label) for i in index[:cut]]
    rows["train"] += [(sentences[i], label) for i in index[cut:]]
  os.makedirs(out_dir, exist_ok=True)
  for split, split_rows in rows.items():
    order = rng.permutation(len(split_rows))
    with open(os.path.join(out_dir, f"{split}.tsv"), "w", encoding="utf-8", newline="") as f:
      writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
      writer.writerows(split_rows[i] for i in order)
  return {split: len(split_rows) for split, split_rows in rows.items()}


def read_polarity_tsv(path: str) -> dict[str, np.ndarray]:
  """A split written by `write_polarity_benchmark` -> sentence and label columns."""
  sentences, labels = [], []
  with open(path, encoding="utf-8", newline="") as f:
    for lineno, row in enumerate(
        csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\"), 1
    ):
      if len(row) != 2 or row[1] not in ("0", "1"):
        raise errors.DataError(f"{path}:{lineno}: expected 'sentence<TAB>0|1', got {row!r}")
      sentences.append(row[0])
      labels.append(int(row[1]))
  return {"sentence": np.asarray(sentences, dtype=object), "label": np.asarray(labels, np.int32)}


def register_benchmarks(vocab, data_config) -> None:
  """The fine-tuning loop's hook: registers `movie_polarity` over `data_config.data_dir`."""
  from vidlankd_jax.data import downstream
  from vidlankd_jax.evaluation import metrics

  files = {split: os.path.join(data_config.data_dir, f"{split}.tsv") for split in SPLITS}
  downstream.register_benchmark(
      downstream.DownstreamSpec(
          name=BENCHMARK,
          kind="classification",
          num_labels=2,
          metric_fn=metrics.accuracy_metric,
          source=downstream.file_source(
              files,
              read_polarity_tsv,
              lambda split, path: f"{path}: no {split} split; the demo's data stage writes it",
          ),
          formatter=lambda ex: {"text_a": ex["sentence"], "label": ex["label"]},
          description=f"movie-review sentence polarity (Pang & Lee; gensim's {POLARITY_FILE})",
          seq_len=64,
          label_names=POLARITY_LABELS,
      ),
      vocab,
  )
