"""Comparing representations: linear CKA over token states, spherical k-means of unit vectors."""

from __future__ import annotations

import functools

import jax

from vidlankd_jax import errors
import jax.numpy as jnp
import numpy as np


def cka_moments(x, y, mask):
  """Sums over the real tokens that linear CKA needs: count, sums, and cross-products.

  x [B, L, Hx], y [B, L, Hy], mask [B, L] -> dict of n, sx [Hx], sy [Hy], xx [Hx, Hx],
  yy [Hy, Hy], yx [Hy, Hx] (float32; add them over batches, then `linear_cka`).
  """
  m = mask.astype(jnp.float32)
  x = x.astype(jnp.float32).reshape(-1, x.shape[-1]) * m.reshape(-1, 1)
  y = y.astype(jnp.float32).reshape(-1, y.shape[-1]) * m.reshape(-1, 1)
  mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
  return {
      "n": jnp.sum(m),
      "sx": jnp.sum(x, 0),
      "sy": jnp.sum(y, 0),
      "xx": mm(x.T, x),
      "yy": mm(y.T, y),
      "yx": mm(y.T, x),
  }


def linear_cka(moments) -> float:
  """Linear CKA of the token representations X and Y summarised by `cka_moments`.

  With centred cross-products C_ab = sum_t (a_t - mean a)(b_t - mean b)ᵀ:
  ``CKA = ||C_yx||_F^2 / (||C_xx||_F ||C_yy||_F)``, in [0, 1], invariant to rotations and
  scalings of either representation (so a student needs no head to be compared).
  """
  m = {k: np.asarray(v, np.float64) for k, v in moments.items()}
  n = max(float(m["n"]), 1.0)
  centred = lambda ab, sa, sb: ab - np.outer(sa, sb) / n
  cxx = centred(m["xx"], m["sx"], m["sx"])
  cyy = centred(m["yy"], m["sy"], m["sy"])
  cyx = centred(m["yx"], m["sy"], m["sx"])
  denominator = np.linalg.norm(cxx) * np.linalg.norm(cyy)
  return float(np.sum(cyx * cyx) / denominator) if denominator > 0 else 0.0


def spherical_kmeans(vectors: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
  """`k` unit centroids of unit `vectors` [N, D] by cosine k-means (an empty cluster keeps its
  centroid); initialised from `k` distinct vectors drawn with `seed`."""
  if k > len(vectors):
    raise errors.ConfigError(
        f"config.kd.voken.num_vokens={k} exceeds the {len(vectors)} clips read"
    )
  rng = np.random.default_rng(seed)
  centroids = vectors[rng.choice(len(vectors), k, replace=False)]
  for _ in range(iters):
    assign = np.argmax(vectors @ centroids.T, axis=1)
    sums = np.zeros_like(centroids)
    np.add.at(sums, assign, vectors)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    centroids = np.where(norms > 0, sums / np.maximum(norms, 1e-12), centroids)
  return centroids
