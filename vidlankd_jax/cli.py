"""The `vidlankd` command.

  vidlankd demo --workdir runs/demo [--fresh] [--size demo|test] [--steps N] [--seed N]
  vidlankd ablate --workdir runs/ablate [--size demo|test|small|base] [--seed N]

`demo` runs every VidLanKD stage end to end at tiny size (minutes on a laptop CPU), headed by the
video-to-language transfer experiment: see vidlankd_jax/demo/pipeline.py. `ablate` runs a grid of
distillation runs (objectives, teacher size, text amount) on the same generated world and
compares their transfer; at real sizes it prints the commands for a pod instead. Training runs
of real size go through `python -m vidlankd_jax.main --config=configs/<stage>.py:... --workdir=...`.

Only argparse is imported here: `vidlankd --help` answers at once; the heavy modules load when a
command runs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from typing import Sequence

DEMO_SIZES = ("demo", "test")  # vidlankd_jax.demo.pipeline.SIZES
ABLATE_SIZES = ("demo", "test", "small", "base")  # vidlankd_jax.demo.ablate: local, then pod


def parse_args(argv: Sequence[str] | None):
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
      choices=DEMO_SIZES,
      help="demo: minutes on 2 CPU cores; test: seconds (default: %(default)s)",
  )
  demo.add_argument(
      "--steps",
      type=int,
      default=None,
      help="training steps of the teacher and of each student (default: the size's)",
  )
  demo.add_argument(
      "--seed",
      type=int,
      default=0,
      help="feeds every seed of the run: the generated world, initialisation, masking, data "
      "order (default: %(default)s, the README's numbers)",
  )
  ablate = commands.add_parser(
      "ablate", help="distillation grid (objectives, teacher size, text amount) on the world"
  )
  ablate.add_argument("--workdir", required=True, help="where the runs, table and figure go")
  ablate.add_argument(
      "--size",
      default="demo",
      choices=ABLATE_SIZES,
      help="demo|test: run the grid here at tiny size; small|base: print the pod commands "
      "(default: %(default)s)",
  )
  ablate.add_argument("--seed", type=int, default=0, help="the world's and the runs' seed")
  return parser, parser.parse_args(argv)


# What TensorFlow's and XLA's C++ code prints on start-up (absl's C++ log writes everything to
# stderr before InitializeLog, whatever TF_CPP_MIN_LOG_LEVEL says).
START_UP_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IWE]\d{4} |.*cudart_stub|"
    r".*oneDNN custom operations)"
)
# Libraries whose absl WARNINGs are noise on a normal run (read-only checkpoint managers,
# missing metadata of checkpoints written by this project, uncached datasets).
NOISY_LIBRARIES = ("/orbax/", "/etils/", "/seqio/", "/tensorflow/")


def import_quietly(modules: Sequence[str]) -> None:
  """Imports `modules` with the C++ start-up lines they print on stderr dropped; any other line
  they print is passed on."""
  import importlib

  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      for module in modules:
        importlib.import_module(module)
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      for line in capture.read().decode(errors="replace").splitlines():
        if line.strip() and not START_UP_NOISE.match(line):
          print(line, file=sys.stderr)


class LibraryNoiseFilter:
  """Drops library log records below ERROR; the project's own warnings stay."""

  def filter(self, record) -> bool:
    return record.levelno >= 40 or not any(p in record.pathname for p in NOISY_LIBRARIES)


def quiet_libraries() -> None:
  """TensorFlow's C++ start-up lines and libraries' absl warnings out of the project's output."""
  # 3: TensorFlow's runtime logs ERROR lines that are noise here (e.g. "oneDNN supports DT_HALF
  # only on platforms with AVX-512" at the first float16 batch); its real errors raise.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import_quietly(["tensorflow"])
  import logging as std_logging

  from absl import logging

  logging.set_verbosity(logging.WARNING)  # the loops print their own progress lines
  # absl's own logger (libraries call absl.logging.warning) and the handler behind absl's
  # (records of other loggers): ABSLHandler hands records on without applying its filters.
  noise = LibraryNoiseFilter()
  std_logging.getLogger("absl").addFilter(noise)
  logging.get_absl_handler().python_handler.addFilter(noise)


def main(argv: Sequence[str] | None = None) -> int:
  """The command: any error ends as one line (the traceback with --verbosity=1)."""
  from vidlankd_jax import errors

  argv = list(sys.argv[1:] if argv is None else argv)
  verbose = errors.pop_verbosity(argv)
  return errors.run_cli(lambda: run_command(argv), verbose=verbose, prog="vidlankd")


def run_command(argv: Sequence[str]) -> int:
  parser, args = parse_args(argv)
  if getattr(args, "steps", None) is not None and args.steps <= 0:
    parser.error(f"--steps must be positive, got {args.steps}")
  if args.seed < 0:
    parser.error(f"--seed must be non-negative, got {args.seed}")
  # Before anything loads TensorFlow or jaxlib: their C++ logging reads it once, at load time.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if args.command == "ablate":
    from vidlankd_jax.demo import ablate

    if args.size not in ablate.POD_SIZES:  # printing the pod commands loads no ML library
      quiet_libraries()
    ablate.run_ablation(args.workdir, size=args.size, seed=args.seed)
    return 0
  quiet_libraries()
  from vidlankd_jax.demo import run_demo

  run_demo(args.workdir, size=args.size, steps=args.steps, fresh=args.fresh, seed=args.seed)
  return 0


if __name__ == "__main__":
  sys.exit(main())
