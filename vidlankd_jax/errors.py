"""One error path for every command: a one-line message, an exit code, a traceback on request.

Users meet errors of three kinds: a wrong command line or config (exit 2), data, checkpoints or
storage that cannot be used (exit 1), and bugs (exit 1, asking for the traceback). `run_cli`
prints `error: <what> (<key or file>): <what to do>` for the first two, and the full traceback
only when asked (`--verbosity=1` for absl commands, `--verbose` for the others).
"""

from __future__ import annotations

import sys
import traceback
from typing import Callable

USAGE_EXIT = 2
DATA_EXIT = 1


class UserError(Exception):
  """A fault of the input, not of the program: `what` went wrong with `where` (a config key or
  a file); `todo` says how to fix it."""

  exit_code = DATA_EXIT

  def __init__(self, what: str, where: str, todo: str):
    super().__init__(f"{what} ({where}): {todo}")
    self.what, self.where, self.todo = what, where, todo


class ConfigError(UserError, ValueError):
  """A config value that cannot work (checked before anything is built): exit 2."""

  exit_code = USAGE_EXIT


def one_line(error: BaseException) -> str:
  """An exception's message on one line (multi-line lists joined with '; ')."""
  parts = [p.strip() for p in str(error).splitlines() if p.strip()]
  return "; ".join(parts) or type(error).__name__


def exit_code(error: BaseException) -> int:
  """2 for usage errors (command line, config), 1 for everything else."""
  if isinstance(error, UserError):
    return error.exit_code
  if type(error).__name__ in ("UsageError", "ArgumentError", "IllegalFlagValueError"):
    return USAGE_EXIT
  return DATA_EXIT


# Exceptions whose message is for users: what the project raises on bad input or storage.
USER_FACING = (UserError, ValueError, OSError, KeyError, TimeoutError, FloatingPointError)


def report(error: BaseException, *, verbose: bool, prog: str = "") -> int:
  """Prints the one-line message (and the traceback when `verbose`); returns the exit code."""
  if verbose:
    traceback.print_exception(error)
  message = one_line(error)
  if not isinstance(error, USER_FACING) and exit_code(error) != USAGE_EXIT:
    message = f"{type(error).__name__}: {message} (an internal error: rerun with "
    message += "--verbosity=1 for the traceback and report it)"
  print(f"{prog + ': ' if prog else ''}error: {message}", file=sys.stderr, flush=True)
  return exit_code(error)


def run_cli(main: Callable[[], int | None], *, verbose: bool = False, prog: str = "") -> int:
  """Runs a command's `main`, turning any exception into one line and an exit code."""
  try:
    return int(main() or 0)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr, flush=True)
    return 130
  except SystemExit:
    raise
  except BaseException as error:  # every error: one line, never a bare traceback
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
