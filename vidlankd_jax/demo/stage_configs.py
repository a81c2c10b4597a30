"""The demo's training configs: the tiny stage configs on the demo's data, at the demo's steps.

Every demo command (`vidlankd demo`, its transfer experiment, `vidlankd ablate`) builds its
teacher and student runs here, so a stage means the same wherever it runs.
"""

from __future__ import annotations

from vidlankd_jax import configlib


def teacher_config(
    data_dir: str, steps: int | None = None, size: str = "tiny", *, seed: int = 0, logs: int = 5
):
  """configs/teacher.py at tiny size on the video-text pairs of `data_dir`, `steps` steps (None:
  the tiny config's own), about `logs` log lines; a `size` above tiny keeps the tiny shapes
  (sequence length, batch, schedule, clip length, projection) and changes both towers alone."""
  config = configlib.load("teacher", "size=tiny")
  if size != "tiny":
    sized = configlib.load("teacher", f"size={size}")
    config.model = sized.model
    sized.video.max_steps = config.video.max_steps
    sized.video.projection_dim = config.video.projection_dim
    config.video = sized.video
  config.data.data_dir = data_dir
  config.seed = seed
  config.train.steps = steps or config.train.steps
  config.train.log_every = max(1, config.train.steps // logs)
  config.eval.every_steps = config.checkpoint.every_steps = config.train.steps
  return config


def student_config(
    data_dir: str,
    teacher_dir: str,
    objectives: str,
    *,
    steps: int | None = None,
    seed: int = 0,
    teacher_size: str = "tiny",
    kd_weight_scale: float = 1.0,
    logs: int = 5,
    eval_batches: int = 2,
):
  """configs/distill.py at tiny size on the text of `data_dir`, from the teacher run in
  `teacher_dir` (a `teacher_size` above tiny: its architecture read from the run's config.json),
  every KD weight times `kd_weight_scale`; `steps` None keeps the tiny config's schedule."""
  from vidlankd_jax import runs

  config = configlib.load("distill", f"size=tiny,objectives={objectives},data=wikipedia")
  if teacher_size != "tiny":
    teacher = runs.Run(teacher_dir).require_config("teacher")
    config.teacher.model = teacher.model
    config.teacher.video = teacher.video
    config.teacher.size = teacher_size
  config.data.data_dir = data_dir
  config.teacher.workdir = teacher_dir
  config.seed = seed
  for term in config.kd.weights:
    config.kd.weights[term] *= kd_weight_scale
  if steps:
    config.train.steps = steps
    config.optimizer.warmup_steps = max(1, steps // 10)
  config.train.log_every = max(1, config.train.steps // logs)
  config.eval.every_steps = config.checkpoint.every_steps = config.train.steps
  config.eval.batches = eval_batches
  return config
