"""One error path for every command: a one-line message for the user's faults, the traceback for
ours, an exit code, and the traceback of whatever ended a run kept in its workdir.

Users meet errors of four kinds: a wrong command line or config (`ConfigError`, exit 2), data,
checkpoints or storage that cannot be used (`DataError`, `MissingFileError`, `StorageError`, or
an `OSError` that names its file; exit 1), a run stopped on request with its checkpoint kept
(`Stopped`, exit 75), and bugs of ours (any other exception, exit 1). `run_cli` prints
`error: <what> (<key or file>): <what to do>` for the first three, and the full traceback for a
bug (for every error with `--verbosity=1` for absl commands, `--verbose` for the others). When the
command named its workdir (`set_workdir`), the full traceback of whatever ended the run is also
appended to `<workdir>/error.txt`, which the message names: a pod job can be diagnosed later.

Only the standard library is imported here: every module may raise these errors.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import time
import traceback
from typing import Callable

USAGE_EXIT = 2
DATA_EXIT = 1
# A run stopped on request (SIGTERM, a preemption notice) with its checkpoint kept: the same
# command resumes it. 75 is EX_TEMPFAIL (sysexits.h: "a temporary failure; retry later"): not 0,
# which a job controller reads as "done, do not restart"; not 1, a failure; not 143 (128 +
# SIGTERM), what a process killed by the signal reports whether or not it saved. A Kubernetes
# Job (GKE, JobSet on TPU slices) can match it in a podFailurePolicy rule (`onExitCodes:
# {operator: In, values: [75]}` with action `Ignore`) so preemptions restart the pod without
# counting against `backoffLimit`; a shell loop restarts while the status is 75 (tpu_launch.sh).
STOPPED_EXIT = 75
ERROR_FILE = "error.txt"


class UserError(Exception):
  """A fault of the input, not of the program: `what` went wrong with `where` (a config key, a
  file or a record); `todo` says how to fix it. `where` and `todo` may be left out when `what`
  names them already."""

  exit_code = DATA_EXIT

  def __init__(self, what: str, where: str | None = None, todo: str | None = None):
    message = what if where is None else f"{what} ({where})"
    super().__init__(message if todo is None else f"{message}: {todo}")
    self.what, self.where, self.todo = what, where, todo

  def __str__(self) -> str:  # KeyError's own would quote the message
    return str(self.args[0]) if self.args else ""


class ConfigError(UserError, ValueError):
  """A config value or command line that cannot work (checked before anything is built): exit 2."""

  exit_code = USAGE_EXIT


class UnknownNameError(ConfigError, KeyError):
  """A name the config or command line gives (a task, a benchmark, a metric) is not known."""


class DataError(UserError, ValueError):
  """Data, a checkpoint or a file's contents that cannot be used: exit 1."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or folder the run needs is not there: exit 1."""


class StorageError(UserError, OSError):
  """Writing or reading a named file failed (a full, read-only or unreachable disk): exit 1."""


class Stopped(Exception):
  """The run stopped on request (SIGTERM, a pod's preemption notice) with what it had done
  saved; the same command resumes it. Exit `STOPPED_EXIT`."""

  exit_code = STOPPED_EXIT


def storage_error(error: OSError, path: str, doing: str = "writing") -> StorageError:
  """`error` (raised while `doing` `path`, often without the file: numpy's `4096 requested and
  4032 written`) as a StorageError naming the file."""
  reason = error.strerror or str(error) or type(error).__name__
  full = error.errno == errno.ENOSPC or "written" in reason  # numpy's short write: a full disk
  todo = "free space on that disk" if full else "check the disk and the permissions"
  result = StorageError(f"{doing} failed: {reason}", path, f"{todo}, then rerun")
  result.errno, result.filename = error.errno, path
  return result


# The exception types of the libraries that mean a wrong command line.
_USAGE_TYPES = ("UsageError", "ArgumentError", "IllegalFlagValueError", "UnrecognizedFlagError")


def exit_code(error: BaseException) -> int:
  """2 for usage errors (command line, config), 75 for a stopped run, 1 for everything else."""
  if isinstance(error, (UserError, Stopped)):
    return error.exit_code
  if type(error).__name__ in _USAGE_TYPES:
    return USAGE_EXIT
  return DATA_EXIT


def is_user_facing(error: BaseException) -> bool:
  """Whether the message alone tells the user what to do: our own checks, a stopped run, a
  wrong command line, and storage errors that name their file. Anything else is a bug."""
  if isinstance(error, (UserError, Stopped)) or type(error).__name__ in _USAGE_TYPES:
    return True
  return isinstance(error, OSError) and bool(error.filename)


def one_line(error: BaseException) -> str:
  """An exception's message on one line (multi-line lists joined with '; ')."""
  parts = [p.strip() for p in str(error).splitlines() if p.strip()]
  return "; ".join(parts) or type(error).__name__


_WORKDIR: list[str] = []  # the running command's workdir, when it has one
_PROCESS: list[int] = [0]  # this process's index among the job's (`set_workdir`)


def set_workdir(workdir: str | None, process_index: int = 0) -> None:
  """Where `run_cli` keeps the traceback of whatever ends the run (process 0: `error.txt`,
  process p of several: `error-process<p>.txt`). None forgets it."""
  _WORKDIR[:] = []
  _PROCESS[:] = [process_index]
  if workdir:
    name = ERROR_FILE if not process_index else f"error-process{process_index}.txt"
    _WORKDIR.append(os.path.join(workdir, name))


def write_error_file(error: BaseException) -> str | None:
  """Appends `error`'s full traceback to the workdir's error file (when the workdir exists: a
  rejected first run creates no folder); returns its path, or None."""
  if not _WORKDIR or not os.path.isdir(os.path.dirname(_WORKDIR[0])):
    return None
  path = _WORKDIR[0]
  try:
    with open(path, "a", encoding="utf-8") as f:
      f.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} on {socket.gethostname()}: ")
      f.write(f"{' '.join(sys.argv)}\n{''.join(traceback.format_exception(error))}\n")
  except OSError:
    return None
  return path


def report(error: BaseException, *, verbose: bool, prog: str = "") -> int:
  """Prints the one-line message (a bug's, or with `verbose` any error's, traceback first) and
  keeps the traceback in the workdir's error file; returns the exit code."""
  user_facing = is_user_facing(error)
  if verbose or not user_facing:
    traceback.print_exception(error)
  message = one_line(error)
  if not user_facing:
    message = f"{type(error).__name__}: {message} (an internal error: the traceback is above; "
    message += "please report it)"
  kept = write_error_file(error)
  if isinstance(error, Stopped):  # not an error: process 0 says it once for the whole job
    if _PROCESS[0] == 0:
      print(f"{prog + ': ' if prog else ''}{message}", file=sys.stderr, flush=True)
    return exit_code(error)
  if kept:
    message += f" [traceback in {kept}]"
  print(f"{prog + ': ' if prog else ''}error: {message}", file=sys.stderr, flush=True)
  return exit_code(error)


def _raise_stopped(signum, frame):
  raise Stopped(
      f"stopped by SIGTERM outside a training step, what was saved is kept; rerun the same command to "
      f"resume (exit {STOPPED_EXIT})"
  )


def stop_on_sigterm() -> None:
  """Outside a training loop (which checkpoints at a step boundary first), SIGTERM raises
  `Stopped` at once: the run ends with `STOPPED_EXIT` whenever the signal lands."""
  signal.signal(signal.SIGTERM, _raise_stopped)


def run_cli(main: Callable[[], int | None], *, verbose: bool = False, prog: str = "") -> int:
  """Runs a command's `main`, turning any exception into its message and an exit code."""
  try:
    return int(main() or 0)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr, flush=True)
    return 130
  except SystemExit:
    raise
  except BaseException as error:  # every error: its line, a bug's traceback, the error file
    return report(error, verbose=verbose, prog=prog)


def pop_verbosity(argv: list[str]) -> bool:
  """Removes `--verbosity=N` (absl's spelling, accepted by every command) from `argv`; returns
  whether N >= 1 (or `--verbose` is there, for the tools that define it): show tracebacks."""
  levels = [a.split("=", 1)[1] for a in argv if a.startswith("--verbosity=")]
  argv[:] = [a for a in argv if not a.startswith("--verbosity=")]
  try:
    return "--verbose" in argv or any(int(level) >= 1 for level in levels)
  except ValueError:
    return True


def run_tool(main: Callable[[], int | None]) -> int:
  """`run_cli` for a tools/*.py script whose `main()` parses `sys.argv`."""
  verbose = pop_verbosity(sys.argv)
  prog = sys.argv[0].rsplit("/", 1)[-1]
  return run_cli(main, verbose=verbose, prog=prog)
