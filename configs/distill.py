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
teacher's width). `objectives` is `+`-separated:
  nst      neuron selectivity transfer (the released models' objective)
  ntxent   in-batch NT-Xent at every token position (the released "CRD")
  crd      memory-bank CRD (Tian et al.), the memory in the training state
  kd       soft-label KD: KL between the teacher's and student's MLM distributions
  mse      hidden-state regression;  cos  cosine distance
  voken    the vokenization baseline: voken classification against a bank of teacher clip vectors
  none     the text-only BERT baseline (MLM alone)
Student loss = mlm_weight * MLM + sum_k weights[k] * KD_k. Defaults follow the paper: lr 2e-4,
weight decay 0.01, clipping 1.0, batch 256; 12L/768H: Wikipedia, 500K steps, warmup 5,000;
6L/512H: WikiText-103 for 40 epochs, warmup 10,000.
"""

import copy
import os

from vidlankd_jax import configlib as common

TEXT_TASKS = {"wiki103": "wiki103_mlm", "wikipedia": "wikipedia_mlm"}
# WikiText-103: about 0.95M blocks of 126 word pieces; 40 epochs at batch 256.
WIKI103_40_EPOCHS_STEPS = 150_000


def get_config(arg=None):
  arg = common.parse_arg(arg, size="tiny", teacher_size="", objectives="nst", data="")
  teacher_size = arg.teacher_size or arg.size
  config = common.base_config(stage="distill", size=arg.size)

  teacher = common.load(
      os.path.join(os.path.dirname(__file__), "teacher.py"), f"size={teacher_size}"
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
      # Each KD term is a per-example mean (independent of the batch size, the devices and
      # gradient accumulation); the weights give the released effective strength
      # (docs/recipe.md derives them): NST 32 / 128 (the released per-GPU batch over L, its
      # sum over a call's sequences divided by L); NT-Xent 1 / (2 x 32) (the released call
      # divides its mean again by 2B).
      weights=dict(nst=0.25, ntxent=1 / 64, crd=1.0, kd=1.0, mse=1.0, cos=1.0, voken=1.0),
      # "released": sum over sequences / L, padding included, teacher-teacher term dropped;
      # "mmd": the masked squared MMD, mean over sequences (>= 0).
      nst_variant="released",
      ntxent_temperature=1.0,
      # NT-Xent draws its negatives within groups of this many sequences: 32, the released
      # per-GPU batch (2 x 32 - 2 = 62 negatives per anchor); 0: the whole (micro-)batch.
      ntxent_group_size=32,
      soft_label_temperature=1.0,
      crd=dict(
          # Rows of each memory (student and teacher), sharded over the data axes: one per
          # example, an example's row its `example_id` (tools/make_text_tfrecords.py writes
          # them). 0: as many as the corpus has examples (its summary JSON); a smaller size is
          # an error. Memory: 2 x rows x teacher hidden x 4 bytes.
          memory_size=0,
          # True: rows from a hash of the token ids instead, modulo memory_size (> 0); examples
          # share rows and read each other's memory as positives (the expected rate is printed).
          hash_rows=False,
          num_negatives=16_384,
          temperature=0.07,
          momentum=0.5,
      ),
      voken=dict(
          # A HowTo100M-layout data dir (the teacher's): the teacher's clip vectors of its
          # held-out (validation) clips form the voken bank.
          data_dir="",
          num_clips=10_000,
          # 0: every clip vector is a voken; > 0: that many spherical k-means centroids of them.
          num_vokens=0,
          kmeans_iters=20,
      ),
  )

  data = arg.data or ("wikipedia" if arg.size in ("base", "large") else "wiki103")
  if data not in TEXT_TASKS:
    raise ValueError(f"unknown data {data!r}; known: {sorted(TEXT_TASKS)}")
  config.data.task = TEXT_TASKS[data]
  config.train.batch_size = 256
  config.train.steps = 500_000 if data == "wikipedia" else WIKI103_40_EPOCHS_STEPS
  config.optimizer = common.optimizer_config(
      learning_rate=2e-4, warmup_steps=5_000 if data == "wikipedia" else 10_000
  )
  config.eval.every_steps = 5_000
  config.checkpoint.every_steps = 5_000
  config.checkpoint.best_metric = "eval/mlm_accuracy"
  config.checkpoint.best_mode = "max"

  if arg.size == "tiny":
    common.shrink_to_tiny(config)
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 20
    config.kd.crd.num_negatives = 256
    config.kd.ntxent_group_size = 8
    # The released normalisations at these shapes: NST's 32 / L at L = 32, NT-Xent's 1 / (2 x 8).
    config.kd.weights.nst = 1.0
    config.kd.weights.ntxent = 1 / 16
    config.kd.voken.num_clips = 512
  config.lock()
  return config
