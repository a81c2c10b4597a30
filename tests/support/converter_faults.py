"""A converter-worker initializer that ignores SIGTERM, for the converter's fault tests.

Spawned converter workers import it by name, so it imports nothing from the tests.
"""

from __future__ import annotations

import signal
import time

from vidlankd_jax.data import howto100m


def init_ignoring_sigterm(counter) -> None:
  """A worker that SIGTERM does not stop and that never gets to its first task (stuck in its
  setup), so only SIGKILL ends it; then the converter's own worker setup."""
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  time.sleep(3600)
  howto100m._init_worker(counter)
