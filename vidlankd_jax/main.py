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
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vidlankd_jax import errors, quiet
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
  logging.info(
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
  return stages.get(config.stage).train_and_evaluate(config, workdir)


def verbosity_given(argv) -> bool:
  """Whether the command line sets absl's --verbosity (or -v): then the libraries' logs stay."""
  return any(a.split("=", 1)[0] in ("--verbosity", "-verbosity", "--v", "-v") for a in argv[1:])


def main(argv):
  """Runs the stage; every error ends as one line (`errors.run_cli`), the traceback only with
  --verbosity=1; exit 2 for a wrong command line or config, 1 for data and storage errors."""
  verbose = flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 1
  sys.exit(errors.run_cli(lambda: run_main(argv), verbose=verbose))


def run_main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required")
  if not flags.FLAGS["verbosity"].present:  # with --verbosity the libraries' logs are wanted
    quiet.quiet_libraries()  # before anything loads TensorFlow
  initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from vidlankd_jax.train import loop

  try:
    metrics = run(_CONFIG.value, _WORKDIR.value)
  except loop.Preempted:
    return  # checkpoint saved; the same command resumes
  logging.info("final metrics: %s", json.dumps({k: float(v) for k, v in metrics.items()}))


if __name__ == "__main__":
  quiet.skip_absent_tpu()  # before the config files load jax
  if not verbosity_given(sys.argv):
    quiet.quiet_tensorflow_runtime()
  app.run(main)
