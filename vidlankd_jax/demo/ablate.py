"""`vidlankd ablate`: the paper's ablations as a grid of distillation runs on the generated world.

  vidlankd ablate --workdir runs/ablate              # the grid here, tiny models (CPU minutes)
  vidlankd ablate --workdir runs/ablate --size test  # one seed, few steps (seconds per cell)
  vidlankd ablate --workdir runs/ablate --size base  # prints the pod commands instead

Axes (each varied alone around the reference cell: NST, tiny teacher, all the text):
  objective     the KD objectives (`configs/distill.py` names) and `none`, the text-only baseline
  teacher size  the teacher's language encoder size (its own teacher run on the world's pairs)
  text amount   the fraction of the student's text (distinct sentences; same steps)
Every cell is a distillation run through `vidlankd_jax.main.run` per seed, scored by the transfer
probe of `demo/transfer.py` (held-out concepts' attributes from the frozen student); the table
(`ablation.md`, `ablation.json`) gives mean and 95% bootstrap interval, `ablation.png` the bars.
"""

from __future__ import annotations

import dataclasses
import os
import time

from vidlankd_jax import errors
from vidlankd_jax.data import shards as shards_lib
from vidlankd_jax.demo import stage_configs
from vidlankd_jax.demo import stages as stages_lib
from vidlankd_jax.demo import transfer
from vidlankd_jax.demo.pipeline import config_settings


@dataclasses.dataclass(frozen=True)
class AblationSize:
  concepts: int
  videos: int
  student_sentences: int
  teacher_steps: int
  student_steps: int
  seeds: int
  objectives: tuple[str, ...]
  teacher_sizes: tuple[str, ...]
  text_fractions: tuple[float, ...]


LOCAL_SIZES = {
    "demo": AblationSize(
        concepts=48,
        videos=1000,
        student_sentences=16000,
        teacher_steps=400,
        student_steps=transfer.STUDENT_STEPS,
        seeds=3,
        objectives=("nst", "cos", "mse", "ntxent", "none"),
        teacher_sizes=("tiny", "mini"),
        text_fractions=(0.1, 1.0),
    ),
    "test": AblationSize(
        concepts=16,
        videos=128,
        student_sentences=1000,
        teacher_steps=8,
        student_steps=4,
        seeds=1,
        objectives=("nst",),
        teacher_sizes=("tiny", "mini"),
        text_fractions=(0.5, 1.0),
    ),
}
POD_SIZES = ("small", "base")


@dataclasses.dataclass(frozen=True)
class Cell:
  objective: str
  teacher_size: str
  text_fraction: float

  @property
  def name(self) -> str:
    return f"{self.objective}/teacher_{self.teacher_size}/text_{self.text_fraction:g}"

  @property
  def folder(self) -> str:
    return self.name.replace("/", "-")


def grid(size: AblationSize) -> list[Cell]:
  """The reference cell and each axis varied alone around it."""
  reference = Cell("nst", size.teacher_sizes[0], size.text_fractions[-1])
  cells = [dataclasses.replace(reference, objective=o) for o in size.objectives]
  cells += [dataclasses.replace(reference, teacher_size=t) for t in size.teacher_sizes]
  for fraction in size.text_fractions:
    cells += [
        dataclasses.replace(reference, text_fraction=fraction),
        dataclasses.replace(reference, objective="none", text_fraction=fraction),
    ]
  return list(dict.fromkeys(cells))


def pod_commands(size: str, seed: int) -> list[str]:
  """The grid at a real size as `tpu_launch.sh` commands (teachers first, then students)."""
  lines = [
      "# The ablation grid at real size: run on a pod (see docs/scale.md).",
      "# Text amount: make each fraction's corpus with tools/make_text_tfrecords.py from the same",
      "# dump cut to that fraction, into $BUCKET/text_<fraction>.",
  ]
  sizes = ("small", "base") if size == "base" else ("mini", "small")
  for teacher_size in sizes:
    lines.append(
        f"./tpu_launch.sh run --workdir $BUCKET/teacher_{teacher_size} -- python -m "
        f"vidlankd_jax.main --config=configs/teacher.py:size={teacher_size} "
        f"--config.data.data_dir=$BUCKET --config.seed={seed}"
    )
  cells = grid(
      AblationSize(
          0, 0, 0, 0, 0, 3, ("nst", "ntxent", "cos", "mse", "kd", "none"), sizes[::-1], (0.1, 1.0)
      )
  )
  for cell in cells:
    for s in range(3):
      data = "$BUCKET" if cell.text_fraction == 1.0 else f"$BUCKET/text_{cell.text_fraction:g}"
      lines.append(
          f"./tpu_launch.sh run --workdir $BUCKET/ablate/{cell.folder}/seed{s} -- python -m "
          f"vidlankd_jax.main --config=configs/distill.py:size={size},"
          f"teacher_size={cell.teacher_size},objectives={cell.objective},data=wikipedia "
          f"--config.teacher.workdir=$BUCKET/teacher_{cell.teacher_size} "
          f"--config.data.data_dir={data} --config.seed={seed * 100 + s}"
      )
  return lines


def table(rows: dict, chance: float) -> str:
  from vidlankd_jax.evaluation.results import markdown_table

  body = [
      [
          name,
          f"{r['mean']:.3f}",
          f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]",
          str(len(r["per_seed"])),
      ]
      for name, r in rows.items()
  ]
  return (
      markdown_table(
          ["objective / teacher / text", "held-out attribute accuracy", "95% CI", "seeds"], body
      )
      + f"\nChance: {chance:.3f}.\n"
  )


def run_ablation(workdir: str, *, size: str = "demo", seed: int = 0, log=print) -> dict | None:
  """Runs the grid (local sizes) or prints its pod commands (real sizes)."""
  if size in POD_SIZES:
    log("\n".join(pod_commands(size, seed)))
    return None
  if size not in LOCAL_SIZES:
    raise errors.DataError(
        f"unknown ablation size {size!r}; known: {sorted(LOCAL_SIZES) + list(POD_SIZES)}"
    )
  from vidlankd_jax import main as main_lib
  from vidlankd_jax.data import vocab as vocab_lib
  from vidlankd_jax.data import world as world_lib
  from vidlankd_jax.evaluation import plots

  sizes = LOCAL_SIZES[size]
  workdir = os.path.abspath(workdir)
  started = time.perf_counter()
  cells = grid(sizes)
  runner = stages_lib.StageRunner(workdir, 2 + len(sizes.teacher_sizes) + len(cells), log)
  world_dir = os.path.join(workdir, "world")
  fractions = sorted({c.text_fraction for c in cells})
  runner.run(
      "world",
      "the generated world (concepts with visual attributes, pairs, student text)",
      {**dataclasses.asdict(sizes), "seed": seed},
      lambda d: world_lib.write_world(
          d,
          num_concepts=sizes.concepts,
          num_videos=sizes.videos,
          num_validation_videos=40,
          student_sentences=sizes.student_sentences,
          text_fractions=fractions,
          probe_per_concept=6,
          word_budget=16,
          max_steps=16,
          vocab_file=vocab_lib.default_vocab_file(),
          seed=seed,
          log=log,
      ),
  )
  teachers = {}
  for teacher_size in sizes.teacher_sizes:
    config = stage_configs.teacher_config(
        os.path.join(world_dir, "video"), sizes.teacher_steps, teacher_size, seed=seed
    )
    teachers[teacher_size] = runner.run(
        f"teacher_{teacher_size}",
        f"{teacher_size} teacher on the world's video-text pairs",
        config_settings(config),
        lambda d, c=config: {k: float(v) for k, v in main_lib.run(c, d).items()},
        after=("world",),
    )

  def cell_stage(cell: Cell):
    def fn(stage_dir):
      configs, workdirs = [], []
      for s in range(sizes.seeds):
        config = stage_configs.student_config(
            os.path.join(world_dir, world_lib.text_folder(cell.text_fraction)),
            runner.stage_dir(f"teacher_{cell.teacher_size}"),
            cell.objective,
            steps=sizes.student_steps,
            seed=seed * 100 + s,
            teacher_size=cell.teacher_size,
            kd_weight_scale=transfer.KD_WEIGHT_SCALE,
        )
        run_dir = os.path.join(stage_dir, f"seed{s}")
        main_lib.run(config, run_dir)
        configs.append(config)
        workdirs.append(run_dir)
      scores = transfer.evaluate_runs(world_dir, {}, {cell.name: workdirs}, {cell.name: configs})
      per_seed = scores["students"][cell.name]
      return {"per_concept": [s.tolist() for s in per_seed]}

    return fn

  for cell in cells:
    runner.run(
        cell.folder,
        f"cell {cell.name}: {sizes.seeds} seed(s) of {sizes.student_steps} steps",
        {"cell": dataclasses.asdict(cell), "sizes": dataclasses.asdict(sizes), "seed": seed},
        cell_stage(cell),
        after=("world", f"teacher_{cell.teacher_size}"),
    )
  import numpy as np

  world, _ = world_lib.read_world(world_dir)
  rows = {
      cell.name: transfer.summarize(
          [np.asarray(s) for s in runner.records[cell.folder].result["per_concept"]], seed=seed
      )
      for cell in cells
  }
  chance = transfer.chance(world)
  shards_lib.write_json_atomic(
      os.path.join(workdir, "ablation.json"), {"cells": rows, "chance": chance, "size": size}
  )
  text = table(rows, chance)
  with open(os.path.join(workdir, "ablation.md"), "w", encoding="utf-8") as f:
    f.write(f"# VidLanKD ablation ({size}, seed {seed})\n\n{text}")
  plots.plot_intervals(
      rows,
      os.path.join(workdir, "ablation.png"),
      reference=chance,
      ylabel="held-out concepts: attribute accuracy",
      title="Ablation: transfer of video-only attributes (mean, 95% CI, seeds)",
  )
  log("\n" + text)
  log(
      f"ablation finished in {shards_lib.format_seconds(time.perf_counter() - started)}: {workdir}/ablation.md, ablation.png"
  )
  return {"cells": rows, "chance": chance}
