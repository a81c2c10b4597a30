"""Converts HowTo100M captions and 2D/3D features into sharded video-text TFRecords.

  python tools/convert_howto100m.py --caption_json caption.json \
      --features_2d_dir howto100m_feature --features_3d_dir howto100m_feature3d \
      --output_dir data/howto100m --pairing all --workers 16

The logic lives in `vidlankd_jax.data.howto100m` (importable: `ConvertConfig`, `convert`,
`make_video_clips`, `join_segments`, ...); see its docstring for the layout and the rules.
Re-running with the same arguments resumes: finished shards are kept.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from vidlankd_jax import errors, quiet

if __name__ == "__main__":  # before the imports below load TensorFlow
  quiet.quiet_libraries()

from vidlankd_jax.data.howto100m import (  # noqa: F401  (re-exported for scripts)
    CAPTION_OVERLAPS,
    PAIRINGS,
    BadInputError,
    ConvertConfig,
    convert,
    convert_shard,
    iter_json_object,
    join_segments,
    load_video_features,
    make_video_clips,
    remove_overlap,
    route_captions,
    select_validation_videos,
)


def parse_args(argv: Sequence[str] | None = None) -> ConvertConfig:
  defaults = ConvertConfig("", "", "", "")
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--caption_json", required=True)
  p.add_argument("--features_2d_dir", required=True, help="folder of VID.npy [T, 2048]")
  p.add_argument("--features_3d_dir", required=True, help="folder of VID.npy [~1.5T, 2048]")
  p.add_argument("--output_dir", required=True)
  p.add_argument(
      "--pairing",
      choices=PAIRINGS,
      default=defaults.pairing,
      help="reference: each video's opening clip only; all: every window",
  )
  p.add_argument("--word_budget", type=int, default=defaults.word_budget)
  p.add_argument(
      "--caption_overlap",
      choices=CAPTION_OVERLAPS,
      default=defaults.caption_overlap,
      help="remove: drop the words a segment repeats from the previous one (the released "
      "loader's intent); keep: keep them (the released loader as run: its check never fires)",
  )
  p.add_argument("--max_steps", type=int, default=defaults.max_steps)
  p.add_argument("--num_validation_videos", type=int, default=defaults.num_validation_videos)
  p.add_argument("--train_shards", type=int, default=defaults.train_shards)
  p.add_argument("--validation_shards", type=int, default=defaults.validation_shards)
  p.add_argument("--dim_2d", type=int, default=defaults.dim_2d)
  p.add_argument("--dim_3d", type=int, default=defaults.dim_3d)
  p.add_argument(
      "--time_tolerance",
      type=float,
      default=defaults.time_tolerance,
      help="seconds a caption may end after the last feature step",
  )
  p.add_argument(
      "--hash_salt",
      default=defaults.hash_salt,
      help="changes the (deterministic) validation choice and shard assignment",
  )
  p.add_argument(
      "--no_l2_normalize",
      dest="l2_normalize",
      action="store_false",
      help="keep the stored feature values (default: each stream's step divided by its L2 norm)",
  )
  p.add_argument(
      "--skip_bad",
      action="store_true",
      help="skip and count bad videos instead of stopping at the first one",
  )
  p.add_argument("--workers", type=int, default=defaults.workers)
  p.add_argument(
      "--progress_interval",
      type=float,
      default=defaults.progress_interval,
      help="seconds between progress lines",
  )
  args = p.parse_args(argv)
  return ConvertConfig(**vars(args))


def main(argv: Sequence[str] | None = None) -> int:
  cfg = parse_args(argv)
  try:
    convert(cfg)
  except ValueError as e:  # bad input (BadInputError) or settings: one line, exit 1
    hint = " (use --skip_bad to skip such videos and count them)"
    print(f"error: {e}{hint if isinstance(e, BadInputError) else ''}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(errors.run_tool(main))
