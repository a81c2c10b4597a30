"""Keeps libraries' start-up lines and warnings out of the project's commands.

TensorFlow's and XLA's C++ code prints lines on stderr when loaded (oneDNN, missing CUDA drivers)
whatever TF_CPP_MIN_LOG_LEVEL says, and libraries log absl WARNINGs that are noise on a normal run
(read-only checkpoint managers, uncached datasets). `quiet_libraries()`, called by every command
before it loads TensorFlow, drops both; the project's own warnings and any library ERROR stay.
A command that loads jax earlier calls `quiet_tensorflow_runtime()` before that.

Only the standard library is imported here: commands import this module before parsing their
command line, and `--help` must answer at once.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import importlib.util
import logging as std_logging
import os
import re
import sys
import tempfile
from typing import Iterator, Sequence

# What TensorFlow's and XLA's C++ code prints on start-up (absl's C++ log writes everything to
# stderr before InitializeLog, whatever TF_CPP_MIN_LOG_LEVEL says).
START_UP_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IWE]\d{4} |.*cudart_stub|"
    r".*oneDNN custom operations|"
    # libtpu on a machine without a TPU (ahead-of-time compilation for a TPU topology)
    r"Failed to find host bounds|WARNING: Logging before InitGoogle|=== Source Location Trace|"
    r"\S+\.cc:\d+$)"
)
# Libraries whose absl WARNINGs are noise on a normal run (read-only checkpoint managers,
# missing metadata of checkpoints written by this project, uncached datasets).
NOISY_LIBRARIES = ("/orbax/", "/etils/", "/seqio/", "/tensorflow/")


@contextlib.contextmanager
def stderr_noise_dropped() -> Iterator[None]:
  """Runs the block with the C++ start-up lines it prints on stderr dropped; any other line it
  prints is passed on."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      for line in capture.read().decode(errors="replace").splitlines():
        if line.strip() and not START_UP_NOISE.match(line):
          print(line, file=sys.stderr)


# Libraries whose errors are reported by the project's own message (a failed checkpoint save is
# a `CheckpointSaveError`): their tracebacks, hundreds of lines, stay off the console too.
REPORTED_LIBRARIES = ("/orbax/",)
LIBRARY_LOG = "library.log"  # its name in a run's workdir
_LIBRARY_LOG: list[str] = []  # where the dropped records go (`log_libraries_to`)


def log_libraries_to(path: str | None) -> None:
  """Appends the library records kept off the console (with their tracebacks) to `path`."""
  _LIBRARY_LOG[:] = [path] if path else []


def _import_tensorflow_quietly() -> None:
  if importlib.util.find_spec("tensorflow") is not None:  # accelerator images may lack it
    import_quietly(["tensorflow"])


def import_deferred_tensorflow() -> None:
  """Imports TensorFlow quietly if `quiet_libraries(defer_tensorflow=True)` deferred it."""
  if _TENSORFLOW_DEFERRED and "tensorflow" not in sys.modules:
    _import_tensorflow_quietly()


def import_quietly(modules: Sequence[str]) -> None:
  """Imports `modules` with the C++ start-up lines they print on stderr dropped."""
  with stderr_noise_dropped():
    for module in modules:
      importlib.import_module(module)


class LibraryNoiseFilter:
  """Drops library log records below ERROR, and Orbax's errors, from the console (into the
  library log when there is one); the project's own warnings and other errors stay."""

  def filter(self, record) -> bool:
    if not any(p in record.pathname for p in NOISY_LIBRARIES):
      return True
    if record.levelno >= 40 and not any(p in record.pathname for p in REPORTED_LIBRARIES):
      return True
    if _LIBRARY_LOG and not getattr(record, "library_logged", False):
      record.library_logged = True  # both filtered handlers see it: written once
      try:  # a workdir that does not exist yet (or a gs:// one) gets no log
        with open(_LIBRARY_LOG[0], "a", encoding="utf-8") as f:
          f.write(_FORMAT.format(record) + "\n")
      except OSError:  # a full disk is often why the library logged
        pass
    return False


_FORMAT = std_logging.Formatter("%(asctime)s %(levelname)s %(pathname)s:%(lineno)d] %(message)s")


def quiet_tensorflow_runtime() -> None:
  """TensorFlow's C++ runtime logs nothing below FATAL (TF_CPP_MIN_LOG_LEVEL=3 unless set): its
  ERROR lines are noise here ("oneDNN supports DT_HALF only on platforms with AVX-512" at the
  first float16 batch, "failed call to cuInit" without a GPU) and its real errors raise.

  Call it before jax loads, not only before TensorFlow: jaxlib reads the variable when it loads
  and TensorFlow loaded after it keeps that level. Also keeps jax off a TPU this machine has
  not got (`skip_absent_tpu`)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  skip_absent_tpu()


# Google's PCI vendor id: a TPU chip on this machine shows it in /sys/bus/pci/devices/*/vendor.
TPU_PCI_VENDOR = "0x1ae0"


def has_tpu() -> bool:
  for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(path) as f:
        if f.read().strip() == TPU_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def skip_absent_tpu() -> None:
  """With libtpu installed (the `tpu` and `test` extras, for ahead-of-time compilation) but no
  TPU here, jax would try the TPU and print libtpu's start-up warnings: unless JAX_PLATFORMS is
  set, it lists the platforms other than the TPU (CUDA or ROCm when their plugin is installed,
  and the CPU)."""
  if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None or has_tpu():
    return
  others = [
      platform
      for platform, plugins in (
          ("cuda", ("jax_cuda12_plugin", "jax_cuda13_plugin")),
          ("rocm", ("jax_rocm60_plugin", "jax_rocm7_plugin")),
      )
      if any(importlib.util.find_spec(p) is not None for p in plugins)
  ]
  os.environ["JAX_PLATFORMS"] = ",".join(others + ["cpu"])


_TENSORFLOW_DEFERRED = []  # [True] once `quiet_libraries(defer_tensorflow=True)` ran


def quiet_libraries(*, defer_tensorflow: bool = False) -> None:
  """TensorFlow's C++ start-up lines and libraries' absl warnings out of the project's output;
  absl's verbosity becomes WARNING (the training loops print their own progress lines).

  With `defer_tensorflow`, TensorFlow is imported (quietly) by `import_deferred_tensorflow()`
  where the process first needs it, so a process that ends before (a config error) does not
  spend the seconds of importing it."""
  quiet_tensorflow_runtime()
  if defer_tensorflow:
    _TENSORFLOW_DEFERRED[:] = [True]
  else:
    _import_tensorflow_quietly()
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  # absl's own logger (libraries call absl.logging.warning) and the handler behind absl's
  # (records of other loggers): ABSLHandler hands records on without applying its filters.
  for filtered in (std_logging.getLogger("absl"), logging.get_absl_handler().python_handler):
    if not any(isinstance(f, LibraryNoiseFilter) for f in filtered.filters):
      filtered.addFilter(LibraryNoiseFilter())
