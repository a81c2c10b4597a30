"""Token-to-clip grounding: which video clips each word of a sentence is closest to.

The teacher's contrastive objective makes a token state x_t (unit norm) score x_t . v against a
clip vector v (unit norm); a distilled student sees no video, but its distillation head maps its
tokens into the teacher's space, so the same score can be read from it. These functions turn
models into numpy vectors (model calls are jitted), score tokens against clips, rank clips for
sentences, and draw the scores as heatmaps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vidlankd_jax.objectives import FEATURE_OBJECTIVES
from vidlankd_jax.ops import l2_normalize


@dataclasses.dataclass
class GroundingPanel:
  """One heatmap: `scores` [L, K] of the L `tokens` (rows) against the K `clip_labels` (columns)."""

  title: str
  tokens: list[str]
  clip_labels: list[str]
  scores: np.ndarray


@functools.lru_cache(maxsize=32)
def _jitted(graphdef: nnx.GraphDef, fn: Callable) -> Callable:
  """`fn(model, *args)` jitted over the model's state; one compile per model structure."""

  def pure(state, *args):
    return fn(nnx.merge(graphdef, state), *args)

  return jax.jit(pure)


def _call(model: nnx.Module, fn: Callable, *args) -> np.ndarray:
  """`fn(model, *args)`, jitted, as a numpy array."""
  graphdef, state = nnx.split(model)
  return np.asarray(jax.device_get(_jitted(graphdef, fn)(state, *args)))


def _text_inputs(input_ids, attention_mask, token_type_ids):
  input_ids = jnp.asarray(input_ids, jnp.int32)
  attention_mask = jnp.asarray(attention_mask, jnp.int32)
  if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
    raise ValueError(
        f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} "
        "must both be [batch, length]"
    )
  token_type_ids = (
      jnp.zeros_like(input_ids)
      if token_type_ids is None
      else jnp.asarray(token_type_ids, jnp.int32)
  )
  return input_ids, attention_mask, token_type_ids


def _teacher_tokens(teacher, input_ids, attention_mask, token_type_ids):
  return teacher.text_states(input_ids, attention_mask, token_type_ids)


def _teacher_clips(teacher, features, mask):
  return teacher.video(features, mask)[0]


@functools.lru_cache(maxsize=None)
def _student_head(head: str) -> Callable:
  """The student's last hidden states through head `head` (no vocabulary logits computed)."""

  def fn(student, input_ids, attention_mask, token_type_ids):
    return student.kd_heads[head](
        student.language.bert.encode(input_ids, attention_mask, token_type_ids)
    )

  return fn


def teacher_token_vectors(teacher, input_ids, attention_mask, token_type_ids=None) -> np.ndarray:
  """[B, L, H] L2-normalised last-layer token states of a `Teacher`."""
  return _call(teacher, _teacher_tokens, *_text_inputs(input_ids, attention_mask, token_type_ids))


def teacher_clip_vectors(teacher, video_features, video_mask) -> np.ndarray:
  """[B, H] unit clip vectors of a `Teacher`'s video encoder."""
  features = jnp.asarray(video_features, jnp.float32)
  mask = jnp.asarray(video_mask, jnp.int32)
  if features.ndim != 3 or mask.shape != features.shape[:2]:
    raise ValueError(
        f"video_features {features.shape} must be [batch, steps, width] and "
        f"video_mask {mask.shape} [batch, steps]"
    )
  return _call(teacher, _teacher_clips, features, mask)


def _student_hidden(student, input_ids, attention_mask, token_type_ids):
  return student.language.bert.encode(input_ids, attention_mask, token_type_ids)


def student_hidden_states(student, input_ids, attention_mask, token_type_ids=None) -> np.ndarray:
  """[B, L, H] a `Student`'s last hidden states (no head): what every student has alike."""
  return _call(student, _student_hidden, *_text_inputs(input_ids, attention_mask, token_type_ids))


def student_token_vectors(
    student, input_ids, attention_mask, token_type_ids=None, head: str = "nst"
) -> np.ndarray:
  """[B, L, H_teacher] unit token vectors of a `Student` through its distillation head `head`."""
  if head not in FEATURE_OBJECTIVES:
    raise ValueError(
        f"head {head!r} does not map tokens into the teacher's space; "
        f"one of {FEATURE_OBJECTIVES} is needed"
    )
  if head not in student.kd_heads:
    raise ValueError(
        f"the student has no {head!r} distillation head (it has "
        f"{sorted(student.kd_heads.keys())})"
    )
  return _call(
      student, _student_head(head), *_text_inputs(input_ids, attention_mask, token_type_ids)
  )


def token_clip_similarity(tokens: np.ndarray, clips: np.ndarray) -> np.ndarray:
  """Cosine similarity [L, K] of token vectors [L, H] and clip vectors [K, H]."""
  tokens, clips = np.asarray(tokens, np.float32), np.asarray(clips, np.float32)
  if tokens.ndim != 2 or clips.ndim != 2 or tokens.shape[1] != clips.shape[1]:
    raise ValueError(
        f"tokens {tokens.shape} and clips {clips.shape} must be [L, H] and [K, H] "
        "with the same H (a student is read through its distillation head)"
    )
  return np.asarray(l2_normalize(jnp.asarray(tokens)) @ l2_normalize(jnp.asarray(clips)).T)


def sentence_vectors(token_vectors: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
  """[B, H] mean of the real (mask 1) token unit vectors: the teacher's sentence-to-clip score."""
  mask = np.asarray(attention_mask, np.float32)[..., None]
  return np.sum(np.asarray(token_vectors, np.float32) * mask, 1) / np.maximum(mask.sum(1), 1.0)


def retrieval_listing(
    sentence_vectors: np.ndarray, clip_vectors: np.ndarray, captions: Sequence[str], k: int = 5
) -> list[list[tuple[int, float, str]]]:
  """Top-`k` clips per sentence, best first: (clip index, score, caption).

  The score of a sentence against a clip is its mean token vector . the clip vector, as in the
  teacher's retrieval evaluation.
  """
  sentences = np.asarray(sentence_vectors, np.float32)
  clips = np.asarray(clip_vectors, np.float32)
  if len(captions) != len(clips):
    raise ValueError(f"{len(clips)} clip vectors but {len(captions)} captions")
  if not 1 <= k <= len(clips):
    raise ValueError(f"k={k} must be between 1 and the number of clips ({len(clips)})")
  scores = sentences @ clips.T
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return [[(int(j), float(row[j]), captions[j]) for j in top] for row, top in zip(scores, order)]


DPI = 100


def figure_size(panels: Sequence[GroundingPanel], columns: int) -> tuple[float, float]:
  """(width, height) in inches of the heatmap grid: room for the longest sentence and clip list."""
  columns = max(1, min(columns, len(panels)))
  rows = math.ceil(len(panels) / columns)
  width = max(len(p.clip_labels) for p in panels)
  height = max(len(p.tokens) for p in panels)
  return columns * (3.0 + 0.45 * width), rows * (2.0 + 0.3 * height)


def plot_grounding_heatmaps(
    panels: Sequence[GroundingPanel],
    output_path: str,
    *,
    columns: int = 2,
    value_label: str = "cosine",
    shared_scale: bool = True,
) -> None:
  """One heatmap per panel (tokens down, clips across) in a grid, written atomically as a PNG."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if not panels:
    raise ValueError("no grounding panels to plot")
  for p in panels:
    if np.shape(p.scores) != (len(p.tokens), len(p.clip_labels)):
      raise ValueError(
          f"panel {p.title!r}: scores of shape {np.shape(p.scores)} do not match "
          f"{len(p.tokens)} tokens x {len(p.clip_labels)} clips"
      )
  fig = Figure(figsize=figure_size(panels, columns), layout="constrained")
  columns = max(1, min(columns, len(panels)))
  rows = math.ceil(len(panels) / columns)
  FigureCanvasAgg(fig)
  vmin = min(float(np.min(p.scores)) for p in panels)
  vmax = max(float(np.max(p.scores)) for p in panels)
  for i, p in enumerate(panels):
    ax = fig.add_subplot(rows, columns, i + 1)
    scale = dict(vmin=vmin, vmax=vmax) if shared_scale else {}
    image = ax.imshow(np.asarray(p.scores), aspect="auto", cmap="viridis", **scale)
    ax.set_title(p.title, fontsize=9)
    ax.set_yticks(range(len(p.tokens)), p.tokens, fontsize=7)
    ax.set_xticks(range(len(p.clip_labels)), p.clip_labels, fontsize=7, rotation=60, ha="right")
    fig.colorbar(image, ax=ax, shrink=0.8, label=value_label)
  directory = os.path.dirname(os.path.abspath(output_path))
  os.makedirs(directory, exist_ok=True)
  tmp = f"{output_path}.tmp{os.getpid()}.png"
  try:
    fig.savefig(tmp, dpi=DPI)
    os.replace(tmp, output_path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
