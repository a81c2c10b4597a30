"""Imports the released VidLanKD PyTorch checkpoints as workdirs our stages read directly.

  # A teacher folder (config.json, pytorch_model.bin, visn_model.chkpt) -> a teacher workdir
  python tools/import_vidlankd.py teacher --model_dir howto100m_bert_small_vokenhinge/checkpoint-epoch0019 \\
      --workdir runs/released_teacher_small
  python -m vidlankd_jax.main --config=configs/distill.py:size=small,teacher_size=small \\
      --config.teacher.workdir=runs/released_teacher_small --workdir=runs/student

  # A student folder (config.json, pytorch_model.bin) -> a distillation workdir
  python tools/import_vidlankd.py student --model_dir wiki103_bert_small_vokenmmd/checkpoint-epoch0039 \\
      --workdir runs/released_student_small
  python -m vidlankd_jax.main --config=configs/finetune.py:task=sst2,init=runs/released_student_small \\
      --workdir=runs/finetune/sst2

The workdir gets `checkpoints/` (step 0, written by our CheckpointManager with the fingerprint a
teacher or distillation run of the same architecture writes, and a fresh optimiser state, so a run
can also continue training from it) and `config.json` (the resolved config). The key map is in
`vidlankd_jax/interop/vidlankd_torch.py`. The printed config overrides are what a distillation run
needs when the architecture is not one of the named sizes.
"""

from __future__ import annotations

import argparse
import os
import sys

from flax import nnx

from vidlankd_jax import errors
from vidlankd_jax import checkpoint as ckpt_lib
from vidlankd_jax import configlib
from vidlankd_jax import runs
from vidlankd_jax import sharding
from vidlankd_jax import train_state as ts
from vidlankd_jax.interop import hf_bert, vidlankd_torch
from vidlankd_jax.models.bert import BertConfig
from vidlankd_jax.models.student import Student
from vidlankd_jax.models.teacher import Teacher

ARCHITECTURE = runs.ARCHITECTURE_KEYS + ("layer_norm_eps",)


def named_size(cfg: BertConfig) -> str | None:
  """The configlib.MODEL_SIZES size with this shape (layers, hidden, heads, FFN), if any."""
  shape = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size)
  return next((name for name, dims in configlib.MODEL_SIZES.items() if dims == shape), None)


def _set_architecture(section, cfg: BertConfig, prefix: str, overrides: list[str]) -> None:
  """Writes `cfg`'s sizes into a config section; records the ones that differ from its defaults."""
  for key in ARCHITECTURE:
    value = getattr(cfg, key)
    if section[key] != value:
      overrides.append(f"--config.{prefix}.{key}={value}")
      section[key] = value


def teacher_config(language: BertConfig, video: dict[str, int]) -> tuple[object, list[str]]:
  """A teacher config (configs/teacher.py at the matching size) describing the released weights,
  and the `teacher.*` overrides a distillation config needs beyond `teacher_size=<size>`."""
  size = named_size(language) or "base"
  config = configlib.load("teacher", f"size={size}")
  overrides: list[str] = []
  video_cfg = BertConfig(
      **{
          **{k: getattr(language, k) for k in ARCHITECTURE},
          "type_vocab_size": video["type_vocab_size"],
      }
  )
  with config.unlocked():
    _set_architecture(config.model, language, "teacher.model", overrides)
    _set_architecture(config.video, video_cfg, "teacher.video", overrides)
    for key in ("input_dim", "projection_dim"):
      if config.video[key] != video[key]:
        overrides.append(f"--config.teacher.video.{key}={video[key]}")
        config.video[key] = video[key]
    config.video.max_steps = min(config.video.max_steps, video["max_steps"])
    config.video.embedding_passes = 2
  config.model.size = config.video.size = size
  return config, overrides


def student_config(
    language: BertConfig, objectives: tuple[str, ...], teacher_hidden: int
) -> tuple[object, list[str]]:
  """A distillation config (configs/distill.py) whose student is the released one."""
  size = named_size(language) or "base"
  teacher_size = next(
      (n for n, dims in configlib.MODEL_SIZES.items() if dims[1] == teacher_hidden), size
  )
  config = configlib.load(
      "distill",
      f"size={size},teacher_size={teacher_size},objectives={'+'.join(objectives) or 'none'}",
  )
  overrides: list[str] = []
  with config.unlocked():
    _set_architecture(config.model, language, "model", overrides)
    if config.teacher.model.hidden_size != teacher_hidden:
      overrides.append(f"--config.teacher.model.hidden_size={teacher_hidden}")
      config.teacher.model.hidden_size = teacher_hidden
  config.model.size = size
  return config, overrides


def write_workdir(config, model: nnx.Module, tx, workdir: str) -> None:
  """Step-0 checkpoint of `model`'s params (fresh optimiser state) plus config.json."""
  manager_dir = os.path.join(workdir, "checkpoints")
  ckpt = ckpt_lib.CheckpointManager(
      manager_dir,
      every_steps=config.checkpoint.every_steps,
      keep=config.checkpoint.keep,
      best_metric=config.checkpoint.best_metric,
      best_mode=config.checkpoint.best_mode,
      async_save=False,
      fingerprint=ckpt_lib.fingerprint(config),
  )
  try:
    if ckpt.latest_step() is not None:
      raise errors.ConfigError(
          f"{manager_dir} already holds checkpoints (step {ckpt.latest_step()}); "
          "import into a new workdir"
      )
    _, params, _ = ts.nnx_params(model)
    ckpt.save(0, ts.init_train_state(tx, params), force=True)
  finally:
    ckpt.close()
  runs.write_config(config, workdir)


def _build(ctor, config):
  return sharding.create_sharded(ctor, sharding.single_device_mesh(), config.sharding_rules)


def import_teacher(model_dir: str, workdir: str, language_file: str = "", video_file: str = ""):
  """Released teacher folder -> teacher workdir; returns (config, distillation overrides)."""
  language_path = language_file or os.path.join(model_dir, vidlankd_torch.LANGUAGE_FILE)
  video_path = video_file or os.path.join(model_dir, vidlankd_torch.VIDEO_FILE)
  language = hf_bert.config_from_hf(vidlankd_torch.read_hf_config(model_dir))
  video_state = vidlankd_torch.read_checkpoint(video_path)
  video = vidlankd_torch.video_architecture(video_state, video_path)
  if (video["hidden_size"], video["num_layers"], video["intermediate_size"]) != (
      language.hidden_size,
      language.num_layers,
      language.intermediate_size,
  ):
    raise errors.DataError(
        f"{video_path}: video model of hidden {video['hidden_size']}, "
        f"{video['num_layers']} layers, FFN {video['intermediate_size']} does not share "
        f"{model_dir}/config.json's sizes (the released video model uses the language config)"
    )
  config, overrides = teacher_config(language, video)
  teacher = _build(lambda: Teacher.from_config(config, rngs=nnx.Rngs(config.seed)), config)
  vidlankd_torch.load_language(
      teacher.language, vidlankd_torch.read_checkpoint(language_path), language_path
  )
  vidlankd_torch.load_video(teacher.video, video_state, video_path)
  write_workdir(config, teacher, ts.make_optimizer(config.optimizer, config.train.steps), workdir)
  return config, overrides


def import_student(model_dir: str, workdir: str, language_file: str = ""):
  """Released student folder -> distillation workdir; returns (config, overrides)."""
  path = language_file or os.path.join(model_dir, vidlankd_torch.LANGUAGE_FILE)
  language = hf_bert.config_from_hf(vidlankd_torch.read_hf_config(model_dir))
  state = vidlankd_torch.read_checkpoint(path)
  objectives = vidlankd_torch.student_objectives(state)
  teacher_hidden = vidlankd_torch.head_output_size(state) or language.hidden_size
  config, overrides = student_config(language, objectives, teacher_hidden)
  student = _build(
      lambda: Student(
          BertConfig.from_config(config.model),
          objectives,
          teacher_hidden_size=teacher_hidden,
          rngs=nnx.Rngs(config.seed),
      ),
      config,
  )
  vidlankd_torch.load_student(student, state, path)
  write_workdir(config, student, ts.make_optimizer(config.optimizer, config.train.steps), workdir)
  return config, overrides


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("kind", choices=("teacher", "student"))
  parser.add_argument(
      "--model_dir",
      required=True,
      help="released checkpoint folder (config.json, pytorch_model.bin[, visn_model.chkpt])",
  )
  parser.add_argument("--workdir", required=True, help="new workdir to write")
  parser.add_argument(
      "--language_file",
      default="",
      help="language model file (default: <model_dir>/pytorch_model.bin)",
  )
  parser.add_argument(
      "--video_file", default="", help="teacher video model (default: <model_dir>/visn_model.chkpt)"
  )
  args = parser.parse_args(argv)
  if args.kind == "teacher":
    config, overrides = import_teacher(
        args.model_dir, args.workdir, args.language_file, args.video_file
    )
    what = f"teacher (size {config.model.size}, video input {config.video.input_dim})"
    overrides.append("--config.teacher.video.embedding_passes=2")
  else:
    if args.video_file:
      parser.error("--video_file is for teachers")
    config, overrides = import_student(args.model_dir, args.workdir, args.language_file)
    what = f"student (size {config.model.size}, objectives {config.kd.objectives})"
  print(f"imported {what} from {args.model_dir} into {args.workdir}")
  if overrides:
    print("a distillation run reading it needs: " + " ".join(overrides))
  return 0


if __name__ == "__main__":
  sys.exit(errors.run_tool(main))
