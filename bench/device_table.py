"""The device suite's table: one row per benchmark log (the JSON object on its last line).

python bench/device_table.py distill_step.log teacher_step.log
"""

from __future__ import annotations

import json
import sys


def last_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f if line.startswith("{")]
  if not lines:
    raise SystemExit(f"error: {path} has no result line (did the benchmark fail?)")
  return json.loads(lines[-1])


def number(value, digits: int) -> str:
  return "-" if value is None else f"{value:,.{digits}f}"


def row(result: dict) -> list[str]:
  if "student_size" in result:
    name = f"distillation {result['student_size']} (NST, teacher {result['teacher_size']})"
  else:
    name = f"teacher {result['size']} ({result['video_steps']} video steps)"
  mfu = result.get("mfu")
  return [
      name,
      result["device"],
      result["dtype"],
      str(result["batch"]),
      number(result["step_seconds"] * 1000, 1),
      number(result["tokens_per_second"], 0),
      "-" if mfu is None else f"{100 * mfu:.1f}%",
      number(result.get("peak_memory_gib"), 1),
      number(result.get("compile_seconds"), 1),
  ]


def main(paths: list[str]) -> str:
  header = [
      "step",
      "device",
      "dtype",
      "batch",
      "step ms",
      "tokens/s",
      "MFU",
      "peak GiB",
      "compile s",
  ]
  rows = [row(last_json(p)) for p in paths]
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  table = "\n".join(lines)
  print(table)
  return table


if __name__ == "__main__":
  main(sys.argv[1:])
