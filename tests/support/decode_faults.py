"""A decode function that fails on purpose, for the feature extractor's worker tests.

Spawned decode workers import it by name, so it imports nothing from the tests.
"""

from __future__ import annotations

import os
import time

from vidlankd_jax.features import decode


def faulty_decode(path, streams, rows_per_chunk=16, threads=0):
  """Decodes as `decode_video` does, except: a file named crash* sends its first rows and then
  kills its process; a file named hang* sends nothing and never returns."""
  name = os.path.basename(path)
  if name.startswith("hang"):
    time.sleep(3600)
  messages = decode.decode_video(path, streams, rows_per_chunk, threads)
  if name.startswith("crash"):
    yield next(messages)
    os._exit(3)
  yield from messages
