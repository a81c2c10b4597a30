"""Percentile bootstrap confidence intervals for scores measured over seeds and items."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def bootstrap_ci(
    per_seed: Sequence[Sequence[float]],
    *,
    confidence: float = 0.95,
    num_resamples: int = 4000,
    seed: int = 0,
) -> tuple[float, float, float]:
  """(mean, low, high): the grand mean of `per_seed[s][i]` and its percentile bootstrap interval.

  Two-level resampling: seeds with replacement, then within each drawn seed its items (e.g.
  held-out concepts) with replacement, so the interval covers both training noise (seeds) and
  which items were evaluated. The statistic is the mean over drawn seeds of their item means.
  A paired difference is the interval of `a[s][i] - b[s][i]`.
  """
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  scores = [np.asarray(s, np.float64) for s in per_seed]
  if not scores or any(s.ndim != 1 or s.size == 0 for s in scores):
    raise ValueError("per_seed must hold at least one seed, each a non-empty list of scores")
  rng = np.random.default_rng(seed)
  mean = float(np.mean([s.mean() for s in scores]))
  num_seeds = len(scores)
  stats = np.empty(num_resamples)
  draws = rng.integers(num_seeds, size=(num_resamples, num_seeds))
  for r in range(num_resamples):
    stats[r] = np.mean(
        [scores[k][rng.integers(scores[k].size, size=scores[k].size)].mean() for k in draws[r]]
    )
  alpha = (1 - confidence) / 2
  low, high = np.quantile(stats, [alpha, 1 - alpha])
  return mean, float(low), float(high)
