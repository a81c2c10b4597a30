"""Training curves of one or several runs from their `metrics.jsonl` files, drawn into a PNG.

Each run's workdir holds `metrics.jsonl`: one JSON object a line with an integer "step" and some
metrics ("train/loss", "train/learning_rate", "eval/recall@1", ...). After a resume a step can
appear again; its last value wins. The figure has one panel per metric group (training losses,
learning rate, throughput, then each other metric, e.g. every eval metric) and one colour per run.
Used by tools/plot_metrics.py and the demo.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vidlankd_jax import errors

METRICS_FILE = "metrics.jsonl"
LOSSES, LEARNING_RATE, THROUGHPUT = "losses", "learning rate", "throughput"
LINE_STYLES = ("-", "--", ":", "-.")


class MetricsError(errors.DataError):
  """A workdir without metrics, or a metrics file that cannot be read."""


def _read_text(path: str, workdir: str) -> str:
  """Reads a local file, or a remote one (gs://...) through TensorFlow's file system."""
  missing = MetricsError(f"{path}: no such file (is {workdir} the workdir of a run?)")
  if "://" in path:
    import tensorflow as tf  # Only for remote workdirs: importing TF costs seconds.

    if not tf.io.gfile.exists(path):
      raise missing
    with tf.io.gfile.GFile(path, "r") as f:
      return f.read()
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except FileNotFoundError:
    raise missing from None


def metrics_file(workdir: str) -> str:
  """The metrics file of a workdir (a path to a .jsonl file is taken as is)."""
  workdir = str(workdir)
  if workdir.endswith(".jsonl"):
    return workdir
  return workdir.rstrip("/") + "/" + METRICS_FILE


def read_metrics(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Reads a run's metrics as {name: (steps, values)}, steps sorted and unique (last value wins).

  Non-numeric values are skipped. Raises MetricsError, naming the file and line, for a missing
  file, a line that is not a JSON object with an integer "step", or a file without metrics. A
  last line that is not valid JSON and has no newline yet (the run is writing it) is left out.
  """
  path = metrics_file(workdir)
  lines = _read_text(path, workdir).split("\n")
  series: dict[str, dict[int, float]] = {}
  for lineno, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if lineno == len(lines):  # After the last newline: a line the run is still writing.
        break
      raise MetricsError(f"{path}:{lineno}: not valid JSON ({e.msg}): {line[:80]!r}") from None
    if not isinstance(record, dict):
      raise MetricsError(f"{path}:{lineno}: expected a JSON object, got {line[:80]!r}")
    step = record.get("step")
    if isinstance(step, float) and step.is_integer():
      step = int(step)
    if not isinstance(step, int) or isinstance(step, bool):
      raise MetricsError(f"{path}:{lineno}: no integer 'step' in {line[:80]!r}")
    for name, value in record.items():
      if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
        series.setdefault(name, {})[step] = float(value)
  if not series:
    raise MetricsError(f"{path}: no metrics")
  result = {}
  for name in sorted(series):
    steps = sorted(series[name])
    result[name] = (np.array(steps, dtype=np.int64), np.array([series[name][s] for s in steps]))
  return result


def metric_group(name: str) -> str:
  """The panel a metric is drawn in: a shared one for losses, learning rate and throughput."""
  lower = name.lower()
  if lower.startswith("eval/"):
    return name
  if "loss" in lower:
    return LOSSES
  if "learning_rate" in lower or lower.rsplit("/", 1)[-1] == "lr":
    return LEARNING_RATE
  if lower.endswith("examples_per_second") or "throughput" in lower:
    return THROUGHPUT
  return name


def _panel_order(title: str) -> tuple[int, str]:
  shared = {LOSSES: 0, LEARNING_RATE: 1, THROUGHPUT: 2}
  if title in shared:
    return shared[title], ""
  return (4 if title.lower().startswith("eval/") else 3), title


def ema(values: np.ndarray, weight: float) -> np.ndarray:
  """Exponential moving average with bias correction (as TensorBoard's smoothing); NaNs are skipped."""
  smoothed = np.full(len(values), np.nan)
  average, count = 0.0, 0
  for i, value in enumerate(values):
    if math.isfinite(value):
      average = weight * average + (1 - weight) * value
      count += 1
      smoothed[i] = average / (1 - weight**count)
  return smoothed


def plot_runs(
    runs: Mapping[str, str],
    output: str,
    metrics: str | None = None,
    smooth: float = 0.0,
    title: str | None = None,
) -> dict[str, list[str]]:
  """Plots the runs {name: workdir} into a PNG; returns {panel title: labels of its lines}.

  `metrics` is a regular expression that metric names must match (re.search); `smooth` in [0, 1)
  is the EMA weight for training curves (learning rate and eval metrics are drawn as they are).
  """
  if not runs:
    raise MetricsError("no runs to plot")
  if not 0.0 <= smooth < 1.0:
    raise ValueError(f"smooth must be in [0, 1), got {smooth}")
  pattern = re.compile(metrics) if metrics else None
  panels: dict[str, list[tuple[str, str]]] = {}  # title -> [(run, metric)]
  data = {}
  for run, workdir in runs.items():
    data[run] = read_metrics(workdir)
    for name in data[run]:
      if pattern is None or pattern.search(name):
        panels.setdefault(metric_group(name), []).append((run, name))
  if not panels:
    raise MetricsError(f"no metric matches {metrics!r} in runs {', '.join(runs)}")

  titles = sorted(panels, key=_panel_order)
  ncols = min(3, len(titles))
  nrows = math.ceil(len(titles) / ncols)
  fig = Figure(figsize=(5.0 * ncols, 3.4 * nrows), dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  if title:
    fig.suptitle(title)
  colors = {run: f"C{i % 10}" for i, run in enumerate(runs)}
  drawn = {}
  for index, panel in enumerate(titles):
    ax = fig.add_subplot(nrows, ncols, index + 1)
    names = sorted({name for _, name in panels[panel]})
    styles = {name: LINE_STYLES[i % len(LINE_STYLES)] for i, name in enumerate(names)}
    smooth_panel = smooth > 0 and panel != LEARNING_RATE and not panel.lower().startswith("eval/")
    labels = []
    for run, name in panels[panel]:
      steps, values = data[run][name]
      label = run if len(names) == 1 else f"{run}: {name.removeprefix('train/')}"
      style = dict(color=colors[run], linestyle=styles[name])
      if smooth_panel:
        ax.plot(steps, values, alpha=0.25, linewidth=0.8, **style)
        values = ema(values, smooth)
      marker = "o" if len(steps) <= 20 else None
      ax.plot(steps, values, label=label, marker=marker, markersize=3, **style)
      labels.append(label)
    ax.set_title(panel)
    ax.set_xlabel("step")
    if panel == LEARNING_RATE:
      ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    drawn[panel] = labels
  directory = os.path.dirname(os.path.abspath(output))
  os.makedirs(directory, exist_ok=True)
  fig.savefig(output)
  return drawn


def plot_intervals(
    rows: Mapping[str, Mapping],
    output: str,
    *,
    reference: float | None = None,
    reference_label: str = "chance",
    ylabel: str = "",
    title: str | None = None,
) -> Figure:
  """Bars of `rows` {name: {"mean", "ci95": [lo, hi], "per_seed": [...]}} with their intervals
  as error bars and the seeds as dots; `reference` (e.g. chance) as a dashed line. The title
  wraps to the figure's width. Returns the figure (saved to `output`)."""
  if not rows:
    raise ValueError("no rows to plot")
  names = list(rows)
  fig = Figure(figsize=(max(5.0, 1.1 * len(names) + 1.5), 3.6), dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  means = np.asarray([rows[n]["mean"] for n in names])
  low = np.asarray([rows[n]["ci95"][0] for n in names])
  high = np.asarray([rows[n]["ci95"][1] for n in names])
  x = np.arange(len(names))
  ax.bar(x, means, color=[f"C{i % 10}" for i in x], alpha=0.75)
  ax.errorbar(x, means, yerr=[means - low, high - means], fmt="none", ecolor="black", capsize=4)
  for i, name in enumerate(names):
    seeds = rows[name].get("per_seed", [])
    ax.plot([i] * len(seeds), seeds, "o", color="black", markersize=3, alpha=0.6)
  if reference is not None:
    ax.axhline(reference, color="gray", linestyle="--", label=reference_label)
    ax.legend(fontsize="small")
  ax.set_xticks(x, names, rotation=20, ha="right")
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title, fontsize="medium", wrap=True)
  ax.grid(axis="y", alpha=0.3)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  fig.savefig(output)
  return fig
