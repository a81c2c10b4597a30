"""Small array functions that models, losses and evaluation share."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def inverse_norm(x, axis=-1, eps=1e-12, keepdims=False):
  """``1 / max(||x||_2, eps)`` along ``axis`` for a float32 ``x``."""
  squared_norm = jnp.sum(x * x, axis=axis, keepdims=keepdims)
  return jax.lax.rsqrt(jnp.maximum(squared_norm, eps * eps))


def l2_normalize(x, axis=-1, eps=1e-12):
  """``x / max(||x||_2, eps)`` along ``axis`` (the definition of torch's ``F.normalize``).

  Computed and returned in float32. A zero vector maps to zero with a finite gradient.
  """
  x = jnp.asarray(x).astype(jnp.float32)
  return x * inverse_norm(x, axis, eps, keepdims=True)


def masked_mean_pool(x, mask):
  """[B, L, D], [B, L] -> [B, D]: the mean over the real tokens (0 for an empty row), float32."""
  mask = jnp.asarray(mask).astype(jnp.float32)[..., None]
  total = jnp.sum(jnp.asarray(x).astype(jnp.float32) * mask, axis=1)
  return total / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
