"""Fine-tunes several initial checkpoints on several tasks and prints the comparison table.

  python tools/compare_finetune.py --workdir=runs/compare \
      --init=vidlankd=runs/student --init=text_only=runs/text_only_student \
      --tasks=sst2,qnli,qqp,mnli,tracie --seeds=1,2,3 \
      --set=data.tracie_dir=data/tracie

Each (init, task) pair is one fine-tuning run of configs/finetune.py in
`<workdir>/<init name>/<task>` (a run whose results.json exists is not repeated). The table has
a row per initial checkpoint and a column per task's primary metric, each cell the mean ± std
over the seeds; it is printed and written to `<workdir>/comparison.md`. `--table_only` only
reads existing results.
"""

from __future__ import annotations

import argparse
import sys
import ast
import json
import os

from vidlankd_jax import errors, quiet

if __name__ == "__main__":
  quiet.quiet_tensorflow_runtime()  # before configlib loads jax

from vidlankd_jax import configlib


class UsageError(errors.ConfigError):
  """A malformed command-line value."""


def parse_inits(specs: list[str]) -> dict[str, str]:
  """['name=source', ...] -> {name: source}, names unique."""
  out = {}
  for spec in specs:
    name, sep, source = spec.partition("=")
    if not sep or not name or not source:
      raise UsageError(f"--init {spec!r} is not of the form name=source")
    if name in out:
      raise UsageError(f"--init name {name!r} is given twice")
    out[name] = source
  return out


def apply_overrides(config, overrides: list[str]) -> None:
  """Sets `section.key=value` overrides, each value converted to the field's type."""
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise UsageError(f"--set {item!r} is not of the form section.key=value")
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    current = node[leaf]
    if isinstance(current, bool):
      node[leaf] = value.lower() in ("1", "true", "yes")
    elif isinstance(current, (int, float)):
      node[leaf] = type(current)(ast.literal_eval(value))
    else:
      node[leaf] = value


def load_results(directory: str) -> dict | None:
  path = os.path.join(directory, "results.json")
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def compare(
    workdir: str,
    inits: dict[str, str],
    tasks: list[str],
    *,
    seeds: str,
    size: str = "",
    overrides: list[str] = (),
    table_only: bool = False,
) -> str:
  """Runs what is missing (unless `table_only`) and returns the markdown comparison table."""
  from vidlankd_jax import main as main_lib
  from vidlankd_jax.evaluation.results import comparison_table

  finetune_config = configlib.load_module("finetune")
  tasks = [finetune_config.TASK_ALIASES.get(t, t) for t in tasks]
  results: dict[str, dict[str, dict]] = {}
  for name, source in inits.items():
    results[name] = {}
    for task in tasks:
      directory = os.path.join(workdir, name, task)
      found = load_results(directory)
      if found is None and not table_only:
        arg = f"task={task},init={source}" + (f",size={size}" if size else "")
        config = configlib.load("finetune", arg)
        config.seeds = seeds
        apply_overrides(config, list(overrides))
        main_lib.run(config, directory)
        found = load_results(directory)
      if found is not None:
        results[name][task] = found
  table = comparison_table(results, tasks)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "comparison.md"), "w", encoding="utf-8") as f:
    f.write(table)
  return table


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--workdir", required=True, help="Folder of the runs and comparison.md.")
  parser.add_argument(
      "--init",
      action="append",
      required=True,
      help="name=source: a teacher/student workdir, hf:<dir> or scratch (repeatable).",
  )
  parser.add_argument(
      "--tasks", required=True, help="Comma-separated tasks (registered or GLUE short names)."
  )
  parser.add_argument("--seeds", default="1,2,3", help="Fine-tuning seeds of every run.")
  parser.add_argument(
      "--size", default="", help="Model size ('' = the weights' own; scratch: base)."
  )
  parser.add_argument(
      "--set", action="append", default=[], help="Config override section.key=value."
  )
  parser.add_argument("--table_only", action="store_true", help="Only tabulate existing results.")
  args = parser.parse_args(argv)
  try:
    inits = parse_inits(args.init)
  except UsageError as e:
    parser.error(str(e))
  tasks = [t for t in args.tasks.split(",") if t]
  if not args.table_only:  # fine-tuning loads TensorFlow (the data) and orbax
    quiet.quiet_libraries()
  print(
      compare(
          args.workdir,
          inits,
          tasks,
          seeds=args.seeds,
          size=args.size,
          overrides=args.set,
          table_only=args.table_only,
      )
  )


if __name__ == "__main__":
  sys.exit(errors.run_tool(main))
