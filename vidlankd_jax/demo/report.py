"""The demo's report: loss curves, the grounding heatmap and `<workdir>/summary.md`."""

from __future__ import annotations

import os
import shutil

from vidlankd_jax import configlib
from vidlankd_jax.data import shards as shards_lib
from vidlankd_jax.evaluation import plots
from vidlankd_jax.evaluation.results import format_cell, markdown_table

CURVE_METRICS = r"^train/(loss|mlm_loss|contrastive_loss|nst_loss|mlm_accuracy)$"
PROBE_TRAINED = (
    "nst student, linear probe",
    "base student, linear probe",
    "untrained student, linear probe",
)


def number(value, digits: int = 3) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def teacher_table(teacher: dict) -> str:
  """Recall@k of the teacher's text-to-clip retrieval next to chance (k / number of clips)."""
  n = teacher["eval/retrieval_clips"]
  rows = [
      [f"recall@{k}", number(teacher[f"eval/recall@{k}"]), number(min(k / n, 1.0))]
      for k in (1, 5, 10)
  ]
  rows.append(["median rank", f"{teacher['eval/median_rank']:.0f}", f"{(n + 1) / 2:.0f}"])
  return markdown_table(["metric", "teacher", "chance"], rows)


def student_table(records) -> str:
  """NST student vs the baseline (and an untrained student) on every measure the demo takes."""
  nst, base = records["student_nst"].result, records["student_base"].result
  probe = records["probe"].result["rows"]
  n = records["probe"].result["test_clips"]
  ft = {k: records[f"finetune_{k}"].result for k in ("nst", "base")}
  metric = ft["nst"]["primary_metric"]
  rows = [
      [
          "MLM accuracy, held-out Wikipedia",
          number(nst["eval/mlm_accuracy"]),
          number(base["eval/mlm_accuracy"]),
          "-",
          "-",
      ],
      [
          "linear CKA with the teacher's token states",
          number(nst.get("eval/teacher_cka")),
          number(base.get("eval/teacher_cka")),
          "-",
          "-",
      ],
  ]
  for k in (1, 5):
    rows.append(
        [f"grounding probe recall@{k} (ridge map to clip vectors)"]
        + [number(probe[name][f"recall@{k}"]) for name in PROBE_TRAINED]
        + [number(min(k / n, 1.0))]
    )
  head = probe.get("nst student, NST head (zero-shot)")
  rows.append(
      [
          "grounding recall@1 through the NST head, zero-shot",
          number(head and head["recall@1"]),
          "no head",
          "-",
          number(1 / n),
      ]
  )
  rows.append(
      [
          f"movie polarity {metric} (%, mean ± std over seeds)",
          format_cell(ft["nst"]["summary"].get(metric)),
          format_cell(ft["base"]["summary"].get(metric)),
          "-",
          f"{ft['nst']['majority_baseline'].get(metric, float('nan')):.1f} (majority)",
      ]
  )
  return markdown_table(
      ["measure", "NST student", "baseline (text only)", "untrained", "chance"], rows
  )


TRANSFER_ORDER = ("nst", "text_only", "shuffled_teacher", "untrained")
TRANSFER_LABELS = {
    "nst": "NST student (distilled from the true-pair teacher)",
    "text_only": "text-only baseline (objectives=none)",
    "shuffled_teacher": "NST from the shuffled-pair teacher (control)",
    "untrained": "untrained student (initial weights)",
}


def transfer_table(transfer: dict) -> str:
  """The headline: held-out attribute accuracy per student, its interval and seeds, and chance."""
  names = [n for n in TRANSFER_ORDER if n in transfer["transfer"]]
  names[1:1] = [n for n in transfer["transfer"] if n not in TRANSFER_ORDER]
  rows = []
  for name in names:
    r = transfer["transfer"][name]
    label = TRANSFER_LABELS.get(name, f"{name} student (objectives={name})")
    rows.append(
        [
            label,
            number(r["mean"]),
            f"[{number(r['ci95'][0])}, {number(r['ci95'][1])}]",
            ", ".join(number(v) for v in r["per_seed"]),
        ]
    )
  rows.append(["chance (1 / classes)", number(transfer["chance"]), "-", "-"])
  rows.append(
      ["the teacher's own token states (ceiling)", number(transfer["teachers"]["video"]), "-", "-"]
  )
  rows.append(
      [
          "the shuffled-pair teacher's token states",
          number(transfer["teachers"]["video_shuffled"]),
          "-",
          "-",
      ]
  )
  return markdown_table(
      ["student", "held-out concepts: attribute accuracy", "95% CI", "per seed"], rows
  )


def difference_lines(transfer: dict) -> str:
  lines = []
  for name, d in transfer["differences"].items():
    lines.append(f"- {name}: {d['mean']:+.3f}, 95% CI [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
  return "\n".join(lines) + "\n"


def stages_table(records, total_seconds: float) -> str:
  rows = [
      [r.name, "reused" if r.reused else "ran", shards_lib.format_seconds(r.seconds)]
      for r in records.values()
  ]
  rows.append(["this run, all stages and report", "", shards_lib.format_seconds(total_seconds)])
  return markdown_table(["stage", "status", "time"], rows)


def example_lines(examples: list[dict]) -> str:
  lines = []
  for ex in examples:
    lines.append(f"- held-out clip #{ex['clip']}, caption \"{ex['caption']}\"")
    for who in ("teacher", "NST student (head)"):
      top = "; ".join(f"#{t['clip']} ({t['score']:.2f}) \"{t['caption']}\"" for t in ex[who])
      lines.append(f"  - {who}: {top}")
  return "\n".join(lines) + "\n"


def write_report(workdir: str, records, *, steps: dict, total_seconds: float, seed: int = 0) -> str:
  """Writes results.json, transfer.png, transfer_tokens.png, loss_curves.png, grounding.png and
  summary.md into `workdir`; returns summary.md."""
  transfer = records["transfer"].result
  for name in ("transfer.png", "transfer_tokens.png"):
    shutil.copyfile(os.path.join(workdir, "transfer", name), os.path.join(workdir, name))
  shards_lib.write_json_atomic(
      os.path.join(workdir, "results.json"),
      {
          "transfer": transfer["transfer"],
          "chance": transfer["chance"],
          "teachers": transfer["teachers"],
          "differences": transfer["differences"],
          "seed": seed,
          "student_seeds": transfer["seeds"],
          "student_steps": transfer["steps"],
          "held_out_concepts": transfer["held_out_concepts"],
          "probe": transfer["probe"],
      },
  )
  curves = os.path.join(workdir, "loss_curves.png")
  plots.plot_runs(
      {
          "teacher": os.path.join(workdir, "teacher"),
          "NST student": os.path.join(workdir, "student_nst"),
          "baseline student": os.path.join(workdir, "student_base"),
      },
      curves,
      metrics=CURVE_METRICS,
      smooth=0.6,
      title="VidLanKD demo: training curves",
  )
  heatmap = os.path.join(workdir, "grounding.png")
  shutil.copyfile(os.path.join(workdir, "probe", "grounding.png"), heatmap)
  data = records["data"].result
  probe = records["probe"].result
  layers, hidden, _, _ = configlib.MODEL_SIZES["tiny"]
  world = data["world"]
  text = f"""# VidLanKD demo

## Does video knowledge reach a text-only student?

{transfer_table(transfer)}
Held-out concepts: {transfer['held_out_concepts']} of {data['concepts']} (GENERATED world, seed
{seed}); each student {transfer['steps']} steps on the world's attribute-free text, seeds
{', '.join(str(s) for s in transfer['seeds'])}; 95% CI: percentile bootstrap over seeds and held-out concepts.
The concepts' shape, colour and motion exist only in the clips: the text never tells them, so a
student can only name them for concepts it never saw labelled if the teacher's token states
passed them on. Probe: {transfer['probe']}, fitted on sentences about the other concepts;
identical for every student. Paired differences with the text-only baseline (same seeds):

{difference_lines(transfer)}
Figures: `transfer.png` (the table as bars with intervals and seeds), `transfer_tokens.png`
(the probe's attribute scores for the concept word of held-out sentences, teacher and students
side by side; each row names the concept's true attributes).

Size: teacher {steps['teacher']} steps, each student {steps['student']} steps, tiny models
({layers} layers, {hidden} hidden). Numbers are what this run measured; tiny models trained for minutes show the
pipeline working, not the paper's figures.

Data:
- student text: REAL English Wikipedia (gensim's sample), {data['text_documents']['train']} train /
  {data['text_documents']['validation']} held-out articles, {data['text_blocks']['train']} / {data['text_blocks']['validation']} blocks of 126 word pieces;
- video-text pairs: GENERATED, not real video ({data['videos']} videos, {data['concepts']} concepts:
  clip features built from each concept's visual attributes plus noise, captions naming the
  concept inside real English sentences), {data['video_clips']['train']} train / {data['video_clips']['validation']} held-out clips, in HowTo100M's
  layout; a twin with the training captions dealt to the wrong clips trains the control teacher;
- the transfer students' text: GENERATED attribute-free sentences (real English word sequences
  with a concept word inserted), {world['text_blocks']['text/train']} blocks;
- downstream: REAL movie-review sentences with polarity labels (Pang & Lee, shipped with gensim),
  {data['polarity']['train']} train / {data['polarity']['validation']} validation.

## Teacher: text-to-clip retrieval over {probe['test_clips']} held-out clips

{teacher_table(records['teacher'].result)}
## Students: distilled with NST vs the text-only baseline (same text, steps and seed)

{student_table(records)}
How to read it. The grounding probe asks whether a student's text representations carry the
teacher's video knowledge: each held-out caption must find its own clip among all
{probe['test_clips']} held-out clips, scored against the teacher's clip vectors. The baseline has no
distillation head, so every student gets the same linear probe: a ridge map from its mean-pooled
last hidden states to the teacher's clip vectors, fitted on {probe['train_clips']} training clips
(penalty picked on a part of them) and scored on the held-out clips; an untrained student of the
same shape shows what the probe extracts from random features. The NST student can also be read
zero-shot through its distillation head. Linear CKA compares each student's hidden states with the
teacher's token states on held-out text (rotation- and scale-invariant, so it needs no head).
Movie polarity has {data['polarity']['validation']} validation sentences: one sentence is
{100 / max(data['polarity']['validation'], 1):.0f} points of accuracy.

## Example retrievals (held-out captions; top 3 clips with cosine scores)

{example_lines(probe['examples'])}
## Stages

{stages_table(records, total_seconds)}
Figures: `loss_curves.png` (training losses of the three Wikipedia-side runs), `grounding.png` (token-to-clip
cosine of a few held-out captions against clips labelled by the concept their caption names; the
teacher and the NST student through its head).
"""
  path = os.path.join(workdir, "summary.md")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)
  return path
