"""Extracts the HowTo100M 2D (ResNet-152) and 3D (ResNeXt-101) features from raw videos.

  python tools/extract_video_features.py --video_dir videos --output_dir features \\
      --resnet152_weights resnet152-394f9c45.pth --resnext101_weights resnext101.pth

Writes features/howto100m_feature/<vid>.npy ([T, 2048], one row per second) and
features/howto100m_feature3d/<vid>.npy ([ceil(F / 16), 2048] for the F frames sampled at 24 fps),
L2-normalised float16 (--no_l2_normalize, --no_half_precision: the reference's
--l2_normalize 0, --half_precision 0), the
folders tools/convert_howto100m.py reads, and features/manifest/ (one line per video).
Running it again skips finished videos. On every host of a pod, run the same command: each host
takes its share of the videos (the host index comes from JAX's distributed runtime, or give
--host_index/--num_hosts to independent machines). The logic is in vidlankd_jax.features.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from vidlankd_jax import errors

# Heavy imports (JAX, PyAV) happen in main(): decode workers are spawned processes that import
# this file again, and they need none of them.


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--video_dir", help="every video file under this folder (recursively)")
  source.add_argument("--video_list", help="a file with one video path per line")
  p.add_argument("--output_dir", required=True)
  p.add_argument("--resnet152_weights", help="torchvision ResNet-152 ImageNet state dict (.pth)")
  p.add_argument("--resnext101_weights", help="3D-ResNets ResNeXt-101 Kinetics checkpoint (.pth)")
  p.add_argument("--streams", default="2d,3d", help="2d, 3d or 2d,3d")
  p.add_argument(
      "--dtype",
      choices=("float32", "bfloat16"),
      default="float32",
      help="compute dtype; bfloat16 accumulates in float32",
  )
  p.add_argument(
      "--batch_size",
      type=int,
      default=64,
      help="frames or clips per device per step; a video's last partial batch is padded only to "
      "the next power of two",
  )
  p.add_argument(
      "--scaler",
      choices=("bilinear", "bicubic"),
      default="bilinear",
      help="frame scaling: bilinear, what the reference's ffmpeg -filter_complex chain ran "
      "(FFmpeg 4.x) for the released features; bicubic, what a -vf chain gives",
  )
  p.add_argument(
      "--no_l2_normalize",
      dest="l2_normalize",
      action="store_false",
      help="store the features as the model gives them (the reference's --l2_normalize 0)",
  )
  p.add_argument(
      "--no_half_precision",
      dest="half_precision",
      action="store_false",
      help="store float32 rows (the reference's --half_precision 0)",
  )
  p.add_argument(
      "--workers",
      type=int,
      default=max(1, min(8, (os.cpu_count() or 2) - 1)),
      help="decode processes",
  )
  p.add_argument("--host_index", type=int, help="this host's index (default: JAX's process index)")
  p.add_argument("--num_hosts", type=int, help="number of hosts (default: JAX's process count)")
  p.add_argument(
      "--stall_timeout",
      type=float,
      default=300.0,
      help="seconds a decode worker may go without progress before its video is skipped",
  )
  p.add_argument(
      "--retry_skipped", action="store_true", help="retry videos an earlier run skipped as bad"
  )
  p.add_argument(
      "--progress_interval", type=float, default=30.0, help="seconds between progress lines"
  )
  p.add_argument("--verbose", action="store_true", help="print tracebacks of errors")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  errors.set_workdir(args.output_dir)  # the traceback of whatever ends the job is kept there
  try:
    return _extract(args)
  except KeyboardInterrupt:
    print("interrupted: finished videos are kept; run the same command to go on", file=sys.stderr)
    return 130


class _UsageError(errors.ConfigError):
  pass


def _extract(args: argparse.Namespace) -> int:
  from vidlankd_jax import main as main_lib
  from vidlankd_jax.features import extract
  from vidlankd_jax.features import streams as streams_lib
  from vidlankd_jax.interop import torch_cnn

  try:
    streams = streams_lib.parse_streams(args.streams)
  except ValueError as e:
    raise _UsageError(f"{e} (--streams): pass 2d, 3d or 2d,3d") from None
  sources = {
      "2d": (args.resnet152_weights, torch_cnn.RESNET152_WEIGHTS),
      "3d": (args.resnext101_weights, torch_cnn.RESNEXT101_WEIGHTS),
  }
  for stream in streams:
    path, source = sources[stream.name]
    if not path:
      other = "3d" if stream.name == "2d" else "2d"
      raise _UsageError(
          f"the {stream.name} stream needs {source.label} weights ({source.flag}): download "
          f"{source.where}; or extract the other stream alone with --streams {other}"
      )
  main_lib.initialize_distributed()  # on a pod (or under SLURM): one process per host
  default_index, default_count = extract.default_hosts()
  try:
    cfg = extract.ExtractConfig(
        output_dir=args.output_dir,
        video_dir=args.video_dir,
        video_list=args.video_list,
        streams=tuple(s.name for s in streams),
        batch_size=args.batch_size,
        scaler=args.scaler,
        l2_normalize=args.l2_normalize,
        half_precision=args.half_precision,
        workers=args.workers,
        host_index=default_index if args.host_index is None else args.host_index,
        num_hosts=default_count if args.num_hosts is None else args.num_hosts,
        stall_timeout=args.stall_timeout,
        retry_skipped=args.retry_skipped,
        progress_interval=args.progress_interval,
    )
  except ValueError as e:
    raise _UsageError(f"{e} (command line): see --help") from None
  videos = extract.find_videos(cfg)  # a wrong folder or list fails before the weights load
  try:
    models = {s.name: torch_cnn.load_resnet(*sources[s.name]) for s in streams}
  except ImportError as e:
    raise _UsageError(f"{e}: the weights' import needs torch (pip install torch)") from None
  features = extract.FeatureModels(models, args.dtype, l2_normalize=args.l2_normalize)
  summary = extract.run(cfg, features, videos=videos)
  return 0 if summary["extracted"] or not summary["skipped"] else 1


if __name__ == "__main__":
  sys.exit(errors.run_tool(main))
