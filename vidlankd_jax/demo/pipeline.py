"""Every VidLanKD stage, end to end at tiny size, through `vidlankd_jax.main.run` and the real tools.

  vidlankd demo --workdir runs/demo            # minutes on a laptop CPU
  vidlankd demo --workdir runs/demo --fresh    # redo every stage
  vidlankd demo --workdir runs/demo --seed 3   # another world, initialisation, masking, order

Stages (each in `<workdir>/<stage>/`, reused when finished with the same settings):
  data          Wikipedia sample -> text TFRecords; the GENERATED world (`data/world.py`:
                concepts whose visual attributes only the clips carry) -> HowTo100M layout ->
                converter, its shuffled-pair twin and its attribute-free student text;
                movie-review polarity TSVs
  teacher       teacher pretraining (contrastive + MLM) on the world's video-text pairs
  teacher_shuffled   the same on the shuffled pairs (the control teacher)
  transfer      the headline experiment (`demo/transfer.py`): students distilled on the world's
                text (NST, other objectives, text only, from the shuffled teacher, untrained),
                several seeds, read by one frozen probe on held-out concepts
  student_nst   student distilled with NST from the teacher, on the Wikipedia text
  student_base  the text-only baseline (objectives=none): same data, steps and seed
  finetune_nst / finetune_base   both students fine-tuned on movie-review polarity, several seeds
  probe         token-to-clip grounding probe on held-out clips; heatmap
then the report (always redrawn): `<workdir>/summary.md` (led by the transfer table),
`results.json`, `transfer.png`, `transfer_tokens.png`, `loss_curves.png`, `grounding.png`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

from vidlankd_jax import errors
from vidlankd_jax import configlib
from vidlankd_jax.data import shards as shards_lib
from vidlankd_jax.demo import data as demo_data
from vidlankd_jax.demo import report
from vidlankd_jax.demo import stage_configs
from vidlankd_jax.demo import transfer
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
  # The transfer experiment: the world's student text, the students' steps and seeds, the KD
  # objectives besides NST.
  student_sentences: int
  transfer_steps: int
  transfer_seeds: int
  transfer_objectives: tuple[str, ...]


SIZES = {
    "demo": DemoSize(
        teacher_steps=400,
        distill_steps=300,
        videos=1000,
        validation_videos=40,
        concepts=48,
        articles=100,
        finetune_epochs=4.0,
        seeds="1,2,3",
        probe_train_clips=2000,
        eval_batches=8,
        student_sentences=16000,
        transfer_steps=transfer.STUDENT_STEPS,
        transfer_seeds=3,
        transfer_objectives=("cos",),
    ),
    "test": DemoSize(
        teacher_steps=16,
        distill_steps=8,
        videos=64,
        validation_videos=16,
        concepts=16,
        articles=12,
        finetune_epochs=0.5,
        seeds="1",
        probe_train_clips=128,
        eval_batches=2,
        student_sentences=800,
        transfer_steps=8,
        transfer_seeds=1,
        transfer_objectives=(),
    ),
}
STAGES = (
    "data",
    "teacher",
    "teacher_shuffled",
    "transfer",
    "student_nst",
    "student_base",
    "finetune_nst",
    "finetune_base",
    "probe",
)
WORLD = "world"  # the generated world's folder inside the data stage
STUDENTS = {"nst": "student_nst", "base": "student_base"}


def teacher_config(workdir: str, size: DemoSize, *, seed: int = 0, pairs: str = "video"):
  """The demo's teacher on the world's true (`video`) or shuffled pairs."""
  data_dir = os.path.join(workdir, "data", WORLD, pairs)
  return stage_configs.teacher_config(data_dir, size.teacher_steps, seed=seed, logs=10)


def student_config(workdir: str, size: DemoSize, objectives: str, *, seed: int = 0):
  """A student on the Wikipedia sample, from the demo's teacher (the text-only baseline keeps it
  for evaluation only: its closeness to the teacher)."""
  return stage_configs.student_config(
      os.path.join(workdir, "data"),
      os.path.join(workdir, "teacher"),
      objectives,
      steps=size.distill_steps,
      seed=seed,
      logs=10,
      eval_batches=size.eval_batches,
  )


def finetune_seeds(seeds: str, seed: int) -> str:
  """The size's fine-tuning seeds, shifted by `--seed` (seed 0 keeps them)."""
  values = [int(s) for s in seeds.split(",")]
  return ",".join(str(v + seed * len(values)) for v in values)


def finetune_config(workdir: str, size: DemoSize, student: str, *, seed: int = 0):
  """configs/finetune.py on movie-review polarity, from a student's workdir."""
  config = configlib.load(
      "finetune", f"task={demo_data.BENCHMARK},size=auto,init={os.path.join(workdir, student)}"
  )
  config.data.data_dir = os.path.join(workdir, "data", "polarity")
  config.data.benchmarks_module = demo_data.BENCHMARKS_MODULE
  config.data.seq_len = 64
  config.data.shuffle_buffer = 256
  config.seeds = finetune_seeds(size.seeds, seed)
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


def make_data(stage_dir: str, size: DemoSize, seed: int, log) -> dict:
  from vidlankd_jax.data import vocab as vocab_lib
  from vidlankd_jax.data import world as world_lib

  vocab_file = vocab_lib.default_vocab_file()
  log(
      f"text: gensim's real English Wikipedia sample ({size.articles} articles at most) -> "
      "126-token blocks (data/text.py, as tools/make_text_tfrecords.py)"
  )
  text = demo_data.make_text_tfrecords(stage_dir, vocab_file, max_articles=size.articles, log=log)
  tcfg = configlib.load("teacher", "size=tiny")
  log(
      "video-text: a GENERATED world (clip features built from the concepts' visual attributes "
      "plus noise, captions from real English sentences) in HowTo100M's layout, converted by the "
      "real converter. It is not real video."
  )
  world = world_lib.write_world(
      os.path.join(stage_dir, WORLD),
      num_concepts=size.concepts,
      num_videos=size.videos,
      num_validation_videos=size.validation_videos,
      student_sentences=size.student_sentences,
      probe_per_concept=6,
      word_budget=tcfg.data.seq_len // 2,
      max_steps=tcfg.video.max_steps,
      vocab_file=vocab_file,
      seed=seed,
      log=log,
  )
  video = {s: {"clips": n} for s, n in world["video_clips"]["video"].items()}
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
      "world": world,
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


def records_world(runner) -> dict:
  """The generated world's description (`world.json`) the data stage wrote."""
  with open(os.path.join(runner.stage_dir("data"), WORLD, "world.json"), encoding="utf-8") as f:
    return json.load(f)


DEMO_FILE = "demo.json"  # which demo a workdir holds: its size, seed and steps


def claim_workdir(workdir: str, identity: dict, *, fresh: bool) -> None:
  """Records which demo `workdir` holds; another size, seed or step count is refused, naming the
  folder, rather than replacing the finished stages (--fresh replaces them on purpose)."""
  path = os.path.join(workdir, DEMO_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      held = json.load(f)
  except (OSError, ValueError):
    held = None
  if held is not None and held != identity and not fresh:
    what = ", ".join(f"{k} {held.get(k)}" for k in identity if held.get(k) != identity[k])
    raise errors.ConfigError(
        f"{workdir} holds the demo of {what}; its finished stages are kept",
        path,
        "give this run another --workdir (or --fresh to replace that demo)",
    )
  if held != identity:
    shards_lib.write_json_atomic(path, identity)


def run_demo(
    workdir: str,
    *,
    size: str = "demo",
    steps: int | None = None,
    fresh: bool = False,
    seed: int = 0,
    log=print,
) -> dict:
  """Runs (or reuses) every stage and writes `<workdir>/summary.md`; returns the summary data.

  `seed` feeds every seed of the run: the world's generation, each model's initialisation,
  masking and data order (the students of the transfer experiment take `100 seed + k`)."""
  if size not in SIZES:
    raise errors.DataError(f"unknown demo size {size!r}; known: {sorted(SIZES)}")
  sizes = SIZES[size]
  if steps is not None:
    if steps <= 0:
      raise errors.DataError(f"--steps must be positive, got {steps}")
    sizes = dataclasses.replace(sizes, teacher_steps=steps, distill_steps=steps)
  workdir = os.path.abspath(workdir)
  if fresh:
    for name in STAGES:
      shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
  os.makedirs(workdir, exist_ok=True)
  claim_workdir(workdir, {"size": size, "seed": seed, "steps": steps}, fresh=fresh)
  started = time.perf_counter()
  runner = StageRunner(workdir, len(STAGES) + 1, log)
  log(f"VidLanKD demo ({size}, seed {seed}): every stage at tiny size in {workdir}")

  data_settings = ("videos", "validation_videos", "concepts", "articles", "student_sentences")
  runner.run(
      "data",
      "data: Wikipedia text, the generated world (video-text pairs, student text), polarity",
      {**{k: getattr(sizes, k) for k in data_settings}, "seed": seed},
      lambda d: make_data(d, sizes, seed, log),
  )
  tcfg = teacher_config(workdir, sizes, seed=seed)
  runner.run(
      "teacher",
      f"teacher pretraining on the world's video-text pairs ({tcfg.train.steps} steps)",
      config_settings(tcfg),
      lambda d: run_stage_config(tcfg, d),
      after=("data",),
      resumable=True,
  )
  shuffled_cfg = teacher_config(workdir, sizes, seed=seed, pairs="video_shuffled")
  runner.run(
      "teacher_shuffled",
      f"control teacher on the same world with shuffled pairs ({tcfg.train.steps} steps)",
      config_settings(shuffled_cfg),
      lambda d: run_stage_config(shuffled_cfg, d),
      after=("data",),
      resumable=True,
  )
  transfer_settings = ("transfer_steps", "transfer_seeds", "transfer_objectives")

  def transfer_stage(stage_dir):
    return json_ready(
        transfer.run_experiment(
            os.path.join(runner.stage_dir("data"), WORLD),
            {
                "video": runner.stage_dir("teacher"),
                "video_shuffled": runner.stage_dir("teacher_shuffled"),
            },
            stage_dir,
            steps=sizes.transfer_steps,
            num_seeds=sizes.transfer_seeds,
            objectives=("nst", *sizes.transfer_objectives),
            seed=seed,
            log=log,
        )
    )

  runner.run(
      "transfer",
      "transfer experiment: students on the world's text, attributes of held-out concepts",
      {**{k: getattr(sizes, k) for k in transfer_settings}, "seed": seed},
      transfer_stage,
      after=("data", "teacher", "teacher_shuffled"),
  )
  scfgs = {
      "nst": student_config(workdir, sizes, "nst", seed=seed),
      "base": student_config(workdir, sizes, "none", seed=seed),
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
        resumable=True,
    )
  for name in ("nst", "base"):
    cfg = finetune_config(workdir, sizes, STUDENTS[name], seed=seed)
    runner.run(
        f"finetune_{name}",
        f"fine-tuning the {name} student on movie-review polarity " f"(seeds {cfg.seeds})",
        config_settings(cfg),
        lambda d, cfg=cfg: finetune_stage(cfg, d),
        after=("data", STUDENTS[name]),
        resumable=True,
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
            concepts=tuple(records_world(runner)["concepts"]),
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
      workdir, runner.records, steps=steps, seed=seed, total_seconds=time.perf_counter() - started
  )
  with open(summary_path, encoding="utf-8") as f:
    log("\n" + f.read())
  log(f"demo finished in {time.perf_counter() - started:.0f} s; summary: {summary_path}")
  return {name: dataclasses.asdict(record) for name, record in runner.records.items()}
