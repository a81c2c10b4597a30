"""TFRecord schema of video-text clips for the teacher.

One `tf.train.Example` per clip:
  video_id      bytes             the source video's id (HowTo100M YouTube id)
  start         float             clip start, seconds from the video start
  end           float             clip end, seconds
  caption       bytes             UTF-8 caption text of the clip (joined ASR segments)
  features      bytes             float16 little-endian [num_steps, feature_dim], row-major
  num_steps     int64             T, the number of feature steps (1 per second, at most 384)
  feature_dim   int64             D (4096 = 2048 2D + 2048 3D by default; other D allowed)
Float16 halves storage against float32 and loses nothing: the released features are float16.
"""

from __future__ import annotations

from vidlankd_jax import errors

import numpy as np
import tensorflow as tf

DEFAULT_FEATURE_DIM = 4096
_FLOAT16_LE = np.dtype("<f2")


def clip_to_example(
    video_id: str, start: float, end: float, caption: str, features: np.ndarray
) -> bytes:
  """Serializes one clip; rejects anything that would make a wrong record."""
  features = np.asarray(features)
  if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
    raise errors.DataError(f"video {video_id}: features must be [T>0, D>0], got {features.shape}.")
  as_half = features.astype(_FLOAT16_LE)
  if not np.isfinite(as_half).all():
    raise errors.DataError(f"video {video_id}: features have NaN/inf (or overflow float16).")
  if not isinstance(caption, str) or not caption.strip():
    raise errors.DataError(f"video {video_id}: empty caption for clip [{start}, {end}].")
  if not (np.isfinite(start) and np.isfinite(end) and 0 <= start <= end):
    raise errors.DataError(f"video {video_id}: bad clip times start={start} end={end}.")

  def _bytes(v: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

  def _float(v: float) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v)]))

  def _int(v: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))

  feature = {
      "video_id": _bytes(video_id.encode("utf-8")),
      "start": _float(start),
      "end": _float(end),
      "caption": _bytes(caption.encode("utf-8")),
      "features": _bytes(np.ascontiguousarray(as_half).tobytes()),
      "num_steps": _int(as_half.shape[0]),
      "feature_dim": _int(as_half.shape[1]),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


FEATURE_SPEC = {
    "video_id": tf.io.FixedLenFeature([], tf.string),
    "start": tf.io.FixedLenFeature([], tf.float32),
    "end": tf.io.FixedLenFeature([], tf.float32),
    "caption": tf.io.FixedLenFeature([], tf.string),
    "features": tf.io.FixedLenFeature([], tf.string),
    "num_steps": tf.io.FixedLenFeature([], tf.int64),
    "feature_dim": tf.io.FixedLenFeature([], tf.int64),
}


def parse_clip(serialized: tf.Tensor, feature_dim: int | None = DEFAULT_FEATURE_DIM) -> dict:
  """Parses one clip: features float16 [T, D] as stored (D static when `feature_dim` is given).

  The features stay float16 up to the device, where the video tower casts them to its compute
  dtype: half the bytes of float32 through the host pipeline and onto the accelerator.

  A record whose stored width differs from `feature_dim`, or whose byte count does not match
  T*D, fails with an InvalidArgumentError naming the video.
  """
  return decode_clip(tf.io.parse_single_example(serialized, FEATURE_SPEC), feature_dim)


def decode_clip(parsed: dict, feature_dim: int | None = DEFAULT_FEATURE_DIM) -> dict:
  """Decodes a clip parsed with FEATURE_SPEC (see `parse_clip`)."""
  num_steps = tf.cast(parsed["num_steps"], tf.int32)
  dim = tf.cast(parsed["feature_dim"], tf.int32)
  flat = tf.io.decode_raw(parsed["features"], tf.float16, little_endian=True)
  checks = [
      tf.debugging.Assert(
          tf.equal(tf.size(flat), num_steps * dim),
          ["features size != num_steps * feature_dim in video", parsed["video_id"]],
      )
  ]
  if feature_dim is not None:
    checks.append(
        tf.debugging.Assert(
            tf.equal(dim, feature_dim),
            [f"feature_dim != {feature_dim} in video", parsed["video_id"], "stored:", dim],
        )
    )
  with tf.control_dependencies(checks):
    features = tf.reshape(flat, [num_steps, feature_dim or dim])
  return {
      "video_id": parsed["video_id"],
      "start": parsed["start"],
      "end": parsed["end"],
      "caption": parsed["caption"],
      "features": features,
      "num_steps": num_steps,
  }
