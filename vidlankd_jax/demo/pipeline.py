"""Every VidLanKD stage, end to end at tiny size, through `vidlankd_jax.main.run` and the real tools.

  vidlankd demo --workdir runs/demo            # minutes on a laptop CPU
  vidlankd demo --workdir runs/demo --fresh    # redo every stage

Stages (each in `<workdir>/<stage>/`, reused when finished with the same settings):
  data          Wikipedia sample -> text TFRecords; GENERATED video-text corpus -> HowTo100M
                layout -> converter; movie-review polarity TSVs
  teacher       teacher pretraining (contrastive + MLM) on the generated video-text pairs
  student_nst   student distilled with NST from the teacher, on the Wikipedia text
  student_base  the text-only baseline (objectives=none): same data, steps and seed
  finetune_nst / finetune_base   both students fine-tuned on movie-review polarity, several seeds
  probe         token-to-clip grounding probe on held-out clips; heatmap
then the report (always redrawn): `<workdir>/summary.md`, `loss_curves.png`, `grounding.png`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

from vidlankd_jax import configlib
from vidlankd_jax.demo import data as demo_data
from vidlankd_jax.demo import report
from vidlankd_jax.demo.stages import StageRunner, json_ready


@dataclasses.dataclass(frozen=True)
class DemoSize:
  """How big each stage is. `demo` fits in minutes on 2 CPU cores; `test` in seconds.

  Steps of None keep the tiny configs' own schedules (configs/teacher.py, configs/distill.py).
  """

  teacher_steps: int | None
  distill_steps: int | None
  videos: int
  validation_videos: int
  concepts: int
  articles: int
  finetune_epochs: float
  seeds: str
  probe_train_clips: int
  eval_batches: int


SIZES = {
    "demo": DemoSize(
        teacher_steps=600,
        distill_steps=300,
        videos=200,
        validation_videos=40,
        concepts=16,
        articles=100,
        finetune_epochs=4.0,
        seeds="1,2,3",
        probe_train_clips=2000,
        eval_batches=8,
    ),
    "test": DemoSize(
        teacher_steps=16,
        distill_steps=8,
        videos=48,
        validation_videos=16,
        concepts=8,
        articles=12,
        finetune_epochs=0.5,
        seeds="1",
        probe_train_clips=128,
        eval_batches=2,
    ),
}
STAGES = (
    "data",
    "teacher",
    "student_nst",
    "student_base",
    "finetune_nst",
    "finetune_base",
    "probe",
)
STUDENTS = {"nst": "student_nst", "base": "student_base"}


def teacher_config(workdir: str, size: DemoSize):
  """configs/teacher.py at tiny size on the demo's generated corpus."""
  config = configlib.load("teacher", "size=tiny")
  config.data.data_dir = os.path.join(workdir, "data")
  config.train.steps = size.teacher_steps or config.train.steps
  config.train.log_every = max(1, config.train.steps // 10)
  config.eval.every_steps = config.checkpoint.every_steps = config.train.steps
  return config


def student_config(workdir: str, size: DemoSize, objectives: str):
  """configs/distill.py at tiny size on the Wikipedia sample, from the demo's teacher."""
  config = configlib.load("distill", f"size=tiny,objectives={objectives},data=wikipedia")
  config.data.data_dir = os.path.join(workdir, "data")
  # The baseline keeps the teacher for evaluation only (its closeness to the teacher).
  config.teacher.workdir = os.path.join(workdir, "teacher")
  if size.distill_steps:
    config.train.steps = size.distill_steps
    config.optimizer.warmup_steps = max(1, size.distill_steps // 10)
  config.train.log_every = max(1, config.train.steps // 10)
  config.eval.every_steps = config.checkpoint.every_steps = config.train.steps
  config.eval.batches = size.eval_batches
  return config


def finetune_config(workdir: str, size: DemoSize, student: str):
  """configs/finetune.py on movie-review polarity, from a student's workdir."""
  config = configlib.load(
      "finetune", f"task={demo_data.BENCHMARK},size=auto,init={os.path.join(workdir, student)}"
  )
  config.data.data_dir = os.path.join(workdir, "data", "polarity")
  config.data.benchmarks_module = demo_data.BENCHMARKS_MODULE
  config.data.seq_len = 64
  config.data.shuffle_buffer = 256
  config.seeds = size.seeds
  config.train.batch_size = 16
  config.train.epochs = size.finetune_epochs
  config.train.log_every = 10
  config.optimizer.learning_rate = 1e-3
  config.eval.batch_size = 32
  return config


def config_settings(config) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def run_stage_config(config, stage_dir: str) -> dict:
  """One training stage exactly as `python -m vidlankd_jax.main` runs it."""
  from vidlankd_jax import main as main_lib

  return {k: float(v) for k, v in main_lib.run(config, stage_dir).items()}


def make_data(stage_dir: str, size: DemoSize, log) -> dict:
  from vidlankd_jax.data import synthetic
  from vidlankd_jax.data import vocab as vocab_lib

  vocab_file = vocab_lib.default_vocab_file()
  log(
      f"text: gensim's real English Wikipedia sample ({size.articles} articles at most) -> "
      "126-token blocks (data/text.py, as tools/make_text_tfrecords.py)"
  )
  text = demo_data.make_text_tfrecords(stage_dir, vocab_file, max_articles=size.articles, log=log)
  tcfg = configlib.load("teacher", "size=tiny")
  log(
      "video-text: a GENERATED corpus (concept prototypes plus noise, captions from real English "
      "sentences) in HowTo100M's layout, converted by the real converter. It is not real video."
  )
  synthetic.prepare_video_text(
      stage_dir,
      num_videos=size.videos,
      num_concepts=size.concepts,
      num_validation_videos=size.validation_videos,
      word_budget=tcfg.data.seq_len // 2,
      max_steps=tcfg.video.max_steps,
      log=log,
  )
  with open(os.path.join(stage_dir, "howto100m", "howto100m-summary.json"), encoding="utf-8") as f:
    video = json.load(f)["splits"]
  polarity = demo_data.write_polarity_benchmark(os.path.join(stage_dir, "polarity"))
  log(
      f"downstream: movie-review polarity, {polarity['train']} train / {polarity['validation']} "
      "validation sentences (real, from gensim's test data)"
  )
  return {
      "text_blocks": {s: text[s]["blocks"] for s in text},
      "text_documents": {s: text[s]["documents"] for s in text},
      "video_clips": {s: video[s]["clips"] for s in video},
      "videos": size.videos,
      "concepts": size.concepts,
      "polarity": polarity,
  }


def finetune_stage(config, stage_dir: str) -> dict:
  run_stage_config(config, stage_dir)
  with open(os.path.join(stage_dir, "results.json"), encoding="utf-8") as f:
    results = json.load(f)
  return {
      k: results[k]
      for k in (
          "summary",
          "majority_baseline",
          "train_examples",
          "train_steps",
          "seeds",
          "primary_metric",
      )
  }


def run_demo(
    workdir: str, *, size: str = "demo", steps: int | None = None, fresh: bool = False, log=print
) -> dict:
  """Runs (or reuses) every stage and writes `<workdir>/summary.md`; returns the summary data."""
  if size not in SIZES:
    raise ValueError(f"unknown demo size {size!r}; known: {sorted(SIZES)}")
  sizes = SIZES[size]
  if steps is not None:
    if steps <= 0:
      raise ValueError(f"--steps must be positive, got {steps}")
    sizes = dataclasses.replace(sizes, teacher_steps=steps, distill_steps=steps)
  workdir = os.path.abspath(workdir)
  if fresh:
    for name in STAGES:
      shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
  os.makedirs(workdir, exist_ok=True)
  started = time.perf_counter()
  runner = StageRunner(workdir, len(STAGES) + 1, log)
  log(f"VidLanKD demo ({size}): every stage at tiny size in {workdir}")

  runner.run(
      "data",
      "data: Wikipedia text, generated video-text corpus, polarity benchmark",
      {k: getattr(sizes, k) for k in ("videos", "validation_videos", "concepts", "articles")},
      lambda d: make_data(d, sizes, log),
  )
  tcfg = teacher_config(workdir, sizes)
  runner.run(
      "teacher",
      f"teacher pretraining on the generated video-text pairs ({tcfg.train.steps} steps)",
      config_settings(tcfg),
      lambda d: run_stage_config(tcfg, d),
      after=("data",),
  )
  scfgs = {
      "nst": student_config(workdir, sizes, "nst"),
      "base": student_config(workdir, sizes, "none"),
  }
  for name, title in (
      ("nst", "student distilled with NST from the teacher"),
      ("base", "text-only baseline student (objectives=none), same budget"),
  ):
    cfg = scfgs[name]
    runner.run(
        STUDENTS[name],
        f"{title} ({cfg.train.steps} steps on Wikipedia text)",
        config_settings(cfg),
        lambda d, cfg=cfg: run_stage_config(cfg, d),
        after=("data", "teacher"),
    )
  for name in ("nst", "base"):
    cfg = finetune_config(workdir, sizes, STUDENTS[name])
    runner.run(
        f"finetune_{name}",
        f"fine-tuning the {name} student on movie-review polarity " f"(seeds {cfg.seeds})",
        config_settings(cfg),
        lambda d, cfg=cfg: finetune_stage(cfg, d),
        after=("data", STUDENTS[name]),
    )

  def probe_stage(stage_dir):
    from vidlankd_jax.demo import probe

    configs = {**scfgs, "untrained": scfgs["base"]}
    workdirs = {
        "nst": runner.stage_dir("student_nst"),
        "base": runner.stage_dir("student_base"),
        "untrained": None,
    }
    return json_ready(
        probe.run_probe(
            teacher_config=tcfg,
            student_configs=configs,
            student_workdirs=workdirs,
            out_dir=stage_dir,
            max_train_clips=sizes.probe_train_clips,
            max_test_clips=int(tcfg.eval.retrieval_clips),
            log=log,
        )
    )

  runner.run(
      "probe",
      "grounding probe: token-to-clip retrieval on held-out clips",
      {"probe_train_clips": sizes.probe_train_clips},
      probe_stage,
      after=("teacher", "student_nst", "student_base"),
  )
  log(
      f"\n=== [{len(STAGES) + 1}/{len(STAGES) + 1}] report: loss curves, grounding heatmap, summary table ==="
  )
  steps = {"teacher": int(tcfg.train.steps), "student": int(scfgs["nst"].train.steps)}
  summary_path = report.write_report(
      workdir, runner.records, steps=steps, total_seconds=time.perf_counter() - started
  )
  with open(summary_path, encoding="utf-8") as f:
    log("\n" + f.read())
  log(f"demo finished in {time.perf_counter() - started:.0f} s; summary: {summary_path}")
  return {name: dataclasses.asdict(record) for name, record in runner.records.items()}
