"""The project's one logger: what a run says on the console, said once per job.

Every process of a pod runs the same loop, so a line printed by each would appear once per host
(64 times on a 64-host pod). Lines below WARNING (progress, resumes, diagnostics) reach the
console from process 0 only; warnings and errors from every process, prefixed with the process
when there are several, since they may concern one host alone. Lines go to the `sys.stdout` /
`sys.stderr` of the moment they are written (so redirection and test capture see them);
`set_verbose(True)` (the commands' `--verbosity=1`) adds the DEBUG lines. The error line that
ends a command is printed by `vidlankd_jax.errors` on every process, and the SIGTERM handler
writes its two lines directly: a handler must not take the logging lock.
"""

from __future__ import annotations

import logging
import sys

LOGGER = logging.getLogger("vidlankd")


def _process() -> tuple[int, int]:
  """(index, count) of this process. Called only when a line is written, by then (in every
  caller) after the distributed runtime has started."""
  import jax

  return jax.process_index(), jax.process_count()


class _ConsoleHandler(logging.Handler):
  """Writes each line to the current stdout (below WARNING) or stderr, from the processes that
  speak for the job (see the module's docstring)."""

  def emit(self, record: logging.LogRecord) -> None:
    try:
      index, count = _process()
      warning = record.levelno >= logging.WARNING
      if index != 0 and not warning:
        return
      line = self.format(record)
      if warning and count > 1:
        line = f"[process {index}] {line}"
      stream = sys.stderr if warning else sys.stdout
      stream.write(line + "\n")
      stream.flush()
    except Exception:  # a failing console must not end a run; logging reports it on stderr
      self.handleError(record)


if not any(isinstance(h, _ConsoleHandler) for h in LOGGER.handlers):
  LOGGER.addHandler(_ConsoleHandler())
LOGGER.setLevel(logging.INFO)
LOGGER.propagate = False  # absl's root handler would print it a second time


def set_verbose(verbose: bool) -> None:
  """DEBUG lines too (`--verbosity=1`), or from INFO up (the default)."""
  LOGGER.setLevel(logging.DEBUG if verbose else logging.INFO)


debug = LOGGER.debug
info = LOGGER.info
warning = LOGGER.warning
