"""Downstream evaluation metrics: GLUE, GLUE diagnostics, SQuAD, multiple choice and TRACIE.

Pure numpy/python functions. Every metric function used by a downstream task has the seqio
signature `metric_fn(targets, predictions, **fields) -> dict[str, float]`; scores are percentages
(as the GLUE and SQuAD leaderboards report them). Classification predictions may be label ids [N]
or per-class scores [N, K] (arg-maxed here).

SQuAD scoring follows the official evaluation scripts (v1.1 and v2.0) line for line in behaviour:
the same answer normalisation, the max over gold answers, v2.0's empty-gold no-answer handling,
HasAns/NoAns breakdown and best null-threshold search.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import math
import re
import string
from typing import Any, Callable, Iterable, Mapping, Sequence

from vidlankd_jax import errors

import numpy as np

MetricFn = Callable[..., dict[str, float]]

# --------------------------------------------------------------------------------------------
# Classification and regression
# --------------------------------------------------------------------------------------------


def _as_labels(predictions: Any) -> np.ndarray:
  """Label ids [N] from ids [N] or per-class scores [N, K]."""
  predictions = np.asarray(predictions)
  if predictions.ndim == 2:
    return predictions.argmax(axis=-1)
  if predictions.ndim != 1:
    raise ValueError(
        f"Predictions must be label ids [N] or scores [N, K]; got shape {predictions.shape}."
    )
  return predictions


def _check_pair(targets: Any, predictions: Any) -> tuple[np.ndarray, np.ndarray]:
  targets = np.asarray(targets)
  predictions = np.asarray(predictions)
  if targets.shape != predictions.shape:
    raise ValueError(
        f"targets {targets.shape} and predictions {predictions.shape} differ in shape."
    )
  if targets.size == 0:
    raise ValueError("Cannot compute a metric over zero examples.")
  return targets, predictions


def accuracy(targets: Sequence, predictions: Sequence) -> float:
  """Fraction of exact label matches."""
  targets, predictions = _check_pair(targets, _as_labels(predictions))
  return float(np.mean(targets == predictions))


def binary_f1(targets: Sequence, predictions: Sequence, positive: int = 1) -> float:
  """F1 of the positive class (GLUE MRPC/QQP); 0 when there are no positives at all."""
  targets, predictions = _check_pair(targets, _as_labels(predictions))
  t, p = targets == positive, predictions == positive
  tp = float(np.sum(t & p))
  denom = 2 * tp + float(np.sum(~t & p)) + float(np.sum(t & ~p))
  return 2 * tp / denom if denom else 0.0


def matthews_corrcoef(targets: Sequence, predictions: Sequence) -> float:
  """Matthews correlation, the K-class form (Gorodkin's R_K; GLUE's R3 for 3 classes).

  Equals the binary MCC for two classes; 0 when either side is constant.
  """
  targets, predictions = _check_pair(targets, _as_labels(predictions))
  classes, encoded = np.unique(np.concatenate([targets, predictions]), return_inverse=True)
  n = len(targets)
  confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
  np.add.at(confusion, (encoded[:n], encoded[n:]), 1.0)
  t_sum, p_sum = confusion.sum(axis=1), confusion.sum(axis=0)
  correct, total = np.trace(confusion), confusion.sum()
  cov_tp = correct * total - t_sum @ p_sum
  cov_pp = total**2 - p_sum @ p_sum
  cov_tt = total**2 - t_sum @ t_sum
  denom = math.sqrt(cov_pp * cov_tt)
  return float(cov_tp / denom) if denom else 0.0


def pearson_corr(targets: Sequence[float], predictions: Sequence[float]) -> float:
  """Pearson correlation; NaN when either side is constant (as SciPy)."""
  x, y = _check_pair(np.asarray(targets, np.float64), np.asarray(predictions, np.float64))
  x, y = x - x.mean(), y - y.mean()
  denom = math.sqrt(float(x @ x) * float(y @ y))
  return float(x @ y) / denom if denom else float("nan")


def rankdata(values: Sequence[float]) -> np.ndarray:
  """1-based ranks, ties getting their average rank (SciPy's 'average' method)."""
  values = np.asarray(values)
  order = np.argsort(values, kind="mergesort")
  sorted_values = values[order]
  # Start of each run of equal values, in sorted order.
  starts = np.flatnonzero(np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]]))
  ends = np.concatenate([starts[1:], [len(values)]])
  run_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
  ranks = np.empty(len(values), dtype=np.float64)
  ranks[order] = np.repeat(run_rank, ends - starts)
  return ranks


def spearman_corr(targets: Sequence[float], predictions: Sequence[float]) -> float:
  """Spearman rank correlation: Pearson over average ranks."""
  targets, predictions = _check_pair(targets, predictions)
  return pearson_corr(rankdata(targets), rankdata(predictions))


def accuracy_metric(targets: Sequence, predictions: Sequence, **_: Any) -> dict[str, float]:
  """{'accuracy'} in percent (SST-2, MNLI, QNLI, RTE, WNLI, PIQA, SWAG)."""
  return {"accuracy": 100.0 * accuracy(targets, predictions)}


def matthews_metric(targets: Sequence, predictions: Sequence, **_: Any) -> dict[str, float]:
  """{'matthews_corr'} in percent (CoLA; the AX diagnostic with gold labels)."""
  return {"matthews_corr": 100.0 * matthews_corrcoef(targets, predictions)}


def f1_accuracy_metric(targets: Sequence, predictions: Sequence, **_: Any) -> dict[str, float]:
  """{'f1', 'accuracy', 'f1_accuracy_mean'} in percent (MRPC, QQP)."""
  f1 = 100.0 * binary_f1(targets, predictions)
  acc = 100.0 * accuracy(targets, predictions)
  return {"f1": f1, "accuracy": acc, "f1_accuracy_mean": (f1 + acc) / 2}


def correlation_metric(targets: Sequence, predictions: Sequence, **_: Any) -> dict[str, float]:
  """{'pearson', 'spearman', 'pearson_spearman_mean'} in percent (STS-B)."""
  predictions = np.asarray(predictions, np.float64)
  if predictions.ndim == 2 and predictions.shape[1] == 1:
    predictions = predictions[:, 0]
  pearson = 100.0 * pearson_corr(targets, predictions)
  spearman = 100.0 * spearman_corr(targets, predictions)
  return {
      "pearson": pearson,
      "spearman": spearman,
      "pearson_spearman_mean": (pearson + spearman) / 2,
  }


# The official metric of each GLUE task (the leaderboard's columns).
GLUE_METRICS: dict[str, MetricFn] = {
    "cola": matthews_metric,
    "sst2": accuracy_metric,
    "mrpc": f1_accuracy_metric,
    "stsb": correlation_metric,
    "qqp": f1_accuracy_metric,
    "mnli": accuracy_metric,
    "qnli": accuracy_metric,
    "rte": accuracy_metric,
    "wnli": accuracy_metric,
    "ax": matthews_metric,
}


def glue_metrics(task: str, targets: Sequence, predictions: Sequence) -> dict[str, float]:
  """The official metrics of GLUE `task` ('cola', 'sst2', ..., 'ax')."""
  if task not in GLUE_METRICS:
    raise errors.UnknownNameError(f"Unknown GLUE task {task!r}; known: {sorted(GLUE_METRICS)}.")
  return GLUE_METRICS[task](targets, predictions)


def multiple_choice_accuracy(
    targets: Sequence, predictions: Sequence, **_: Any
) -> dict[str, float]:
  """{'accuracy'} of chosen indices [N] or per-choice scores [N, C] (SWAG, PIQA)."""
  return accuracy_metric(targets, predictions)


# --------------------------------------------------------------------------------------------
# TRACIE
# --------------------------------------------------------------------------------------------

TRACIE_START, TRACIE_END = 0, 1


def tracie_hypothesis_type(line: str) -> int:
  """TRACIE_START when 'starts before' or 'starts after' occurs in a TRACIE file's line, else
  TRACIE_END: the official evaluator's rule, which reads the whole line (story included), not
  the hypothesis alone."""
  return TRACIE_START if ("starts before" in line or "starts after" in line) else TRACIE_END


def tracie_metrics(
    targets: Sequence,
    predictions: Sequence,
    *,
    hypothesis_type: Sequence[int] | None = None,
    story_id: Sequence[int] | None = None,
    **_: Any,
) -> dict[str, float]:
  """TRACIE accuracy overall, on start and on end hypotheses, and story exact match.

  `hypothesis_type` (TRACIE_START/TRACIE_END per example) adds 'start_accuracy'/'end_accuracy';
  `story_id` adds 'story_em', the share of stories whose every hypothesis is right (both as
  the official leaderboard evaluator computes them).
  """
  targets, predictions = _check_pair(targets, _as_labels(predictions))
  correct = targets == predictions
  out = {"accuracy": 100.0 * float(correct.mean())}
  if hypothesis_type is not None:
    kinds = np.asarray(hypothesis_type)
    if kinds.shape != correct.shape:
      raise ValueError(f"hypothesis_type has shape {kinds.shape}; expected {correct.shape}.")
    for name, kind in (("start", TRACIE_START), ("end", TRACIE_END)):
      subset = correct[kinds == kind]
      out[f"{name}_accuracy"] = 100.0 * float(subset.mean()) if subset.size else float("nan")
  if story_id is not None:
    stories = np.asarray(story_id)
    if stories.shape != correct.shape:
      raise ValueError(f"story_id has shape {stories.shape}; expected {correct.shape}.")
    per_story = [bool(correct[stories == s].all()) for s in np.unique(stories)]
    out["story_em"] = 100.0 * float(np.mean(per_story))
  return out


# --------------------------------------------------------------------------------------------
# GLUE diagnostics (AX)
# --------------------------------------------------------------------------------------------

# Label names of an MNLI model, in the order of TFDS glue/mnli and glue/ax.
MNLI_LABELS = ("entailment", "neutral", "contradiction")
DIAGNOSTIC_CATEGORIES = ("Lexical Semantics", "Predicate-Argument Structure", "Logic", "Knowledge")
_DIAGNOSTIC_COLUMNS = DIAGNOSTIC_CATEGORIES + ("Domain", "Premise", "Hypothesis", "Label")


def _label_names(predictions: Iterable, label_names: Sequence[str], where: str) -> list[str]:
  """Predictions as label names; ids are looked up in `label_names`."""
  names = []
  for i, p in enumerate(predictions):
    if isinstance(p, (str, bytes)):
      p = p.decode() if isinstance(p, bytes) else p
      if p not in label_names:
        raise errors.DataError(f"{where}: prediction {i} is {p!r}, not one of {list(label_names)}.")
      names.append(p)
    else:
      k = int(p)
      if not 0 <= k < len(label_names):
        raise errors.DataError(
            f"{where}: prediction {i} is label id {k}, outside 0..{len(label_names) - 1}."
        )
      names.append(label_names[k])
  return names


def write_glue_ax_predictions(
    path: str,
    indices: Sequence[int],
    predictions: Sequence,
    label_names: Sequence[str] = MNLI_LABELS,
) -> None:
  """Writes AX.tsv for the GLUE server: header 'index\\tprediction', rows sorted by index.

  `predictions` are an MNLI model's label ids (or names) for the glue/ax test examples with
  the given `idx` values.
  """
  indices = [int(i) for i in indices]
  if len(indices) != len(predictions):
    raise errors.DataError(f"{len(indices)} indices but {len(predictions)} predictions for {path}.")
  if len(set(indices)) != len(indices):
    raise errors.DataError(f"Duplicate indices in the AX predictions for {path}.")
  names = _label_names(predictions, label_names, path)
  with open(path, "w", encoding="utf-8", newline="") as f:
    f.write("index\tprediction\n")
    for index, name in sorted(zip(indices, names)):
      f.write(f"{index}\t{name}\n")


def read_glue_diagnostics(path: str) -> list[dict[str, str]]:
  """Rows of the labelled GLUE diagnostic file (diagnostic-full.tsv), in file order."""
  try:
    f = open(path, encoding="utf-8", newline="")
  except OSError as e:
    raise errors.MissingFileError(
        f"Cannot read the GLUE diagnostic file {path!r} ({e}). It is diagnostic-full.tsv "
        "from the GLUE benchmark site (gluebenchmark.com/diagnostics)."
    ) from e
  with f:
    reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    missing = [c for c in _DIAGNOSTIC_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
      raise errors.DataError(
          f"{path}: header lacks the columns {missing}; found {reader.fieldnames}."
      )
    rows = []
    for line, row in enumerate(reader, start=2):
      if row["Label"] not in MNLI_LABELS:
        raise errors.DataError(
            f"{path}:{line}: Label {row['Label']!r} is not one of {list(MNLI_LABELS)}."
        )
      rows.append({k: (row[k] or "").strip() for k in _DIAGNOSTIC_COLUMNS})
  return rows


def glue_diagnostic_breakdown(
    diagnostics: str | Sequence[Mapping[str, str]],
    predictions: Sequence | Mapping[int, Any],
    label_names: Sequence[str] = MNLI_LABELS,
) -> dict[str, dict[str, float]]:
  """R3 and accuracy per diagnostic category, from an MNLI model's AX predictions.

  `diagnostics` is diagnostic-full.tsv (path or rows); row i is AX example idx i.
  `predictions` are label ids or names, a sequence in idx order or a mapping idx -> label.
  Keys: 'all', each coarse category (e.g. 'Knowledge') and each fine category as
  'Category/Fine' (e.g. 'Knowledge/World knowledge'); values: {'r3', 'accuracy', 'count'}
  with r3 and accuracy in percent.
  """
  rows = read_glue_diagnostics(diagnostics) if isinstance(diagnostics, str) else list(diagnostics)
  if isinstance(predictions, Mapping):
    missing = [i for i in range(len(rows)) if i not in predictions]
    if missing:
      raise errors.DataError(
          f"No prediction for diagnostic rows {missing[:10]} ({len(missing)} missing)."
      )
    predictions = [predictions[i] for i in range(len(rows))]
  if len(predictions) != len(rows):
    raise errors.DataError(f"{len(predictions)} predictions for {len(rows)} diagnostic rows.")
  predicted = np.asarray(_label_names(predictions, label_names, "AX predictions"))
  gold = np.asarray([r["Label"] for r in rows])

  groups: dict[str, list[int]] = collections.defaultdict(list)
  groups["all"] = list(range(len(rows)))
  for i, row in enumerate(rows):
    for category in DIAGNOSTIC_CATEGORIES:
      fine = [v.strip() for v in row[category].split(";") if v.strip()]
      if fine:
        groups[category].append(i)
      for v in fine:
        groups[f"{category}/{v}"].append(i)
  return {
      name: {
          "r3": 100.0 * matthews_corrcoef(gold[idx], predicted[idx]),
          "accuracy": 100.0 * float(np.mean(gold[idx] == predicted[idx])),
          "count": float(len(idx)),
      }
      for name, idx in groups.items()
  }


# --------------------------------------------------------------------------------------------
# SQuAD v1.1 / v2.0 scoring (the official scripts' logic)
# --------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
  """Lowercase, drop punctuation, drop articles a/an/the, collapse white space."""
  s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", s).split())


def squad_exact(gold: str, prediction: str) -> int:
  """1 if the normalised strings are equal."""
  return int(normalize_answer(gold) == normalize_answer(prediction))


def squad_f1(gold: str, prediction: str, *, empty_matches_empty: bool = True) -> float:
  """Bag-of-tokens F1 of normalised answers.

  With `empty_matches_empty` (v2.0), an empty side scores 1 if both are empty, else 0;
  without it (v1.1), no overlap scores 0 even when both are empty.
  """
  gold_toks, pred_toks = normalize_answer(gold).split(), normalize_answer(prediction).split()
  if empty_matches_empty and (not gold_toks or not pred_toks):
    return float(gold_toks == pred_toks)
  num_same = sum((collections.Counter(gold_toks) & collections.Counter(pred_toks)).values())
  if num_same == 0:
    return 0.0
  precision, recall = num_same / len(pred_toks), num_same / len(gold_toks)
  return 2 * precision * recall / (precision + recall)


def _keyed(values: Mapping | Sequence, name: str) -> Mapping:
  """A mapping from question id; a sequence is keyed by position."""
  if isinstance(values, Mapping):
    return values
  if isinstance(values, (str, bytes)):
    raise TypeError(f"{name} must be a mapping or a sequence, not a string.")
  return dict(enumerate(values))


def _text(x: Any) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def squad_v1_metrics(
    targets: Mapping[Any, Sequence[str]] | Sequence[Sequence[str]],
    predictions: Mapping[Any, str] | Sequence[str],
    **_: Any,
) -> dict[str, float]:
  """SQuAD v1.1 {'exact_match', 'f1'} in percent: max over gold answers, mean over questions.

  A question without a prediction scores 0, as in the official script.
  """
  targets, predictions = _keyed(targets, "targets"), _keyed(predictions, "predictions")
  if not targets:
    raise ValueError("Cannot score SQuAD over zero questions.")
  em = f1 = 0.0
  for qid, golds in targets.items():
    if qid not in predictions:
      continue
    pred = _text(predictions[qid])
    golds = [_text(g) for g in golds]
    em += max(squad_exact(g, pred) for g in golds)
    f1 += max(squad_f1(g, pred, empty_matches_empty=False) for g in golds)
  return {"exact_match": 100.0 * em / len(targets), "f1": 100.0 * f1 / len(targets)}


def _best_threshold(
    predictions: Mapping, scores: Mapping, na_probs: Mapping, has_answer: Mapping
) -> tuple[float, float]:
  """Best score over null thresholds taken from `na_probs`, and that threshold (official)."""
  best = current = float(sum(1 for q in has_answer if not has_answer[q]))
  best_thresh = 0.0
  for qid in sorted(na_probs, key=lambda q: na_probs[q]):
    if qid not in scores:
      continue
    if has_answer[qid]:
      current += scores[qid]
    elif predictions[qid]:
      current -= 1
    if current > best:
      best, best_thresh = current, na_probs[qid]
  return 100.0 * best / len(scores), float(best_thresh)


def squad_v2_metrics(
    targets: Mapping[Any, Sequence[str]] | Sequence[Sequence[str]],
    predictions: Mapping[Any, str] | Sequence[str],
    *,
    na_probs: Mapping[Any, float] | Sequence[float] | None = None,
    na_prob_thresh: float = 1.0,
    **_: Any,
) -> dict[str, float]:
  """SQuAD v2.0 metrics as the official script: exact/f1/total, HasAns_*, NoAns_*, best_*.

  A question with no gold answers (or only ones that normalise to empty) is unanswerable;
  an empty prediction answers "no answer". A question is predicted unanswerable when its
  `na_probs` exceeds `na_prob_thresh`. With `na_probs`, also the best threshold search on
  these predictions: 'best_exact', 'best_exact_thresh', 'best_f1', 'best_f1_thresh'.
  """
  targets, predictions = _keyed(targets, "targets"), _keyed(predictions, "predictions")
  missing = [q for q in targets if q not in predictions]
  if missing:
    raise errors.DataError(f"No prediction for {len(missing)} questions, e.g. {missing[:5]}.")
  if not targets:
    raise ValueError("Cannot score SQuAD over zero questions.")
  probs = {q: 0.0 for q in predictions} if na_probs is None else _keyed(na_probs, "na_probs")
  missing = [q for q in targets if q not in probs]
  if missing:
    raise errors.DataError(f"No na_prob for {len(missing)} questions, e.g. {missing[:5]}.")
  has_answer = {q: bool(len(golds)) for q, golds in targets.items()}

  exact_raw, f1_raw = {}, {}
  for qid, golds in targets.items():
    golds = [g for g in (_text(g) for g in golds) if normalize_answer(g)] or [""]
    pred = _text(predictions[qid])
    exact_raw[qid] = max(squad_exact(g, pred) for g in golds)
    f1_raw[qid] = max(squad_f1(g, pred) for g in golds)

  def thresholded(scores):
    return {
        q: float(not has_answer[q]) if probs[q] > na_prob_thresh else s for q, s in scores.items()
    }

  exact, f1 = thresholded(exact_raw), thresholded(f1_raw)

  def summary(qids):
    return {
        "exact": 100.0 * sum(exact[q] for q in qids) / len(qids),
        "f1": 100.0 * sum(f1[q] for q in qids) / len(qids),
        "total": float(len(qids)),
    }

  out = summary(list(targets))
  for prefix, qids in (
      ("HasAns", [q for q in targets if has_answer[q]]),
      ("NoAns", [q for q in targets if not has_answer[q]]),
  ):
    if qids:
      out.update({f"{prefix}_{k}": v for k, v in summary(qids).items()})
  if na_probs is not None:
    preds = {q: _text(p) for q, p in predictions.items()}
    out["best_exact"], out["best_exact_thresh"] = _best_threshold(
        preds, exact_raw, probs, has_answer
    )
    out["best_f1"], out["best_f1_thresh"] = _best_threshold(preds, f1_raw, probs, has_answer)
  return out


# --------------------------------------------------------------------------------------------
# Span decoding: window logits -> answer text
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpanCandidate:
  """One answer candidate: its text, character span in the context and logit sum."""

  text: str
  start_char: int
  end_char: int
  score: float


@dataclasses.dataclass
class SpanDecoding:
  """Decoded answers per question id.

  predictions: best answer text ("" for no answer in v2.0).
  null_odds: null score minus the best span score (v2.0 `na_probs` for the threshold search).
  nbest: the n best non-null candidates, best first.
  """

  predictions: dict[str, str]
  null_odds: dict[str, float]
  nbest: dict[str, list[SpanCandidate]]


def window_span_candidates(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    offset_start: np.ndarray,
    offset_end: np.ndarray,
    token_is_max_context: np.ndarray,
    *,
    n_best_size: int,
    max_answer_length: int,
) -> list[tuple[float, int, int]]:
  """(score, start_char, end_char) of valid spans in one window, from its top start/end logits.

  Valid: both tokens in the context (offset >= 0), end not before start, at most
  `max_answer_length` tokens, and the start token seen with its maximal context in this window.
  """
  starts = np.argsort(-start_logits, kind="stable")[:n_best_size]
  ends = np.argsort(-end_logits, kind="stable")[:n_best_size]
  out = []
  for s in starts:
    if offset_start[s] < 0 or not token_is_max_context[s]:
      continue
    for e in ends:
      if offset_end[e] < 0 or e < s or e - s + 1 > max_answer_length:
        continue
      out.append((float(start_logits[s] + end_logits[e]), int(offset_start[s]), int(offset_end[e])))
  return out


def decode_span_predictions(
    windows: Mapping[str, np.ndarray],
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    contexts: Mapping[str, str],
    *,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> SpanDecoding:
  """Maps per-window start/end logits [N, L] back to answer text in each question's context.

  `windows` holds the span task's bookkeeping for the same N windows: 'example_id' [N],
  'offset_start'/'offset_end' [N, L] (character offsets into the context, -1 outside it),
  'token_is_max_context' [N, L] and, optionally, 'valid' [N] (0 for batch padding).
  The n-best spans are pooled over all windows of a question. For v2.0 the null score is the
  smallest [CLS] start+end logit over its windows; the answer is "" when null score minus
  best span score exceeds `null_score_diff_threshold`.
  """
  ids = [_text(x) for x in np.asarray(windows["example_id"]).reshape(-1)]
  n = len(ids)
  start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
  if start_logits.shape != end_logits.shape or start_logits.shape[0] != n:
    raise ValueError(
        f"Logits {start_logits.shape}/{end_logits.shape} do not match {n} windows of "
        "bookkeeping."
    )
  valid = np.asarray(windows.get("valid", np.ones(n)), dtype=bool)
  spans: dict[str, list[tuple[float, int, int]]] = collections.defaultdict(list)
  null_score: dict[str, float] = {}
  for i in range(n):
    if not valid[i]:
      continue
    qid = ids[i]
    if qid not in contexts:
      raise KeyError(f"Window {i} belongs to question {qid!r}, which has no context.")
    spans[qid].extend(
        window_span_candidates(
            start_logits[i],
            end_logits[i],
            windows["offset_start"][i],
            windows["offset_end"][i],
            windows["token_is_max_context"][i],
            n_best_size=n_best_size,
            max_answer_length=max_answer_length,
        )
    )
    cls_score = float(start_logits[i, 0] + end_logits[i, 0])
    null_score[qid] = min(null_score.get(qid, cls_score), cls_score)

  predictions, null_odds, nbest = {}, {}, {}
  for qid in null_score:
    context = contexts[qid]
    ranked = sorted(spans[qid], key=lambda c: -c[0])
    seen, best = set(), []
    for score, s, e in ranked:
      if (s, e) in seen:
        continue
      seen.add((s, e))
      best.append(SpanCandidate(context[s:e], s, e, score))
      if len(best) == n_best_size:
        break
    nbest[qid] = best
    # As the reference BERT decoder: no valid span leaves an empty answer scored 0.
    best_score = best[0].score if best else 0.0
    null_odds[qid] = null_score[qid] - best_score
    text = best[0].text if best else ""
    if version_2_with_negative and null_odds[qid] > null_score_diff_threshold:
      text = ""
    predictions[qid] = text
  return SpanDecoding(predictions, null_odds, nbest)
