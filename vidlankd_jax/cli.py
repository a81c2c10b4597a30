"""The `vidlankd` command.

  vidlankd demo --workdir runs/demo [--fresh] [--size demo|test] [--steps N]

`demo` runs every VidLanKD stage end to end at tiny size (minutes on a laptop CPU): see
vidlankd_jax/demo/pipeline.py. Training runs of real size go through
`python -m vidlankd_jax.main --config=configs/<stage>.py:... --workdir=...`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def parse_args(argv: Sequence[str] | None):
  from vidlankd_jax.demo.pipeline import SIZES

  parser = argparse.ArgumentParser(prog="vidlankd", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  demo = commands.add_parser("demo", help="every stage end to end at tiny size, no downloads")
  demo.add_argument("--workdir", required=True, help="where data, checkpoints and the report go")
  demo.add_argument(
      "--fresh", action="store_true", help="redo every stage instead of reusing finished ones"
  )
  demo.add_argument(
      "--size",
      default="demo",
      choices=sorted(SIZES),
      help="demo: minutes on 2 CPU cores; test: seconds (default: %(default)s)",
  )
  demo.add_argument(
      "--steps",
      type=int,
      default=None,
      help="training steps of the teacher and of each student (default: the size's)",
  )
  return parser, parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """The command: any error ends as one line (the traceback with --verbosity=1)."""
  from vidlankd_jax import errors

  argv = list(sys.argv[1:] if argv is None else argv)
  verbose = errors.pop_verbosity(argv)
  return errors.run_cli(lambda: run_command(argv), verbose=verbose, prog="vidlankd")


def run_command(argv: Sequence[str]) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
  parser, args = parse_args(argv)
  if args.steps is not None and args.steps <= 0:
    parser.error(f"--steps must be positive, got {args.steps}")
  from absl import logging

  logging.set_verbosity(logging.WARNING)  # the loops print their own progress lines
  from vidlankd_jax.demo import run_demo

  run_demo(args.workdir, size=args.size, steps=args.steps, fresh=args.fresh)
  return 0


if __name__ == "__main__":
  sys.exit(main())
