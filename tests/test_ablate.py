"""`vidlankd ablate`: the grid, its local run at test size, and the pod commands at real size."""

import json
import os

import numpy as np
import pytest
from matplotlib import image

from vidlankd_jax import cli
from vidlankd_jax.demo import ablate


def test_the_grid_varies_each_axis_alone_around_the_reference():
  size = ablate.LOCAL_SIZES["demo"]
  cells = ablate.grid(size)
  reference = ablate.Cell("nst", "tiny", 1.0)
  assert cells[0] == reference and len(set(cells)) == len(cells)
  for cell in cells:
    changed = [
        f
        for f in ("objective", "teacher_size", "text_fraction")
        if getattr(cell, f) != getattr(reference, f)
    ]
    # The text-only baseline is also shown at each text amount.
    assert len(changed) <= 1 or (
        cell.objective == "none" and changed == ["objective", "text_fraction"]
    )
  assert {c.objective for c in cells} == set(size.objectives)
  assert {c.teacher_size for c in cells} == set(size.teacher_sizes)
  assert {c.text_fraction for c in cells} == set(size.text_fractions)


def test_real_sizes_print_pod_commands(capsys):
  assert cli.main(["ablate", "--workdir", "unused", "--size", "base"]) == 0
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("./tpu_launch.sh")]
  assert any("configs/teacher.py:size=base" in l for l in lines)
  students = [l for l in lines if "configs/distill.py" in l]
  assert len(students) == 3 * len(
      ablate.grid(
          ablate.AblationSize(
              0,
              0,
              0,
              0,
              0,
              3,
              ("nst", "ntxent", "cos", "mse", "kd", "none"),
              ("base", "small"),
              (0.1, 1.0),
          )
      )
  )
  assert all("-- python -m vidlankd_jax.main" in l for l in lines)
  assert not os.path.exists("unused")


@pytest.mark.slow
def test_the_local_grid_runs_every_cell_and_writes_table_and_figure(tmp_path):
  result = ablate.run_ablation(str(tmp_path), size="test", log=lambda *_: None)
  cells = ablate.grid(ablate.LOCAL_SIZES["test"])
  assert set(result["cells"]) == {c.name for c in cells}
  for row in result["cells"].values():
    assert 0.0 <= row["ci95"][0] <= row["mean"] <= row["ci95"][1] <= 1.0
  with open(tmp_path / "ablation.json", encoding="utf-8") as f:
    assert json.load(f)["cells"] == result["cells"]
  table = (tmp_path / "ablation.md").read_text()
  assert all(c.name in table for c in cells) and "Chance: 0.250" in table
  pixels = image.imread(os.path.join(tmp_path, "ablation.png"))
  assert min(pixels.shape[:2]) > 200 and np.ptp(pixels) > 0
