"""Ridge regression, the linear read-out of every probe (grounding and transfer).

``w = argmin ||(x - mean) / scale @ w - y||^2 + penalty ||w||^2``, solved in float64 in closed
form: ``w = (Xᵀ X + penalty I)^-1 Xᵀ y`` with X the centred (optionally standardised) features.
`penalty` is absolute; a caller that wants it per example passes ``penalty * len(x)``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Ridge(NamedTuple):
  """A fitted map: ``decision(x) = ((x - mean) / scale) @ w``."""

  w: np.ndarray
  mean: np.ndarray
  scale: np.ndarray


def fit(x, y, penalty: float, *, standardize: bool = False) -> Ridge:
  """The ridge map from features x [N, D] to targets y [N, K]; `standardize` divides each feature
  by its standard deviation on x (plus 1e-6) after centring."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  mean = x.mean(0)
  scale = x.std(0) + 1e-6 if standardize else np.ones_like(mean)
  xs = (x - mean) / scale
  w = np.linalg.solve(xs.T @ xs + penalty * np.eye(x.shape[1]), xs.T @ y)
  return Ridge(w, mean, scale)


def decision(model: Ridge, x) -> np.ndarray:
  """[N, K]: the map applied to x [N, D]."""
  return ((np.asarray(x, np.float64) - model.mean) / model.scale) @ model.w


def fit_classifier(x, labels, num_classes: int, penalty: float) -> Ridge:
  """A one-hot ridge classifier on standardised features (targets one-hot minus 1 / K)."""
  targets = np.eye(num_classes)[np.asarray(labels)] - 1.0 / num_classes
  return fit(x, targets, penalty, standardize=True)
