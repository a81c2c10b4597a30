"""Entry point: runs the stage a config names (teacher, distill, finetune).

  python -m vidlankd_jax.main --config=configs/teacher.py:size=small \
      --config.train.steps=10 --workdir=runs/teacher

On a multi-host TPU slice the same command runs on every host (see tpu_launch.sh); JAX's
distributed runtime is initialised first. On one machine several processes can be started by
hand with --coordinator_address/--num_processes/--process_id (how the multi-host path is tested).
"""

from __future__ import annotations

import json
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from vidlankd_jax import console, errors, quiet
from vidlankd_jax.train import stages

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file, with :arg.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process runs)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (multi-process runs)."
)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")


# Environment variables that mean "this host is one of several": Cloud TPU VMs of a pod slice,
# multi-slice (Megascale) jobs, and SLURM/Open MPI style launchers handled by JAX's cluster detection.
_MULTI_HOST_ENV = (
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "JAX_COORDINATOR_ADDRESS",
)


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None) -> None:
  """Starts JAX's distributed runtime when this is one process of several; else does nothing."""
  import jax

  if coordinator_address:
    if num_processes is None or process_id is None:
      raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif any(os.environ.get(k) for k in _MULTI_HOST_ENV):
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or not hosts:
      jax.distributed.initialize()
  console.debug(
      "process %d of %d, %d local / %d global devices",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )


def run(config, workdir: str) -> dict:
  """Runs `config.stage` and returns its final metrics.

  `<workdir>/config.json` records the config once the stage accepts the workdir (a checkpoint
  of another configuration is refused before anything is written). A stage stopped on request
  (SIGTERM, preemption) raises `loop.Preempted` after saving a checkpoint.
  """
  if config.stage not in stages.STAGES:
    raise errors.ConfigError(
        f"config.stage {config.stage!r} is not one of {sorted(stages.STAGES)}",
        "config.stage",
        "use configs/teacher.py, distill.py or finetune.py as they are",
    )
  import jax

  from vidlankd_jax import configlib
  from vidlankd_jax.train import loop

  configlib.validate(config, jax.device_count())
  loop.check_writable(workdir)
  quiet.import_deferred_tensorflow()  # the stage's data and summaries need it from here on
  return stages.get(config.stage).train_and_evaluate(config, workdir)


def verbosity_given(argv) -> bool:
  """Whether the command line sets absl's --verbosity (or -v): then the libraries' logs stay."""
  return any(a.split("=", 1)[0] in ("--verbosity", "-verbosity", "--v", "-v") for a in argv[1:])


def flag_error(error: Exception, argv) -> errors.ConfigError:
  """absl's or ml_collections' error for a wrong flag or config file (an unknown key, a bad
  `:arg` or value, a missing file) as a ConfigError naming the flag and the key, with the
  project's own message (the innermost cause) when there is one."""
  text = str(error)
  config = next((a for a in argv if a.startswith("--config=")), "--config")
  if isinstance(error, OSError) and "Configuration is not available" in text:
    return errors.ConfigError(
        "config file not found", config, "use configs/teacher.py, distill.py or finetune.py"
    )
  if isinstance(error, flags.UnrecognizedFlagError) or not isinstance(error, flags.Error):
    overrides = [a[2:].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    name = getattr(error, "flagname", None) or next(
        (o for o in overrides for key in o.split(".")[1:] if re.search(rf"\b{key}\b", text)), None
    )
    if name:
      hint = re.search(r'Did you mean "(\w+)"', text)
      todo = f'did you mean "{hint[1]}"?' if hint else "see --help and --config's file"
      return errors.ConfigError("unknown flag or config key", f"--{name}", todo)
  cause = error
  while cause.__cause__ is not None or cause.__context__ is not None:
    cause = cause.__cause__ or cause.__context__
  first = errors.one_line(error).split("; ")[0]
  flag = re.match(r"flag (--[^=]+=\S+): ", first)
  what = str(cause) if isinstance(cause, errors.UserError) else errors.one_line(cause)
  return errors.ConfigError(what, flag[1] if flag else "flags", "fix the command line")


def parse_flags(argv, flag_values=flags.FLAGS):
  """absl's flag parsing with a wrong flag or config given as one line and exit 2 (absl alone
  prints a FATAL line or a traceback and exits 1); --verbosity=1 adds the traceback."""
  try:
    remaining = flag_values(argv)
    _ = flag_values.config and flag_values.config.stage  # ml_collections defers load errors
    return remaining
  except Exception as e:  # noqa: BLE001  (any error while parsing is the command line's)
    error = flag_error(e, argv)
  verbose = any(a.startswith("--verbosity=") and a[12:] not in ("0", "-1") for a in argv)
  sys.exit(errors.report(error, verbose=verbose))


def main(argv):
  """Runs the stage; a fault of the input ends as one line (`errors.run_cli`), a bug with its
  traceback; exit 2 for a wrong command line or config, 1 for data and storage errors, 75
  (`errors.STOPPED_EXIT`) for a run stopped by SIGTERM that the same command resumes."""
  verbose = flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 1
  console.set_verbose(verbose)
  errors.stop_on_sigterm()  # outside the training loop SIGTERM stops at once, exit 75
  sys.exit(errors.run_cli(lambda: run_main(argv), verbose=verbose))


def run_main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required")
  if not flags.FLAGS["verbosity"].present:  # with --verbosity the libraries' logs are wanted
    quiet.quiet_libraries(defer_tensorflow=True)  # TensorFlow once the config is accepted
  initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  import jax

  errors.set_workdir(_WORKDIR.value, jax.process_index())
  if jax.process_index() == 0:  # the library records kept off the console, Orbax's included
    quiet.log_libraries_to(os.path.join(_WORKDIR.value, quiet.LIBRARY_LOG))
  metrics = run(_CONFIG.value, _WORKDIR.value)  # loop.Preempted (errors.Stopped): exit 75
  console.debug("final metrics: %s", json.dumps({k: float(v) for k, v in metrics.items()}))


if __name__ == "__main__":
  quiet.skip_absent_tpu()  # before the config files load jax
  if not verbosity_given(sys.argv):
    quiet.quiet_tensorflow_runtime()  # before the config files load jax
  app.run(main, flags_parser=parse_flags)
