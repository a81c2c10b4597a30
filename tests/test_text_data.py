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


def read_blocks(output_dir, prefix, split, num_shards, with_ids=False):
  """Blocks in stream order (block k is record k // n of shard k % n), and their example ids."""
  per_shard = []
  for i in range(num_shards):
    path = os.path.join(output_dir, f"{prefix}-{split}.tfrecord-{i:05d}-of-{num_shards:05d}")
    ds = tf.data.TFRecordDataset(path).map(text_lib.parse_block)
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
