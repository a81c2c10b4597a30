"""`vidlankd demo` end to end at its test size: every stage, every artefact, reuse and redo."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image

from vidlankd_jax import cli
from vidlankd_jax import errors
from vidlankd_jax.demo import pipeline
from vidlankd_jax.demo import stages as stages_lib

pytestmark = pytest.mark.slow  # the whole demo at test size, end to end


def parse_tables(markdown: str) -> list[dict]:
  """Every markdown table of a document: {"header": [...], "rows": [[...], ...]}."""
  tables, lines = [], markdown.splitlines()
  i = 0
  while i < len(lines):
    if lines[i].startswith("|") and i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: "):
      cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]
      header, rows = cells(lines[i]), []
      i += 2
      while i < len(lines) and lines[i].startswith("|"):
        rows.append(cells(lines[i]))
        assert len(rows[-1]) == len(header), lines[i]
        i += 1
      tables.append({"header": header, "rows": rows})
    else:
      i += 1
  return tables


def all_finite(tree) -> bool:
  if isinstance(tree, dict):
    return all(all_finite(v) for v in tree.values())
  if isinstance(tree, list):
    return all(all_finite(v) for v in tree)
  return not isinstance(tree, float) or math.isfinite(tree)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """One demo run at test size, then a second run of the same command (everything reused)."""
  workdir = str(tmp_path_factory.mktemp("demo"))
  first_log, second_log = [], []
  first = pipeline.run_demo(workdir, size="test", log=first_log.append)
  with open(os.path.join(workdir, "summary.md"), encoding="utf-8") as f:
    first_summary = f.read()
  second = pipeline.run_demo(workdir, size="test", log=second_log.append)
  return workdir, first, second, "\n".join(first_log), "\n".join(second_log), first_summary


def test_every_stage_runs_and_says_what_is_generated(demo):
  workdir, first, _, log, _, _ = demo
  assert list(first) == list(pipeline.STAGES)
  assert not any(record["reused"] for record in first.values())
  for name in pipeline.STAGES:
    assert stages_lib.read_marker(os.path.join(workdir, name)) is not None, name
  assert log.count("\n=== [") == len(pipeline.STAGES) + 1  # a banner per stage and the report
  assert "GENERATED" in log and "It is not real video" in log
  data = first["data"]["result"]
  assert data["text_blocks"]["train"] > 0 and data["text_blocks"]["validation"] > 0
  assert data["video_clips"]["train"] > 0 and data["video_clips"]["validation"] > 0
  assert data["polarity"] == {"train": 150, "validation": 50}


def test_metrics_are_finite_and_the_comparison_is_complete(demo):
  _, first, _, _, _, _ = demo
  assert all_finite({name: record["result"] for name, record in first.items()})
  teacher = first["teacher"]["result"]
  assert (
      0.0
      <= teacher["eval/recall@1"]
      <= teacher["eval/recall@5"]
      <= teacher["eval/recall@10"]
      <= 1.0
  )
  for name in ("student_nst", "student_base"):  # the baseline is compared with the teacher too
    assert 0.0 <= first[name]["result"]["eval/teacher_cka"] <= 1.0
  assert "eval/nst_loss" in first["student_nst"]["result"]
  assert "eval/nst_loss" not in first["student_base"]["result"]
  rows = first["probe"]["result"]["rows"]
  assert set(rows) == {
      "teacher (zero-shot)",
      "nst student, NST head (zero-shot)",
      "nst student, linear probe",
      "base student, linear probe",
      "untrained student, linear probe",
  }
  # The teacher's own ranking in the probe is the one its evaluation computed on the same clips.
  assert rows["teacher (zero-shot)"]["recall@5"] == pytest.approx(
      teacher["eval/recall@5"], abs=1e-6
  )
  for name in ("nst", "base"):
    result = first[f"finetune_{name}"]["result"]
    assert 0.0 <= result["summary"]["validation/accuracy"]["mean"] <= 100.0
    assert result["train_examples"] == 150


def test_artefacts_are_valid(demo):
  workdir, _, _, _, _, summary = demo
  for name in ("loss_curves.png", "grounding.png", "transfer.png", "transfer_tokens.png"):
    pixels = image.imread(os.path.join(workdir, name))
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 200 and np.ptp(pixels) > 0, name
  tables = parse_tables(summary)
  assert [t["header"][:2] for t in tables] == [
      ["student", "held-out concepts: attribute accuracy"],
      ["metric", "teacher"],
      ["measure", "NST student"],
      ["stage", "status"],
  ]
  transfer_rows, teacher, students, stage_rows = tables
  assert [r[0].split(" ")[0] for r in transfer_rows["rows"][:4]] == [
      "NST",
      "text-only",
      "NST",
      "untrained",
  ]
  for row in teacher["rows"] + students["rows"]:
    for cell in row[1:]:
      value = cell.split(" ")[0]
      if value not in ("-", "no"):
        assert math.isfinite(float(value)), row
  assert "held-out clip #" in summary  # the example retrievals
  assert [r[0] for r in stage_rows["rows"][:-1]] == list(pipeline.STAGES)
  assert {r[1] for r in stage_rows["rows"][:-1]} == {"ran"}


def test_results_json_holds_the_transfer_experiment(demo):
  workdir = demo[0]
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    results = json.load(f)
  assert set(results["transfer"]) == {"nst", "text_only", "shuffled_teacher", "untrained"}
  for name, row in results["transfer"].items():
    assert 0.0 <= row["ci95"][0] <= row["mean"] <= row["ci95"][1] <= 1.0, name
    assert len(row["per_seed"]) == pipeline.SIZES["test"].transfer_seeds, name
    assert all(0.0 <= v <= 1.0 for v in row["per_seed"]), name
  assert results["chance"] == pytest.approx(0.25)  # four classes per attribute
  assert results["seed"] == 0


def test_the_seed_reaches_every_part_of_the_run(tmp_path):
  from vidlankd_jax.data import world as world_lib

  size = pipeline.SIZES["test"]
  assert world_lib.make_world(16, 3) != world_lib.make_world(16, 0)
  assert world_lib.make_world(16, 0) == world_lib.make_world(16, 0)
  for pairs in ("video", "video_shuffled"):
    assert pipeline.teacher_config(str(tmp_path), size, seed=3, pairs=pairs).seed == 3
  assert pipeline.student_config(str(tmp_path), size, "nst", seed=3).seed == 3
  assert pipeline.finetune_seeds("1,2,3", 0) == "1,2,3"
  assert pipeline.finetune_seeds("1,2,3", 3) == "10,11,12"


def test_a_rerun_reuses_every_finished_stage(demo):
  workdir, first, second, _, second_log, _ = demo
  assert all(record["reused"] for record in second.values())
  assert {n: r["run_id"] for n, r in second.items()} == {n: r["run_id"] for n, r in first.items()}
  assert second_log.count("reusing the finished stage") == len(pipeline.STAGES)
  tables = parse_tables(open(os.path.join(workdir, "summary.md"), encoding="utf-8").read())
  assert {r[1] for r in tables[-1]["rows"][:-1]} == {"reused"}


def test_a_stage_that_did_not_finish_is_redone_through_the_command(demo, capfd):
  workdir, first, _, _, _, _ = demo
  marker = os.path.join(workdir, "probe", stages_lib.MARKER)
  os.remove(marker)  # as if the probe had crashed before finishing
  assert cli.main(["demo", "--workdir", workdir, "--size", "test"]) == 0
  # The probe restores the teacher and the students: no library log lines on the way.
  output = "\n".join(capfd.readouterr())
  assert "reusing the finished stage" in output
  for noise in ("I0000", "W0000", "absl", "cudart"):
    assert noise not in output, output
  redone = stages_lib.read_marker(os.path.join(workdir, "probe"))
  assert redone["run_id"] != first["probe"]["run_id"]
  for name in pipeline.STAGES[:-1]:
    assert stages_lib.read_marker(os.path.join(workdir, name))["run_id"] == first[name]["run_id"]


def test_stage_runner_keeps_changed_stages_and_redoes_broken_ones_and_their_dependents(tmp_path):
  calls = []

  def stage(name, value):
    def fn(stage_dir):
      calls.append(name)
      with open(os.path.join(stage_dir, "out.txt"), "w") as f:
        f.write(str(value))
      return {"value": value}

    return fn

  def run_all(a_value, log):
    runner = stages_lib.StageRunner(str(tmp_path), 2, log.append)
    runner.run("a", "stage a", {"v": a_value}, stage("a", a_value))
    runner.run("b", "stage b", {}, stage("b", 1), after=("a",))
    return runner.records

  run_all(1, [])
  assert calls == ["a", "b"]
  records = run_all(1, [])
  assert calls == ["a", "b"] and records["b"].reused and records["a"].result == {"value": 1}
  with pytest.raises(errors.ConfigError, match=r"a holds a finished run .* other settings \(v\)"):
    run_all(2, [])  # a's settings changed: its finished run is kept, not redone
  assert calls == ["a", "b"]
  os.remove(tmp_path / "a" / stages_lib.MARKER)  # as if a had not finished
  log = []
  run_all(2, log)  # a is redone, and b, which reads it
  assert calls == ["a", "b", "a", "b"] and "a stage it reads was redone" in "\n".join(log)
  with open(tmp_path / "b" / stages_lib.MARKER, "w") as f:
    f.write("{truncated")  # a marker cut short is no marker
  log = []
  run_all(2, log)
  assert calls[-1] == "b" and calls.count("a") == 2 and "did not finish" in "\n".join(log)


def test_the_command_imports_nothing_heavy_until_it_runs():
  # `vidlankd --help` must answer at once: the module alone imports no ML library.
  code = (
      "import sys, vidlankd_jax.cli; heavy = [m for m in ('jax', 'tensorflow', 'flax', 'seqio', "
      "'orbax', 'numpy', 'ml_collections') if m in sys.modules]; print(heavy)"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr
  assert set(cli.DEMO_SIZES) == set(pipeline.SIZES)


def test_bad_command_lines_are_refused():
  with pytest.raises(SystemExit):
    cli.main(["demo", "--workdir", "x", "--steps", "0"])
  with pytest.raises(SystemExit):
    cli.main(["demo"])
  with pytest.raises(ValueError, match="unknown demo size 'huge'"):
    pipeline.run_demo("unused", size="huge")
