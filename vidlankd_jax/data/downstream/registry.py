"""The downstream benchmark registry: one `DownstreamSpec` per benchmark, each a seqio task.

A benchmark is fully described by its spec (kind, labels, metric, data source, formatter,
splits, default length); `register_benchmark(spec, vocab)` registers the seqio task whose
preprocessors are [formatter, the kind's encoder]. `get_downstream_dataset` gives the
fine-tuning loop fixed-shape batches of any registered benchmark.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from vidlankd_jax import errors
from vidlankd_jax.data import batching
from vidlankd_jax.data.downstream import encoding
from vidlankd_jax.evaluation import metrics

SHUFFLE_BUFFER = 10_000


@dataclasses.dataclass(frozen=True)
class DownstreamSpec:
  """What the fine-tuning loop and the evaluator need to know about one benchmark.

  name: seqio task name.  kind: classification | regression | multiple_choice | span.
  num_labels: classes (classification), 1 (regression), choices (multiple_choice),
    2 for span (a start and an end logit per token).
  metric_fn: `metric_fn(targets, predictions, **fields) -> dict` (percentages), where
    `fields` are the per-example features named in `metric_fields`. For span tasks the
    targets are gold answers and predictions answer texts, keyed by question id (see
    `evaluate_span_predictions`).
  source: the seqio DataSource of raw records.  formatter: raw record -> the kind's canonical
    fields (see `encoding`), plus any passthrough fields.  description: where the data comes
    from.  seq_len: default max tokens per row.  train_split / eval_splits / test_splits:
    split names of `source` (test splits may be unlabelled).  label_names: class names.
  doc_stride, max_query_length, version_2_with_negative: span windows and null answers.
  """

  name: str
  kind: str
  num_labels: int
  metric_fn: Callable[..., dict[str, float]]
  source: seqio.DataSource
  formatter: Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]
  description: str
  seq_len: int
  train_split: str | None = "train"
  eval_splits: tuple[str, ...] = ("validation",)
  test_splits: tuple[str, ...] = ()
  label_names: tuple[str, ...] = ()
  metric_fields: tuple[str, ...] = ()
  doc_stride: int = 128
  max_query_length: int = 64
  version_2_with_negative: bool = False

  def __post_init__(self):
    if self.kind not in encoding.KINDS:
      raise errors.DataError(
          f"{self.name}: unknown kind {self.kind!r}; expected one of {encoding.KINDS}."
      )
    if self.label_names and len(self.label_names) != self.num_labels:
      raise errors.DataError(
          f"{self.name}: {len(self.label_names)} label names for {self.num_labels} labels."
      )

  @property
  def splits(self) -> tuple[str, ...]:
    return ((self.train_split,) if self.train_split else ()) + self.eval_splits + self.test_splits

  def sequence_length(self, seq_len: int | None = None) -> dict[str, Any]:
    """seqio sequence_length for rows of `seq_len` tokens (the spec's default if None)."""
    length = int(seq_len or self.seq_len)
    if self.kind == "multiple_choice":
      return {"input_ids": (self.num_labels, length)}
    return {"input_ids": length}


_SPECS: dict[str, DownstreamSpec] = {}


def _encoder(spec: DownstreamSpec):
  if spec.kind == "span":
    return functools.partial(
        encoding.span_preprocessor,
        doc_stride=spec.doc_stride,
        max_query_length=spec.max_query_length,
    )
  if spec.kind == "multiple_choice":
    return functools.partial(encoding.multiple_choice_preprocessor, num_choices=spec.num_labels)
  return functools.partial(
      encoding.classification_preprocessor, regression=spec.kind == "regression"
  )


def register_benchmark(spec: DownstreamSpec, vocab: seqio.Vocabulary) -> seqio.Task:
  """Registers (or re-registers) `spec` as a seqio task tokenized with `vocab`."""
  task = seqio.Task(
      spec.name,
      source=spec.source,
      output_features=encoding.output_features(spec.kind, vocab, spec.num_labels),
      preprocessors=[seqio.map_over_dataset(spec.formatter), _encoder(spec)],
      metric_fns=[spec.metric_fn],
      shuffle_buffer_size=SHUFFLE_BUFFER,
  )
  if spec.name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(spec.name)
  seqio.TaskRegistry.add_provider(spec.name, task)
  _SPECS[spec.name] = spec
  return task


def get_downstream_spec(task_name: str) -> DownstreamSpec:
  if task_name not in _SPECS:
    raise errors.UnknownNameError(
        f"No downstream benchmark {task_name!r} is registered (known: {sorted(_SPECS)}); "
        "call register_downstream_tasks(...) first."
    )
  return _SPECS[task_name]


def downstream_specs() -> dict[str, DownstreamSpec]:
  """All registered benchmarks by name."""
  return dict(_SPECS)


def get_downstream_dataset(
    task_name: str,
    split: str,
    *,
    batch_size: int,
    seq_len: int | None = None,
    shuffle: bool = False,
    seed: int | None = None,
    repeat: bool = False,
    shard_info: seqio.ShardInfo | None = None,
    shuffle_buffer_size: int | None = None,
) -> tf.data.Dataset:
  """Fixed-shape batches of a registered benchmark for the fine-tuning loop.

  Every batch has exactly `batch_size` rows and an int32 `valid` [B] feature: with
  `repeat` the stream is endless (training); without it, one pass whose last batch is padded
  with zero rows marked valid = 0 (evaluation). Rows are `seq_len` tokens (the spec's default
  if None). `shard_info` selects this host's share of the data; shuffling uses a buffer of
  `shuffle_buffer_size` rows (default SHUFFLE_BUFFER).
  """
  spec = get_downstream_spec(task_name)
  if split not in spec.splits:
    raise errors.DataError(f"{task_name} has no split {split!r}; its splits are {spec.splits}.")
  if batch_size <= 0:
    raise errors.DataError(f"batch_size must be positive, got {batch_size}.")
  ds = seqio.get_mixture_or_task(task_name).get_dataset(
      sequence_length=spec.sequence_length(seq_len),
      split=split,
      shuffle=shuffle,
      shuffle_buffer_size=shuffle_buffer_size,
      seed=seed,
      shard_info=shard_info,
      num_epochs=None if repeat else 1,
      use_cached=False,
      try_in_mem_cache=False,
  )
  return batching.batch_examples(ds, batch_size, repeat=repeat).prefetch(tf.data.AUTOTUNE)


def training_stats(spec: DownstreamSpec, seq_len: int) -> tuple[int, np.ndarray | None]:
  """(training examples, label counts or None) of the train split.

  Span tasks count their context windows (what a training step consumes); the others count raw
  records, reading labels through the task's formatter without tokenizing.
  """
  if spec.kind == "span":
    ds = get_downstream_dataset(spec.name, spec.train_split, batch_size=256, seq_len=seq_len)
    return (
        int(ds.reduce(np.int64(0), lambda n, b: n + tf.reduce_sum(tf.cast(b["valid"], tf.int64)))),
        None,
    )
  ds = spec.source.get_dataset(split=spec.train_split, shuffle=False).map(spec.formatter)
  if spec.kind == "regression":
    return _some_examples(spec, int(ds.reduce(np.int64(0), lambda n, _: n + 1))), None
  n = spec.num_labels

  def count(counts, ex):  # labels outside [0, n) in an extra bucket, not silently dropped
    label = tf.cast(ex["label"], tf.int32)
    inside = (label >= 0) & (label < n)
    return counts + tf.one_hot(tf.where(inside, label, n), n + 1, dtype=tf.int64)

  counts = np.asarray(ds.reduce(tf.zeros([n + 1], tf.int64), count))
  if counts[n]:
    rows = ds.enumerate().filter(
        lambda i, ex: (tf.cast(ex["label"], tf.int32) < 0) | (tf.cast(ex["label"], tf.int32) >= n)
    )
    bad = [(int(i), ex["label"].item()) for i, ex in rows.take(3).as_numpy_iterator()]
    raise _label_error(spec, spec.train_split, int(counts[n]), bad)
  return _some_examples(spec, int(counts[:n].sum())), counts[:n]


def _some_examples(spec: DownstreamSpec, count: int) -> int:
  """`count`, or a DataError when the training split holds no example (0 steps would be run and
  an untrained model scored)."""
  if count == 0:
    raise errors.DataError(
        f"the {spec.train_split} split holds no example",
        spec.name,
        f"check its file ({spec.description}); at least one training example is needed",
    )
  return count


def _label_error(spec, split: str, count: int, bad: list) -> errors.DataError:
  rows = ", ".join(f"row {i}: {label}" for i, label in bad)
  return errors.DataError(
      f"{count} label(s) of the {split} split are outside 0..{spec.num_labels - 1} ({rows})",
      spec.name,
      f"use label ids below num_labels={spec.num_labels} (or raise num_labels in the benchmark's "
      "DownstreamSpec)",
  )


# The kinds whose examples carry a class label in [0, num_labels).
LABELLED_KINDS = ("classification", "multiple_choice")


def check_labels(spec: DownstreamSpec, split: str, labels: np.ndarray) -> None:
  """A DataError when a classification or multiple-choice split holds a label outside
  [0, num_labels): it would be scored as wrong, not reported."""
  if spec.kind not in LABELLED_KINDS:
    return
  labels = np.asarray(labels).astype(np.int64)
  bad = np.flatnonzero((labels < 0) | (labels >= spec.num_labels))
  if len(bad):
    raise _label_error(spec, split, len(bad), [(int(i), int(labels[i])) for i in bad[:3]])


@dataclasses.dataclass(frozen=True)
class SpanExample:
  """A span question's context and gold answers (empty: unanswerable)."""

  context: str
  answers: tuple[str, ...]


def get_span_examples(task_name: str, split: str) -> dict[str, SpanExample]:
  """Question id -> context and gold answers of a span benchmark's split (no tokenization)."""
  spec = get_downstream_spec(task_name)
  if spec.kind != "span":
    raise errors.DataError(f"{task_name} is a {spec.kind} task, not a span task.")
  ds = spec.source.get_dataset(split=split, shuffle=False).map(spec.formatter)
  out = {}
  for ex in ds.as_numpy_iterator():
    qid = ex["example_id"].decode("utf-8")
    if qid in out:
      raise errors.DataError(f"{task_name}/{split}: question id {qid!r} occurs twice.")
    out[qid] = SpanExample(
        ex["context"].decode("utf-8"), tuple(a.decode("utf-8") for a in ex["answer_text"])
    )
  return out


def evaluate_span_predictions(
    task_name: str,
    split: str,
    windows: Mapping[str, np.ndarray],
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    *,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
    examples: Mapping[str, SpanExample] | None = None,
) -> tuple[dict[str, float], metrics.SpanDecoding]:
  """Decodes window logits [N, L] to answers and scores them with the task's metric.

  `windows` are the span bookkeeping features of the same N rows (concatenated eval batches:
  example_id, offset_start, offset_end, token_is_max_context, valid). Every question of the
  split must have at least one window.
  """
  spec = get_downstream_spec(task_name)
  examples = get_span_examples(task_name, split) if examples is None else examples
  decoding = metrics.decode_span_predictions(
      windows,
      start_logits,
      end_logits,
      {q: e.context for q, e in examples.items()},
      n_best_size=n_best_size,
      max_answer_length=max_answer_length,
      version_2_with_negative=spec.version_2_with_negative,
      null_score_diff_threshold=null_score_diff_threshold,
  )
  unseen = [q for q in examples if q not in decoding.predictions]
  if unseen:
    raise errors.DataError(
        f"{task_name}/{split}: no windows for {len(unseen)} questions, e.g. {unseen[:5]}."
    )
  targets = {q: list(e.answers) for q, e in examples.items()}
  extra = {"na_probs": decoding.null_odds} if spec.version_2_with_negative else {}
  return spec.metric_fn(targets, decoding.predictions, **extra), decoding


def eval_fields(
    spec: DownstreamSpec, batches: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
  """The `metric_fields` of concatenated numpy eval batches, padding rows (valid = 0) dropped."""
  valid = np.concatenate([np.asarray(b["valid"]) for b in batches]).astype(bool)
  return {f: np.concatenate([np.asarray(b[f]) for b in batches])[valid] for f in spec.metric_fields}
