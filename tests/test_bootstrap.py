"""The percentile bootstrap over seeds and items (evaluation/bootstrap.py)."""

import numpy as np
import pytest

from vidlankd_jax.evaluation.bootstrap import bootstrap_ci


def test_interval_brackets_the_mean_and_shrinks_with_more_items():
  rng = np.random.default_rng(0)
  small = [rng.binomial(1, 0.7, 20).astype(float) for _ in range(3)]
  large = [rng.binomial(1, 0.7, 2000).astype(float) for _ in range(3)]
  widths = []
  for scores in (small, large):
    mean, low, high = bootstrap_ci(scores, num_resamples=500)
    assert low <= mean <= high
    assert mean == pytest.approx(np.mean([s.mean() for s in scores]))
    widths.append(high - low)
  assert widths[1] < widths[0] / 4
  assert 0.65 < low < 0.7 < high < 0.75  # the large case: 6,000 Bernoulli(0.7) draws


def test_constant_scores_give_a_point_interval_and_spread_seeds_widen_it():
  assert bootstrap_ci([[0.5, 0.5], [0.5, 0.5]], num_resamples=100) == (0.5, 0.5, 0.5)
  # Items agree within each seed; the seeds disagree: only the seed level can make the spread.
  mean, low, high = bootstrap_ci([[0.2] * 5, [0.5] * 5, [0.8] * 5], num_resamples=1000)
  assert mean == pytest.approx(0.5) and low < 0.4 and high > 0.6


def test_a_paired_difference_separates_a_consistent_gain_from_noise():
  rng = np.random.default_rng(1)
  base = [rng.uniform(0.2, 0.3, 32) for _ in range(3)]
  gain = [b + 0.1 + rng.normal(0, 0.02, 32) for b in base]
  noise = [b + rng.normal(0, 0.05, 32) for b in base]
  assert bootstrap_ci([g - b for g, b in zip(gain, base)], num_resamples=1000)[1] > 0.05
  _, low, high = bootstrap_ci([n - b for n, b in zip(noise, base)], num_resamples=1000)
  assert low < 0 < high


def test_bad_input_is_refused():
  with pytest.raises(ValueError, match="at least one seed"):
    bootstrap_ci([])
  with pytest.raises(ValueError, match="non-empty"):
    bootstrap_ci([[0.1], []])
  with pytest.raises(ValueError, match="confidence"):
    bootstrap_ci([[0.1]], confidence=1.5)
