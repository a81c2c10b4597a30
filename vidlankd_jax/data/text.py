"""Text corpora for the student: reading raw corpora and the TFRecord schema of token blocks.

TFRecord schema (one `tf.train.Example` per block):
  ids         int64 list [BLOCK_LEN]  contiguous word-piece ids (no specials). Blocks run
                                      across paragraph and document boundaries, as in the
                                      reference pipeline; [CLS]/[SEP] are added later, giving
                                      128 tokens.
  example_id  int64                   the block's index in write order: dense and unique,
                                      0..N-1 over all shards of a split (N is the summary's
                                      `blocks`). The memory-bank CRD keeps one row per id.
                                      Shards written before it existed read as -1.

Raw corpus formats (`iter_paragraphs`):
  wikitext   WikiText-103 `wiki.*.raw`: ` = Title = ` lines start an article (` = = Section = = `
             lines do not), blank lines separate paragraphs; lines are kept as written.
  lines      one document per line (plain Wikipedia dumps, news corpora); blank lines skipped.
  mediawiki  a MediaWiki XML dump (`*-pages-articles*.xml[.bz2]`), markup stripped with gensim.
Files ending in .bz2 or .gz are decompressed on the fly.

Cleaning (`clean=True`, the default), as the released corpora were made (vokenization
`tokenization/tokenize_dataset.py` lines 33-46): WikiText lines starting " = " (titles and
section headings) and lines of fewer than 5 space-separated tokens are dropped. Blocks of the
released English Wikipedia that end inside its FORBIDDEN_RANGE of token offsets are dropped too
(VidLanKD `vlm/data.py` lines 37-38 and 75-96; `forbidden_range`).
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import gzip
import io
import json
import os
import re
from typing import IO, Iterator, Sequence
from xml.etree import ElementTree

import numpy as np
import tensorflow as tf

from vidlankd_jax import errors
from vidlankd_jax.data import shards as shards_lib

BLOCK_LEN = 126
FORMATS = ("wikitext", "lines", "mediawiki")
# Lines with fewer space-separated tokens are dropped by the released tokenization.
MIN_LINE_TOKENS = 5
# Token offsets of the released English Wikipedia (`en.train.raw`, bert-base-uncased) whose
# blocks its loader drops ("Start of iter 3700", "End of iter 5800").
RELEASED_FORBIDDEN_RANGE = (119_314_944, 187_053_048)
RELEASED_WIKIPEDIA_FILE = "en.train.raw"
BERT_BASE_UNCASED_SIZE = 30_522

# A WikiText article title: exactly one '=' on each side (section headings have two or more).
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")
# Bold/italic quote runs that gensim's markup filter leaves in place.
_WIKI_EMPHASIS = re.compile(r"'{2,}")


def _open_binary(path: str, raw: IO[bytes]) -> IO[bytes]:
  """Decompresses `raw` by the file name's suffix (.bz2, .gz) or passes it through."""
  if path.endswith(".bz2"):
    return bz2.open(raw, "rb")
  if path.endswith(".gz"):
    return gzip.open(raw, "rb")
  return raw


def open_text(path: str) -> IO[str]:
  """Opens a UTF-8 text file, decompressing .bz2/.gz."""
  return io.TextIOWrapper(
      _open_binary(path, open(path, "rb")), encoding="utf-8", errors="strict", newline=None
  )


def detect_format(path: str) -> str:
  """Guesses the corpus format from the file's first non-blank line."""
  with open_text(path) as f:
    for line in f:
      if line.strip():
        if line.lstrip().startswith("<mediawiki"):
          return "mediawiki"
        if _WIKITEXT_TITLE.match(line.rstrip("\n")):
          return "wikitext"
        return "lines"
  return "lines"


@dataclasses.dataclass(frozen=True)
class Paragraph:
  """One paragraph of a corpus; `doc_index` counts documents from 0 in file order and
  `offset` is how many bytes of the (possibly compressed) file have been read so far."""

  doc_index: int
  text: str
  offset: int = 0


def keep_line(line: str, fmt: str) -> bool:
  """The released tokenization's line filter: no WikiText title or heading (" = ... = "), no
  line of fewer than MIN_LINE_TOKENS space-separated tokens (`line.strip().split(' ')`)."""
  if fmt == "wikitext" and line.startswith(" = "):
    return False
  return len(line.strip().split(" ")) >= MIN_LINE_TOKENS


def in_forbidden_range(block_index: int, block_len: int, forbidden: tuple[int, int]) -> bool:
  """Whether the released loader drops block `block_index` of the token stream: its end lies
  strictly inside `forbidden` (its `intersect`, which keeps a block that straddles the end)."""
  end = (block_index + 1) * block_len
  return forbidden[0] < end < forbidden[1]


def iter_paragraphs(path: str, fmt: str = "auto", clean: bool = False) -> Iterator[Paragraph]:
  """Streams the non-blank paragraphs of a raw corpus with the index of their document;
  `clean` drops the lines the released tokenization drops (`keep_line`)."""
  if fmt not in FORMATS + ("auto",):
    raise errors.DataError(f"Unknown corpus format {fmt!r}; expected one of {FORMATS} or 'auto'.")
  try:
    if fmt == "auto":
      fmt = detect_format(path)
    with open(path, "rb") as raw:
      if fmt == "mediawiki":
        try:
          for para in _iter_mediawiki(_open_binary(path, raw), raw):
            if not clean or keep_line(para.text, fmt):
              yield para
        except ValueError as e:  # gensim's own check of the dump's namespace
          raise errors.DataError(f"{path}: malformed MediaWiki XML ({str(e).strip()}).") from e
        return
      f = io.TextIOWrapper(_open_binary(path, raw), encoding="utf-8", errors="strict")
      doc, continued = -1, False
      for text, whole in _bounded_lines(f):
        if not text.strip():
          continued = not whole
          continue
        if not continued and (fmt == "lines" or _WIKITEXT_TITLE.match(text) or doc < 0):
          doc += 1
        if not clean or keep_line(text, fmt):
          yield Paragraph(doc, text.strip(), raw.tell())
        continued = not whole
  except UnicodeDecodeError as e:
    raise errors.DataError(f"{path}: not UTF-8 text ({e}).") from e
  except ElementTree.ParseError as e:
    raise errors.DataError(f"{path}: malformed MediaWiki XML ({e}).") from e
  except (OSError, EOFError) as e:
    raise errors.DataError(f"{path}: cannot read the corpus ({e}).") from e


# A line longer than this is cut (at a space where there is one) into paragraphs of at most this
# many characters: a corpus with one huge line would otherwise be held and tokenized at once.
MAX_LINE_CHARS = 1 << 20


def _bounded_lines(f: IO[str], limit: int = MAX_LINE_CHARS) -> Iterator[tuple[str, bool]]:
  """(piece, ends its line) for each line of `f`, lines longer than `limit` in pieces."""
  carry = ""
  while True:
    line = f.readline(limit)
    if not line:
      if carry:
        yield carry, True
      return
    text = carry + line
    carry = ""
    if text.endswith("\n"):
      yield text.rstrip("\n"), True
      continue
    cut = text.rfind(" ", len(text) // 2)
    if cut > 0 and len(text) >= limit:
      text, carry = text[:cut], text[cut + 1 :]
    yield text, False


def _iter_mediawiki(f: IO[bytes], raw: IO[bytes]) -> Iterator[Paragraph]:
  """Articles of a MediaWiki XML dump as plain-text paragraphs (needs gensim)."""
  try:
    from gensim.corpora import wikicorpus
  except ImportError as e:
    raise ImportError("Reading MediaWiki XML dumps needs gensim: `pip install gensim`.") from e
  doc = -1
  pages = wikicorpus.extract_pages(f, filter_namespaces=("0",))
  while True:
    try:
      _, markup, _ = next(pages)
    except StopIteration:
      return
    except AttributeError:  # gensim reads a page's <title>, <ns> and <id> without checking
      raise ValueError(
          f"a <page> before byte {raw.tell()} lacks its <title>, <ns> or <id>"
      ) from None
    plain = wikicorpus.filter_wiki(markup)
    if not plain.strip() or plain.lstrip().lower().startswith("#redirect"):
      continue
    doc += 1
    for para in plain.split("\n"):
      para = " ".join(_WIKI_EMPHASIS.sub("", para).split())
      if para:
        yield Paragraph(doc, para, raw.tell())


class BlockPacker:
  """Cuts a stream of token ids into contiguous blocks of `block_len`; the tail stays buffered."""

  def __init__(self, block_len: int = BLOCK_LEN):
    if block_len <= 0:
      raise errors.DataError(f"block_len must be positive, got {block_len}.")
    self.block_len = block_len
    self._buffer = np.zeros([0], np.int64)

  def add(self, ids) -> np.ndarray:
    """Appends ids and returns the completed blocks, int64 [n, block_len]."""
    self._buffer = np.concatenate([self._buffer, np.asarray(ids, np.int64).reshape(-1)])
    n = len(self._buffer) // self.block_len
    blocks = self._buffer[: n * self.block_len].reshape(n, self.block_len)
    self._buffer = self._buffer[n * self.block_len :]
    return blocks

  @property
  def leftover(self) -> int:
    """Tokens waiting for a full block (dropped at the end of a corpus)."""
    return len(self._buffer)


# The example_id of blocks from shards written without one.
MISSING_EXAMPLE_ID = -1


def block_to_example(ids, example_id: int | None = None) -> bytes:
  """Serializes one block of ids (and its example id; None writes none, as older shards) as a
  tf.train.Example."""
  ids = np.asarray(ids, np.int64).reshape(-1)
  feature = {"ids": tf.train.Feature(int64_list=tf.train.Int64List(value=ids))}
  if example_id is not None:
    feature["example_id"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(example_id)]))
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def block_feature_spec(block_len: int = BLOCK_LEN) -> dict[str, tf.io.FixedLenFeature]:
  return {
      "ids": tf.io.FixedLenFeature([block_len], tf.int64),
      "example_id": tf.io.FixedLenFeature([], tf.int64, default_value=MISSING_EXAMPLE_ID),
  }


def parse_block(serialized: tf.Tensor, block_len: int = BLOCK_LEN) -> dict[str, tf.Tensor]:
  """Parses one serialized block into {'ids': int32 [block_len], 'example_id': int64 []}."""
  parsed = tf.io.parse_single_example(serialized, block_feature_spec(block_len))
  return {"ids": tf.cast(parsed["ids"], tf.int32), "example_id": parsed["example_id"]}


def convert_text(
    inputs: Sequence[str],
    output_dir: str,
    vocab,
    *,
    prefix: str,
    split: str = "train",
    num_shards: int = 16,
    fmt: str = "auto",
    block_len: int = BLOCK_LEN,
    batch_paragraphs: int = 512,
    progress_interval: float = 30.0,
    clean: bool = True,
    forbidden_range: str = "auto",
    log=print,
) -> dict:
  """Tokenizes raw corpora into contiguous blocks, dealt round-robin into `num_shards` shards.

  Each block's `example_id` is its index in write order (dense over all shards). Streaming:
  memory holds one batch of paragraphs. Each shard appears only when complete (a temporary
  file, then a rename); a finished conversion is not redone. Returns the summary, also written
  to `{prefix}-{split}-summary.json` (`blocks` is the number of examples).

  `clean` drops the lines the released tokenization drops; `forbidden_range` "auto" drops the
  blocks in RELEASED_FORBIDDEN_RANGE where the released loader does (an input named
  en.train.raw read with a lower-cased 30,522-piece vocabulary: bert-base-uncased), "released"
  always, "none" never.
  """
  if forbidden_range not in ("auto", "released", "none"):
    raise ValueError(f"forbidden_range must be auto, released or none, got {forbidden_range!r}")
  if forbidden_range == "auto":
    released_wikipedia = any(os.path.basename(p) == RELEASED_WIKIPEDIA_FILE for p in inputs)
    # bert-base-uncased: lower-cased, 30,522 word pieces.
    uncased_bert = vocab.lower_case and len(vocab.tokens) == BERT_BASE_UNCASED_SIZE
    forbidden_range = "released" if released_wikipedia and uncased_bert else "none"
  forbidden = RELEASED_FORBIDDEN_RANGE if forbidden_range == "released" else None
  if num_shards <= 0:
    raise errors.DataError(f"num_shards must be positive, got {num_shards}.")
  for path in inputs:
    if not os.path.isfile(path):
      raise errors.MissingFileError(f"corpus file {path} does not exist.")
  settings = {
      "inputs": [os.path.abspath(p) for p in inputs],
      "format": fmt,
      "block_len": block_len,
      "num_shards": num_shards,
      "vocab_file": os.path.abspath(vocab.vocab_file),
      "lower_case": vocab.lower_case,
      "example_ids": "dense",  # blocks carry example_id 0..N-1 in write order
      "clean": clean,
      "forbidden_range": list(forbidden) if forbidden else None,
  }
  with shards_lib.output_lock(output_dir):
    settings["input_files"] = shards_lib.input_fingerprint(inputs)
    shards_lib.check_settings(output_dir, f"{prefix}-{split}-conversion", settings)
    summary_path = os.path.join(output_dir, f"{prefix}-{split}-summary.json")
    names = [shards_lib.shard_name(prefix, split, i, num_shards) for i in range(num_shards)]
    if all(shards_lib.read_marker(output_dir, n) for n in names) and os.path.exists(summary_path):
      log(f"[{prefix}-{split}] all {num_shards} shards already done")
      with open(summary_path, encoding="utf-8") as f:
        return json.load(f)
    shards_lib.remove_temporaries(output_dir)

    total_bytes = sum(os.path.getsize(p) for p in inputs)
    progress = shards_lib.Progress(f"{prefix}-{split}", total_bytes / 1e6, "MB", progress_interval)
    packer = BlockPacker(block_len)
    stats = {
        "files": len(inputs),
        "documents": 0,
        "paragraphs": 0,
        "tokens": 0,
        "unk_tokens": 0,
        "blocks": 0,
        "forbidden_blocks": 0,
    }
    per_shard = [0] * num_shards
    with contextlib.ExitStack() as stack:
      writers = [stack.enter_context(shards_lib.ShardWriter(output_dir, n)) for n in names]

      def write_batch(texts: list[str]) -> None:
        ids = vocab.tokenize_tf(tf.constant(texts)).flat_values.numpy()
        stats["tokens"] += len(ids)
        stats["unk_tokens"] += int(np.sum(ids == vocab.unk_id))
        for block in packer.add(ids):
          stream_index = stats["blocks"] + stats["forbidden_blocks"]
          if forbidden and in_forbidden_range(stream_index, block_len, forbidden):
            stats["forbidden_blocks"] += 1
            continue
          shard = stats["blocks"] % num_shards
          writers[shard].write(block_to_example(block, stats["blocks"]))
          per_shard[shard] += 1
          stats["blocks"] += 1

      done_bytes = 0
      for path in inputs:
        batch: list[str] = []
        batch_chars, last_doc = 0, -1
        for para in iter_paragraphs(path, fmt, clean=clean):
          batch.append(para.text)
          batch_chars += len(para.text)
          stats["paragraphs"] += 1
          last_doc = para.doc_index
          if len(batch) >= batch_paragraphs or batch_chars >= 4 * MAX_LINE_CHARS:
            write_batch(batch)
            batch, batch_chars = [], 0
            progress.set((done_bytes + para.offset) / 1e6, f"{stats['blocks']:,} blocks")
        if batch:
          write_batch(batch)
        stats["documents"] += last_doc + 1
        done_bytes += os.path.getsize(path)
      stats["dropped_tail_tokens"] = packer.leftover
      if stats["blocks"] == 0:  # raised inside the writers' block: no empty shard is kept
        raise errors.DataError(
            f"{', '.join(inputs)}: no {block_len}-token block in {stats['paragraphs']} paragraphs "
            f"({stats['tokens']} tokens): the input is empty or too short to train on"
        )
      for writer, count in zip(writers, per_shard):
        writer.commit({"split": split, "blocks": count})
    progress.set(total_bytes / 1e6)
    progress.finish(f"{stats['blocks']:,} blocks")
    summary = {
        **stats,
        "prefix": prefix,
        "split": split,
        "num_shards": num_shards,
        "block_len": block_len,
        "blocks_per_shard": per_shard,
        "settings": settings,
    }
    shards_lib.write_json_atomic(summary_path, summary)
    log(f"[{prefix}-{split}] " + json.dumps({k: stats[k] for k in stats}))
    return summary
