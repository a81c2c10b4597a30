"""Tests for tools/plot_metrics.py: reading metrics.jsonl, the panels drawn, the PNG and the CLI."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "plot_metrics.py"

_spec = importlib.util.spec_from_file_location("plot_metrics", TOOL)
plot_metrics = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_metrics)


def write_metrics(workdir, records, tail=""):
  workdir.mkdir(parents=True, exist_ok=True)
  text = "".join(json.dumps(r) + "\n" for r in records) + tail
  (workdir / "metrics.jsonl").write_text(text)
  return workdir


def train_records(steps, loss_offset=0.0, nst=False):
  records = []
  for step in steps:
    record = {
        "step": step,
        "train/loss": 5.0 - 0.02 * step + loss_offset,
        "train/mlm_loss": 4.5 - 0.02 * step + loss_offset,
        "train/learning_rate": 1e-4 * min(1.0, step / 20),
        "train/examples_per_second": 512.0 + step % 7,
    }
    if nst:
      record["train/nst_loss"] = -0.1 - 0.001 * step
    records.append(record)
    if step % 50 == 0 and step:
      records.append({"step": step, "eval/mlm_accuracy": 0.2 + step / 1000, "stage": "eval"})
  return records


@pytest.fixture
def runs(tmp_path):
  """A baseline run, and a KD run that was resumed from step 60 after being preempted at step 75."""
  baseline = write_metrics(tmp_path / "baseline", train_records(range(0, 101, 5)))
  kd_records = train_records(range(0, 76, 5), loss_offset=1.0, nst=True)
  kd_records += train_records(range(60, 101, 5), nst=True)  # Steps 60-75 again: these values win.
  kd_records += [{"step": 100, "eval/recall@1": 0.4}]
  kd = write_metrics(
      tmp_path / "kd", kd_records, tail='{"step": 105, "train/lo'
  )  # Still being written.
  return {"baseline": str(baseline), "kd": str(kd)}


def test_read_metrics_keeps_the_last_value_of_a_repeated_step(runs):
  metrics = plot_metrics.read_metrics(runs["kd"])
  assert sorted(metrics) == [
      "eval/mlm_accuracy",
      "eval/recall@1",
      "train/examples_per_second",
      "train/learning_rate",
      "train/loss",
      "train/mlm_loss",
      "train/nst_loss",
  ]  # The text value of "stage" and the unfinished last line are left out.
  steps, values = metrics["train/loss"]
  np.testing.assert_array_equal(steps, np.arange(0, 101, 5))
  expected = 5.0 - 0.02 * steps + np.where(steps < 60, 1.0, 0.0)
  np.testing.assert_allclose(values, expected)
  np.testing.assert_array_equal(metrics["eval/mlm_accuracy"][0], [50, 100])
  np.testing.assert_array_equal(metrics["eval/recall@1"][1], [0.4])


def test_plot_runs_draws_one_panel_per_group_and_one_colour_per_run(runs, tmp_path):
  output = tmp_path / "plots" / "compare.png"
  panels = plot_metrics.plot_runs(runs, str(output), smooth=0.6, title="KD vs baseline")
  assert list(panels) == [
      "losses",
      "learning rate",
      "throughput",
      "eval/mlm_accuracy",
      "eval/recall@1",
  ]
  assert panels["learning rate"] == ["baseline", "kd"]
  assert panels["throughput"] == ["baseline", "kd"]
  assert panels["eval/mlm_accuracy"] == ["baseline", "kd"]
  assert panels["eval/recall@1"] == ["kd"]
  assert sorted(panels["losses"]) == [
      "baseline: loss",
      "baseline: mlm_loss",
      "kd: loss",
      "kd: mlm_loss",
      "kd: nst_loss",
  ]
  pixels = image.imread(output)
  assert pixels.shape[:2] == (680, 1500)  # 2 rows x 3 columns of 5 x 3.4 inch panels at 100 dpi
  assert pixels[..., :3].std() > 0.05


def test_metrics_filter_and_single_run(runs, tmp_path):
  output = tmp_path / "eval.png"
  panels = plot_metrics.plot_runs({"kd": runs["kd"]}, str(output), metrics=r"^eval/|nst")
  assert panels == {"losses": ["kd"], "eval/mlm_accuracy": ["kd"], "eval/recall@1": ["kd"]}
  assert image.imread(output).shape[:2] == (340, 1500)
  with pytest.raises(plot_metrics.MetricsError, match="no metric matches 'bleu'"):
    plot_metrics.plot_runs(runs, str(output), metrics="bleu")


def test_ema_is_bias_corrected_and_skips_nan():
  np.testing.assert_allclose(plot_metrics.ema(np.full(5, 3.0), 0.9), np.full(5, 3.0))
  smoothed = plot_metrics.ema(np.array([0.0, np.nan, 10.0]), 0.5)
  np.testing.assert_allclose(smoothed, [0.0, np.nan, 10.0 * 0.5 / 0.75])


@pytest.mark.parametrize(
    "lines, lineno, message",
    [
        (
            ['{"step": 1, "train/loss": 2.0}', '{"step": 2, "train/loss": 1.9', '{"step": 3}'],
            2,
            "not valid JSON",
        ),
        (['{"step": 1, "train/loss": 2.0}', "", '{"train/loss": 1.0}'], 3, "no integer 'step'"),
        (["[1, 2]"], 1, "expected a JSON object"),
    ],
)
def test_malformed_line_names_the_file_and_line(tmp_path, lines, lineno, message):
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  with pytest.raises(plot_metrics.MetricsError) as error:
    plot_metrics.read_metrics(str(tmp_path))
  assert str(error.value).startswith(f"{tmp_path / 'metrics.jsonl'}:{lineno}: {message}")


def test_missing_metrics_file(tmp_path):
  with pytest.raises(plot_metrics.MetricsError, match="metrics.jsonl: no such file"):
    plot_metrics.read_metrics(str(tmp_path))


def run_cli(*args):
  return subprocess.run(
      [sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=60
  )


def test_cli_plots_named_and_positional_runs(runs, tmp_path):
  output = tmp_path / "cli.png"
  result = run_cli(
      "--run", f"student={runs['kd']}", runs["baseline"], "--output", str(output), "--smooth", "0.9"
  )
  assert result.returncode == 0, result.stderr
  assert (
      "5 panels (losses, learning rate, throughput, eval/mlm_accuracy, eval/recall@1)"
      in result.stdout
  )
  assert "for runs student, baseline" in result.stdout
  assert image.imread(output).shape[:2] == (680, 1500)

  broken = write_metrics(tmp_path / "broken", [{"step": 1, "train/loss": 1.0}], tail="oops\n")
  failed = run_cli(str(broken), "--output", str(tmp_path / "broken.png"))
  assert failed.returncode == 1
  assert f"{broken / 'metrics.jsonl'}:2: not valid JSON" in failed.stderr
  assert run_cli("--run", "nameless", "--output", str(tmp_path / "x.png")).returncode == 2


@pytest.mark.parametrize("names", [["nst", "text_only", "shuffled_teacher", "untrained"], ["a"]])
def test_interval_plot_title_stays_inside_the_figure(tmp_path, names):
  """The transfer figure's long title wraps instead of running off the figure's edges."""
  from vidlankd_jax.evaluation import plots

  rows = {n: {"mean": 0.3, "ci95": [0.25, 0.4], "per_seed": [0.3, 0.32]} for n in names}
  title = (
      "Video-only attributes of held-out concepts, read from frozen students (mean, 95% CI, seeds)"
  )
  fig = plots.plot_intervals(rows, str(tmp_path / "bars.png"), reference=0.25, title=title)
  extent = fig.axes[0].title.get_window_extent(fig.canvas.get_renderer())
  assert extent.x0 >= 0 and extent.x1 <= fig.bbox.width, (extent, fig.bbox)
  assert image.imread(str(tmp_path / "bars.png")).shape[1] == int(fig.bbox.width)
