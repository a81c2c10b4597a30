"""Tokenizes a raw text corpus into TFRecords of contiguous 126-token word-piece blocks.

  python tools/make_text_tfrecords.py --input wiki.train.raw --output_dir data/wiki103 \
      --prefix wiki103 --split train --num_shards 16
  python tools/make_text_tfrecords.py --input wiki.valid.raw --output_dir data/wiki103 \
      --prefix wiki103 --split validation --num_shards 1

Inputs: WikiText-103 `wiki.*.raw`, one-document-per-line text, or a MediaWiki XML dump (.bz2
and .gz are read directly). Each block carries a dense `example_id` (its index in write order,
0..N-1 over all shards of the split; the memory-bank CRD keeps one row per id) and the summary
JSON `<prefix>-<split>-summary.json` records N as `blocks`. The logic is
`vidlankd_jax.data.text.convert_text`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from vidlankd_jax import errors, quiet

if __name__ == "__main__":  # before the imports below load TensorFlow
  quiet.quiet_libraries()

from vidlankd_jax.data import text as text_lib
from vidlankd_jax.data import vocab as vocab_lib
from vidlankd_jax.data.text import convert_text, iter_paragraphs  # noqa: F401  (re-exported)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--input", required=True, nargs="+", help="raw corpus files, in order")
  p.add_argument("--output_dir", required=True)
  p.add_argument("--prefix", required=True, help="shard name prefix, e.g. wiki103, wikipedia")
  p.add_argument("--split", default="train", choices=("train", "validation"))
  p.add_argument("--num_shards", type=int, default=16)
  p.add_argument("--format", default="auto", choices=("auto",) + text_lib.FORMATS)
  p.add_argument("--vocab_file", default=None, help="default: bert-base-uncased vocab")
  p.add_argument("--cased", action="store_true", help="do not lowercase")
  p.add_argument("--block_len", type=int, default=text_lib.BLOCK_LEN)
  p.add_argument("--progress_interval", type=float, default=30.0)
  p.add_argument(
      "--no_clean",
      dest="clean",
      action="store_false",
      help="keep WikiText headings and lines under 5 tokens (default: dropped, as the released "
      "corpora)",
  )
  p.add_argument(
      "--forbidden_range",
      default="auto",
      choices=("auto", "released", "none"),
      help="drop the released English Wikipedia's FORBIDDEN_RANGE blocks: auto (default) where "
      "the released loader does (en.train.raw with bert-base-uncased), released always, none",
  )
  args = p.parse_args(argv)
  try:
    vocab = vocab_lib.WordPieceVocabulary(
        args.vocab_file or vocab_lib.default_vocab_file(), lower_case=not args.cased
    )
    convert_text(
        args.input,
        args.output_dir,
        vocab,
        prefix=args.prefix,
        split=args.split,
        num_shards=args.num_shards,
        fmt=args.format,
        block_len=args.block_len,
        progress_interval=args.progress_interval,
        clean=args.clean,
        forbidden_range=args.forbidden_range,
    )
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(errors.run_tool(main))
