"""Downstream seqio tasks end to end at tiny lengths, on data the tests make (TFDS mocks, SWAG
CSVs in the released format) and on the real TRACIE files: shapes, special tokens, segments,
masks, SQuAD windows and answer labels, and errors for missing data."""

import csv
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")
seqio = pytest.importorskip("seqio")

from vidlankd_jax.data import downstream  # noqa: E402
from vidlankd_jax.data import vocab as vocab_lib  # noqa: E402
from vidlankd_jax.data.downstream import encoding, sources  # noqa: E402
from vidlankd_jax.evaluation import metrics  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACIE_DIR = os.path.join(os.path.dirname(ROOT), "shared", "data", "tracie")
L, SPAN_L, STRIDE, MAX_QUERY = 32, 64, 16, 16


@pytest.fixture(scope="session")
def vocab():
  return vocab_lib.WordPieceVocabulary(vocab_lib.default_vocab_file())


@pytest.fixture(scope="session")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("downstream")
  swag = root / "swag"
  swag.mkdir()
  header = [
      "",
      "video-id",
      "fold-ind",
      "startphrase",
      "sent1",
      "sent2",
      "gold-source",
      "ending0",
      "ending1",
      "ending2",
      "ending3",
      "label",
  ]
  rows = [
      [
          "anetv_1",
          "101",
          "Members of the group dance. A man",
          "Members of the group dance.",
          "A man",
          "gold",
          "claps his hands.",
          "jumps into a lake.",
          "eats the microphone slowly.",
          "sings.",
          "0",
      ],
      [
          "lsmdc_2",
          "7",
          "Someone opens the door. He",
          "Someone opens the door.",
          "He",
          "gen",
          "walks in.",
          "flies away over the tall mountains of the north.",
          "sleeps.",
          "is a door.",
          "1",
      ],
      [
          "anetv_3",
          "55",
          "A woman is seen riding a bike. She",
          "A woman is seen riding a bike.",
          "She",
          "gold",
          "falls.",
          "waves.",
          "stops at the light and looks around the busy street.",
          "smiles.",
          "2",
      ],
  ]
  for name, n in (("train.csv", 3), ("val.csv", 2)):
    with open(swag / name, "w", newline="", encoding="utf-8") as f:
      w = csv.writer(f)
      w.writerow(header)
      for i, r in enumerate(rows[:n]):
        w.writerow([str(i)] + r)
  return {"data_dir": str(root / "tfds"), "swag_dir": str(swag), "root": root}


def register_all(dirs):
  """Registers every benchmark over the test data, with tiny SQuAD windows."""
  return downstream.register_downstream_tasks(
      data_dir=dirs["data_dir"],
      swag_dir=dirs["swag_dir"],
      tracie_dir=TRACIE_DIR,
      seq_len={"squad_v1": SPAN_L, "squad_v2": SPAN_L},
      doc_stride=STRIDE,
      max_query_length=MAX_QUERY,
  )


@pytest.fixture(scope="session")
def specs(dirs):
  return register_all(dirs)


def reference_pair(vocab, a, b, length):
  """BERT's reference encoding: _truncate_seq_pair, [CLS] a [SEP] b [SEP], zero padding."""
  a = vocab.encode(a)
  b = vocab.encode(b) if b is not None else None
  if b is None:
    a = a[: length - 2]
    ids, types = [vocab.cls_id] + a + [vocab.sep_id], [0] * (len(a) + 2)
  else:
    while len(a) + len(b) > length - 3:
      (a if len(a) > len(b) else b).pop()
    ids = [vocab.cls_id] + a + [vocab.sep_id] + b + [vocab.sep_id]
    types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
  pad = length - len(ids)
  return ids + [0] * pad, types + [0] * pad, [1] * len(ids) + [0] * pad


def batches(name, split, batch_size=4, **kw):
  return list(
      downstream.get_downstream_dataset(
          name, split, batch_size=batch_size, **kw
      ).as_numpy_iterator()
  )


def concat(bs):
  return {k: np.concatenate([b[k] for b in bs]) for k in bs[0]}


def raw_examples(spec, split):
  return list(
      spec.source.get_dataset(split=split, shuffle=False).map(spec.formatter).as_numpy_iterator()
  )


def _text(x):
  return x.decode("utf-8")


# ------------------------------------------------------------------------------- encoding


def test_truncation_matches_bert_reference():
  for budget in (1, 4, 7, 10):
    for la in range(0, 13):
      for lb in range(0, 13):
        a, b = list(range(la)), list(range(lb))
        while len(a) + len(b) > budget:
          (a if len(a) > len(b) else b).pop()
        ka, kb = encoding.truncate_pair_lengths(tf.constant(la), tf.constant(lb), budget)
        assert (int(ka), int(kb)) == (len(a), len(b)), (la, lb, budget)


def test_char_offsets_point_into_the_raw_text(vocab):
  text = "Café Ångström's naïve résumé, 1990s—done. 日本語 x\u00a0y  soft\u00adhyphen ²³ ΣΑΣ don't $5.00"
  ids, starts, ends = encoding.tokenize_with_char_offsets(
      vocab, tf.constant(text), tf.constant(vocab.tokens)
  )
  ids, starts, ends = ids.numpy(), starts.numpy(), ends.numpy()
  assert ids.tolist() == vocab.encode(text)
  assert np.all(np.diff(starts) >= 0) and np.all(ends > starts)
  pieces = [(vocab.tokens[i], text[s:e]) for i, s, e in zip(ids, starts, ends)]
  assert ("cafe", "Café") in pieces and ("ang", "Ång") in pieces and ("##strom", "ström") in pieces
  assert ("—", "—") in pieces and ("日", "日") in pieces and ("resume", "résumé") in pieces
  # Normalisation drops the soft hyphen: the word's pieces all span the whole word.
  assert ("##hy", "soft\u00adhyphen") in pieces


# ---------------------------------------------------------------------------------- GLUE

GLUE = [n for n in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "ax")]


@pytest.mark.parametrize("name", GLUE)
def test_glue_task_end_to_end(name, specs, vocab):
  spec = specs[f"glue_{name}"]
  split = (spec.eval_splits or spec.test_splits)[0]
  with tfds.testing.mock_data(num_examples=6):
    raw = raw_examples(spec, split)
    out = concat(batches(spec.name, split, batch_size=4, seq_len=L))
  assert len(raw) == 6 and all(r["text_a"] for r in raw)  # the mock gives non-empty strings
  assert out["input_ids"].shape == (8, L) and out["input_ids"].dtype == np.int32
  np.testing.assert_array_equal(out["valid"], [1] * 6 + [0] * 2)
  for i, r in enumerate(raw):
    b = _text(r["text_b"]) if "text_b" in r else None
    ids, types, mask = reference_pair(vocab, _text(r["text_a"]), b, L)
    assert out["input_ids"][i].tolist() == ids
    assert out["token_type_ids"][i].tolist() == types
    assert out["attention_mask"][i].tolist() == mask
    assert out["label"][i] == pytest.approx(r["label"])
    assert out["idx"][i] == r["idx"]
  assert out["label"].dtype == (np.float32 if name == "stsb" else np.int32)
  assert spec.kind == ("regression" if name == "stsb" else "classification")
  assert not out["input_ids"][6:].any() and not out["attention_mask"][6:].any()


def test_glue_splits_and_training_stream(specs):
  assert specs["glue_mnli"].eval_splits == ("validation_matched", "validation_mismatched")
  assert specs["glue_ax"].train_split is None and specs["glue_ax"].test_splits == ("test",)
  assert specs["glue_mnli"].num_labels == 3 and specs["glue_stsb"].num_labels == 1

  def stream(shuffle):
    ds = downstream.get_downstream_dataset(
        "glue_sst2",
        "train",
        batch_size=4,
        seq_len=L,
        shuffle=shuffle,
        seed=3,
        repeat=True,
        shuffle_buffer_size=8,
    )
    return [b for _, b in zip(range(4), ds.as_numpy_iterator())]

  with tfds.testing.mock_data(num_examples=5):
    shuffled, ordered = stream(True), stream(False)
  assert all(b["input_ids"].shape == (4, L) and b["valid"].all() for b in shuffled)
  # Endless: 16 rows cycle through the 5 examples; shuffling changes their order.
  seen, plain = (np.concatenate([b["idx"] for b in s]) for s in (shuffled, ordered))
  np.testing.assert_array_equal(plain[:5], plain[5:10])
  assert set(seen.tolist()) == set(plain[:5].tolist())
  assert seen.tolist() != plain.tolist()
  with pytest.raises(ValueError, match="has no split 'validation'"):
    downstream.get_downstream_dataset("glue_ax", "validation", batch_size=2)


def test_glue_ax_prediction_export(specs, tmp_path):
  with tfds.testing.mock_data(num_examples=4):
    out = concat(batches("glue_ax", "test", batch_size=4, seq_len=L))
  predictions = np.arange(4) % 3
  path = tmp_path / "AX.tsv"
  metrics.write_glue_ax_predictions(str(path), out["idx"][out["valid"] == 1], predictions)
  lines = path.read_text().splitlines()
  assert lines[0] == "index\tprediction" and len(lines) == 5
  assert {line.split("\t")[1] for line in lines[1:]} <= set(metrics.MNLI_LABELS)


# -------------------------------------------------------------------------- multiple choice


def test_piqa_rows_have_their_own_masks(specs, vocab):
  spec = specs["piqa"]
  with tfds.testing.mock_data(num_examples=5):
    raw = raw_examples(spec, "validation")
    out = concat(batches("piqa", "validation", batch_size=4, seq_len=L))
  assert out["input_ids"].shape == (8, 2, L) and out["label"].shape == (8,)
  differing = 0
  for i, r in enumerate(raw):
    for c in range(2):
      ids, types, mask = reference_pair(vocab, _text(r["context"]), _text(r["choices"][c]), L)
      assert out["input_ids"][i, c].tolist() == ids
      assert out["token_type_ids"][i, c].tolist() == types
      assert out["attention_mask"][i, c].tolist() == mask
    differing += out["attention_mask"][i, 0].tolist() != out["attention_mask"][i, 1].tolist()
    assert out["label"][i] == r["label"]
  assert differing > 0  # choices of different lengths: the masks must not be shared


def test_swag_from_released_csv(specs, vocab, dirs):
  out = concat(batches("swag", "train", batch_size=2, seq_len=L))
  assert out["input_ids"].shape == (4, 4, L)
  np.testing.assert_array_equal(out["label"][:3], [0, 1, 2])
  np.testing.assert_array_equal(out["valid"], [1, 1, 1, 0])
  ids, types, mask = reference_pair(
      vocab,
      "Someone opens the door.",
      "He flies away over the tall mountains " "of the north.",
      L,
  )
  assert out["input_ids"][1, 1].tolist() == ids and out["token_type_ids"][1, 1].tolist() == types
  assert out["attention_mask"][1, 1].tolist() == mask
  assert out["attention_mask"][1, 0].sum() < out["attention_mask"][1, 1].sum()
  assert len(concat(batches("swag", "validation", batch_size=2, seq_len=L))["label"]) == 2
  with pytest.raises(
      FileNotFoundError, match=r"SWAG CSVs not found .*test.csv.*github.com/rowanz/swagaf"
  ):
    batches("swag", "test", seq_len=L)


def test_swag_csv_errors_name_the_row(tmp_path):
  path = tmp_path / "train.csv"
  path.write_text(
      "sent1,sent2,ending0,ending1,ending2,ending3,label\na,b,c,d,e,f,0\na,b,c,d,e,f,7\n"
  )
  with pytest.raises(ValueError, match=r"train.csv:3: label 7"):
    sources.read_swag_csv(str(path))
  path.write_text("sent1,sent2,label\na,b,0\n")
  with pytest.raises(ValueError, match="lacks the columns"):
    sources.read_swag_csv(str(path))


# ---------------------------------------------------------------------------------- TRACIE

needs_tracie = pytest.mark.skipif(
    not os.path.isdir(TRACIE_DIR), reason=f"TRACIE files not in {TRACIE_DIR}"
)


@needs_tracie
def test_tracie_real_files(specs, vocab):
  out = concat(batches("tracie_uniform_prior", "train", batch_size=128, seq_len=128))
  valid = out["valid"] == 1
  lines = open(
      os.path.join(TRACIE_DIR, "uniform-prior", "tracie_train_uniform_prior.txt"),
      encoding="utf-8",
  )
  lines = [line.rstrip("\n").split("\t") for line in lines if line.strip()]
  assert valid.sum() == len(lines) == 860
  for i in (0, 1, 517, 859):
    event, story = lines[i][0][len("event: ") :].split(" story: ")
    ids, types, mask = reference_pair(vocab, story.strip(), event.strip(), 128)
    assert out["input_ids"][i].tolist() == ids and out["token_type_ids"][i].tolist() == types
    assert out["attention_mask"][i].tolist() == mask
    assert out["label"][i] == (lines[i][1] == "answer: positive")
    official_start = "starts before" in lines[i][0] or "starts after" in lines[i][0]
    assert out["hypothesis_type"][i] == (
        metrics.TRACIE_START if official_start else metrics.TRACIE_END
    )
  # Two hypotheses (positive, negative) per story in the release.
  assert out["story_id"][0] == out["story_id"][1] and out["label"][0] != out["label"][1]
  # The metric reads its fields from the eval batches.
  spec = specs["tracie_uniform_prior"]
  fields = downstream.eval_fields(spec, [out])
  result = spec.metric_fn(out["label"][valid], np.ones(valid.sum(), np.int32), **fields)
  assert result["accuracy"] == pytest.approx(50.0)
  assert (
      set(result) == {"accuracy", "start_accuracy", "end_accuracy", "story_em"}
      and result["story_em"] == 0
  )


@needs_tracie
def test_tracie_iid_sharding(specs):
  assert specs["tracie_iid"].eval_splits == ("test",)
  shards = [
      concat(
          batches(
              "tracie_iid", "train", batch_size=600, seq_len=16, shard_info=seqio.ShardInfo(i, 2)
          )
      )
      for i in range(2)
  ]
  counts = [int(s["valid"].sum()) for s in shards]
  assert sum(counts) == 1174 and abs(counts[0] - counts[1]) <= 1
  # Disjoint halves: the same story's hypotheses are consecutive lines and go to different shards.
  assert shards[0]["story_id"][0] == shards[1]["story_id"][0]


def test_tracie_errors(tmp_path):
  (tmp_path / "iid").mkdir()
  (tmp_path / "iid" / "tracie_train.txt").write_text(
      "event: a starts after b story: s\tanswer: maybe\n"
  )
  with pytest.raises(ValueError, match=r"tracie_train.txt:1: answer 'answer: maybe'"):
    sources.read_tracie(str(tmp_path / "iid" / "tracie_train.txt"))
  source = sources.tracie_source(str(tmp_path), "iid")
  with pytest.raises(FileNotFoundError, match=r"iid/tracie_test.txt not found .*allenai/tracie"):
    source.get_dataset(split="test")


# ---------------------------------------------------------------------------------- SQuAD

LONG = " ".join(
    f"Sentence {i} of the long story tells how the river number {i} flows past the old mill."
    for i in range(12)
)
SQUAD = [
    (
        "n1",
        "In what country is Normandy located?",
        "The Normans gave their name to Normandy, a region in France.",
        ["France"],
    ),
    (
        "u1",
        "What did the naïve résumé describe?",
        "Café Ångström — the naïve résumé of Tōkyō studies — began in the 1990s.",
        ["Tōkyō studies", "Tōkyō"],
    ),
    (
        "u2",
        "Who is the café named after?",
        "Café Ångström — the naïve résumé of Tōkyō studies — began in the 1990s.",
        ["Ångström"],
    ),
    ("l1", "Which river flows past the mill in sentence 10?", LONG, ["the river number 10"]),
    ("l2", "How does sentence 0 start?", LONG, ["Sentence 0"]),
    ("x1", "Who founded the mill?", LONG, []),  # unanswerable (v2.0 only)
]


def _squad_examples(v2):
  for qid, q, ctx, answers in SQUAD:
    if not answers and not v2:
      continue
    # The validation answer at its last occurrence exercises the char offsets of later windows.
    starts = [ctx.rindex(a) if qid.startswith("l") else ctx.index(a) for a in answers]
    ex = {
        "id": qid,
        "title": "t",
        "question": q,
        "context": ctx,
        "answers": {
            "text": np.array(answers, dtype=object).reshape(-1),
            "answer_start": np.array(starts, np.int32),
        },
    }
    if v2:
      ex["is_impossible"] = not answers
      ex["plausible_answers"] = {
          "text": np.zeros([0], object),
          "answer_start": np.zeros([0], np.int32),
      }
    yield ex


def _squad_as_dataset(self, split, decoders=None, read_config=None, **kwargs):
  """A mock whose answers sit at their real character offsets (TFDS's random mock has none)."""
  v2 = self.builder_config.name == "v2.0"
  answers = {
      "text": tf.TensorSpec([None], tf.string),
      "answer_start": tf.TensorSpec([None], tf.int32),
  }
  sig = {
      "id": tf.TensorSpec([], tf.string),
      "title": tf.TensorSpec([], tf.string),
      "question": tf.TensorSpec([], tf.string),
      "context": tf.TensorSpec([], tf.string),
      "answers": answers,
  }
  if v2:
    sig.update(is_impossible=tf.TensorSpec([], tf.bool), plausible_answers=answers)
  return tf.data.Dataset.from_generator(lambda: _squad_examples(v2), output_signature=sig)


@pytest.fixture(scope="module", params=["squad_v1", "squad_v2"])
def squad(request, specs):
  name = request.param
  with tfds.testing.mock_data(as_dataset_fn=_squad_as_dataset):
    out = concat(batches(name, "validation", batch_size=8))
    examples = downstream.get_span_examples(name, "validation")
  return name, out, examples


def test_squad_windows_cover_the_context_with_the_stride(squad, vocab):
  name, out, examples = squad
  valid = out["valid"] == 1
  ids = np.array([_text(x) for x in out["example_id"]])
  assert out["input_ids"].shape[1] == SPAN_L and set(ids[valid]) == set(examples)
  for qid, ex in examples.items():
    rows = np.flatnonzero((ids == qid) & valid)
    context_tokens = vocab.encode(ex.context)
    q_len = min(len(vocab.encode(next(q for i, q, _, _ in SQUAD if i == qid))), MAX_QUERY)
    max_doc = SPAN_L - q_len - 3
    n_expected = 1 + max(0, -(-(len(context_tokens) - max_doc) // STRIDE))
    assert len(rows) == n_expected and out["window_index"][rows].tolist() == list(range(len(rows)))
    covered, owners = [], np.zeros(len(context_tokens), int)
    for w, r in enumerate(rows):
      ctx_pos = np.flatnonzero(out["token_type_ids"][r] == 1)[:-1]  # drop the final [SEP]
      assert (
          out["input_ids"][r, 0] == vocab.cls_id and out["input_ids"][r, q_len + 1] == vocab.sep_id
      )
      assert out["input_ids"][r, ctx_pos[-1] + 1] == vocab.sep_id and ctx_pos[0] == q_len + 2
      assert out["attention_mask"][r].sum() == ctx_pos[-1] + 2
      start = w * STRIDE
      assert out["input_ids"][r, ctx_pos].tolist() == context_tokens[start : start + len(ctx_pos)]
      assert (out["offset_start"][r, ctx_pos] >= 0).all() and (
          np.delete(out["offset_start"][r], ctx_pos) == -1
      ).all()
      covered.extend(range(start, start + len(ctx_pos)))
      owners[start : start + len(ctx_pos)] += out["token_is_max_context"][r, ctx_pos]
    assert sorted(set(covered)) == list(range(len(context_tokens)))
    np.testing.assert_array_equal(owners, 1)  # each token has exactly one max-context window
  assert (
      max(np.bincount(np.unique(ids[valid], return_inverse=True)[1])) > 1
  )  # long contexts: several windows


def test_squad_labels_point_at_the_answer(squad):
  name, out, examples = squad
  ids = np.array([_text(x) for x in out["example_id"]])
  for qid, ex in examples.items():
    rows = np.flatnonzero((ids == qid) & (out["valid"] == 1))
    hits = [r for r in rows if out["start_position"][r] > 0]
    if not ex.answers:
      assert not hits and not out["end_position"][rows].any()
      continue
    assert hits, qid
    for r in hits:
      s, e = out["start_position"][r], out["end_position"][r]
      assert s <= e and out["token_type_ids"][r, s] == 1
      assert ex.context[out["offset_start"][r, s] : out["offset_end"][r, e]] == ex.answers[0]
    for r in set(rows) - set(hits):
      assert out["end_position"][r] == 0


def test_squad_perfect_logits_score_100(squad):
  name, out, examples = squad
  start = np.full(out["input_ids"].shape, -10.0)
  end = np.full(out["input_ids"].shape, -10.0)
  rows = np.arange(len(start))
  start[rows, out["start_position"]] = 10.0
  end[rows, out["end_position"]] = 10.0
  result, decoding = downstream.evaluate_span_predictions(
      name, "validation", out, start, end, examples=examples
  )
  key = "exact_match" if name == "squad_v1" else "exact"
  assert result[key] == pytest.approx(100.0) and result["f1"] == pytest.approx(100.0)
  assert decoding.predictions["u2"] == "Ångström"
  if name == "squad_v2":
    assert decoding.predictions["x1"] == "" and result["NoAns_total"] == 1
    assert "best_f1_thresh" in result
  # Off-by-one starts lose exact match.
  result, _ = downstream.evaluate_span_predictions(
      name, "validation", out, np.roll(start, 1, axis=1), end, examples=examples
  )
  assert result["f1"] < 100.0


# ---------------------------------------------------------------- registry, errors, extension


def test_missing_tfds_data_says_how_to_get_it(specs, dirs):
  with pytest.raises(
      FileNotFoundError, match=r"TFDS glue/sst2:2.0.0 is not prepared in .*tfds build glue/sst2"
  ):
    batches("glue_sst2", "validation")


def test_registry_is_re_registrable(specs, dirs):
  again = downstream.register_downstream_tasks(data_dir=dirs["data_dir"], seq_len=40)
  assert (
      again["glue_rte"].seq_len == 40 and downstream.get_downstream_spec("glue_rte").seq_len == 40
  )
  assert set(again) == set(specs)
  with pytest.raises(KeyError, match="No downstream benchmark 'glue_boolq'"):
    downstream.get_downstream_spec("glue_boolq")
  register_all(dirs)  # restore the shared registration for the other tests


def test_a_new_benchmark_is_one_registration(tmp_path, vocab):
  """A user's TSV benchmark: one spec with a formatter and a metric function."""
  path = tmp_path / "dev.tsv"
  path.write_text("good movie\t1\nawful plot\t0\nfine acting\t1\n")

  def read_tsv(p):
    rows = [line.rstrip("\n").split("\t") for line in open(p, encoding="utf-8")]
    return {
        "text": np.array([r[0] for r in rows], object),
        "label": np.array([int(r[1]) for r in rows]),
    }

  spec = downstream.DownstreamSpec(
      name="my_sentiment",
      kind="classification",
      num_labels=2,
      metric_fn=metrics.accuracy_metric,
      source=downstream.file_source(
          {"validation": str(path)}, read_tsv, lambda s, p: f"missing {p}"
      ),
      formatter=lambda ex: {"text_a": ex["text"], "label": ex["label"]},
      description="a TSV file",
      seq_len=8,
      train_split=None,
  )
  downstream.register_benchmark(spec, vocab)
  out = concat(batches("my_sentiment", "validation", batch_size=2))
  assert out["input_ids"].shape == (4, 8)
  assert out["input_ids"][0].tolist() == reference_pair(vocab, "good movie", None, 8)[0]
  assert spec.metric_fn(out["label"][:3], [1, 1, 1]) == {"accuracy": pytest.approx(200 / 3)}
  assert seqio.get_mixture_or_task("my_sentiment").predict_metric_fns == [metrics.accuracy_metric]
