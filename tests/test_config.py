"""Configs: sizes, command-line overrides, locked keys, and the entry point's stage dispatch."""

import subprocess
import sys

import pytest
import json

import ml_collections

from vidlankd_jax import configlib as common


def teacher_config(arg):
  return common.load("teacher", arg)


def parse(*args):
  """The config main.py's flags resolve from these command-line arguments (in a subprocess)."""
  script = (
      "import sys; from absl import app, flags; from vidlankd_jax import main; "
      "app.run(lambda argv: print(flags.FLAGS.config.to_json()))"
  )
  proc = subprocess.run(
      [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120
  )
  if proc.returncode:
    raise ValueError(proc.stderr[-2000:])
  return ml_collections.ConfigDict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_sizes_are_the_papers():
  assert common.MODEL_SIZES["small"] == (6, 512, 8, 2048)
  assert common.MODEL_SIZES["base"] == (12, 768, 12, 3072)
  c = teacher_config("size=small")
  assert (
      c.model.num_layers,
      c.model.hidden_size,
      c.model.num_heads,
      c.model.intermediate_size,
  ) == (6, 512, 8, 2048)
  assert c.video.hidden_size == 512 and c.optimizer.learning_rate == 5e-5


def test_command_line_overrides_apply():
  c = parse(
      "--config=configs/teacher.py:size=small,video_size=base",
      "--config.train.steps=10",
      "--config.loss.contrastive=info_nce",
      "--config.model.attention_impl=cudnn",
  )
  assert c.model.hidden_size == 512 and c.video.hidden_size == 768
  assert c.train.steps == 10 and c.loss.contrastive == "info_nce"
  assert c.model.attention_impl == "cudnn"


def test_misspelt_keys_are_errors_that_name_them():
  with pytest.raises(ValueError, match="stepz"):
    parse("--config=configs/teacher.py:size=tiny", "--config.train.stepz=10")
  with pytest.raises(ValueError, match="sise"):
    teacher_config("sise=small")
  with pytest.raises(ValueError, match="unknown model size 'huge'"):
    teacher_config("size=huge")
  c = teacher_config("size=tiny")
  with pytest.raises(AttributeError, match="stepz"):
    c.train.stepz = 3


def test_main_rejects_an_unknown_stage_and_writes_nothing(tmp_path):
  script = (
      "import sys; sys.argv=['m', '--config=configs/teacher.py:size=tiny', "
      f"'--config.stage=nonsense', '--workdir={tmp_path}']; "
      "from absl import app; from vidlankd_jax import main; app.run(main.main)"
  )
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "config.stage 'nonsense'" in proc.stderr
  assert not (tmp_path / "config.json").exists()
