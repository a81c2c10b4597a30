"""Text-to-video retrieval metrics: how well sentence vectors find their own clip."""

from __future__ import annotations

import numpy as np


def retrieval_metrics(sentence: np.ndarray, clip: np.ndarray) -> dict[str, float]:
  """Text-to-video recall@1/5/10 and median rank (1 = best) over paired rows; also chance R@1.

  Ties count half (the expected rank under random tie-breaking) and NaN scores count ahead of
  the true clip, so a collapsed model that scores every clip alike ranks at chance, never first.
  """
  scores = sentence @ clip.T
  own = np.diagonal(scores)[:, None]
  n = len(own)
  others = ~np.eye(n, dtype=bool)
  ahead = (scores > own) | np.isnan(scores) | np.isnan(own)
  ranks = 1 + np.sum(ahead & others, axis=1) + 0.5 * np.sum((scores == own) & others, axis=1)
  return {
      "recall@1": float(np.mean(ranks <= 1)),
      "recall@5": float(np.mean(ranks <= 5)),
      "recall@10": float(np.mean(ranks <= 10)),
      "median_rank": float(np.median(ranks)),
      "chance_recall@1": 1.0 / max(n, 1),
      "retrieval_clips": float(n),
  }
