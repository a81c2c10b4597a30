"""In-graph BERT encoding of downstream examples into fixed-length int32 features.

A benchmark's formatter turns its raw records into one canonical form per task kind; the
preprocessors here turn that form into model inputs:

  classification / regression: text_a, [text_b], label
      -> input_ids, attention_mask, token_type_ids [L]: [CLS] a [SEP] (b [SEP]) then [PAD]
  multiple_choice: context, choices [C], label
      -> input_ids, attention_mask, token_type_ids [C, L]: one [CLS] context [SEP] choice [SEP]
         row per choice, each with its own mask
  span: example_id, question, context, answer_text [A], answer_start [A] (characters)
      -> one example per window over the context (BERT's doc-stride windows):
         input_ids etc. [L] = [CLS] question [SEP] context window [SEP]; start_position,
         end_position (the answer tokens, or 0 = [CLS] when the window misses the answer or
         there is none); bookkeeping to map predictions back to text: example_id,
         window_index, offset_start/offset_end [L] (character offsets into the context, -1
         outside it) and token_is_max_context [L].

Every other field a formatter returns is passed through unchanged (repeated per window for
span tasks). Pairs are truncated longest-first, one token at a time from the longer side and
from the second on ties, as BERT's reference code does.
"""

from __future__ import annotations

from typing import Mapping

import seqio

from vidlankd_jax import errors
import tensorflow as tf
import tensorflow_text as tf_text

KINDS = ("classification", "regression", "multiple_choice", "span")
MODEL_FEATURES = ("input_ids", "attention_mask", "token_type_ids")
CANONICAL_FIELDS = {
    "classification": ("text_a", "text_b", "label"),
    "regression": ("text_a", "text_b", "label"),
    "multiple_choice": ("context", "choices", "label"),
    "span": ("example_id", "question", "context", "answer_text", "answer_start"),
}

# BERT's basic tokenizer splits on white space and keeps punctuation and CJK ideographs as
# single-character words; word pieces never cross these boundaries.
_WHITESPACE = r"[\s\p{Zs}]+"
_SINGLE_CHAR_WORDS = (
    r"[!-/:-@\[-`{-~\p{P}\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}"
    r"\x{2B740}-\x{2B81F}\x{2B820}-\x{2CEAF}\x{F900}-\x{FAFF}\x{2F800}-\x{2FA1F}]"
)


def eager_vocabulary(vocab):
  """`vocab` with its tokenizer built outside any tf.function, so that every dataset
  pipeline can capture it (one built while tracing a map belongs to that graph only)."""
  with tf.init_scope():
    vocab.tokenize_tf(tf.constant([""]))
  return vocab


def sequence_length_of(sequence_length: Mapping | None) -> int:
  """L from seqio's sequence_length {'input_ids': L or (C, L)}."""
  if not sequence_length or sequence_length.get("input_ids") is None:
    raise errors.DataError(
        "Downstream tasks need sequence_length={'input_ids': L} (or (C, L) for choices)."
    )
  length = sequence_length["input_ids"]
  return int(length[-1]) if isinstance(length, (list, tuple)) else int(length)


def truncate_pair_lengths(
    len_a: tf.Tensor, len_b: tf.Tensor, budget
) -> tuple[tf.Tensor, tf.Tensor]:
  """Lengths kept when a pair is cut to `budget` tokens, longest first (ties shorten b)."""
  budget = tf.cast(budget, len_a.dtype)
  keep_a = tf.minimum(len_a, tf.maximum(budget - len_b, (budget + 1) // 2))
  keep_b = tf.minimum(len_b, tf.maximum(budget - len_a, budget // 2))
  return keep_a, keep_b


def _prefix(rows: tf.RaggedTensor, keep: tf.Tensor) -> tf.RaggedTensor:
  """The first keep[i] items of each row."""
  positions = tf.ragged.range(rows.row_lengths())
  return tf.ragged.boolean_mask(rows, positions < tf.expand_dims(tf.cast(keep, tf.int64), 1))


def _column(num_rows, value) -> tf.RaggedTensor:
  return tf.RaggedTensor.from_tensor(tf.fill(tf.stack([num_rows, 1]), tf.constant(value, tf.int32)))


def _pack(segments, length: int, pad: int) -> tf.Tensor:
  """Concatenates ragged [N, *] segments row-wise into a dense [N, length] padded with `pad`."""
  return tf.concat(segments, axis=1).to_tensor(default_value=pad, shape=[None, length])


def _assemble(vocab, parts, length: int) -> dict[str, tf.Tensor]:
  """Model features [N, L] from (ragged ids, segment id) parts in order."""
  ids = [p for p, _ in parts]
  return {
      "input_ids": _pack(ids, length, vocab.pad_id),
      "attention_mask": _pack([tf.ones_like(p) for p in ids], length, 0),
      "token_type_ids": _pack([tf.ones_like(p) * t for p, t in parts], length, 0),
  }


def encode_text_pairs(
    vocab, text_a: tf.Tensor, text_b: tf.Tensor | None, length: int
) -> dict[str, tf.Tensor]:
  """Strings [N] (and [N]) -> [CLS] a [SEP] (b [SEP]) features [N, length]."""
  a = vocab.tokenize_tf(text_a)
  n = a.nrows()
  cls, sep = _column(n, vocab.cls_id), _column(n, vocab.sep_id)
  if text_b is None:
    a = _prefix(a, tf.fill([n], tf.constant(length - 2, tf.int64)))
    return _assemble(vocab, [(cls, 0), (a, 0), (sep, 0)], length)
  b = vocab.tokenize_tf(text_b)
  keep_a, keep_b = truncate_pair_lengths(a.row_lengths(), b.row_lengths(), length - 3)
  return _assemble(
      vocab,
      [(cls, 0), (_prefix(a, keep_a), 0), (sep, 0), (_prefix(b, keep_b), 1), (sep, 1)],
      length,
  )


def _passthrough(example: Mapping[str, tf.Tensor], kind: str) -> dict[str, tf.Tensor]:
  return {k: v for k, v in example.items() if k not in CANONICAL_FIELDS[kind]}


def classification_preprocessor(
    dataset: tf.data.Dataset, sequence_length, output_features, *, regression: bool = False
) -> tf.data.Dataset:
  """text_a, [text_b], label -> features [L] and an int32 (float32 for regression) label."""
  vocab = eager_vocabulary(output_features["input_ids"].vocabulary)
  length = sequence_length_of(sequence_length)
  kind = "regression" if regression else "classification"

  @tf.autograph.experimental.do_not_convert  # plain graph code: autograph only slows tracing
  def encode(ex):
    text_b = ex["text_b"][tf.newaxis] if "text_b" in ex else None
    out = {
        k: v[0]
        for k, v in encode_text_pairs(vocab, ex["text_a"][tf.newaxis], text_b, length).items()
    }
    out["label"] = tf.cast(ex["label"], tf.float32 if regression else tf.int32)
    return {**_passthrough(ex, kind), **out}

  return dataset.map(encode, num_parallel_calls=tf.data.AUTOTUNE)


def multiple_choice_preprocessor(
    dataset: tf.data.Dataset, sequence_length, output_features, *, num_choices: int
) -> tf.data.Dataset:
  """context, choices [C], label -> features [C, L]: [CLS] context [SEP] choice [SEP] rows."""
  vocab = eager_vocabulary(output_features["input_ids"].vocabulary)
  length = sequence_length_of(sequence_length)

  @tf.autograph.experimental.do_not_convert  # plain graph code: autograph only slows tracing
  def encode(ex):
    choices = tf.ensure_shape(ex["choices"], [num_choices])
    contexts = tf.repeat(ex["context"][tf.newaxis], num_choices)
    out = {
        k: tf.ensure_shape(v, [num_choices, length])
        for k, v in encode_text_pairs(vocab, contexts, choices, length).items()
    }
    out["label"] = tf.cast(ex["label"], tf.int32)
    return {**_passthrough(ex, "multiple_choice"), **out}

  return dataset.map(encode, num_parallel_calls=tf.data.AUTOTUNE)


def tokenize_with_char_offsets(
    vocab, text: tf.Tensor, tokens: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Scalar string -> word-piece ids [T] and each piece's [start, end) character offsets.

  The text is split into BERT's basic words (with offsets in the raw text), and each word is
  tokenized by `vocab` (same ids as tokenizing the whole text). Pieces get exact offsets
  inside their word when normalisation keeps the word's length and no piece is [UNK];
  otherwise every piece of the word spans the whole word. `tokens` is the vocabulary as a
  string tensor.
  """
  words, byte_starts, byte_ends = tf_text.regex_split_with_offsets(
      text[tf.newaxis], _WHITESPACE + "|" + _SINGLE_CHAR_WORDS, _SINGLE_CHAR_WORDS
  )
  words, byte_starts, byte_ends = words[0], byte_starts[0], byte_ends[0]
  char_byte_offsets = tf.strings.unicode_decode_with_offsets(text, "UTF-8")[1]
  word_starts = tf.searchsorted(char_byte_offsets, byte_starts, side="left", out_type=tf.int64)
  word_lens = (
      tf.searchsorted(char_byte_offsets, byte_ends, side="left", out_type=tf.int64) - word_starts
  )

  pieces = vocab.tokenize_tf(words)
  ids = pieces.flat_values
  rows = pieces.value_rowids()
  num_words = tf.shape(words, out_type=tf.int64)[0]
  piece_text = tf.strings.regex_replace(tf.gather(tokens, ids), "^##", "")
  piece_lens = tf.cast(tf.strings.length(piece_text, unit="UTF8_CHAR"), tf.int64)
  is_unk = tf.cast(tf.equal(ids, vocab.unk_id), tf.int64)
  exact = tf.logical_and(
      tf.equal(tf.math.unsorted_segment_sum(piece_lens, rows, num_words), word_lens),
      tf.equal(tf.math.unsorted_segment_max(is_unk, rows, num_words), 0),
  )
  ends_total = tf.cumsum(piece_lens)
  before_word = tf.gather(tf.concat([[0], ends_total], 0), tf.gather(pieces.row_splits, rows))
  local_end = ends_total - before_word
  piece_exact = tf.gather(exact, rows)
  start = tf.gather(word_starts, rows) + tf.where(piece_exact, local_end - piece_lens, 0)
  end = tf.gather(word_starts, rows) + tf.where(piece_exact, local_end, tf.gather(word_lens, rows))
  return ids, tf.cast(start, tf.int32), tf.cast(end, tf.int32)


def _max_context_flags(
    window_tokens: tf.RaggedTensor, starts: tf.Tensor, lengths: tf.Tensor
) -> tf.RaggedTensor:
  """1 where a window holds the token with its most context (BERT's _check_is_max_context)."""
  t = tf.cast(window_tokens.flat_values, tf.float64)[:, tf.newaxis]
  w = tf.cast(starts, tf.float64)[tf.newaxis]
  n = tf.cast(lengths, tf.float64)[tf.newaxis]
  score = tf.minimum(t - w, w + n - 1 - t) + 0.01 * n
  score = tf.where((t >= w) & (t < w + n), score, tf.constant(-1e9, tf.float64))
  best = tf.argmax(score, axis=1)  # first window wins ties, as the reference
  return window_tokens.with_flat_values(
      tf.cast(tf.equal(best, window_tokens.value_rowids()), tf.int32)
  )


def span_preprocessor(
    dataset: tf.data.Dataset,
    sequence_length,
    output_features,
    *,
    doc_stride: int,
    max_query_length: int,
) -> tf.data.Dataset:
  """One question -> its windows (see the module docstring); labels point at answer tokens."""
  vocab = eager_vocabulary(output_features["input_ids"].vocabulary)
  length = sequence_length_of(sequence_length)
  if length - max_query_length - 3 <= 0:
    raise errors.DataError(
        f"Span sequence length {length} leaves no room for the context after a question of up "
        f"to {max_query_length} tokens and 3 special tokens."
    )
  if doc_stride <= 0:
    raise errors.DataError(f"doc_stride must be positive, got {doc_stride}.")
  tokens = tf.constant(vocab.tokens)

  @tf.autograph.experimental.do_not_convert
  def windows(ex):
    question = vocab.tokenize_tf(ex["question"][tf.newaxis])[0][:max_query_length]
    ctx_ids, ctx_start, ctx_end = tokenize_with_char_offsets(vocab, ex["context"], tokens)
    num_tokens = tf.size(ctx_ids, out_type=tf.int64)
    q_len = tf.size(question, out_type=tf.int64)
    max_doc = length - q_len - 3
    stride = tf.minimum(tf.constant(doc_stride, tf.int64), max_doc)
    n = 1 + tf.maximum(tf.constant(0, tf.int64), (num_tokens - max_doc + stride - 1) // stride)
    starts = tf.range(n) * stride
    lens = tf.maximum(tf.minimum(max_doc, num_tokens - starts), 0)
    window_tokens = tf.ragged.range(starts, starts + lens)

    cls, sep = _column(n, vocab.cls_id), _column(n, vocab.sep_id)
    q_rows = tf.RaggedTensor.from_tensor(tf.tile(question[tf.newaxis], tf.stack([n, 1])))
    ctx_rows = tf.gather(ctx_ids, window_tokens)
    out = _assemble(vocab, [(cls, 0), (q_rows, 0), (sep, 0), (ctx_rows, 1), (sep, 1)], length)
    outside = [cls * 0 - 1, q_rows * 0 - 1, sep * 0 - 1]
    out["offset_start"] = _pack(
        outside + [tf.gather(ctx_start, window_tokens), sep * 0 - 1], length, -1
    )
    out["offset_end"] = _pack(
        outside + [tf.gather(ctx_end, window_tokens), sep * 0 - 1], length, -1
    )
    max_ctx = _max_context_flags(window_tokens, starts, lens)
    out["token_is_max_context"] = _pack([cls * 0, q_rows * 0, sep * 0, max_ctx, sep * 0], length, 0)

    # The first gold answer, in characters; none (v2.0 unanswerable) gives -1.
    answer_start = tf.cast(tf.concat([ex["answer_start"], [-1]], 0)[0], tf.int32)
    answer_text = tf.concat([ex["answer_text"], [""]], 0)[0]
    answer_end = answer_start + tf.strings.length(answer_text, unit="UTF8_CHAR")
    positions = tf.range(num_tokens)
    first = tf.reduce_min(tf.where(ctx_end > answer_start, positions, num_tokens))
    last = tf.reduce_max(tf.where(ctx_start < answer_end, positions, -1))
    answerable = (answer_start >= 0) & (first <= last) & (first < num_tokens)
    inside = answerable & (first >= starts) & (last < starts + lens)
    shift = q_len + 2 - starts
    out["start_position"] = tf.cast(tf.where(inside, first + shift, 0), tf.int32)
    out["end_position"] = tf.cast(tf.where(inside, last + shift, 0), tf.int32)
    out["example_id"] = tf.repeat(ex["example_id"][tf.newaxis], n)
    out["window_index"] = tf.cast(tf.range(n), tf.int32)
    for k, v in _passthrough(ex, "span").items():
      out[k] = tf.repeat(v[tf.newaxis], n, axis=0)
    return tf.data.Dataset.from_tensor_slices(out)

  return dataset.flat_map(windows)


def _scalar_feature(dtype: tf.DType, size: int) -> seqio.Feature:
  return seqio.Feature(seqio.PassThroughVocabulary(size), add_eos=False, dtype=dtype, rank=0)


def output_features(
    kind: str, vocab: seqio.Vocabulary, num_labels: int
) -> dict[str, seqio.Feature]:
  """seqio output features of a kind: model inputs and labels (bookkeeping passes through)."""
  if kind not in KINDS:
    raise errors.DataError(f"Unknown task kind {kind!r}; expected one of {KINDS}.")
  rank = 2 if kind == "multiple_choice" else 1
  binary = seqio.PassThroughVocabulary(2)
  features = {
      "input_ids": seqio.Feature(vocab, add_eos=False, dtype=tf.int32, rank=rank),
      "attention_mask": seqio.Feature(binary, add_eos=False, dtype=tf.int32, rank=rank),
      "token_type_ids": seqio.Feature(binary, add_eos=False, dtype=tf.int32, rank=rank),
  }
  if kind == "span":
    features["start_position"] = _scalar_feature(tf.int32, 0)
    features["end_position"] = _scalar_feature(tf.int32, 0)
  else:
    dtype = tf.float32 if kind == "regression" else tf.int32
    features["label"] = _scalar_feature(dtype, num_labels)
  return features
