"""Fixed-shape batches for the jitted steps, with padding rows marked by `valid` = 0."""

from __future__ import annotations

import functools

import tensorflow as tf


def pad_batch(batch: dict[str, tf.Tensor], batch_size: int) -> dict[str, tf.Tensor]:
  """Pads a partial batch to `batch_size` rows of zeros ("" for strings, so `valid` = 0)."""

  def pad(x):
    rows = [[0, batch_size - tf.shape(x)[0]]] + [[0, 0]] * (x.shape.rank - 1)
    padded = tf.pad(x, rows, constant_values="" if x.dtype == tf.string else tf.zeros([], x.dtype))
    return tf.ensure_shape(padded, [batch_size] + x.shape[1:].as_list())

  return {k: pad(v) for k, v in batch.items()}


def batch_examples(ds: tf.data.Dataset, batch_size: int, *, repeat: bool) -> tf.data.Dataset:
  """Batches of exactly `batch_size` rows with an int32 `valid` [B] feature.

  An endless (`repeat`) stream drops nothing and every row is real; one pass has its last
  partial batch padded with rows marked `valid` = 0, which evaluation leaves out.
  """
  ds = ds.map(lambda ex: {**ex, "valid": tf.constant(1, tf.int32)})
  if repeat:
    return ds.batch(batch_size, drop_remainder=True)
  return ds.batch(batch_size).map(functools.partial(pad_batch, batch_size=batch_size))
