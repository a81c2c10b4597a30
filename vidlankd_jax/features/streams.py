"""The two feature streams of the HowTo100M extractor (github antoine77340/video_feature_extractor).

2D: ffmpeg `fps=1`, the short side scaled to 224 keeping the aspect ratio, no crop; pixels / 255,
    then ImageNet mean and std; ResNet-152 averaged over height and width: [T, 2048].
3D: ffmpeg `fps=24`, the short side scaled to 112, a centre crop of 112 x 112; pixels (0..255)
    minus (110.6, 103.2, 96.3), std 1; frames zero-padded to a multiple of 16 and cut into
    non-overlapping 16-frame clips; ResNeXt-101: [ceil(F / 16), 2048] for the F frames the
    `fps=24` filter gives (about 24 per second of video).
Both are L2-normalised per row and stored as float16, one `.npy` per video, in the folders that
tools/convert_howto100m.py reads (`howto100m_feature/`, `howto100m_feature3d/`).

Scaling: the reference builds its chain with ffmpeg-python, which runs it as `-filter_complex`;
the ffmpeg program's bicubic `-sws_flags` default applies to simple `-vf` chains only, so the
`scale` filter used its own default, bilinear in the FFmpeg 4.x of 2019 when the released
features were extracted. `scaler="bilinear"` (the default) reproduces that; "bicubic" is what a
`-vf` chain (or FFmpeg 5.0+'s `scale` default) gives.

This module has no JAX in it: decode workers import it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# The reference divides by (std + 1e-8).
STD_EPSILON = 1e-8
SCALERS = ("bilinear", "bicubic")


@dataclasses.dataclass(frozen=True)
class Stream:
  """One stream: how frames are decoded, grouped into model inputs and normalised."""

  name: str
  folder: str  # sub-folder of the output directory
  fps: int
  size: int  # the short side after scaling (and the crop's side when `center_crop`)
  center_crop: bool
  clip_frames: int  # frames per model input: 1 (an image) or 16 (a clip)
  pixel_divisor: float  # 0..255 pixels are divided by it before the mean is subtracted
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  scaler: str = "bilinear"  # the scale filter's flags (see the module docstring)

  def __post_init__(self):
    if self.scaler not in SCALERS:
      raise ValueError(f"scaler must be one of {SCALERS}, got {self.scaler!r}")

  def scaled_size(self, height: int, width: int) -> tuple[int, int]:
    """(height, width) after scaling: the short side becomes `size`, the other keeps the aspect
    ratio, truncated to an integer as the reference does (`int(h * size / w)`)."""
    if height >= width:
      return int(height * self.size / width), self.size
    return self.size, int(width * self.size / height)

  def frame_shape(self, height: int, width: int) -> tuple[int, int]:
    """(height, width) of the frames the model sees."""
    return (self.size, self.size) if self.center_crop else self.scaled_size(height, width)

  def filters(self, height: int, width: int) -> list[tuple[str, str]]:
    """The reference's FFmpeg filter chain for a `width` x `height` video, as (filter, args),
    with the scaler's flags explicit (`scaler`); the crop offsets are truncated as the reference
    truncates them."""
    scaled_h, scaled_w = self.scaled_size(height, width)
    chain = [("fps", f"fps={self.fps}"), ("scale", f"{scaled_w}:{scaled_h}:flags={self.scaler}")]
    if self.center_crop:
      x, y = int((scaled_w - self.size) / 2.0), int((scaled_h - self.size) / 2.0)
      chain.append(("crop", f"{self.size}:{self.size}:{x}:{y}"))
    return chain

  def rows(self, num_frames: int) -> int:
    """Model inputs (feature rows) for `num_frames` decoded frames."""
    return -(-num_frames // self.clip_frames)

  def normalize(self, pixels):
    """uint8 pixels [..., 3] -> float32 model input (numpy or jax arrays alike)."""
    mean = np.asarray(self.mean, np.float32)
    std = np.asarray(self.std, np.float32) + np.float32(STD_EPSILON)
    return (pixels.astype(np.float32) / np.float32(self.pixel_divisor) - mean) / std


STREAM_2D = Stream(
    name="2d",
    folder="howto100m_feature",
    fps=1,
    size=224,
    center_crop=False,
    clip_frames=1,
    pixel_divisor=255.0,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)
STREAM_3D = Stream(
    name="3d",
    folder="howto100m_feature3d",
    fps=24,
    size=112,
    center_crop=True,
    clip_frames=16,
    pixel_divisor=1.0,
    mean=(110.6, 103.2, 96.3),
    std=(1.0, 1.0, 1.0),
)
STREAMS = {s.name: s for s in (STREAM_2D, STREAM_3D)}


def parse_streams(text: str, scaler: str = "bilinear") -> tuple[Stream, ...]:
  """`"2d,3d"` -> the streams, in the canonical order, scaled with `scaler`; a ValueError names
  an unknown one."""
  names = [n.strip() for n in text.split(",") if n.strip()]
  unknown = [n for n in names if n not in STREAMS]
  if unknown or not names:
    raise ValueError(f"streams must be a comma-separated subset of 2d,3d, got {text!r}")
  return tuple(dataclasses.replace(s, scaler=scaler) for s in STREAMS.values() if s.name in names)
