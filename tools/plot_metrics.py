"""Plots the training metrics of one or several runs, to compare e.g. a distilled student with a baseline.

Each run's workdir holds `metrics.jsonl`: one JSON object a line with an integer "step" and some
metrics ("train/loss", "train/learning_rate", "eval/recall@1", ...). After a resume a step can
appear again; its last value wins. The figure has one panel per metric group (training losses,
learning rate, throughput, then each other metric, e.g. every eval metric) and one colour per run.

  python tools/plot_metrics.py --run kd=gs://bucket/distill_nst --run baseline=runs/bert \\
      --output compare.png --smooth 0.9
  python tools/plot_metrics.py runs/teacher --metrics 'loss|recall'
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from vidlankd_jax import errors
from vidlankd_jax.evaluation.plots import (  # noqa: F401  (re-exported for scripts and tests)
    METRICS_FILE,
    MetricsError,
    ema,
    metric_group,
    metrics_file,
    plot_runs,
    read_metrics,
)


def _parse_runs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
  """Names the runs: NAME=WORKDIR from --run, the workdir's last path part for positional ones."""
  runs: dict[str, str] = {}
  for spec in args.run:
    name, sep, workdir = spec.partition("=")
    if not sep or not name or not workdir:
      parser.error(f"--run takes NAME=WORKDIR, got {spec!r}")
    if name in runs:
      parser.error(f"two runs are named {name!r}")
    runs[name] = workdir
  for workdir in args.workdirs:
    name = os.path.basename(workdir.rstrip("/").removesuffix("/" + METRICS_FILE)) or workdir
    runs[workdir if name in runs else name] = workdir
  if not runs:
    parser.error("give at least one workdir (positional or --run NAME=WORKDIR)")
  return runs


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      epilog="Workdirs may be local or gs:// paths; a path to a .jsonl file is read as is.",
  )
  parser.add_argument(
      "workdirs", nargs="*", help="run workdirs, each named after its last path part"
  )
  parser.add_argument(
      "--run", action="append", default=[], metavar="NAME=WORKDIR", help="a named run (repeat)"
  )
  parser.add_argument("--output", default="metrics.png", help="PNG to write (default: %(default)s)")
  parser.add_argument("--metrics", help="regular expression that the plotted metric names match")
  parser.add_argument(
      "--smooth", type=float, default=0.0, help="EMA weight in [0, 1) for training curves"
  )
  parser.add_argument("--title", help="figure title")
  args = parser.parse_args(argv)
  if not 0.0 <= args.smooth < 1.0:
    parser.error(f"--smooth must be in [0, 1), got {args.smooth}")
  if args.metrics:
    try:
      re.compile(args.metrics)
    except re.error as e:
      parser.error(f"--metrics is not a valid regular expression: {e}")
  runs = _parse_runs(parser, args)
  try:
    panels = plot_runs(
        runs, args.output, metrics=args.metrics, smooth=args.smooth, title=args.title
    )
  except MetricsError as e:
    print(f"{parser.prog}: error: {e}", file=sys.stderr)
    return 1
  print(
      f"wrote {args.output}: {len(panels)} panels ({', '.join(panels)}) for runs {', '.join(runs)}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(errors.run_tool(main))
