"""Fine-tuning heads on top of `BertModel`, and the pure loss of each task kind.

  classification / regression  pooled [CLS] -> dropout -> Linear(H, K)   (K = 1 for regression)
  span                         every token -> Linear(H, 2): start and end logits
  multiple_choice              each [CLS] context [SEP] choice [SEP] row of [B, C, L] is encoded
                               by the shared BERT on its own, pooled, scored by Linear(H, 1);
                               softmax over the C choices

Every head returns a dict of float32 outputs; the losses take those arrays, the labels and a
per-row weight (0 for the padding rows of an evaluation batch) and know nothing of modules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vidlankd_jax import losses
from vidlankd_jax.models.bert import BertConfig, BertModel, dense

Array = jax.Array

KINDS = ("classification", "regression", "multiple_choice", "span")

# Logit of a padding token in the span head: finite, so an all-padding row stays finite.
_PAD_LOGIT = -1e9


class SequenceClassifier(nnx.Module):
  """BERT + dropout + Linear on the pooled output: class logits [B, K] (K = 1: a regression score)."""

  def __init__(self, cfg: BertConfig, num_labels: int, *, rngs: nnx.Rngs):
    self.bert = BertModel(cfg, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout)
    self.classifier = dense(cfg, cfg.hidden_size, num_labels, ("embed", None), rngs=rngs)

  def __call__(
      self,
      input_ids: Array,
      attention_mask: Array,
      token_type_ids: Array | None = None,
      *,
      rngs: nnx.Rngs | None = None,
  ) -> dict[str, Array]:
    _, pooled = self.bert(input_ids, attention_mask, token_type_ids, rngs=rngs)
    with jax.named_scope("classifier"):
      pooled = self.dropout(pooled, deterministic=rngs is None, rngs=rngs)
      return {"logits": self.classifier(pooled).astype(jnp.float32)}


class SpanExtractor(nnx.Module):
  """BERT + Linear(H, 2) on every token: start and end logits [B, L] (padding at -1e9)."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.bert = BertModel(cfg, rngs=rngs)
    self.qa_outputs = dense(cfg, cfg.hidden_size, 2, ("embed", None), rngs=rngs)

  def __call__(
      self,
      input_ids: Array,
      attention_mask: Array,
      token_type_ids: Array | None = None,
      *,
      rngs: nnx.Rngs | None = None,
  ) -> dict[str, Array]:
    hidden = self.bert.encode(input_ids, attention_mask, token_type_ids, rngs=rngs)
    with jax.named_scope("span_head"):
      logits = self.qa_outputs(hidden).astype(jnp.float32)
      logits = jnp.where(attention_mask[..., None] > 0, logits, _PAD_LOGIT)
      return {"start_logits": logits[..., 0], "end_logits": logits[..., 1]}


class MultipleChoice(nnx.Module):
  """BERT over each choice row [B, C, L] separately, pooled, one score per choice: logits [B, C]."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.bert = BertModel(cfg, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout)
    self.classifier = dense(cfg, cfg.hidden_size, 1, ("embed", None), rngs=rngs)

  def __call__(
      self,
      input_ids: Array,
      attention_mask: Array,
      token_type_ids: Array | None = None,
      *,
      rngs: nnx.Rngs | None = None,
  ) -> dict[str, Array]:
    b, c, l = input_ids.shape
    rows = lambda x: None if x is None else x.reshape(b * c, l)
    _, pooled = self.bert(rows(input_ids), rows(attention_mask), rows(token_type_ids), rngs=rngs)
    with jax.named_scope("choice_head"):
      pooled = self.dropout(pooled, deterministic=rngs is None, rngs=rngs)
      return {"logits": self.classifier(pooled).astype(jnp.float32).reshape(b, c)}


def build_head(kind: str, cfg: BertConfig, num_labels: int, *, rngs: nnx.Rngs) -> nnx.Module:
  """The model of a task kind; `num_labels` is the class count (ignored for span and choices)."""
  if kind == "classification":
    return SequenceClassifier(cfg, num_labels, rngs=rngs)
  if kind == "regression":
    return SequenceClassifier(cfg, 1, rngs=rngs)
  if kind == "span":
    return SpanExtractor(cfg, rngs=rngs)
  if kind == "multiple_choice":
    return MultipleChoice(cfg, rngs=rngs)
  raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")


def classification_loss(logits: Array, labels: Array, weights: Array) -> tuple[Array, dict]:
  """Weighted mean cross-entropy of class logits [B, K] and its accuracy."""
  return (
      losses.weighted_cross_entropy(logits, labels, weights),
      {"accuracy": losses.weighted_accuracy(logits, labels, weights)},
  )


def regression_loss(logits: Array, targets: Array, weights: Array) -> tuple[Array, dict]:
  """Weighted mean squared error of scores [B, 1] (or [B]) against float targets [B]."""
  scores = logits.reshape(targets.shape).astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  mse = jnp.sum(weights * (scores - targets.astype(jnp.float32)) ** 2) / jnp.maximum(
      jnp.sum(weights), 1.0
  )
  return mse, {"mse": mse}


def span_loss(
    start_logits: Array,
    end_logits: Array,
    start_positions: Array,
    end_positions: Array,
    weights: Array,
) -> tuple[Array, dict]:
  """Mean of the start and end cross-entropies over token positions (position 0 = no answer)."""
  start = losses.weighted_cross_entropy(start_logits, start_positions, weights)
  end = losses.weighted_cross_entropy(end_logits, end_positions, weights)
  both = (
      (jnp.argmax(start_logits, -1) == start_positions)
      & (jnp.argmax(end_logits, -1) == end_positions)
  ).astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  exact = jnp.sum(both * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  return (start + end) / 2.0, {"start_loss": start, "end_loss": end, "span_accuracy": exact}


def multiple_choice_loss(logits: Array, labels: Array, weights: Array) -> tuple[Array, dict]:
  """Cross-entropy of the softmax over choices [B, C] against the right choice's index."""
  return classification_loss(logits, labels, weights)


def task_loss(kind: str, outputs: dict[str, Array], batch: dict[str, Array]) -> tuple[Array, dict]:
  """The loss of a task kind from a head's outputs and a batch (rows weighted by `valid`)."""
  weights = batch["valid"].astype(jnp.float32)
  if kind == "classification":
    return classification_loss(outputs["logits"], batch["label"], weights)
  if kind == "regression":
    return regression_loss(outputs["logits"], batch["label"], weights)
  if kind == "span":
    return span_loss(
        outputs["start_logits"],
        outputs["end_logits"],
        batch["start_position"],
        batch["end_position"],
        weights,
    )
  if kind == "multiple_choice":
    return multiple_choice_loss(outputs["logits"], batch["label"], weights)
  raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")
