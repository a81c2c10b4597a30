"""The probes' one ridge solver: the closed form, its penalty convention, the classifier."""

import numpy as np
import pytest

from vidlankd_jax.evaluation import ridge


def data(seed=0, n=200, d=5, k=3):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, d)) * np.arange(1, d + 1) + 3.0
  w = rng.standard_normal((d, k))
  return x, (x - x.mean(0)) @ w, w


def test_without_penalty_it_recovers_a_linear_map():
  x, y, w = data()
  model = ridge.fit(x, y, 0.0)
  np.testing.assert_allclose(model.w, w, atol=1e-8)
  np.testing.assert_allclose(ridge.decision(model, x), y, atol=1e-8)


@pytest.mark.parametrize("standardize", [False, True])
def test_the_penalty_is_absolute_and_minimises_the_ridge_objective(standardize):
  x, y, _ = data(1)
  y = y + np.random.default_rng(2).standard_normal(y.shape)
  penalty = 25.0
  model = ridge.fit(x, y, penalty, standardize=standardize)
  xs = (x - model.mean) / model.scale

  def objective(w):
    return np.sum((xs @ w - y) ** 2) + penalty * np.sum(w**2)

  best = objective(model.w)
  rng = np.random.default_rng(3)
  for _ in range(20):
    assert objective(model.w + 1e-3 * rng.standard_normal(model.w.shape)) > best
  # Doubling the examples at the same penalty shrinks the map less: the penalty is not per example.
  doubled = ridge.fit(
      np.concatenate([x, x]), np.concatenate([y, y]), penalty, standardize=standardize
  )
  assert np.linalg.norm(doubled.w) > np.linalg.norm(model.w)
  np.testing.assert_allclose(
      ridge.fit(
          np.concatenate([x, x]), np.concatenate([y, y]), 2 * penalty, standardize=standardize
      ).w,
      model.w,
      rtol=1e-9,
  )


def test_standardising_makes_the_map_blind_to_feature_scale():
  x, y, _ = data(4)
  scaled = x * np.array([1.0, 10.0, 0.1, 3.0, 1e3])
  a = ridge.decision(ridge.fit(x, y, 5.0, standardize=True), x)
  b = ridge.decision(ridge.fit(scaled, y, 5.0, standardize=True), scaled)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_the_classifier_separates_classes_and_has_zero_mean_targets():
  rng = np.random.default_rng(5)
  labels = rng.integers(0, 4, 400)
  x = np.eye(4)[labels] @ rng.standard_normal((4, 8)) * 3 + rng.standard_normal((400, 8))
  model = ridge.fit_classifier(x[:300], labels[:300], 4, penalty=1.0)
  assert np.mean(np.argmax(ridge.decision(model, x[300:]), -1) == labels[300:]) > 0.9
  # One-hot targets minus 1/K: every row of scores sums to the mean of the targets' rows, 0.
  np.testing.assert_allclose(ridge.decision(model, x).sum(-1), 0.0, atol=1e-9)
