"""Raw corpora -> contiguous 126-token blocks: contents, formats, resume and bad input."""

import bz2
import importlib.util
import itertools
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
gensim_test = pytest.importorskip("gensim.test.utils")

from vidlankd_jax.data import text as text_lib  # noqa: E402
from vidlankd_jax.data import vocab as vocab_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WIKITEXT = """ 
 = Valkyria Chronicles III = 
 
 Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing video game . 
 
 = = Gameplay = = 
 
 As with previous Valkyira Chronicles games , the player controls a squad . 
 
 = Tower Building of the Little Rock Arsenal = 
 
 The Tower Building of the Little Rock Arsenal , also known as U.S. Arsenal Building , is a building . 
"""


@pytest.fixture(scope="module")
def vocab():
  return vocab_lib.WordPieceVocabulary(vocab_lib.default_vocab_file())


@pytest.fixture(scope="module")
def news_corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus") / "news.txt"
  with open(gensim_test.datapath("lee_background.cor"), encoding="utf-8") as f:
    path.write_text("".join(itertools.islice(f, 80)), encoding="utf-8")
  return str(path)


def read_blocks(output_dir, prefix, split, num_shards, with_ids=False, block_len=126):
  """Blocks in stream order (block k is record k // n of shard k % n), and their example ids."""
  per_shard = []
  for i in range(num_shards):
    path = os.path.join(output_dir, f"{prefix}-{split}.tfrecord-{i:05d}-of-{num_shards:05d}")
    ds = tf.data.TFRecordDataset(path).map(lambda r: text_lib.parse_block(r, block_len))
    per_shard.append([(ex["ids"].numpy(), int(ex["example_id"])) for ex in ds])
  blocks = []
  for k in range(sum(len(s) for s in per_shard)):
    blocks.append(per_shard[k % num_shards][k // num_shards])
  return blocks if with_ids else [ids for ids, _ in blocks]


def test_blocks_are_the_contiguous_token_stream(tmp_path, vocab, news_corpus):
  out = str(tmp_path / "out")
  summary = text_lib.convert_text(
      [news_corpus],
      out,
      vocab,
      prefix="news",
      num_shards=3,
      batch_paragraphs=7,
      log=lambda *_: None,
  )
  with open(news_corpus, encoding="utf-8") as f:
    lines = [line.strip() for line in f if line.strip()]
  expected = np.concatenate([vocab.encode(line) for line in lines])
  blocks, example_ids = zip(*read_blocks(out, "news", "train", 3, with_ids=True))
  assert all(b.shape == (126,) and b.dtype == np.int32 for b in blocks)
  # example_id: dense and unique over the three shards, the block's index in the stream.
  assert list(example_ids) == list(range(summary["blocks"]))
  n = len(expected) // 126
  assert len(blocks) == n == summary["blocks"]
  np.testing.assert_array_equal(np.concatenate(blocks), expected[: n * 126])
  assert summary["dropped_tail_tokens"] == len(expected) - n * 126
  assert summary["tokens"] == len(expected) and summary["documents"] == len(lines)
  assert sum(summary["blocks_per_shard"]) == n


def test_resume_skips_finished_work_and_refuses_other_settings(tmp_path, vocab, news_corpus):
  out = str(tmp_path / "out")
  text_lib.convert_text([news_corpus], out, vocab, prefix="news", num_shards=2, log=lambda *_: None)
  shard = os.path.join(out, "news-train.tfrecord-00000-of-00002")
  mtime = os.path.getmtime(shard)
  again = text_lib.convert_text(
      [news_corpus], out, vocab, prefix="news", num_shards=2, log=lambda *_: None
  )
  assert os.path.getmtime(shard) == mtime and again["blocks"] > 0
  with pytest.raises(ValueError, match="other settings"):
    text_lib.convert_text(
        [news_corpus], out, vocab, prefix="news", num_shards=4, log=lambda *_: None
    )


def test_wikitext_format_and_bz2_input(tmp_path, vocab):
  raw = tmp_path / "wiki.train.raw"
  raw.write_text(WIKITEXT, encoding="utf-8")
  assert text_lib.detect_format(str(raw)) == "wikitext"
  paras = list(text_lib.iter_paragraphs(str(raw)))
  assert [p.doc_index for p in paras] == [0, 0, 0, 0, 1, 1]  # sections stay in their article
  assert paras[0].text == "= Valkyria Chronicles III ="
  compressed = tmp_path / "wiki.train.raw.bz2"
  compressed.write_bytes(bz2.compress(raw.read_bytes()))
  assert [p.text for p in text_lib.iter_paragraphs(str(compressed))] == [p.text for p in paras]
  summary = text_lib.convert_text(
      [str(compressed)],
      str(tmp_path / "o"),
      vocab,
      prefix="wiki103",
      num_shards=1,
      block_len=16,
      log=lambda *_: None,
  )
  assert summary["documents"] == 2 and summary["blocks"] == summary["tokens"] // 16


def test_mediawiki_dump_is_read_as_plain_text(tmp_path):
  xml = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">
  <page><title>Anarchism</title><ns>0</ns><id>12</id><revision><id>1</id>
    <text xml:space="preserve">'''Anarchism''' is a [[political philosophy]].

It rejects [[hierarchy|hierarchies]].</text></revision></page>
  <page><title>Talk:Anarchism</title><ns>1</ns><id>13</id><revision><id>2</id>
    <text xml:space="preserve">talk page text</text></revision></page>
</mediawiki>"""
  path = tmp_path / "enwiki-pages-articles.xml.bz2"
  path.write_bytes(bz2.compress(xml.encode("utf-8")))
  assert text_lib.detect_format(str(path)) == "mediawiki"
  paras = list(text_lib.iter_paragraphs(str(path)))
  assert [p.text for p in paras] == [
      "Anarchism is a political philosophy.",
      "It rejects hierarchies.",
  ]
  assert {p.doc_index for p in paras} == {0}


def test_bad_corpus_files_are_named(tmp_path, vocab):
  bad = tmp_path / "latin1.txt"
  bad.write_bytes("caf\u00e9 ok\n".encode("latin-1"))
  with pytest.raises(ValueError, match="latin1.txt.*UTF-8"):
    list(text_lib.iter_paragraphs(str(bad)))
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    text_lib.convert_text(
        [str(tmp_path / "missing.txt")], str(tmp_path / "o"), vocab, prefix="x", log=lambda *_: None
    )
  broken = tmp_path / "broken.txt.bz2"
  broken.write_bytes(bz2.compress(b"hello world\n" * 100)[:40])
  with pytest.raises(ValueError, match="broken.txt.bz2"):
    list(text_lib.iter_paragraphs(str(broken), "lines"))
  assert not os.path.exists(tmp_path / "o" / "x-train.tfrecord-00000-of-00016")


def test_cli_writes_shards_and_summary(tmp_path, news_corpus):
  spec = importlib.util.spec_from_file_location(
      "make_text_tfrecords", os.path.join(ROOT, "tools", "make_text_tfrecords.py")
  )
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  out = str(tmp_path / "wiki103")
  assert (
      tool.main(
          [
              "--input",
              news_corpus,
              "--output_dir",
              out,
              "--prefix",
              "wiki103",
              "--split",
              "validation",
              "--num_shards",
              "2",
          ]
      )
      == 0
  )
  assert os.path.exists(os.path.join(out, "wiki103-validation.tfrecord-00001-of-00002"))
  assert os.path.exists(os.path.join(out, "wiki103-validation-summary.json"))
  assert (
      tool.main(["--input", str(tmp_path / "nope.txt"), "--output_dir", out, "--prefix", "wiki103"])
      == 1
  )


CLEANING_SAMPLE = """ = Title = 
 
 Four tokens only . 
 
 = = Section = = 
 
 Exactly five tokens here . 
 
 A longer line of text that stays . 
"""


def test_cleaning_drops_headings_and_lines_under_five_tokens(tmp_path):
  """The released tokenization's filter: " = Title = " and " = = Section = = " start with " = ";
  "Four tokens only ." splits into 4 space-separated tokens (< 5); the two others have 5 and 8."""
  raw = tmp_path / "wiki.train.raw"
  raw.write_text(CLEANING_SAMPLE, encoding="utf-8")
  cleaned = list(text_lib.iter_paragraphs(str(raw), clean=True))
  assert [p.text for p in cleaned] == [
      "Exactly five tokens here .",
      "A longer line of text that stays .",
  ]
  assert [p.doc_index for p in cleaned] == [0, 0]
  assert len(list(text_lib.iter_paragraphs(str(raw)))) == 5  # clean=False keeps every line
  lines = tmp_path / "en.txt"
  lines.write_text("Anarchism\nOne two three four\none two three four five\n", encoding="utf-8")
  assert [p.text for p in text_lib.iter_paragraphs(str(lines), "lines", clean=True)] == [
      "one two three four five"
  ]


def test_forbidden_range_drops_the_blocks_whose_end_lies_inside_it(
    tmp_path, vocab, news_corpus, monkeypatch
):
  """Blocks of 16 tokens end at 16, 32, 48, 64, 80, 96, ...; a range (40, 90) holds the ends 48,
  64 and 80: blocks 2, 3 and 4 go; block 5 ([80, 96), straddling the range's end) stays, as the
  released `intersect` keeps it. Example ids stay dense."""
  assert [text_lib.in_forbidden_range(k, 16, (40, 90)) for k in range(7)] == [
      False,
      False,
      True,
      True,
      True,
      False,
      False,
  ]
  monkeypatch.setattr(text_lib, "RELEASED_FORBIDDEN_RANGE", (40, 90))
  released = tmp_path / "en.train.raw"
  released.write_text(open(news_corpus, encoding="utf-8").read(), encoding="utf-8")
  outputs = {}
  for name, path, mode in (
      ("plain", news_corpus, "auto"),  # another file name: no range
      ("auto", str(released), "auto"),  # en.train.raw with bert-base-uncased: the range
      ("none", str(released), "none"),
  ):
    out = str(tmp_path / name)
    summary = text_lib.convert_text(
        [path],
        out,
        vocab,
        prefix="w",
        num_shards=1,
        block_len=16,
        forbidden_range=mode,
        log=lambda *_: None,
    )
    outputs[name] = (summary, read_blocks(out, "w", "train", 1, with_ids=True, block_len=16))
  everything = [ids for ids, _ in outputs["plain"][1]]
  kept = [ids for ids, _ in outputs["auto"][1]]
  assert len(kept) == len(everything) - 3 and outputs["auto"][0]["forbidden_blocks"] == 3
  for got, want in zip(kept, everything[:2] + everything[5:]):
    np.testing.assert_array_equal(got, want)
  assert [i for _, i in outputs["auto"][1]] == list(range(len(kept)))
  assert len(outputs["none"][1]) == len(everything)
