"""Downstream metrics against reference implementations: scikit-learn, SciPy, and the official
SQuAD v1.1 / v2.0, GLUE diagnostic and TRACIE evaluators (reimplemented here as written)."""

import collections
import csv
import math
import re
import string

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from vidlankd_jax.evaluation import metrics

# ---------------------------------------------------------------------------- GLUE metrics


def _label_cases():
  rng = np.random.default_rng(0)
  cases = [
      ([0, 1, 1, 0, 1, 0, 0, 1], [0, 1, 0, 0, 1, 1, 0, 1]),
      ([1, 1, 1, 1], [1, 1, 1, 1]),  # constant: MCC 0, F1 1
      ([0, 0, 0, 0], [0, 0, 0, 0]),  # no positives: F1 0
      ([0, 1, 0, 1], [1, 0, 1, 0]),  # perfectly wrong: MCC -1
  ]
  for n, k in ((50, 2), (200, 2), (90, 3), (300, 3)):
    t = rng.integers(0, k, n)
    p = np.where(rng.random(n) < 0.6, t, rng.integers(0, k, n))
    cases.append((t.tolist(), p.tolist()))
  return cases


@pytest.mark.parametrize("targets,predictions", _label_cases())
def test_classification_metrics_equal_sklearn(targets, predictions):
  assert metrics.accuracy(targets, predictions) == pytest.approx(
      skm.accuracy_score(targets, predictions)
  )
  assert metrics.matthews_corrcoef(targets, predictions) == pytest.approx(
      skm.matthews_corrcoef(targets, predictions), abs=1e-12
  )
  if max(targets + predictions) <= 1:
    expected = skm.f1_score(targets, predictions, zero_division=0.0)
    assert metrics.binary_f1(targets, predictions) == pytest.approx(expected)


def test_known_values():
  assert metrics.matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
  assert metrics.binary_f1([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.5)
  # Scores [N, K] are arg-maxed.
  assert metrics.accuracy(
      [0, 1, 2], [[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1]]
  ) == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_correlations_equal_scipy(seed, ties):
  rng = np.random.default_rng(seed)
  t = rng.uniform(0, 5, 80)
  p = t + rng.normal(0, 1.5, 80)
  if ties:
    t, p = np.round(t), np.round(p * 2) / 2
  assert metrics.pearson_corr(t, p) == pytest.approx(stats.pearsonr(t, p)[0], abs=1e-12)
  assert metrics.spearman_corr(t, p) == pytest.approx(stats.spearmanr(t, p)[0], abs=1e-12)
  np.testing.assert_allclose(metrics.rankdata(p), stats.rankdata(p, method="average"))


def test_glue_task_metrics_follow_the_leaderboard():
  t, p = [0, 1, 1, 0, 1, 0], [0, 1, 0, 0, 1, 1]
  assert set(metrics.glue_metrics("cola", t, p)) == {"matthews_corr"}
  assert metrics.glue_metrics("cola", t, p)["matthews_corr"] == pytest.approx(
      100 * skm.matthews_corrcoef(t, p)
  )
  for task in ("mrpc", "qqp"):
    out = metrics.glue_metrics(task, t, p)
    assert out["f1"] == pytest.approx(100 * skm.f1_score(t, p))
    assert out["accuracy"] == pytest.approx(100 * skm.accuracy_score(t, p))
  for task in ("sst2", "mnli", "qnli", "rte", "wnli"):
    assert metrics.glue_metrics(task, t, p) == {
        "accuracy": pytest.approx(100 * skm.accuracy_score(t, p))
    }
  gold, pred = [0.0, 1.5, 2.0, 4.5, 3.0], [0.5, 1.0, 2.5, 4.0, 3.5]
  out = metrics.glue_metrics("stsb", gold, pred)
  assert out["pearson"] == pytest.approx(100 * stats.pearsonr(gold, pred)[0])
  assert out["spearman"] == pytest.approx(100 * stats.spearmanr(gold, pred)[0])
  with pytest.raises(KeyError, match="Unknown GLUE task"):
    metrics.glue_metrics("boolq", t, p)
  with pytest.raises(ValueError, match="differ in shape"):
    metrics.accuracy([0, 1], [0])


def test_multiple_choice_accuracy():
  scores = np.array([[0.1, 0.9, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1], [0.0, 0.0, 0.2, 0.8]])
  assert metrics.multiple_choice_accuracy([1, 0, 2], scores) == {"accuracy": pytest.approx(200 / 3)}


# ---------------------------------------------------------------------------------- TRACIE


def _official_tracie(lines, predictions):
  """The TRACIE evaluator's rules (allenai/tracie code/models/ptntime/evaluator.py) on the
  release's lines: a line is a start hypothesis when "starts before" or "starts after" occurs
  anywhere in it (the story included); its story is the text after "story:"."""
  total = correct = total_start = correct_start = total_end = correct_end = 0
  story_prediction_map = {}
  for line, prediction in zip(lines, predictions):
    source, answer = line.split("\t")
    story = source.split("story:")[1] if "story:" in source else "no story"
    right = (answer.split()[1] == "positive") == (prediction == 1)
    story_prediction_map.setdefault(story, []).append(right)
    total += 1
    correct += right
    if "starts before" in line or "starts after" in line:
      total_start += 1
      correct_start += right
    else:
      total_end += 1
      correct_end += right
  story_em = sum(all(v) for v in story_prediction_map.values()) / len(story_prediction_map)
  return correct / total, correct_start / total_start, correct_end / total_end, story_em


def test_tracie_metrics_equal_official_evaluator(tmp_path):
  from vidlankd_jax.data.downstream import sources

  s1 = "Tom ate. Then he left."
  s3 = "Bob ran at dawn. The race starts after the bell."  # 'starts after' in the story only
  gold = [
      ("Tom left starts after he ate", s1, "positive"),
      ("Tom left starts before he ate", s1, "negative"),
      ("Tom ate ends after he left", s1, "positive"),
      ("Ann sang ends before the show", "Ann sang. The show began.", "negative"),
      ("Ann sang starts after the show", "Ann sang. The show began.", "positive"),
      ("Bob ran ends after dawn", s3, "positive"),
      ("the party starts later ends before noon", s3, "negative"),  # no 'starts before/after'
  ]
  lines = [f"event: {h} story: {story}\tanswer: {label}" for h, story, label in gold]
  path = tmp_path / "tracie_test.txt"
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  read = sources.read_tracie(str(path))
  # The evaluator reads the whole line: the end hypotheses of story s3 count as start ones.
  assert read["hypothesis_type"].tolist() == [0, 0, 1, 1, 0, 0, 0]
  predictions = [1, 0, 0, 0, 1, 1, 1]
  acc, start, end, story_em = _official_tracie(lines, predictions)
  out = metrics.tracie_metrics(
      read["label"],
      predictions,
      hypothesis_type=read["hypothesis_type"],
      story_id=read["story_id"],
  )
  assert out["accuracy"] == pytest.approx(100 * acc)
  assert out["start_accuracy"] == pytest.approx(100 * start)
  assert out["end_accuracy"] == pytest.approx(100 * end)
  assert out["story_em"] == pytest.approx(100 * story_em)
  assert set(metrics.tracie_metrics([1, 0], [1, 1])) == {"accuracy"}


# ----------------------------------------------------------------------- GLUE diagnostics

DIAG_HEADER = [
    "Lexical Semantics",
    "Predicate-Argument Structure",
    "Logic",
    "Knowledge",
    "Domain",
    "Premise",
    "Hypothesis",
    "Label",
]
DIAG_ROWS = [
    ["", "", "Negation", "", "News", "The cat sat.", "The cat did not sit.", "contradiction"],
    [
        "Lexical entailment",
        "",
        "",
        "World knowledge",
        "ACL",
        "Paris is in France.",
        "Paris is in Europe.",
        "entailment",
    ],
    [
        "",
        "Coordination scope",
        "",
        "Common sense",
        "Reddit",
        "A and B ran.",
        "A ran.",
        "entailment",
    ],
    [
        "Quantifiers;Lexical entailment",
        "",
        "Negation;Double negation",
        "",
        "News",
        "All dogs bark.",
        "Some dogs bark.",
        "entailment",
    ],
    [
        "",
        "",
        "",
        "World knowledge",
        "Wikipedia",
        "Obama was president.",
        "Obama was a senator.",
        "neutral",
    ],
    ["", "Core args", "", "World knowledge", "News", "X bought Y.", "Y sold X.", "contradiction"],
    [
        "Morphological negation",
        "",
        "",
        "",
        "ACL",
        "It is possible.",
        "It is impossible.",
        "contradiction",
    ],
    [
        "",
        "",
        "Conditionals",
        "Common sense",
        "Reddit",
        "If it rains, it is wet.",
        "It is dry.",
        "neutral",
    ],
]


@pytest.fixture
def diagnostic_file(tmp_path):
  path = tmp_path / "diagnostic-full.tsv"
  with open(path, "w", encoding="utf-8", newline="") as f:
    w = csv.writer(f, delimiter="\t", lineterminator="\n")
    w.writerow(DIAG_HEADER)
    w.writerows(DIAG_ROWS)
  return str(path)


def test_glue_diagnostic_breakdown(diagnostic_file):
  predictions = [
      "contradiction",
      "entailment",
      "neutral",
      "entailment",
      "entailment",
      "contradiction",
      "neutral",
      "neutral",
  ]
  out = metrics.glue_diagnostic_breakdown(diagnostic_file, predictions)
  gold = np.array([r[-1] for r in DIAG_ROWS])
  pred = np.array(predictions)

  def check(name, rows):
    assert out[name]["count"] == len(rows)
    assert out[name]["r3"] == pytest.approx(
        100 * skm.matthews_corrcoef(gold[rows], pred[rows]), abs=1e-9
    )
    assert out[name]["accuracy"] == pytest.approx(100 * skm.accuracy_score(gold[rows], pred[rows]))

  check("all", list(range(8)))
  check("Knowledge", [1, 2, 4, 5, 7])
  check("Knowledge/World knowledge", [1, 4, 5])
  check("Knowledge/Common sense", [2, 7])
  check("Logic", [0, 3, 7])
  check("Logic/Negation", [0, 3])
  check("Lexical Semantics/Lexical entailment", [1, 3])
  # Ids in MNLI order and a mapping idx -> label give the same answer.
  ids = [metrics.MNLI_LABELS.index(p) for p in predictions]
  assert metrics.glue_diagnostic_breakdown(diagnostic_file, dict(enumerate(ids))) == out
  with pytest.raises(ValueError, match="7 predictions for 8 diagnostic rows"):
    metrics.glue_diagnostic_breakdown(diagnostic_file, predictions[:7])


def test_glue_diagnostic_file_errors(tmp_path):
  bad = tmp_path / "bad.tsv"
  bad.write_text("Premise\tHypothesis\tLabel\nA\tB\tentailment\n")
  with pytest.raises(ValueError, match="lacks the columns"):
    metrics.read_glue_diagnostics(str(bad))
  bad.write_text("\t".join(DIAG_HEADER) + "\n" + "\t".join(DIAG_ROWS[0][:-1] + ["yes"]) + "\n")
  with pytest.raises(ValueError, match=r"bad.tsv:2: Label 'yes'"):
    metrics.read_glue_diagnostics(str(bad))
  with pytest.raises(FileNotFoundError, match="diagnostic-full.tsv"):
    metrics.read_glue_diagnostics(str(tmp_path / "absent.tsv"))


def test_write_glue_ax_predictions(tmp_path):
  path = tmp_path / "AX.tsv"
  metrics.write_glue_ax_predictions(str(path), [2, 0, 1], [1, 0, "contradiction"])
  assert path.read_text() == "index\tprediction\n0\tentailment\n1\tcontradiction\n2\tneutral\n"
  with pytest.raises(ValueError, match="label id 3"):
    metrics.write_glue_ax_predictions(str(path), [0], [3])
  with pytest.raises(ValueError, match="Duplicate indices"):
    metrics.write_glue_ax_predictions(str(path), [0, 0], [0, 1])


# ------------------------------------------------------- SQuAD: the official scripts, as written


def _official_normalize_answer(s):
  def remove_articles(text):
    return re.sub(r"\b(a|an|the)\b", " ", text)

  def white_space_fix(text):
    return " ".join(text.split())

  def remove_punc(text):
    exclude = set(string.punctuation)
    return "".join(ch for ch in text if ch not in exclude)

  return white_space_fix(remove_articles(remove_punc(s.lower())))


def _official_v1(dataset, predictions):
  """evaluate-v1.1.py: evaluate()."""

  def f1_score(prediction, ground_truth):
    prediction_tokens = _official_normalize_answer(prediction).split()
    ground_truth_tokens = _official_normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
      return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)

  def exact_match_score(prediction, ground_truth):
    return _official_normalize_answer(prediction) == _official_normalize_answer(ground_truth)

  f1 = exact_match = total = 0
  for article in dataset:
    for paragraph in article["paragraphs"]:
      for qa in paragraph["qas"]:
        total += 1
        if qa["id"] not in predictions:
          continue
        ground_truths = [x["text"] for x in qa["answers"]]
        prediction = predictions[qa["id"]]
        exact_match += max(exact_match_score(prediction, g) for g in ground_truths)
        f1 += max(f1_score(prediction, g) for g in ground_truths)
  return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


def _official_v2(dataset, preds, na_probs=None, na_prob_thresh=1.0):
  """evaluate-v2.0.py: main() without the plots."""

  def get_tokens(s):
    if not s:
      return []
    return _official_normalize_answer(s).split()

  def compute_exact(a_gold, a_pred):
    return int(_official_normalize_answer(a_gold) == _official_normalize_answer(a_pred))

  def compute_f1(a_gold, a_pred):
    gold_toks, pred_toks = get_tokens(a_gold), get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
      return int(gold_toks == pred_toks)
    if num_same == 0:
      return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)

  qid_to_has_ans = {}
  exact_scores, f1_scores = {}, {}
  for article in dataset:
    for p in article["paragraphs"]:
      for qa in p["qas"]:
        qid_to_has_ans[qa["id"]] = bool(qa["answers"])
        gold_answers = [a["text"] for a in qa["answers"] if _official_normalize_answer(a["text"])]
        if not gold_answers:
          gold_answers = [""]
        if qa["id"] not in preds:
          continue
        exact_scores[qa["id"]] = max(compute_exact(a, preds[qa["id"]]) for a in gold_answers)
        f1_scores[qa["id"]] = max(compute_f1(a, preds[qa["id"]]) for a in gold_answers)
  has_na_file = na_probs is not None
  if not has_na_file:
    na_probs = {k: 0.0 for k in preds}
  has_ans_qids = [k for k, v in qid_to_has_ans.items() if v]
  no_ans_qids = [k for k, v in qid_to_has_ans.items() if not v]

  def apply_no_ans_threshold(scores):
    new_scores = {}
    for qid, s in scores.items():
      if na_probs[qid] > na_prob_thresh:
        new_scores[qid] = float(not qid_to_has_ans[qid])
      else:
        new_scores[qid] = s
    return new_scores

  def make_eval_dict(exact, f1, qid_list=None):
    if not qid_list:
      total = len(exact)
      return {
          "exact": 100.0 * sum(exact.values()) / total,
          "f1": 100.0 * sum(f1.values()) / total,
          "total": total,
      }
    total = len(qid_list)
    return {
        "exact": 100.0 * sum(exact[k] for k in qid_list) / total,
        "f1": 100.0 * sum(f1[k] for k in qid_list) / total,
        "total": total,
    }

  def find_best_thresh(scores):
    num_no_ans = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
    cur_score = num_no_ans
    best_score = cur_score
    best_thresh = 0.0
    qid_list = sorted(na_probs, key=lambda k: na_probs[k])
    for qid in qid_list:
      if qid not in scores:
        continue
      if qid_to_has_ans[qid]:
        diff = scores[qid]
      else:
        diff = -1 if preds[qid] else 0
      cur_score += diff
      if cur_score > best_score:
        best_score = cur_score
        best_thresh = na_probs[qid]
    return 100.0 * best_score / len(scores), best_thresh

  exact_thresh, f1_thresh = apply_no_ans_threshold(exact_scores), apply_no_ans_threshold(f1_scores)
  out = make_eval_dict(exact_thresh, f1_thresh)
  if has_ans_qids:
    out.update(
        {"HasAns_" + k: v for k, v in make_eval_dict(exact_thresh, f1_thresh, has_ans_qids).items()}
    )
  if no_ans_qids:
    out.update(
        {"NoAns_" + k: v for k, v in make_eval_dict(exact_thresh, f1_thresh, no_ans_qids).items()}
    )
  if has_na_file:
    out["best_exact"], out["best_exact_thresh"] = find_best_thresh(exact_scores)
    out["best_f1"], out["best_f1_thresh"] = find_best_thresh(f1_scores)
  return out


# Hand-made questions: (id, gold answers, prediction, na_prob). Empty golds: unanswerable.
SQUAD_CASES = [
    (
        "q1",
        ["Denver Broncos", "The Denver Broncos"],
        "the Denver Broncos!",
        0.1,
    ),  # exact after normalising
    ("q2", ["Santa Clara, California"], "Santa Clara", 0.3),  # partial F1
    ("q3", ["1990s", "the 1990s"], "in the  1990s", 0.2),  # extra token
    ("q4", ["gold medal"], "silver", 0.9),  # wrong
    ("q5", ["An apple"], "apple", 0.05),  # article removed
    ("q6", [], "", 0.8),  # unanswerable, abstained
    ("q7", [], "Paris", 0.6),  # unanswerable, answered
    ("q8", ["the"], "", 0.7),  # gold normalises to empty: no-answer for v2
    ("q9", ["Émile Zola"], "émile zola.", 0.4),
    ("q10", [], "", 0.05),
]


def _dataset(cases):
  qas = [{"id": q, "answers": [{"text": a} for a in golds]} for q, golds, _, _ in cases]
  return [{"paragraphs": [{"qas": qas[:4]}, {"qas": qas[4:]}]}]


def test_normalize_answer():
  assert metrics.normalize_answer("  The  Quick, brown FOX!  ") == "quick brown fox"
  assert metrics.normalize_answer("an apple a day") == "apple day"
  assert metrics.normalize_answer("theater") == "theater"  # articles only as whole words
  for s in ("Hello, World", "A-B c", "the end.", "  x  y ", "Ça va?"):
    assert metrics.normalize_answer(s) == _official_normalize_answer(s)


def test_squad_v1_equals_official_script():
  answered = [c for c in SQUAD_CASES if c[1]]
  preds = {q: p for q, _, p, _ in answered}
  expected = _official_v1(_dataset(answered), preds)
  out = metrics.squad_v1_metrics({q: g for q, g, _, _ in answered}, preds)
  assert out == pytest.approx(expected)
  # Known values on a tiny case: one exact, one half-overlap (P=1, R=1/2 -> F1=2/3).
  tiny = metrics.squad_v1_metrics([["New York City"], ["red car"]], ["new york city", "red"])
  assert tiny["exact_match"] == pytest.approx(50.0)
  assert tiny["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
  # A missing prediction scores 0, as in the official script.
  del preds["q1"]
  assert metrics.squad_v1_metrics({q: g for q, g, _, _ in answered}, preds) == pytest.approx(
      _official_v1(_dataset(answered), preds)
  )


@pytest.mark.parametrize("with_probs,thresh", [(False, 1.0), (True, 1.0), (True, 0.5), (True, 0.0)])
def test_squad_v2_equals_official_script(with_probs, thresh):
  preds = {q: p for q, _, p, _ in SQUAD_CASES}
  probs = {q: na for q, _, _, na in SQUAD_CASES} if with_probs else None
  expected = _official_v2(_dataset(SQUAD_CASES), preds, probs, thresh)
  out = metrics.squad_v2_metrics(
      {q: g for q, g, _, _ in SQUAD_CASES}, preds, na_probs=probs, na_prob_thresh=thresh
  )
  assert set(out) == set(expected)
  for k in expected:
    assert out[k] == pytest.approx(expected[k]), k
  if with_probs:
    assert {"best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"} <= set(out)


def test_squad_v2_known_values_and_errors():
  # Unanswerable + empty prediction is right; answering it is wrong.
  out = metrics.squad_v2_metrics([[], [], ["x y"]], ["", "z", "x"])
  assert out["NoAns_exact"] == pytest.approx(50.0)
  assert out["HasAns_f1"] == pytest.approx(100 * 2 / 3)
  with pytest.raises(ValueError, match="No prediction for 1 questions"):
    metrics.squad_v2_metrics({"a": ["x"], "b": []}, {"a": "x"})


# ------------------------------------------------------------------------ span decoding


def test_decode_span_predictions():
  context = "Alpha beta gamma delta epsilon"
  # Character spans of the five words; two windows of 6 positions: [CLS] w w w w [SEP].
  spans = [(0, 5), (6, 10), (11, 16), (17, 22), (23, 30)]
  L = 6

  def window(word_ids, max_ctx):
    s, e = np.full(L, -1), np.full(L, -1)
    for pos, w in enumerate(word_ids, start=1):
      s[pos], e[pos] = spans[w]
    return s, e, np.array([0] + max_ctx + [0] * (L - 1 - len(max_ctx)))

  w0, w1 = window([0, 1, 2, 3], [1, 1, 1, 0]), window([2, 3, 4], [0, 1, 1])
  windows = {
      "example_id": np.array([b"q", b"q", b""]),
      "offset_start": np.stack([w0[0], w1[0], w1[0]]),
      "offset_end": np.stack([w0[1], w1[1], w1[1]]),
      "token_is_max_context": np.stack([w0[2], w1[2], w1[2]]),
      "valid": np.array([1, 1, 0]),
  }
  start = np.full((3, L), -5.0)
  end = np.full((3, L), -5.0)
  # Window 0: 'beta gamma' scores 3+3; window 1: 'gamma' at a non-max-context start is ignored,
  # 'delta epsilon' scores 4+4 and wins.
  start[0, 2], end[0, 3] = 3.0, 3.0
  start[1, 1], end[1, 1] = 9.0, 9.0
  start[1, 2], end[1, 3] = 4.0, 4.0
  start[:, 0], end[:, 0] = 1.0, 1.0
  dec = metrics.decode_span_predictions(
      windows, start, end, {"q": context}, n_best_size=5, max_answer_length=5
  )
  assert dec.predictions == {"q": "delta epsilon"}
  assert dec.nbest["q"][0] == metrics.SpanCandidate("delta epsilon", 17, 30, 8.0)
  assert all(c.text != "gamma" or c.score != 18.0 for c in dec.nbest["q"])
  assert dec.null_odds["q"] == pytest.approx(2.0 - 8.0)
  # max_answer_length 1 rules out the two-token spans.
  dec = metrics.decode_span_predictions(
      windows, start, end, {"q": context}, n_best_size=5, max_answer_length=1
  )
  assert len(dec.predictions["q"].split()) == 1
  # v2.0: a null score above the best span gives "".
  start[:, 0], end[:, 0] = 6.0, 6.0
  dec = metrics.decode_span_predictions(
      windows,
      start,
      end,
      {"q": context},
      n_best_size=5,
      max_answer_length=5,
      version_2_with_negative=True,
  )
  assert dec.predictions == {"q": ""} and dec.null_odds["q"] == pytest.approx(12.0 - 8.0)
  with pytest.raises(ValueError, match="do not match 3 windows"):
    metrics.decode_span_predictions(windows, start[:2], end[:2], {"q": context})
  assert math.isfinite(dec.null_odds["q"])
