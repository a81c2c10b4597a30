"""Distillation: a student BERT trained on text with MLM + KD from a frozen video-language teacher.

  python -m vidlankd_jax.main --config=configs/distill.py:size=small,teacher_size=small,objectives=nst \
      --config.teacher.workdir=runs/teacher --config.data.data_dir=data --workdir=runs/student
  python -m vidlankd_jax.main --config=configs/distill.py:size=base,objectives=nst+crd \
      --config.teacher.workdir=runs/teacher_base --workdir=runs/student_base
  python -m vidlankd_jax.main --config=configs/distill.py:size=small,objectives=none \
      --workdir=runs/bert_baseline        # the text-only BERT baseline (no teacher needed)
  --config.train.profile_steps=10:15   # a jax.profiler trace of steps 11-15 in <workdir>/profile

`size` is the student (tiny|mini|small|base|large), `teacher_size` the teacher's language encoder
(default: the student's; a different size is distilled through the heads' projection to the
teacher's width). `objectives` is `+`-separated names declared in vidlankd_jax/objectives.py
(nst, ntxent, crd, kd, mse, cos, voken; docs/recipe.md tabulates them), or `none`: the text-only
BERT baseline (MLM alone).
Student loss = mlm_weight * MLM + sum_k weights[k] * KD_k, each KD term a per-example mean.
Defaults follow the paper: lr 2e-4, weight decay 0.01, clipping 1.0, batch 256; 12L/768H:
Wikipedia, 500K steps, warmup 5,000; 6L/512H: WikiText-103 for 40 epochs, warmup 10,000.
The corpus is read in order, as the released run (no --shuffle). `recipe=released` (default
`paper`) runs the released scripts where they differ from the paper: the 12L baselines' steps
(text-only 220K, voken 200K), weight decay on the KD heads' LayerNorm scales, and the released
teacher's architecture; docs/recipe.md.
"""

import copy
import os

from vidlankd_jax import configlib as common
from vidlankd_jax import objectives as kd_objectives

TEXT_TASKS = {"wiki103": "wiki103_mlm", "wikipedia": "wikipedia_mlm"}
# WikiText-103: about 0.95M blocks of 126 word pieces; 40 epochs at batch 256.
WIKI103_40_EPOCHS_STEPS = 150_000


def get_config(arg=None):
  arg = common.parse_arg(
      arg, size="tiny", teacher_size="", objectives="nst", data="", recipe="paper"
  )
  released = common.check_recipe(arg.recipe) == "released"
  teacher_size = arg.teacher_size or arg.size
  config = common.base_config(stage="distill", size=arg.size)

  teacher = common.load(
      os.path.join(os.path.dirname(__file__), "teacher.py"),
      f"size={teacher_size},recipe={arg.recipe}",
  )
  config.teacher = dict(
      # The teacher run's workdir (or its checkpoints/ folder). Only the language encoder's
      # params are read, never re-saved; required unless objectives=none. With objectives=none
      # a teacher, when given, is used by evaluation alone (closeness to the teacher).
      workdir="",
      size=teacher_size,
      step=-1,  # teacher checkpoint step to read; -1: the latest
      # What the teacher reads: "masked" (the student's input, as the released code) or
      # "unmasked" (the clean text). The voken baseline's labels always come from the clean
      # text, as vokenization's.
      input="masked",
  )
  # The teacher's architecture: must match its checkpoint (the fingerprint is checked). It
  # computes in `config.dtype`, like the student.
  config.teacher.model = copy.deepcopy(teacher.model.to_dict())
  config.teacher.video = copy.deepcopy(teacher.video.to_dict())

  config.kd = dict(
      objectives=arg.objectives,
      mlm_weight=1.0,
      # Each KD term is a per-example mean (independent of the batch size, the devices, gradient
      # accumulation and the sequence length); each weight is the released run's effective
      # strength (vidlankd_jax/objectives.py declares it with its arithmetic).
      weights=kd_objectives.default_weights(),
      # Each objective's own settings (documented where it is declared).
      **kd_objectives.default_settings(),
  )

  data = arg.data or ("wikipedia" if arg.size in ("base", "large") else "wiki103")
  if data not in TEXT_TASKS:
    raise ValueError(f"unknown data {data!r}; known: {sorted(TEXT_TASKS)}")
  config.data.task = TEXT_TASKS[data]
  # The released distillation reads the corpus in order (its scripts never pass --shuffle).
  config.data.shuffle = False
  config.train.batch_size = 256
  config.train.steps = 500_000 if data == "wikipedia" else WIKI103_40_EPOCHS_STEPS
  config.optimizer = common.optimizer_config(
      learning_rate=2e-4, warmup_steps=5_000 if data == "wikipedia" else 10_000
  )
  config.eval.every_steps = 5_000
  config.checkpoint.every_steps = 5_000
  config.checkpoint.best_metric = "eval/mlm_accuracy"
  config.checkpoint.best_mode = "max"

  if released:
    config.optimizer.decay_head_layer_norms = True
    if data == "wikipedia" and arg.objectives == "none":
      config.train.steps = 220_000  # VidLanKD scripts/base_wiki.bash
    if data == "wikipedia" and arg.objectives == "voken":
      config.train.steps = 200_000  # vokenization scripts/base_vlm_wiki.bash

  if arg.size == "tiny":
    common.shrink_to_tiny(config)
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 20
    config.kd.crd.num_negatives = 256
    config.kd.ntxent_group_size = 8
    # The strength the released code's normalisation gives at these shapes (NST 32 / L at
    # L = 32, NT-Xent 1 / (2 x 8)): the tiny runs distil as hard as the released code would.
    config.kd.weights = kd_objectives.released_weights(config)
    config.kd.voken.num_clips = 512
    # Tests and the CPU demo shuffle their few blocks (their figures were made so).
    config.data.shuffle = True
  config.lock()
  return config
