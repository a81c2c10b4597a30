"""Learns a BERT WordPiece vocabulary from a raw text corpus with tensorflow-text's learner.

The written vocab.txt has [PAD] first (id 0, seqio's padding id), then [UNK] [CLS] [SEP] [MASK],
then the learned pieces; it loads directly into `WordPieceVocabulary`.

  python tools/learn_vocab.py --input wiki.train.raw --output vocab.txt --vocab_size 30522
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Iterable, Sequence

from vidlankd_jax import errors, quiet


def learn_vocab(
    paragraphs: Iterable[str],
    vocab_size: int = 30522,
    lower_case: bool = True,
    upper_thresh: int = 10_000_000,
    lower_thresh: int = 10,
    num_iterations: int = 4,
) -> list[str]:
  """Learns WordPiece tokens from paragraphs of text; the specials come first."""
  import tensorflow as tf
  from tensorflow_text.tools.wordpiece_vocab import bert_vocab_from_dataset as bvd

  from vidlankd_jax.data import vocab as vocab_lib

  dataset = tf.data.Dataset.from_generator(
      lambda: (p for p in paragraphs), output_signature=tf.TensorSpec([], tf.string)
  ).batch(1024)
  tokens = bvd.bert_vocab_from_dataset(
      dataset,
      vocab_size=vocab_size,
      reserved_tokens=list(vocab_lib.SPECIAL_TOKENS),
      bert_tokenizer_params={"lower_case": lower_case},
      learn_params={
          "upper_thresh": upper_thresh,
          "lower_thresh": lower_thresh,
          "num_iterations": num_iterations,
      },
  )
  specials = list(vocab_lib.SPECIAL_TOKENS)
  return specials + [t for t in tokens if t not in specials]


def write_vocab(tokens: Sequence[str], path: str) -> None:
  """Writes one token per line (atomically), after checking the specials and duplicates."""
  from vidlankd_jax.data import vocab as vocab_lib

  if list(tokens[: len(vocab_lib.SPECIAL_TOKENS)]) != list(vocab_lib.SPECIAL_TOKENS):
    raise errors.DataError(f"The vocabulary must start with {vocab_lib.SPECIAL_TOKENS}.")
  if len(set(tokens)) != len(tokens):
    raise errors.DataError("The vocabulary has duplicate tokens.")
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write("".join(t + "\n" for t in tokens))
  os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
  quiet.quiet_libraries()  # the --format choices below load TensorFlow
  from vidlankd_jax.data import text as text_lib

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--input", required=True, nargs="+", help="raw corpus files")
  parser.add_argument("--output", required=True, help="vocab.txt to write")
  parser.add_argument("--format", default="auto", choices=("auto",) + text_lib.FORMATS)
  parser.add_argument("--vocab_size", type=int, default=30522)
  parser.add_argument("--cased", action="store_true", help="keep case (default lowercases)")
  parser.add_argument("--max_paragraphs", type=int, default=0, help="0 reads everything")
  parser.add_argument(
      "--lower_thresh", type=int, default=10, help="lowest word-piece count considered"
  )
  args = parser.parse_args(argv)

  paragraphs = (p.text for path in args.input for p in text_lib.iter_paragraphs(path, args.format))
  if args.max_paragraphs > 0:
    paragraphs = itertools.islice(paragraphs, args.max_paragraphs)
  tokens = learn_vocab(
      paragraphs, args.vocab_size, lower_case=not args.cased, lower_thresh=args.lower_thresh
  )
  write_vocab(tokens, args.output)
  print(f"wrote {len(tokens)} tokens to {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(errors.run_tool(main))
