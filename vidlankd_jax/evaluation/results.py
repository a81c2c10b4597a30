"""Fine-tuning results: mean and spread over seeds, markdown tables, results.json."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
from etils import epath


def summarize(per_seed: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
  """Mean and sample standard deviation (0 for one seed) of each metric over seeds."""
  names = sorted(set().union(*(m.keys() for m in per_seed.values())))
  out = {}
  for name in names:
    values = np.asarray([m[name] for m in per_seed.values() if name in m], np.float64)
    out[name] = {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "n": len(values),
    }
  return out


def format_cell(stats: dict | None) -> str:
  """'mean ± std' with one decimal (metrics are percentages); the mean alone for one seed;
  '-' when missing."""
  if not stats or stats.get("mean") is None:
    return "-"
  if stats.get("n", 0) < 2 or stats.get("std") is None:
    return f"{stats['mean']:.1f}"
  return f"{stats['mean']:.1f} ± {stats['std']:.1f}"


def primary_metric_name(spec, primary: str) -> str:
  """`<first eval split>/<primary>`: the metric a comparison table shows for the task."""
  return f"{spec.eval_splits[0]}/{primary}" if spec.eval_splits else primary


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def results_markdown(results: dict) -> str:
  """The task's table: one row, a column per metric (mean ± std over seeds)."""
  names = list(results["summary"])
  header = ["task", "init", "seeds"] + names
  row = [results["task"], results["init"], str(len(results["seeds"]))]
  row += [format_cell(results["summary"][n]) for n in names]
  if results.get("majority_baseline"):
    header.append("majority baseline")
    row.append(f"{results['majority_baseline'].get(results['primary_metric'], float('nan')):.1f}")
  return markdown_table(header, [row])


def comparison_table(results: dict[str, dict[str, dict]], tasks: list[str]) -> str:
  """Rows: initial checkpoints; columns: tasks' primary metrics; cells mean ± std over seeds.

  `results[name][task]` is a results.json dict (missing runs show '-').
  """
  header, rows = ["init"], []
  for task in tasks:
    any_run = next((r[task] for r in results.values() if task in r), None)
    header.append(f"{task} ({any_run['primary_metric']})" if any_run else task)
  for name, by_task in results.items():
    rows.append(
        [name]
        + [
            format_cell(by_task[t]["summary"].get(by_task[t]["primary_metric"]))
            if t in by_task
            else "-"
            for t in tasks
        ]
    )
  return markdown_table(header, rows)


def json_safe(tree):
  """NaN (e.g. a metric over an empty subset) -> None, so results.json stays strict JSON."""
  if isinstance(tree, dict):
    return {k: json_safe(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [json_safe(v) for v in tree]
  return None if isinstance(tree, float) and math.isnan(tree) else tree


def write_results(workdir: str, results: dict) -> None:
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir)  # local folders and gs:// buckets alike
  path.mkdir(parents=True, exist_ok=True)
  (path / "results.json").write_text(
      json.dumps(json_safe(results), indent=2, sort_keys=True, allow_nan=False)
  )
  (path / "results.md").write_text(results_markdown(results))
