"""The `vidlankd` command.

  vidlankd demo --workdir runs/demo [--fresh] [--size demo|test] [--steps N] [--seed N]
  vidlankd ablate --workdir runs/ablate [--size demo|test|small|base] [--seed N]
  vidlankd plan --config=configs/<stage>.py:size=base [--config.key=value ...] \
      --topology=v5e:16x16 [--num_slices=N] [--json=FILE]

`demo` runs every VidLanKD stage end to end at tiny size (minutes on a laptop CPU), headed by the
video-to-language transfer experiment: see vidlankd_jax/demo/pipeline.py. `ablate` runs a grid of
distillation runs (objectives, teacher size, text amount) on the same generated world and
compares their transfer; at real sizes it prints the commands for a pod instead. `plan` compiles a
stage's train step for a TPU topology on this machine and prints its HBM, FLOPs, collectives and
an estimated step time (vidlankd_jax/plan.py; no TPU needed, libtpu is). Training runs
of real size go through `python -m vidlankd_jax.main --config=configs/<stage>.py:... --workdir=...`.

Only argparse and `quiet` (standard library only) are imported here: `vidlankd --help` answers at
once; the heavy modules load when a command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from vidlankd_jax import quiet

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
      "order (default: %(default)s, docs/demo.md's numbers)",
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
  plan = commands.add_parser(
      "plan",
      help="compile a stage for a TPU topology here: HBM, FLOPs, collectives, estimated speed",
  )
  plan.add_argument(
      "--config",
      required=True,
      help="configs/<stage>.py:<arg>, followed by any --config.<key>=<value> overrides",
  )
  plan.add_argument("--topology", required=True, help="e.g. v5e:4x4, v5e:16x16, v4:4x4x8")
  plan.add_argument("--num_slices", type=int, default=1, help="slices over the DCN (default 1)")
  plan.add_argument("--json", default="", help="write the plan here, the compiled HLO beside it")
  plan.add_argument(
      "--as_compiled",
      action="store_true",
      help="FLOPs as the compiler counts them (a scan's body once): skips the per-layer compiles",
  )
  args, extra = parser.parse_known_args(argv)
  # `plan` takes `--config.<key>=<value>` (or `--config.<key> <value>`) overrides after --config.
  values = [b for a, b in zip([""] + extra, extra) if a.startswith("--config.") and "=" not in a]
  unknown = [a for a in extra if not a.startswith("--config.") and a not in values]
  if extra and (args.command != "plan" or unknown):
    parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
  args.overrides = extra
  return parser, args


def load_config(path: str, overrides: Sequence[str]):
  """The config `--config=<file>:<arg>` and its `--config.<key>=<value>` overrides name, parsed
  as a training run parses them (ml_collections' config flags)."""
  from absl import flags
  from ml_collections import config_flags

  values = flags.FlagValues()
  argv = ["vidlankd plan", f"--config={path}", *overrides]
  # The override flags are defined from `sys_argv` (sys.argv unless given).
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
  values(argv)
  return holder.value


def main(argv: Sequence[str] | None = None) -> int:
  """The command: any error ends as one line (the traceback with --verbosity=1)."""
  from vidlankd_jax import console, errors

  argv = list(sys.argv[1:] if argv is None else argv)
  verbose = errors.pop_verbosity(argv)
  console.set_verbose(verbose)
  return errors.run_cli(lambda: run_command(argv), verbose=verbose, prog="vidlankd")


def run_command(argv: Sequence[str]) -> int:
  from vidlankd_jax import errors

  parser, args = parse_args(argv)
  if getattr(args, "steps", None) is not None and args.steps <= 0:
    parser.error(f"--steps must be positive, got {args.steps}")
  if getattr(args, "seed", 0) < 0:
    parser.error(f"--seed must be non-negative, got {args.seed}")
  workdir = getattr(args, "workdir", None)  # `plan` writes no workdir
  errors.set_workdir(workdir)  # the traceback of whatever ends the run is kept there
  quiet.log_libraries_to(os.path.join(workdir, quiet.LIBRARY_LOG) if workdir else None)
  errors.stop_on_sigterm()  # between training steps too: exit 75, finished stages kept
  quiet.quiet_tensorflow_runtime()  # before anything loads jax or TensorFlow
  if args.command == "plan":
    if args.num_slices < 1:
      parser.error(f"--num_slices must be positive, got {args.num_slices}")
    quiet.quiet_libraries()
    from vidlankd_jax import plan

    return plan.main(args, load_config(args.config, args.overrides))
  if args.command == "ablate":
    from vidlankd_jax.demo import ablate

    if args.size not in ablate.POD_SIZES:  # printing the pod commands loads no TensorFlow
      quiet.quiet_libraries()
    ablate.run_ablation(args.workdir, size=args.size, seed=args.seed)
    return 0
  quiet.quiet_libraries()
  from vidlankd_jax.demo import run_demo

  run_demo(args.workdir, size=args.size, steps=args.steps, fresh=args.fresh, seed=args.seed)
  return 0


if __name__ == "__main__":
  sys.exit(main())
